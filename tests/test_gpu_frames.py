"""CPU workers that hand decoded planes to the GPU (decode/gpu_frames.py): the conversion and resize, run here on
CPU tensors (the same torch code runs on the GPU), give the CPU path's pixels; formats the GPU conversion does not
take still come resized from the worker."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iv2trt.decode.clips import Windowing
from iv2trt.decode.gpu_frames import YuvClip
from iv2trt.decode.inputs import InputItem
from iv2trt.decode.samples import pattern_frames, write_video
from iv2trt.decode.source import iter_clips

SIZE = 56
W = Windowing(4, window_frames=8)


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
def test_planes_converted_and_resized_as_the_cpu_path_does(tmp_path, case):
    path = write_video(tmp_path / "v.mp4", pattern_frames(20, 90, 124, seed=3), **case)
    cpu, planes = _pair(path)
    assert len(cpu) == len(planes) > 1
    for (info_cpu, frames_cpu), (info, clip) in zip(cpu, planes):
        assert info == info_cpu and isinstance(clip, YuvClip)
        assert clip.planes.shape == (4, 90 * 3 // 2, 124) and clip.planes.dtype == np.uint8
        got = clip.to_model_frames("cpu", SIZE).numpy()
        assert got.shape == frames_cpu.shape == (4, SIZE, SIZE, 3)
        diff = np.abs(got.astype(int) - frames_cpu.astype(int))
        assert diff.max() == 0, (diff.mean(), diff.max())  # the same arithmetic: the same pixels


def test_other_formats_come_resized_from_the_worker(tmp_path):
    """4:4:4, odd sizes: the GPU conversion takes 8-bit 4:2:0 of even size only; the rest is the CPU path's."""
    for name, kw, frames in (("full_chroma.mp4", dict(pix_fmt="yuv444p"), pattern_frames(12, 64, 64, seed=1)),
                             ("odd.mkv", dict(codec="ffv1", pix_fmt="yuv420p"), pattern_frames(12, 63, 65, seed=2))):
        path = write_video(tmp_path / name, frames, **kw)
        cpu, planes = _pair(path)
        assert len(cpu) == len(planes) > 0
        for (_, want), (_, got) in zip(cpu, planes):
            assert isinstance(got, np.ndarray) and np.array_equal(got, want)
