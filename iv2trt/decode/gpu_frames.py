"""Decoded YUV 4:2:0 frames -> the model's uint8 frames on the GPU: one piece of code for NVDEC's frames and for the
planes the CPU decode workers hand over (so both give the same pixels as the CPU path).

The CPU path converts with swscale and resizes with torchvision's antialiased bicubic on the CPU; here the same
arithmetic runs as torch ops on the pipeline's GPU (colorspace.surface_converter is swscale's converter
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
    what converting them takes (the stream's colour matrix, range and pixel format, the rotation). `borrowed`:
    the planes lie in memory reused once `to_model_frames` returns (a worker's shared-memory slot, plane_ring.py),
    so they are copied before it returns."""

    planes: np.ndarray
    colorspace: int
    color_range: int
    pix_fmt: str
    height: int
    width: int
    rotation: float
    borrowed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:  # (frames, ...): what the pipeline's frame-count check reads
        return self.planes.shape

    def to_model_frames(self, device, size: int):
        """The clip as the model's uint8 frames [T, size, size, 3] on `device` (call it on the stream that the
        result is used on): its planes laid out as NVDEC's NV12 surfaces, then the NVDEC path's own steps."""
        import torch

        from .colorspace import surface_converter

        planes = torch.from_numpy(self.planes).to(device, non_blocking=not self.borrowed)
        conv = surface_converter(self.colorspace, self.color_range, self.pix_fmt)
        turns = int(round(self.rotation / 90.0)) % 4
        return model_frames(nv12_surfaces(planes, self.height, self.width), conv, self.height, self.width, turns,
                            size)


def yuv420p_planes(frame) -> np.ndarray | None:
    """A decoded PyAV frame's Y, U and V planes as one uint8 array [H * 3 // 2, W] (Y rows, then U, then V, each
    chroma plane H/2 x W/2 laid out row after row), or None where the frame is not 8-bit 4:2:0 of even size (the
    worker converts those itself)."""
    if frame.format.name not in PLANAR_FORMATS or frame.width % 2 or frame.height % 2:
        return None
    return frame.to_ndarray()


def nv12_surfaces(planes, height: int, width: int):
    """[..., H * 3 // 2, W] planes (yuv420p_planes' layout, any device) -> NV12 surfaces [..., H * 3 // 2, W]: the
    luma rows, then the chroma rows with U and V interleaved, as NVDEC gives its frames."""
    import torch

    flat = planes.reshape(*planes.shape[:-2], -1)
    area, quarter = height * width, height * width // 4
    u = flat[..., area:area + quarter].unflatten(-1, (height // 2, width // 2))
    v = flat[..., area + quarter:area + 2 * quarter].unflatten(-1, (height // 2, width // 2))
    chroma = torch.stack([u, v], -1).flatten(-2)  # [..., H/2, W]: U V U V ...
    return torch.cat([flat[..., :area].unflatten(-1, (height, width)), chroma], -2)


def model_frames(surfaces, conv, height: int, width: int, turns: int, size: int):
    """Decoder surfaces of one clip [T, rows, >= W] -> the model's uint8 frames [T, size, size, 3]: the stream's
    conversion to the CPU path's RGB (`conv`, colorspace.surface_converter), the rotation (counter-clockwise
    quarter turns) and the CPU path's resize. NVDEC's frames and CPU workers' planes both come through here."""
    import torch

    from ..transforms import resize_planar

    rgb = conv.to_rgb_planar(surfaces, height, width).float()
    if turns:
        rgb = torch.rot90(rgb, turns, dims=(-2, -1))
    return resize_planar(rgb, size)
