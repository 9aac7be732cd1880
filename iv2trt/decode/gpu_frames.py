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

# what a CPU worker hands over as planes (8-bit in bytes, 10/12-bit in 16-bit words, samples in the low bits);
# other formats as RGB
PLANAR_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv420p10le", "yuv420p12le"})


@dataclass
class YuvClip:
    """A clip as a CPU worker hands it to a pipeline on a GPU: its frames' planes, uint8 [T, H * 3 // 2, W], and
    what converting them takes (the stream's colour matrix, range and pixel format, the rotation, and for 10/12-bit
    the chroma siting swscale applies, colorspace.swscale_chroma_siting). 10/12-bit planes are uint16 words, the
    samples in the low bits, as FFmpeg decodes them. `borrowed`: the planes lie in memory reused once
    `to_model_frames` returns (a worker's shared-memory slot, plane_ring.py), so they are copied before it returns."""

    planes: np.ndarray
    colorspace: int
    color_range: int
    pix_fmt: str
    height: int
    width: int
    rotation: float
    siting: tuple[int, int] = (-513, -513)
    borrowed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:  # (frames, ...): what the pipeline's frame-count check reads
        return self.planes.shape

    def to_model_frames(self, device, size: int):
        """The clip as the model's uint8 frames [T, size, size, 3] on `device` (call it on the stream that the
        result is used on): its planes laid out as NVDEC's NV12 surfaces, then the NVDEC path's own steps."""
        import torch

        from .colorspace import surface_converter

        conv = surface_converter(self.colorspace, self.color_range, self.pix_fmt, self.siting)
        if self.planes.dtype == np.uint16:  # as int16 (the same bits: samples < 2^15), then high bits as in P016
            planes = torch.from_numpy(self.planes.view(np.int16)).to(device, non_blocking=not self.borrowed)
            planes = planes.to(torch.int32) << (16 - conv.bit_depth)
        else:
            planes = torch.from_numpy(self.planes).to(device, non_blocking=not self.borrowed)
        turns = int(round(self.rotation / 90.0)) % 4
        return model_frames(nv12_surfaces(planes, self.height, self.width), conv, self.height, self.width, turns,
                            size)


def yuv420_planes(frame) -> np.ndarray | None:
    """A decoded PyAV frame's Y, U and V planes as one array [H * 3 // 2, W] (Y rows, then U, then V, each chroma
    plane H/2 x W/2 laid out row after row; uint8, or uint16 for 10/12-bit), or None where the frame is not 4:2:0
    of PLANAR_FORMATS and even size (the worker converts those itself)."""
    if frame.format.name not in PLANAR_FORMATS or frame.width % 2 or frame.height % 2:
        return None
    if frame.format.name in ("yuv420p", "yuvj420p"):
        return frame.to_ndarray()
    height, width = frame.height, frame.width  # (PyAV's to_ndarray takes 10-bit, not 12-bit)
    out = np.empty(height * width * 3 // 2, np.uint16)
    start = 0
    for i, plane in enumerate(frame.planes):
        rows, cols = (height // 2, width // 2) if i else (height, width)
        out[start:start + rows * cols] = np.frombuffer(plane, np.uint16).reshape(-1, plane.line_size // 2)[
            :rows, :cols].ravel()
        start += rows * cols
    return out.reshape(height * 3 // 2, width)


def nv12_surfaces(planes, height: int, width: int):
    """[..., H * 3 // 2, W] planes (yuv420_planes' layout, any device) -> NV12 surfaces [..., H * 3 // 2, W]: the
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
