"""GPU decoding (NVDEC through PyNvVideoCodec) against the CPU path: same clips, same pixels, fallbacks.
Needs an NVIDIA GPU with NVDEC and PyNvVideoCodec; skips with the reason elsewhere (CI has no GPU)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_video import _has_encoder  # noqa: E402 - the tests' own helper

from iv2trt.decode.clips import DecodeError, Windowing
from iv2trt.decode.inputs import InputItem
from iv2trt.decode.nvdec import nvdec_unavailable
from iv2trt.decode.samples import write_image, write_video
from iv2trt.decode.source import iter_clips

REASON = nvdec_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs NVDEC: {REASON}")

SIZE = 112


def natural_frames(count: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth moving colour fields with texture and an object: something like footage, cheap to make."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = rng.normal(0, 10, (h, w, 3)).astype(np.float32)
    out = np.empty((count, h, w, 3), np.uint8)
    for t in range(count):
        base = np.stack([128 + 90 * np.sin((x + 4 * t) / 37.0), 128 + 80 * np.cos((y - 3 * t) / 23.0),
                         128 + 70 * np.sin((x + y + 5 * t) / 51.0)], -1)
        frame = base + tex
        cy, cx = int(h / 2 + h / 3 * np.sin(t / 9)), int(w / 2 + w / 3 * np.cos(t / 11))
        frame[max(cy - h // 8, 0):cy + h // 8, max(cx - w // 8, 0):cx + w // 8] = (230, 40, 60)
        out[t] = np.clip(frame, 0, 255)
    return out


def encode(path: Path, frames: np.ndarray, codec: str, fps: int = 30, options=None, pix_fmt="yuv420p",
           colorspace=None, color_range=None, rotation=None) -> Path:
    return write_video(path, frames, codec, fps, rotation=rotation, pix_fmt=pix_fmt, options=options,
                       colorspace=colorspace, color_range=color_range)


@pytest.fixture(scope="module")
def session():
    """Sessions as the job makes them: the demux pass in helper processes."""
    from iv2trt.decode.nvdec import NvdecSession
    from iv2trt.decode.probe_pool import ProbePool

    probes = ProbePool(2).start()
    yield lambda w: NvdecSession(0, w, SIZE, probes)
    probes.close()


def gpu_clips(session, path: Path, w: Windowing, kind: str = "video"):
    s = session(w)
    out = []
    for info, frames, ready in s.clips(kind, str(path)):
        ready.synchronize()
        out.append((info, frames.cpu().numpy()))
    return out, s


def cpu_clips(path: Path, w: Windowing, kind: str = "video"):
    return list(iter_clips(InputItem(str(path), path.name, kind), w, SIZE))


def assert_same_clips(gpu, cpu, mean_max: float = 0.5, exact: bool = False) -> dict:
    assert [i["indices"] for i, _ in gpu] == [i["indices"] for i, _ in cpu]
    assert [(i["start_s"], i["end_s"]) for i, _ in gpu] == pytest.approx([(i["start_s"], i["end_s"]) for i, _ in cpu])
    a = np.stack([f for _, f in gpu]).astype(int)
    b = np.stack([f for _, f in cpu]).astype(int)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    stats = {"mean_abs": float(diff.mean()), "max_abs": int(diff.max()), "identical": float((diff == 0).mean())}
    print(json.dumps(stats))
    assert stats["mean_abs"] <= mean_max, stats
    if exact:
        assert stats["max_abs"] <= 1, stats  # a resize rounding may fall the other way on the GPU
    return stats


WINDOWINGS = [Windowing(frames=8), Windowing(frames=4, window_seconds=1.0), Windowing(frames=8, window_frames=24,
                                                                                        stride=16)]
CODECS = [("libx264", "mp4", {"bf": "3"}, True), ("libx265", "mp4", {"x265-params": "log-level=0"}, True),
          ("libvpx-vp9", "webm", {}, True), ("mpeg4", "mp4", {"bf": "2"}, False)]


@pytest.mark.parametrize("codec,ext,options,bit_exact", CODECS, ids=[c[0] for c in CODECS])
@pytest.mark.parametrize("w", WINDOWINGS, ids=["one-clip", "1s-windows", "frame-windows"])
def test_clips_match_the_cpu_path(tmp_path, session, codec, ext, options, bit_exact, w):
    if not _has_encoder(codec):
        pytest.skip(f"no {codec} encoder in this FFmpeg build")
    path = encode(tmp_path / f"v.{ext}", natural_frames(75, 144, 256, seed=1), codec, options=options)
    gpu, _ = gpu_clips(session, path, w)
    # H.264, HEVC and VP9 decode bit-exactly everywhere; MPEG-4 Part 2 lets IDCTs differ by a level or so
    assert_same_clips(gpu, cpu_clips(path, w), exact=bit_exact)


@pytest.mark.parametrize("colorspace,color_range,pix_fmt", [(1, 1, "yuv420p"), (1, 2, "yuv420p"), (5, 2, "yuvj420p"),
                                                            (9, 1, "yuv420p")])
def test_colour_metadata_is_followed(tmp_path, session, colorspace, color_range, pix_fmt):
    path = encode(tmp_path / "c.mp4", natural_frames(20, 96, 160, seed=2), "libx264", pix_fmt=pix_fmt,
                  colorspace=colorspace, color_range=color_range)
    w = Windowing(frames=4)
    assert_same_clips(gpu_clips(session, path, w)[0], cpu_clips(path, w), exact=True)


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotation(tmp_path, session, rotation):
    path = encode(tmp_path / "r.mp4", natural_frames(12, 96, 160, seed=3), "libx264", rotation=rotation)
    w = Windowing(frames=4)
    assert_same_clips(gpu_clips(session, path, w)[0], cpu_clips(path, w), exact=True)


def test_1080p_surface_padding(tmp_path, session):
    """1080 rows are coded as 1088: the decoder's surface is cropped to the picture."""
    path = encode(tmp_path / "hd.mp4", natural_frames(6, 1080, 1920, seed=4), "libx264")
    w = Windowing(frames=3)
    assert_same_clips(gpu_clips(session, path, w)[0], cpu_clips(path, w), exact=True)


