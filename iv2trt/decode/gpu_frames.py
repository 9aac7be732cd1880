"""Decoded YUV 4:2:0 frames -> the model's uint8 frames on the GPU: one piece of code for NVDEC's frames and for the
planes the CPU decode workers hand over (so both give the same pixels as the CPU path).

The CPU path converts with swscale and resizes with torchvision's antialiased bicubic on the CPU; here the same
arithmetic runs as torch ops on the pipeline's GPU (colorspace.nv12_to_rgb_planar is swscale's x86 converter
bit for bit; resize_planar is the CPU path's resize), a few kernels per clip. A CPU worker that leaves the
conversion and the resize to the GPU spends its time decoding only (the resize alone was about 80% of its time).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLANAR_FORMATS = frozenset({"yuv420p", "yuvj420p"})  # what a CPU worker hands over as planes; others as RGB


@dataclass
class YuvClip:
    """A clip as a CPU worker hands it to a pipeline on a GPU: its frames' planes, uint8 [T, H * 3 // 2, W], and
    what converting them takes (the stream's colour matrix, range and pixel format, the rotation)."""

    planes: np.ndarray
    colorspace: int
    color_range: int
    pix_fmt: str
    height: int
    width: int
    rotation: float

    @property
    def shape(self) -> tuple[int, ...]:  # (frames, ...): what the pipeline's frame-count check reads
        return self.planes.shape

    def to_model_frames(self, device, size: int):
        """The clip as the model's uint8 frames [T, size, size, 3] on `device` (call it on the stream that the
        result is used on)."""
        import torch

        from .colorspace import stream_yuv_to_rgb

        planes = torch.from_numpy(self.planes).to(device, non_blocking=True)
        luma, chroma = split_planes(planes, self.height, self.width)
        colour = stream_yuv_to_rgb(self.colorspace, self.color_range, self.pix_fmt)
        return yuv_to_model_frames(luma, chroma, colour, int(round(self.rotation / 90.0)) % 4, size)


def yuv420p_planes(frame) -> np.ndarray | None:
    """A decoded PyAV frame's Y, U and V planes as one uint8 array [H * 3 // 2, W] (Y rows, then U, then V, each
    chroma plane H/2 x W/2 laid out row after row), or None where the frame is not 8-bit 4:2:0 of even size (the
    worker converts those itself)."""
    if frame.format.name not in PLANAR_FORMATS or frame.width % 2 or frame.height % 2:
        return None
    return frame.to_ndarray()


def split_planes(planes, height: int, width: int):
    """[..., H * 3 // 2, W] planes (yuv420p_planes' layout, any device) -> (luma [..., H, W], chroma [..., H/2,
    W/2, 2] with U and V interleaved, as NVDEC's NV12 gives them)."""
    import torch

    flat = planes.reshape(*planes.shape[:-2], -1)
    luma = flat[..., :height * width].unflatten(-1, (height, width))
    quarter = height * width // 4
    u = flat[..., height * width:height * width + quarter].unflatten(-1, (height // 2, width // 2))
    v = flat[..., height * width + quarter:height * width + 2 * quarter].unflatten(-1, (height // 2, width // 2))
    return luma, torch.stack([u, v], -1)


def yuv_to_model_frames(luma, chroma, colour, turns: int, size: int):
    """uint8 luma [T, H, W] and interleaved chroma [T, H/2, W/2, 2] -> uint8 [T, size, size, 3]: swscale's
    conversion, the rotation (counter-clockwise quarter turns) and the CPU path's resize."""
    import torch

    from ..transforms import resize_planar
    from .colorspace import nv12_to_rgb_planar

    rgb = nv12_to_rgb_planar(luma, chroma, colour).float()
    if turns:
        rgb = torch.rot90(rgb, turns, dims=(-2, -1))
    return resize_planar(rgb, size)
