"""GPU decode (NVDEC) against the CPU path on real videos: resized frames and S/14 fp32 features, per file.

For every video in --videos (and, with --transcode, copies of each re-encoded to HEVC 8 and 10-bit, VP9, MPEG-4
Part 2, AV1 10-bit, and H.264 stamped as phones do (a 1/1,000,000 time base, jittered durations, an edit list),
with FFmpeg's encoders, so one set of real footage covers several codecs and timestamp styles), both decoders produce
the job's clips (T frames, resized uint8); the tool reports the mean and largest absolute pixel difference,
the share of identical values, and the smallest cosine between the fp32 model's features of the two. Files NVDEC
refuses or fails on are rows too (status refused / failed, the fallback category and the reason), and the summary
counts them by category. Prints a table and writes JSON. Needs a GPU with NVDEC and PyNvVideoCodec.

  python tools/decode_parity.py --videos DIR --transcode --output parity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> (encoder, container, options, pixel format, timestamps: "rate" (1/fps, one per frame) or "phone")
TRANSCODES = {"hevc": ("libx265", "mp4", {"x265-params": "log-level=0"}, "yuv420p", "rate"),
              "hevc10": ("libx265", "mp4", {"x265-params": "log-level=0"}, "yuv420p10le", "rate"),
              "vp9": ("libvpx-vp9", "webm", {}, "yuv420p", "rate"),
              "mpeg4": ("mpeg4", "mp4", {"qscale": "3", "bf": "2"}, "yuv420p", "rate"),
              "av1": ("libsvtav1", "mkv", {}, "yuv420p10le", "rate"),
              "h264phone": ("libx264", "mp4", {"bf": "2"}, "yuv420p", "phone")}
PHONE_TIME_BASE = Fraction(1, 1_000_000)
PHONE_START_US = -100_000  # frames before 0: the mp4 muxer writes an edit list that cuts them


def phone_pts(count: int, rate: Fraction, seed: int = 0) -> list[int]:
    """Timestamps as phones write them: a 1/1,000,000 time base, durations jittering by +-3% around 1/rate, and a
    first frame before 0."""
    from iv2trt.decode.samples import jittered_pts

    step = 1_000_000 / float(rate)
    return [int(t) for t in jittered_pts(count, step, 0.03 * step, PHONE_START_US, seed)]


def transcode(src: Path, dst: Path, codec: str, options: dict, seconds: float, pix_fmt: str = "yuv420p",
              timing: str = "rate") -> Path:
    """The first `seconds` of src re-encoded with `codec` in `pix_fmt` (frame size, rate and colour tags kept);
    `timing="phone"` stamps the frames as a phone does (phone_pts)."""
    import av

    from iv2trt.decode.pyav import video_stream
    from iv2trt.decode.samples import scheduling_kept

    if dst.is_file():
        return dst
    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    with scheduling_kept(), av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        s_in = video_stream(inp)
        cc = s_in.codec_context
        s_out = out.add_stream(codec, rate=s_in.average_rate or 30, options=options)
        rate = s_in.average_rate or 30
        time_base = PHONE_TIME_BASE if timing == "phone" else Fraction(1) / rate
        s_out.codec_context.time_base = time_base
        s_out.width, s_out.height, s_out.pix_fmt = cc.width, cc.height, pix_fmt
        s_out.codec_context.colorspace, s_out.codec_context.color_range = cc.colorspace, cc.color_range
        count = int(seconds * rate)
        pts = phone_pts(count, rate) if timing == "phone" else range(count)
        for n, frame in enumerate(inp.decode(s_in)):
            if n >= count:
                break
            frame = frame.reformat(format=pix_fmt)
            frame.pts, frame.time_base = pts[n], time_base
            for packet in s_out.encode(frame):
                out.mux(packet)
        for packet in s_out.encode():
            out.mux(packet)
    tmp.rename(dst)
    return dst


def stream_format(path: Path) -> str:
    """codec, pixel format, size and colour tags of a file's video stream, for the table."""
    import av

    from iv2trt.decode.pyav import video_stream

    try:
        with av.open(str(path)) as c:
            cc = video_stream(c).codec_context
            return f"{cc.name} {cc.pix_fmt} {cc.width}x{cc.height} cs{cc.colorspace} range{cc.color_range}"
    except Exception as exc:  # noqa: BLE001 - the row says the file is not readable
        return f"unreadable ({type(exc).__name__})"


def compare(path: Path, session, runner, w, img_size: int) -> dict:
    """NVDEC's clips of one file against the CPU path's: pixel differences and feature cosines. Raises NvdecError
    (or another exception) when the GPU path does not decode it, DecodeError when the CPU path does not."""
    import torch

    from iv2trt.compare import cosine_rows
    from iv2trt.decode.inputs import InputItem
    from iv2trt.decode.source import iter_clips

    gpu = []
    for _, frames, ready in session.clips("video", str(path)):
        ready.synchronize()
        gpu.append(frames)
    cpu = [f for _, f in iter_clips(InputItem(str(path), path.name, "video"), w, img_size)]
    a_cpu, t_gpu = np.stack(cpu), torch.stack(gpu)
    diff = np.abs(a_cpu.astype(np.int16) - t_gpu.cpu().numpy().astype(np.int16))
    f_cpu = np.concatenate([runner.infer_uint8(a_cpu[i:i + 8]) for i in range(0, len(a_cpu), 8)])
    f_gpu = np.concatenate([runner.infer_uint8(t_gpu[i:i + 8]) for i in range(0, len(t_gpu), 8)])
    return {"clips": len(cpu), "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max()),
            "identical": float((diff == 0).mean()), "min_cosine": float(cosine_rows(f_cpu, f_gpu).min())}