def test_sparse_clips_seek_and_drop_frames(tmp_path, session):
    """A 20 s video with 1 s GOPs, one 4-frame clip every 5 s: the session seeks past whole GOPs and does not
    decode unneeded non-reference frames; the clips still equal the CPU path's."""
    path = encode(tmp_path / "long.mp4", natural_frames(600, 72, 128, seed=5), "libx264",
                  options={"g": "30", "bf": "3", "keyint_min": "30"})
    w = Windowing(frames=4, window_seconds=1.0, stride=5.0)
    gpu, s = gpu_clips(session, path, w)
    assert_same_clips(gpu, cpu_clips(path, w), exact=True)
    assert s.frames_decoded < 300, s.frames_decoded  # far fewer than the 600 frames of the file
    assert s.frames_dropped > 0


def test_session_reuse_across_inputs_and_codecs(tmp_path, session):
    a = encode(tmp_path / "a.mp4", natural_frames(30, 96, 160, seed=6), "libx264")
    b = encode(tmp_path / "b.mp4", natural_frames(40, 120, 200, seed=7), "libx264")
    w = Windowing(frames=4, window_frames=10)
    s = session(w)
    for path in (a, b, a):
        clips = []
        for info, frames, ready in s.clips("video", str(path)):
            ready.synchronize()
            clips.append((info, frames.cpu().numpy()))
        assert_same_clips(clips, cpu_clips(path, w), exact=True)


