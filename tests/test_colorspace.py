"""NV12 -> RGB (the GPU decode path's conversion) against PyAV's own rgb24 conversion of the same frames."""
from __future__ import annotations

import dataclasses
import platform

import av
import numpy as np
import pytest
import torch

from iv2trt.decode.colorspace import (
    CHROMA_SITINGS,
    dense_surface,
    nv12_to_rgb,
    split_nv12,
    stream_yuv_to_rgb,
    surface_converter,
    swscale_chroma_siting,
    yuv_to_rgb,
)
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


# --- 10/12-bit 4:2:0 and 4:4:4: swscale's scaler routes, as NVDEC's P016 / YUV444 surfaces reach them -----------
def planar_frame(planes: list[np.ndarray], fmt: str, colorspace: int = 2, color_range: int = 0) -> av.VideoFrame:
    """A PyAV frame of a planar format (yuv444p, yuv420p10le, yuv444p12le, ...) holding these planes."""
    frame = av.VideoFrame(planes[0].shape[1], planes[0].shape[0], fmt)
    dtype = np.uint8 if frame.format.components[0].bits == 8 else np.uint16
    for plane, data in zip(frame.planes, planes):
        rows = np.frombuffer(plane, dtype).reshape(-1, plane.line_size // dtype().itemsize)
        rows[:data.shape[0], :data.shape[1]] = data
    frame.colorspace, frame.color_range = colorspace, color_range
    return frame


def frame_planes(frame: av.VideoFrame) -> list[np.ndarray]:
    """Y, U, V samples of a planar frame (8 or 16-bit words), without the line padding."""
    dtype = np.uint8 if frame.format.components[0].bits == 8 else np.uint16
    out = []
    for plane, comp in zip(frame.planes, frame.format.components):
        data = np.frombuffer(plane, dtype).reshape(-1, plane.line_size // dtype().itemsize)
        out.append(data[:comp.height, :comp.width])
    return out


def decoder_surface(planes: list[np.ndarray], depth: int) -> torch.Tensor:
    """The surface NVDEC hands out for these samples: luma rows then interleaved U/V rows for 4:2:0 (P016 above 8
    bits), three planes for 4:4:4; above 8 bits in 16-bit words with the samples in the high bits."""
    y, u, v = planes
    rows = [y, np.stack([u, v], -1).reshape(u.shape[0], -1)] if u.shape != y.shape else [y, u, v]
    surface = np.concatenate(rows, 0)
    return torch.from_numpy(surface.astype(np.uint16) << (16 - depth) if depth > 8 else surface.astype(np.uint8))


def assert_converts_like_pyav(frame: av.VideoFrame, siting=(-513, -513)) -> None:
    conv = surface_converter(frame.colorspace, frame.color_range, frame.format.name, siting)
    surface = decoder_surface(frame_planes(frame), frame.format.components[0].bits)
    assert surface.shape[0] == conv.rows(frame.height)
    ours = conv.to_rgb_planar(surface, frame.height, frame.width).to(torch.uint8).permute(1, 2, 0).numpy()
    assert_same_pixels(ours, frame.to_ndarray(format="rgb24"))


HI_MATRICES = [(2, 0), (1, 1), (1, 2), (5, 2), (4, 1), (7, 1), (9, 1), (9, 2)]


@pytest.mark.parametrize("colorspace,color_range", HI_MATRICES)
@pytest.mark.parametrize("fmt", ["yuv420p10le", "yuv420p12le", "yuv444p", "yuv444p10le", "yuv444p12le"])
def test_high_depth_and_444_random_samples_match_pyav(fmt, colorspace, color_range):
    """Random samples over the whole range, each matrix and range: surfaces converted here equal swscale's rgb24
    (for 10/12-bit 4:2:0 its scaler route: 15-bit samples, 2x chroma filter, C tables; full chroma for 4:4:4)."""
    depth, sub = av.VideoFormat(fmt).components[0].bits, 1 if "420" in fmt else 0
    rng = np.random.default_rng(depth * 100 + colorspace * 10 + color_range)
    h, w = 48, 80
    planes = [rng.integers(0, 1 << depth, (h, w))] + [rng.integers(0, 1 << depth, (h >> sub, w >> sub)) for _ in "uv"]
    assert_converts_like_pyav(planar_frame(planes, fmt, colorspace, color_range))


@pytest.mark.parametrize("colorspace,color_range", [(1, 1), (1, 2), (2, 1), (7, 1), (9, 2)])
@pytest.mark.parametrize("fmt", ["yuv420p10le", "yuv420p12le", "yuv444p", "yuv444p12le"])
def test_extreme_samples_match_pyav(fmt, colorspace, color_range):
    """Every combination of extreme and middle samples (0, 1, mid, max - 1, max) for Y, U and V: the saturation of
    the C tables (luma rounds up to 256 at the top) and the 32-bit wrap-around of the full-chroma sums."""
    top = (1 << av.VideoFormat(fmt).components[0].bits) - 1
    values = np.array([0, 1, top // 2, top - 1, top])
    y, u, v = (a.ravel() for a in np.meshgrid(values, values, values, indexing="ij"))  # 125 triples
    if "444" in fmt:
        planes = [np.tile(np.append(c, c[-1]), (2, 1)) for c in (y, u, v)]                 # [2, 126]
    else:  # each (U, V) under a 2 x 2 block of one Y
        planes = [np.repeat(np.repeat(y[None], 2, 0), 2, 1), u[None], v[None]]
    assert_converts_like_pyav(planar_frame(planes, fmt, colorspace, color_range))


def _has_encoder(name: str, pix_fmt: str) -> bool:
    try:
        return pix_fmt in [f.name for f in av.codec.Codec(name, "w").video_formats]
    except Exception:
        return False


@pytest.mark.parametrize("chromaloc", range(6))
def test_chroma_siting_of_decoded_hevc_10bit(tmp_path, chromaloc):
    """HEVC signals where chroma sits (x265 --chromaloc 0..5; the decoder reports LEFT when unsignalled) and swscale
    filters chroma to match: swscale_chroma_siting finds it from one frame, and every frame of the stream then
    converts like PyAV."""
    if not _has_encoder("libx265", "yuv420p10le"):
        pytest.skip("no 10-bit libx265 in this FFmpeg build")
    path = write_video(tmp_path / "c.mp4", pattern_frames(4, 48, 64, seed=chromaloc), "libx265", pix_fmt="yuv420p10le",
                       options={"x265-params": f"log-level=0:chromaloc={chromaloc}"})
    expected = list(CHROMA_SITINGS.values())[[1, 0, 2, 3, 4, 5][chromaloc]]  # CENTER is swscale's default
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    for frame in frames[:-1]:
        assert_converts_like_pyav(frame, expected)
    assert swscale_chroma_siting(frames[-1]) == expected


ENCODED = [("libx265", "yuv420p10le", {"x265-params": "log-level=0"}), ("libx265", "yuv420p12le",
                                                                       {"x265-params": "log-level=0"}),
           ("libx265", "yuv444p", {"x265-params": "log-level=0"}), ("libx265", "yuv444p10le",
                                                                   {"x265-params": "log-level=0"}),
           ("libx264", "yuv420p10le", {}), ("libx264", "yuv444p", {}), ("libsvtav1", "yuv420p10le", {})]


@pytest.mark.parametrize("codec,pix_fmt,options", ENCODED, ids=[f"{c}-{p}" for c, p, _ in ENCODED])
def test_encoded_high_depth_and_444_streams_convert_like_pyav(tmp_path, codec, pix_fmt, options):
    """Real decoded frames (each decoder sets its own chroma location and colour tags): the siting found on one
    frame, then every other frame converted from its decoder surface, equal PyAV's rgb24."""
    if not _has_encoder(codec, pix_fmt):
        pytest.skip(f"no {codec} for {pix_fmt} in this FFmpeg build")
    path = write_video(tmp_path / "v.mkv", pattern_frames(4, 64, 96, seed=5), codec, pix_fmt=pix_fmt, options=options,
                       colorspace=1, color_range=1)
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert frames[0].format.name == pix_fmt
    siting = swscale_chroma_siting(frames[-1]) if "420" in pix_fmt else (-513, -513)
    assert siting is not None
    for frame in frames[:-1]:
        assert_converts_like_pyav(frame, siting)


def test_formats_without_a_reproduced_conversion_are_refused():
    for pix_fmt in ("yuv422p10le", "gray10le", "yuva420p", "gbrp", "nv12", "yuv420p16le"):
        with pytest.raises(ValueError, match="no RGB conversion"):
            surface_converter(1, 1, pix_fmt)
    with pytest.raises(ValueError, match="YCgCo"):
        surface_converter(8, 1, "yuv420p10le")
    assert surface_converter(1, 2, "yuvj444p").route.full_range


def test_16_bit_surface_exported_with_odd_strides_reads_as_packed_rows():
    """PyNvVideoCodec labels its P016 surfaces with element strides (W, 2) over a buffer of packed W-sample rows;
    dense_surface reads the buffer as it is laid out."""
    rows, w = 6, 8
    buffer = torch.arange(rows * w + w, dtype=torch.int32)
    exported = buffer.as_strided((rows, w), (w, 2))
    assert torch.equal(dense_surface(exported), buffer[:rows * w].view(rows, w))
    dense = buffer[:rows * w].view(rows, w)
    assert dense_surface(dense) is dense


def test_encoding_leaves_the_threads_scheduling_as_it_was(tmp_path):
    """libsvtav1 puts the thread that opens it under SCHED_FIFO 99 where it may (as root here): processes started
    afterwards (ONNX Runtime's spinning pool, decode workers, Ray) then starve the machine. write_video gives the
    policy back."""
    import os

    if not _has_encoder("libsvtav1", "yuv420p"):
        pytest.skip("no libsvtav1 in this FFmpeg build")
    before = os.sched_getscheduler(0)
    write_video(tmp_path / "a.mkv", pattern_frames(4, 64, 96, seed=1), "libsvtav1")
    assert os.sched_getscheduler(0) == before