def parity_rows(videos: list[Path], session, runner, w, img_size: int) -> list[dict]:
    """One row per file, printed as it comes: its comparison when NVDEC decoded it; otherwise "refused" (NVDEC
    does not take it), "failed" (NVDEC broke on it) or "cpu_failed", with the fallback category and the reason.
    A file that does not go through NVDEC is reported and the next one taken."""
    from iv2trt.decode.clips import DecodeError
    from iv2trt.decode.fallbacks import NvdecError, NvdecUnsupported, fallback_category

    print("| file | format | status | clips | mean abs diff | max | identical | min cosine |", flush=True)
    rows = []
    for path in videos:
        started = time.perf_counter()
        row = {"file": path.name, "format": stream_format(path)}
        try:
            row.update(status="ok", **compare(path, session, runner, w, img_size))
        except NvdecError as exc:
            row.update(status="refused" if isinstance(exc, NvdecUnsupported) else "failed", category=exc.category,
                       reason=exc.reason)
        except DecodeError as exc:  # NVDEC decoded it, the CPU path did not
            row.update(status="cpu_failed", category=None, reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - a crash on the GPU path is that file's result; go on
            row.update(status="failed", category=fallback_category(exc), reason=f"{type(exc).__name__}: {exc}")
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        if row["status"] == "ok":
            print(f"| {row['file']} | {row['format']} | ok | {row['clips']} | {row['mean_abs_diff']:.4f} | "
                  f"{row['max_abs_diff']} | {100 * row['identical']:.3f}% | {row['min_cosine']:.7f} |", flush=True)
        else:
            why = f"{row['status']} ({row['category']})" if row["category"] else row["status"]
            print(f"| {row['file']} | {row['format']} | {why} | {row['reason']} | | | | |", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    from iv2trt.decode.fallbacks import count_fallbacks

    ok = [r for r in rows if r["status"] == "ok"]
    return {"videos": len(rows), "decoded_by_nvdec": len(ok),
            "fallbacks": count_fallbacks(r["category"] for r in rows if r["status"] in ("refused", "failed")),
            "cpu_failed": sum(r["status"] == "cpu_failed" for r in rows),
            "worst_mean_abs_diff": max((r["mean_abs_diff"] for r in ok), default=None),
            "worst_min_cosine": min((r["min_cosine"] for r in ok), default=None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    p.add_argument("--transcode", action="store_true",
                   help="also HEVC (8 and 10-bit), VP9, MPEG-4, AV1 (10-bit) and phone-style H.264 "
                        "(1/1,000,000 time base, jittered durations, an edit list, B-frames) copies of each video")
    p.add_argument("--transcode-seconds", type=float, default=10.0, help="length of the transcoded copies")
    p.add_argument("--work", default="/tmp/iv2trt_parity", help="where transcoded copies go")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--window-seconds", type=float, default=2.0, help="0: one clip per video")
    p.add_argument("--output", help="JSON file for the results")
    a = p.parse_args(argv)

    import torch

    from iv2trt.decode.clips import Windowing
    from iv2trt.decode.inputs import discover
    from iv2trt.decode.nvdec import NvdecSession, nvdec_unavailable
    from iv2trt.models import create_model
    from iv2trt.runners.torch_runner import TorchRunner

    reason = nvdec_unavailable()
    if reason:
        print(f"NVDEC cannot run here: {reason}", file=sys.stderr)
        return 4
    videos = [Path(i.path) for i in discover([a.videos], False) if i.kind == "video"]
    if a.transcode:
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
        for src in list(videos):
            for name, (codec, ext, options, pix_fmt, timing) in TRANSCODES.items():
                try:
                    videos.append(transcode(src, work / f"{src.stem}.{name}.{ext}", codec, options,
                                            a.transcode_seconds, pix_fmt, timing))
                except Exception as exc:  # noqa: BLE001 - a source FFmpeg cannot read is skipped, and said
                    print(f"skipping {src} ({name}): {exc}", file=sys.stderr)
    w = Windowing(a.frames, a.window_seconds or None)
    model = create_model("internvideo2_clip_s14", random_init=True, seed=0)
    runner = TorchRunner(model, device="cuda", precision="fp32")
    session = NvdecSession(0, w, model.cfg.img_size)
    rows = parity_rows(videos, session, runner, w, model.cfg.img_size)
    summary = {**summarize(rows), "gpu": torch.cuda.get_device_name(0),
               "model": "internvideo2_clip_s14 fp32, random weights (seed 0)", "windowing": str(w), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.output:
        Path(a.output).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