def test_corrupt_streams_fail_cleanly_and_leave_the_gpu_usable(tmp_path, session):
    from iv2trt.decode.nvdec import NvdecUnsupported

    good = encode(tmp_path / "good.mp4", natural_frames(60, 96, 160, seed=8), "libx264")
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(0)
    broken = tmp_path / "broken.mp4"
    noisy = bytearray(data)
    for i in rng.integers(len(data) // 5, len(data) - 2000, 400):  # mdat damage, the index intact
        noisy[i] = rng.integers(0, 256)
    broken.write_bytes(bytes(noisy))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(bytes(data[:len(data) // 2]))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(rng.integers(0, 256, 20000, np.uint8).tobytes())
    w = Windowing(frames=8, window_frames=20)
    s = session(w)
    for path in (broken, truncated, garbage):
        try:
            for _, frames, ready in s.clips("video", str(path)):
                ready.synchronize()
        except DecodeError as exc:  # NvdecUnsupported is one; both send the file to the CPU path
            assert exc.reason
    for _ in range(2):  # the same session and the GPU still work
        clips = []
        for info, frames, ready in s.clips("video", str(good)):
            ready.synchronize()
            clips.append((info, frames.cpu().numpy()))
        assert_same_clips(clips, cpu_clips(good, w), exact=True)
    assert torch.ones(4, device="cuda").sum().item() == 4
    with pytest.raises(NvdecUnsupported):
        list(s.clips("video", str(encode(tmp_path / "hi.mp4", natural_frames(4, 64, 64, seed=9), "libx264",
                                         pix_fmt="yuv444p"))))


def test_jpeg_images_and_folders_on_the_gpu(tmp_path, session):
    from iv2trt.decode.nvdec import gpu_jpeg_available

    if not gpu_jpeg_available():
        pytest.skip("torchvision's GPU JPEG decoder is not installed")
    frames = natural_frames(10, 240, 320, seed=10)
    image = write_image(tmp_path / "one.jpg", frames[0])
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, rgb in enumerate(frames):
        write_image(folder / f"{i:03d}.jpg", rgb)
    w = Windowing(frames=4)
    # nvJPEG's IDCT and chroma upsampling are not FFmpeg's: close, not identical
    assert_same_clips(gpu_clips(session, image, w, "image")[0], cpu_clips(image, w, "image"), mean_max=1.0)
    assert_same_clips(gpu_clips(session, folder, w, "frames")[0], cpu_clips(folder, w, "frames"), mean_max=1.0)


def test_job_features_nvdec_vs_cpu(tmp_path, tiny_model):
    """The whole job, fp32 model on the GPU: features from --decoder nvdec equal --decoder cpu's."""
    from iv2trt.decode.inputs import discover
    from iv2trt.job.local import run_job
    from iv2trt.job.pipeline import JobOptions
    from iv2trt.output.writer import FeatureWriter, load_features
    from iv2trt.runners.torch_runner import TorchRunner

    root = tmp_path / "in"
    root.mkdir()
    for i, (codec, ext) in enumerate([("libx264", "mp4"), ("libx265", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "mp4"),
                                      ("mpeg4", "avi")]):  # MPEG-4 in AVI: NVDEC refuses, the CPU decodes it
        if _has_encoder(codec):
            encode(root / f"{i}.{ext}", natural_frames(60, 144, 176, seed=20 + i), codec)
    (root / "broken.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes())
    results = {}
    for decoder in ("cpu", "nvdec"):
        runner = TorchRunner(copy.deepcopy(tiny_model), device="cuda", precision="fp32")
        out = tmp_path / decoder
        summary = run_job(discover([str(root)]), runner, out, FeatureWriter(out, "float32"),
                          JobOptions(Windowing(frames=4, window_frames=20), 56, 4, 2, 60, False, decoder, 2))
        feats, rows = load_features(out)
        results[decoder] = ({(r["id"], r["clip"]): f for f, r in zip(feats, rows)}, summary)
    cpu, nv = results["cpu"][0], results["nvdec"][0]
    assert cpu.keys() == nv.keys() and len(cpu) >= 6
    cos = min(float(np.dot(cpu[k], nv[k])) for k in cpu)
    print(json.dumps({"min_cosine_nvdec_vs_cpu": cos, "nvdec": results["nvdec"][1]["decoders"]}))
    assert cos >= 0.9999
    summary = results["nvdec"][1]
    assert summary["failed"] == 1 and summary["decoders"]["nvdec"]["inputs"] == 4
    assert summary["decoders"]["nvdec"]["fallbacks_to_cpu"] == 2  # the AVI and the broken file
    failure = json.loads((tmp_path / "nvdec" / "failures.jsonl").read_text().splitlines()[0])
    assert failure["reason"].startswith("NVDEC: ") and "; CPU: " in failure["reason"]


# --- issue 22: every format the GPU decodes, high bit depths, real-file timestamps, refusals with categories -------
def _encoder_takes(codec: str, pix_fmt: str) -> bool:
    import av

    try:
        return pix_fmt in [f.name for f in av.codec.Codec(codec, "w").video_formats]
    except Exception:  # noqa: BLE001 - no such encoder in this FFmpeg build
        return False


def decoded_by_nvdec(session, path: Path, w: Windowing):
    """The GPU clips of a file NVDEC must decode (a fallback fails the test, with its category and reason), and the
    session (its counters)."""
    from iv2trt.decode.nvdec import NvdecError

    s = session(w)
    try:
        out = []
        for info, frames, ready in s.clips("video", str(path)):
            ready.synchronize()
            out.append((info, frames.cpu().numpy()))
    except NvdecError as exc:
        pytest.fail(f"NVDEC fell back on {path.name}: {exc.category}: {exc.reason}")
    return out, s


HIGH_DEPTH = [("libx265", "mp4", "yuv420p10le", {"x265-params": "log-level=0"}),
              ("libx265", "mp4", "yuv420p12le", {"x265-params": "log-level=0"}),
              ("libx265", "mp4", "yuv444p", {"x265-params": "log-level=0"}),
              ("libx265", "mp4", "yuv444p10le", {"x265-params": "log-level=0"}),
              ("libx265", "mkv", "yuv420p10le", {"x265-params": "log-level=0:chromaloc=2"}),  # top-left chroma
              ("libvpx-vp9", "webm", "yuv420p10le", {}),
              ("libvpx-vp9", "webm", "yuv420p12le", {})]


@pytest.mark.parametrize("codec,ext,pix_fmt,options", HIGH_DEPTH,
                         ids=[f"{c}-{p}" + ("-chromaloc2" if "chromaloc" in str(o) else "")
                              for c, _, p, o in HIGH_DEPTH])
def test_high_bit_depth_and_444_parity(tmp_path, session, codec, ext, pix_fmt, options):
    """HEVC 10/12-bit 4:2:0 (P016 surfaces) and 8/10-bit 4:4:4 (YUV444 surfaces), VP9 10/12-bit where PyAV's
    libvpx writes them, else the files of tests/data (PyPI's wheels: 8-bit only), 2 s of 640x360: decoded by NVDEC
    with no fallback, converted as swscale does (bit-exact on x86: HEVC and VP9 decode identically), so the
    resized clips match the CPU path's, one clip and 1 s windows; every label came back."""
    if _encoder_takes(codec, pix_fmt):
        path = encode(tmp_path / f"v.{ext}", natural_frames(60, 360, 640, seed=30), codec, options=options,
                      pix_fmt=pix_fmt, colorspace=1, color_range=1)
    elif codec == "libvpx-vp9":  # PyPI's PyAV writes 8-bit VP9 only: the same content made by FFmpeg, 320x180
        path = Path(__file__).resolve().parent / "data" / f"vp9_{pix_fmt}.webm"
    else:
        pytest.skip(f"this FFmpeg build's {codec} does not write {pix_fmt}")
    for w in WINDOWINGS[:2]:
        gpu, s = decoded_by_nvdec(session, path, w)
        assert_same_clips(gpu, cpu_clips(path, w), exact=True)
        assert s.labels_repaired == 0


@pytest.mark.parametrize("kind", ["us-jitter-editlist-bframes", "us-jitter-no-bframes", "90k-start-5s-pyramid"])
def test_real_file_timestamps_parity(tmp_path, session, kind):
    """H.264 as phones and cameras write it, 2.5 s of 640x360: a 1/1,000,000 time base with durations of 32-34 ms
    and an edit list cutting frames before 0 (with and without B-frames), and 1/90,000 starting at 5 s with
    reordered B-frames. Every file decoded by NVDEC with no fallback, frames matched to the plan through seeks
    (one clip, sparse 0.5 s windows, frame windows), clips equal the CPU path's; every label came back."""
    from fractions import Fraction

    from test_nvdec_fake import encode as encode_timed

    from iv2trt.decode.samples import jittered_pts

    frames = natural_frames(75, 360, 640, seed=31)
    if kind.startswith("us"):
        pts, time_base = jittered_pts(75, 33_333, 1_000, -100_000), Fraction(1, 1_000_000)
    else:
        pts, time_base = jittered_pts(75, 3003, 300, 450_000), Fraction(1, 90_000)
    options = {"bf": "0"} if "no-bframes" in kind else {"bf": "3", "b_strategy": "0"}
    path = encode_timed(tmp_path / "t.mp4", 75, time_base=time_base, pts=pts, options=options, gop=15, frames=frames)
    for w in (Windowing(frames=8), Windowing(frames=4, window_seconds=0.5, stride=1.5),
              Windowing(frames=6, window_frames=20, stride=13)):
        gpu, s = decoded_by_nvdec(session, path, w)
        assert_same_clips(gpu, cpu_clips(path, w), exact=True)
        assert s.labels_repaired == 0
        print(json.dumps({"kind": kind, "windowing": str(w), "frames_decoded": s.frames_decoded,
                          "frames_dropped": s.frames_dropped}))


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le"])
def test_av1_refused_by_codec_or_decoded_with_parity(tmp_path, session, pix_fmt):
    """AV1: on a GPU whose NVDEC does not report it (H100/H200) refused before anything is decoded, category codec;
    where it does (L4, L40S, ...), decoded like the CPU path."""
    from iv2trt.decode.nvdec import NvdecUnsupported, gpu_caps

    if not _encoder_takes("libsvtav1", pix_fmt):
        pytest.skip(f"no libsvtav1 for {pix_fmt} in this FFmpeg build")
    path = encode(tmp_path / "a.mkv", natural_frames(30, 240, 320, seed=32), "libsvtav1", pix_fmt=pix_fmt)
    w = Windowing(frames=4)
    s = session(w)
    depth = 10 if "10" in pix_fmt else 8
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "av1_caps": gpu_caps(s.nvc, 0)("av1", depth, "420")}))
    if not gpu_caps(s.nvc, 0)("av1", depth, "420").get("supported"):
        with pytest.raises(NvdecUnsupported) as info:
            list(s.clips("video", str(path)))
        assert info.value.category in ("codec", "bit_depth"), info.value.reason
        assert s.frames_decoded == 0
    else:  # against the frames the plan names (reference_clips: a full decode)
        from test_nvdec_fake import reference_clips

        gpu, _ = decoded_by_nvdec(session, path, w)
        assert_same_clips(gpu, reference_clips(path, w, SIZE), exact=True)


@pytest.mark.parametrize("codec,pix_fmt,category", [("libx264", "yuv420p10le", "bit_depth"),
                                                    ("libx264", "yuv444p", "chroma"),
                                                    ("libx265", "yuv422p10le", "chroma")])
def test_formats_refused_with_their_category_and_decoded_on_the_cpu(tmp_path, session, codec, pix_fmt, category):
    """Formats this GPU's NVDEC (or the conversion) does not take are refused before a decoder is made, with a
    category; the CPU path decodes them."""
    from iv2trt.decode.nvdec import NvdecUnsupported

    if not _encoder_takes(codec, pix_fmt):
        pytest.skip(f"no {codec} for {pix_fmt}")
    path = encode(tmp_path / "r.mp4", natural_frames(8, 96, 160, seed=33), codec, pix_fmt=pix_fmt,
                  options={"x265-params": "log-level=0"} if codec == "libx265" else None)
    s = session(Windowing(frames=4))
    with pytest.raises(NvdecUnsupported) as info:
        list(s.clips("video", str(path)))
    assert info.value.category == category, info.value.reason
    assert s.frames_decoded == 0 and not s._decoders
    assert len(cpu_clips(path, Windowing(frames=4))) == 1
