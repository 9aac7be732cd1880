"""CPU workers that hand decoded planes to the GPU (decode/gpu_frames.py): the conversion and resize, run here on
CPU tensors (the same torch code runs on the GPU), give the CPU path's pixels; formats the GPU conversion does not
take still come resized from the worker."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from iv2trt.decode.clips import Windowing
from iv2trt.decode.gpu_frames import YuvClip
from iv2trt.decode.inputs import InputItem
from iv2trt.decode.samples import pattern_frames, write_video
from iv2trt.decode.source import iter_clips

SIZE = 56
W = Windowing(4, window_frames=8)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _check(got: np.ndarray, want: np.ndarray, device: str) -> None:
    """Exactly the CPU path's pixels on CPU tensors; on a GPU (other rounding of the same float arithmetic) as
    close as NVDEC's are held to: a level at most, and a mean difference <= 0.5."""
    diff = np.abs(got.astype(int) - want.astype(int))
    print(f"{device}: max diff {diff.max()}, mean {diff.mean():.5f}")
    if device == "cpu":
        assert diff.max() == 0, (diff.mean(), diff.max())  # the same arithmetic: the same pixels
    else:
        assert diff.max() <= 1 and diff.mean() <= 0.5, (diff.mean(), diff.max())


def _pair(path: Path):
    item = InputItem(str(path), path.name, "video")
    return list(iter_clips(item, W, SIZE)), list(iter_clips(item, W, SIZE, planes=True))


@pytest.mark.parametrize("case", [
    dict(),                                            # BT.601 limited range, the common case
    dict(colorspace=1),                                # BT.709
    dict(pix_fmt="yuvj420p", color_range=2),           # full range (JPEG)
    dict(rotation=90),                                 # a phone held upright
    dict(rotation=270),
])
@pytest.mark.parametrize("device", DEVICES)
def test_planes_converted_and_resized_as_the_cpu_path_does(tmp_path, case, device):
    path = write_video(tmp_path / "v.mp4", pattern_frames(20, 90, 124, seed=3), **case)
    cpu, planes = _pair(path)
    assert len(cpu) == len(planes) > 1
    for (info_cpu, frames_cpu), (info, clip) in zip(cpu, planes):
        assert info == info_cpu and isinstance(clip, YuvClip)
        assert clip.planes.shape == (4, 90 * 3 // 2, 124) and clip.planes.dtype == np.uint8
        got = clip.to_model_frames(device, SIZE).cpu().numpy()
        assert got.shape == frames_cpu.shape == (4, SIZE, SIZE, 3)
        _check(got, frames_cpu, device)


X265 = {"x265-params": "log-level=0"}


@pytest.mark.parametrize("case", [
    dict(pix_fmt="yuv420p10le"),                                     # HEVC Main10 (phones, HDR)
    dict(pix_fmt="yuv420p12le"),
    dict(pix_fmt="yuv420p10le", colorspace=1, color_range=2),        # BT.709, full range
    dict(pix_fmt="yuv420p10le", options={"x265-params": "log-level=0:chromaloc=2"}),  # chroma sited top-left
    dict(pix_fmt="yuv420p10le", rotation=90),
], ids=["10bit", "12bit", "10bit-709-full", "10bit-chromaloc2", "10bit-rotated"])
@pytest.mark.parametrize("device", DEVICES)
def test_high_depth_planes_converted_and_resized_as_the_cpu_path_does(tmp_path, case, device):
    """10/12-bit 4:2:0 planes (16-bit words, low bits) through the P016 route NVDEC's frames take: the CPU path's
    pixels exactly, with the chroma siting read off the stream's first frame."""
    case = {"options": X265, **case}
    path = write_video(tmp_path / "v.mp4", pattern_frames(20, 90, 124, seed=7), "libx265", **case)
    cpu, planes = _pair(path)
    assert len(cpu) == len(planes) > 1
    for (info_cpu, frames_cpu), (info, clip) in zip(cpu, planes):
        assert info == info_cpu and isinstance(clip, YuvClip) and clip.pix_fmt == case["pix_fmt"]
        assert clip.planes.shape == (4, 90 * 3 // 2, 124) and clip.planes.dtype == np.uint16
        _check(clip.to_model_frames(device, SIZE).cpu().numpy(), frames_cpu, device)


VP9_HIGH_DEPTH = Path(__file__).resolve().parent / "data"  # data/make_vp9_high_depth.py (PyAV writes 8-bit only)


@pytest.mark.parametrize("pix_fmt", ["yuv420p10le", "yuv420p12le"])
@pytest.mark.parametrize("device", DEVICES)
def test_vp9_high_depth_planes_converted_and_resized_as_the_cpu_path_does(pix_fmt, device):
    """VP9 profile 2 (10 and 12-bit 4:2:0, BT.709, in WebM) through the same P016 route: the CPU path's pixels."""
    path = VP9_HIGH_DEPTH / f"vp9_{pix_fmt}.webm"
    cpu, planes = _pair(path)
    assert len(cpu) == len(planes) > 1
    for (info_cpu, frames_cpu), (info, clip) in zip(cpu, planes):
        assert info == info_cpu and isinstance(clip, YuvClip) and clip.pix_fmt == pix_fmt
        assert clip.planes.shape == (4, 180 * 3 // 2, 320) and clip.planes.dtype == np.uint16
        _check(clip.to_model_frames(device, SIZE).cpu().numpy(), frames_cpu, device)


def test_other_formats_come_resized_from_the_worker(tmp_path):
    """4:4:4, odd sizes: the GPU conversion takes 4:2:0 of even size only; the rest is the CPU path's."""
    for name, kw, frames in (("full_chroma.mp4", dict(pix_fmt="yuv444p"), pattern_frames(12, 64, 64, seed=1)),
                             ("odd.mkv", dict(codec="ffv1", pix_fmt="yuv420p"), pattern_frames(12, 63, 65, seed=2))):
        path = write_video(tmp_path / name, frames, **kw)
        cpu, planes = _pair(path)
        assert len(cpu) == len(planes) > 0
        for (_, want), (_, got) in zip(cpu, planes):
            assert isinstance(got, np.ndarray) and np.array_equal(got, want)
