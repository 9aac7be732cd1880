"""NV12 -> RGB (the GPU decode path's conversion) against PyAV's own rgb24 conversion of the same frames."""
from __future__ import annotations

import dataclasses
import platform

import av
import numpy as np
import pytest
import torch

from iv2trt.decode.colorspace import nv12_to_rgb, split_nv12, stream_yuv_to_rgb, yuv_to_rgb
from iv2trt.decode.samples import pattern_frames, write_video

X86 = platform.machine().lower() in ("x86_64", "amd64")


def planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V of a yuv420p-layout frame, without the line padding."""
    w, h, cw, ch = frame.width, frame.height, (frame.width + 1) // 2, (frame.height + 1) // 2
    y, u, v = (np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in frame.planes)
    return y[:h, :w], u[:ch, :cw], v[:ch, :cw]


def nv12_surface(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> torch.Tensor:
    """The [1.5 H, W] NV12 layout NVDEC hands out: luma rows, then rows of interleaved U, V."""
    uv = np.stack([u, v], -1).reshape(u.shape[0], -1)
    return torch.from_numpy(np.concatenate([y, uv[:, :y.shape[1]]], 0))


def assert_same_pixels(ours: np.ndarray, theirs: np.ndarray) -> None:
    if X86:  # the converter we reproduce is FFmpeg's x86 one: bit-identical
        np.testing.assert_array_equal(ours, theirs)
    else:   # other CPUs run another swscale implementation; rounding may differ by a level
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.1


def random_frame(h: int, w: int, colorspace: int, color_range: int, seed: int) -> av.VideoFrame:
    """A yuv420p frame of random samples over the whole 0..255 range (out-of-range values included)."""
    rng = np.random.default_rng(seed)
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, (ph, pw) in zip(frame.planes, [(h, w), (h // 2, w // 2), (h // 2, w // 2)]):
        buf = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        buf[:ph, :pw] = rng.integers(0, 256, (ph, pw), dtype=np.uint8)
    frame.colorspace, frame.color_range = colorspace, color_range
    return frame


# (AVColorSpace, AVColorRange): unspecified, BT.709, FCC, BT.470BG, SMPTE 170M, SMPTE 240M, BT.2020 NCL;
# range unspecified (0), limited (1), full (2)
MATRICES = [(2, 0), (2, 1), (2, 2), (1, 0), (1, 1), (1, 2), (4, 1), (5, 1), (6, 2), (7, 1), (7, 2), (9, 1), (9, 2)]


@pytest.mark.parametrize("colorspace,color_range", MATRICES)
def test_random_samples_match_pyav(colorspace, color_range):
    """Every luma/chroma value (random frames cover all 256 x 256 chroma pairs statistically) and each matrix."""
    frame = random_frame(96, 256, colorspace, color_range, seed=colorspace * 10 + color_range)
    y, u, v = planes(frame)
    c = stream_yuv_to_rgb(colorspace, color_range, "yuv420p")
    luma, chroma = split_nv12(nv12_surface(y, u, v), 96, 256)
    assert_same_pixels(nv12_to_rgb(luma, chroma, c).numpy(), frame.to_ndarray(format="rgb24"))


def test_every_yuv_triple_matches_pyav():
    """All 2^24 (Y, U, V) combinations at once for BT.601 limited range, the default of untagged video."""
    u, v = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    u, v = np.repeat(u.reshape(256, 256), 4, 1), np.repeat(v.reshape(256, 256), 4, 1)  # [256, 1024] chroma
    frame = av.VideoFrame(2048, 512, "yuv420p")
    y = np.tile(np.arange(256, dtype=np.uint8), (512, 8))                               # every Y under each (U, V)
    for plane, data in zip(frame.planes, (y, u, v)):
        np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:data.shape[0], :data.shape[1]] = data
    c = yuv_to_rgb(2, full_range=False)
    luma, chroma = split_nv12(nv12_surface(*planes(frame)), 512, 2048)
    assert_same_pixels(nv12_to_rgb(luma, chroma, c).numpy(), frame.to_ndarray(format="rgb24"))


def _encode(path, frames, colorspace=None, color_range=None, pix_fmt="yuv420p"):
    return write_video(path, frames, options={"bframes": "3"}, pix_fmt=pix_fmt, colorspace=colorspace,
                       color_range=color_range)


@pytest.mark.parametrize("colorspace,color_range,pix_fmt", [(None, None, "yuv420p"), (1, 1, "yuv420p"),
                                                            (1, 2, "yuv420p"), (5, None, "yuvj420p"),
                                                            (9, 1, "yuv420p")])
def test_encoded_video_frames_match_pyav(tmp_path, colorspace, color_range, pix_fmt):
    """Real H.264 streams tagged with a matrix and range: the stream's metadata, read as the GPU path reads it
    (codec context after opening), picks the conversion PyAV applies to each decoded frame."""
    path = _encode(tmp_path / "v.mp4", pattern_frames(6, 72, 128, seed=3), colorspace, color_range, pix_fmt)
    with av.open(str(path)) as container:
        cc = container.streams.video[0].codec_context
        c = stream_yuv_to_rgb(cc.colorspace, cc.color_range, cc.pix_fmt)
        if colorspace is not None:
            assert c.colorspace == colorspace
        assert c.full_range == (color_range == 2 or pix_fmt == "yuvj420p")
        for frame in container.decode(video=0):
            luma, chroma = split_nv12(nv12_surface(*planes(frame)), frame.height, frame.width)
            assert_same_pixels(nv12_to_rgb(luma, chroma, c).numpy(), frame.to_ndarray(format="rgb24"))


def test_surface_with_padding_rows_and_columns():
    """NVDEC surfaces may be wider (pitch) or taller than the picture: only the picture is converted."""
    frame = random_frame(40, 64, 2, 0, seed=7)
    y, u, v = planes(frame)
    padded_y = np.pad(y, ((0, 8), (0, 16)), constant_values=99)
    padded_uv = np.pad(np.stack([u, v], -1).reshape(20, 64), ((0, 4), (0, 16)), constant_values=77)
    surface = torch.from_numpy(np.concatenate([padded_y, padded_uv], 0))
    luma, chroma = split_nv12(surface, 40, 64)
    assert_same_pixels(nv12_to_rgb(luma, chroma, yuv_to_rgb(2, False)).numpy(), frame.to_ndarray(format="rgb24"))


def test_unconvertible_matrices_are_refused():
    with pytest.raises(ValueError, match="YCgCo"):
        stream_yuv_to_rgb(8, 1, "yuv420p")
    reserved = stream_yuv_to_rgb(3, 0, "yuv420p")  # reserved: the BT.601 default
    assert dataclasses.replace(reserved, colorspace=2) == yuv_to_rgb(2, False)
