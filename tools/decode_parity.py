"""GPU decode (NVDEC) against the CPU path on real videos: resized frames and S/14 fp32 features, per file.

For every video in --videos (and, with --transcode, copies of each re-encoded to HEVC, VP9 and MPEG-4
Part 2 with FFmpeg's encoders, so one set of real footage covers several codecs), both decoders produce
the job's clips (T frames, resized uint8); the tool reports the mean and largest absolute pixel difference,
the share of identical values, and the smallest cosine between the fp32 model's features of the two.
Prints a table and writes JSON. Needs a GPU with NVDEC and PyNvVideoCodec.

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

TRANSCODES = {"hevc": ("libx265", "mp4", {"x265-params": "log-level=0"}), "vp9": ("libvpx-vp9", "webm", {}),
              "mpeg4": ("mpeg4", "mp4", {"qscale": "3", "bf": "2"})}


def transcode(src: Path, dst: Path, codec: str, options: dict, seconds: float) -> Path:
    """The first `seconds` of src re-encoded with `codec` (frame size, rate and colour tags kept)."""
    import av

    if dst.is_file():
        return dst
    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        s_in = inp.streams.video[0]
        cc = s_in.codec_context
        s_out = out.add_stream(codec, rate=s_in.average_rate or 30, options=options)
        s_out.codec_context.time_base = Fraction(1) / (s_in.average_rate or 30)
        s_out.width, s_out.height, s_out.pix_fmt = cc.width, cc.height, "yuv420p"
        s_out.codec_context.colorspace, s_out.codec_context.color_range = cc.colorspace, cc.color_range
        rate = s_in.average_rate or 30
        for n, frame in enumerate(inp.decode(s_in)):
            if n >= seconds * rate:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = n, Fraction(1) / rate
            for packet in s_out.encode(frame):
                out.mux(packet)
        for packet in s_out.encode():
            out.mux(packet)
    tmp.rename(dst)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    p.add_argument("--transcode", action="store_true", help="also HEVC, VP9 and MPEG-4 copies of each video")
    p.add_argument("--transcode-seconds", type=float, default=10.0, help="length of the transcoded copies")
    p.add_argument("--work", default="/tmp/iv2trt_parity", help="where transcoded copies go")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--window-seconds", type=float, default=2.0, help="0: one clip per video")
    p.add_argument("--output", help="JSON file for the results")
    a = p.parse_args(argv)

    import torch

    from iv2trt.compare import cosine_rows
    from iv2trt.decode.clips import Windowing
    from iv2trt.decode.inputs import InputItem, discover
    from iv2trt.decode.nvdec import NvdecSession, nvdec_unavailable
    from iv2trt.decode.source import iter_clips
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
            for name, (codec, ext, options) in TRANSCODES.items():
                try:
                    videos.append(transcode(src, work / f"{src.stem}.{name}.{ext}", codec, options,
                                            a.transcode_seconds))
                except Exception as exc:  # noqa: BLE001 - a source FFmpeg cannot read is skipped, and said
                    print(f"skipping {src} ({name}): {exc}", file=sys.stderr)
    w = Windowing(a.frames, a.window_seconds or None)
    model = create_model("internvideo2_clip_s14", random_init=True, seed=0)
    runner = TorchRunner(model, device="cuda", precision="fp32")
    session = NvdecSession(0, w, model.cfg.img_size)
    rows = []
    for path in videos:
        started = time.perf_counter()
        cpu = [f for _, f in iter_clips(InputItem(str(path), path.name, "video"), w, model.cfg.img_size)]
        gpu = []
        for _, frames, ready in session.clips("video", str(path)):
            ready.synchronize()
            gpu.append(frames)
        a_cpu = np.stack(cpu)
        t_gpu = torch.stack(gpu)
        diff = np.abs(a_cpu.astype(np.int16) - t_gpu.cpu().numpy().astype(np.int16))
        f_cpu = np.concatenate([runner.infer_uint8(a_cpu[i:i + 8]) for i in range(0, len(a_cpu), 8)])
        f_gpu = np.concatenate([runner.infer_uint8(t_gpu[i:i + 8]) for i in range(0, len(t_gpu), 8)])
        import av

        with av.open(str(path)) as c:
            cc = c.streams.video[0].codec_context
            fmt = f"{cc.name} {cc.pix_fmt} {cc.width}x{cc.height} cs{cc.colorspace} range{cc.color_range}"
        rows.append({"file": path.name, "format": fmt, "clips": len(cpu), "mean_abs_diff": float(diff.mean()),
                     "max_abs_diff": int(diff.max()), "identical": float((diff == 0).mean()),
                     "min_cosine": float(cosine_rows(f_cpu, f_gpu).min()), "seconds": time.perf_counter() - started})
        r = rows[-1]
        print(f"| {r['file']} | {r['format']} | {r['clips']} | {r['mean_abs_diff']:.4f} | {r['max_abs_diff']} | "
              f"{100 * r['identical']:.3f}% | {r['min_cosine']:.7f} |", flush=True)
    summary = {"videos": len(rows), "worst_mean_abs_diff": max(r["mean_abs_diff"] for r in rows),
               "worst_min_cosine": min(r["min_cosine"] for r in rows), "gpu": torch.cuda.get_device_name(0),
               "model": "internvideo2_clip_s14 fp32, random weights (seed 0)", "windowing": str(w), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.output:
        Path(a.output).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
