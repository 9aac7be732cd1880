"""YUV 4:2:0 -> RGB the way the CPU path (FFmpeg's swscale through PyAV) does it, as torch ops on any device.

The CPU path turns decoded frames into RGB with `frame.to_ndarray(format="rgb24")`: swscale's unscaled
yuv420p -> rgb24 converter with the frame's colour matrix and range. On x86-64 that converter works in
16-bit fixed point (the SIMD path): luma and each chroma term are multiplied separately, keeping the high
16 bits (`pmulhw`: floor of the product / 65536), summed, and saturated to 0..255; each chroma sample
serves its 2 x 2 luma block (no chroma interpolation). The coefficients come from FFmpeg's per-matrix table
(`ff_yuv2rgb_coeffs`, returned by `sws_getCoefficients`), scaled for the range as swscale does.
`nv12_to_rgb` repeats that arithmetic exactly, so NVDEC's NV12 frames (bit-identical to FFmpeg's yuv420p
planes for H.264, HEVC and VP9) become the CPU path's RGB pixels; tests check it against PyAV.

Colour metadata is read as FFmpeg reads it: the matrix from the stream's `colorspace` (unspecified,
reserved and unknown values use BT.601, swscale's default), the range from `color_range` (unspecified
means limited/MPEG range; `yuvj*` pixel formats are full/JPEG range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# FFmpeg's ff_yuv2rgb_coeffs (libswscale/yuv2rgb.c), indexed by AVColorSpace: crv, cbu, cgu, cgv in 16.16
# fixed point for limited-range input. Public constants of the format, listed here as data.
_BT601 = (104597, 132201, 25675, 53279)
_FFMPEG_YUV2RGB_COEFFS = {
    1: (117489, 138438, 13975, 34925),   # BT.709
    4: (104448, 132798, 24759, 53109),   # FCC
    7: (117579, 136230, 16907, 35559),   # SMPTE 240M
    9: (110013, 140363, 12277, 42626),   # BT.2020 non-constant luminance
    10: (110013, 140363, 12277, 42626),  # BT.2020 constant luminance (same table; swscale refuses it)
}
AVCOL_RANGE_JPEG = 2
UNSUPPORTED_COLORSPACES = {0: "RGB matrix on YUV data", 8: "YCgCo", 10: "BT.2020 constant luminance"}


@dataclass(frozen=True)
class YuvToRgb:
    """swscale's 16-bit coefficients for one colour matrix and range (what its x86 converter multiplies by)."""

    colorspace: int
    full_range: bool
    y_coeff: int
    y_offset: int
    v_red: int
    u_blue: int
    u_green: int
    v_green: int


def _round_to_int16(x: int) -> int:
    """swscale's roundToInt16 of a 16.16 value times 2^13 (or 2^3): (x + 2^15) >> 16, clipped to int16."""
    return max(-0x8000, min(0x7FFF, (x + (1 << 15)) >> 16))


def _scale_toward_zero(c: int, num: int, den: int) -> int:
    """C's integer (c * num) / den, which truncates toward zero."""
    q = abs(c) * num // den
    return q if c >= 0 else -q


def yuv_to_rgb(colorspace: int, full_range: bool) -> YuvToRgb:
    """Coefficients for an AVColorSpace value and range, computed as swscale's sws_setColorspaceDetails does."""
    crv, cbu, cgu, cgv = _FFMPEG_YUV2RGB_COEFFS.get(colorspace, _BT601)
    cgu, cgv = -cgu, -cgv
    if full_range:
        cy, oy = 1 << 16, 0
        crv, cbu, cgu, cgv = (_scale_toward_zero(c, 224, 255) for c in (crv, cbu, cgu, cgv))
    else:
        cy, oy = (1 << 16) * 255 // 219, 16 << 16
    return YuvToRgb(colorspace, full_range, _round_to_int16(cy << 13), _round_to_int16(oy << 3),
                    _round_to_int16(crv << 13), _round_to_int16(cbu << 13), _round_to_int16(cgu << 13),
                    _round_to_int16(cgv << 13))


def stream_yuv_to_rgb(colorspace: int | None, color_range: int | None, pix_fmt: str | None) -> YuvToRgb:
    """The conversion FFmpeg applies to a stream's frames, from its metadata; ValueError for matrices swscale
    (and so the CPU path) does not convert."""
    cs = int(colorspace or 2)
    if cs in UNSUPPORTED_COLORSPACES:
        raise ValueError(f"colour matrix {UNSUPPORTED_COLORSPACES[cs]} is not converted by FFmpeg's swscale")
    full = int(color_range or 0) == AVCOL_RANGE_JPEG or bool(pix_fmt and pix_fmt.startswith("yuvj"))
    return yuv_to_rgb(cs, full)


def _mulhi(x: torch.Tensor, coeff: int) -> torch.Tensor:
    """pmulhw: the high 16 bits of a signed 16 x 16-bit product (floor of x * coeff / 2^16)."""
    return (x * coeff) >> 16


def nv12_to_rgb_planar(luma: torch.Tensor, chroma: torch.Tensor, c: YuvToRgb) -> torch.Tensor:
    """uint8 luma [..., H, W] and interleaved chroma [..., ceil(H/2), ceil(W/2), 2] (U, V) -> RGB int32
    [..., 3, H, W] with values 0..255, exactly as swscale's x86 yuv420p -> rgb24 converter computes them."""
    h, w = luma.shape[-2:]
    y = _mulhi((luma.to(torch.int32) << 3) - c.y_offset, c.y_coeff)
    uv = (chroma.to(torch.int32) - 128) << 3
    u, v = uv[..., 0], uv[..., 1]
    terms = torch.stack([_mulhi(v, c.v_red), _mulhi(u, c.u_green) + _mulhi(v, c.v_green), _mulhi(u, c.u_blue)], -3)
    terms = terms.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :h, :w]
    return (y.unsqueeze(-3) + terms).clamp_(0, 255)


def nv12_to_rgb(luma: torch.Tensor, chroma: torch.Tensor, c: YuvToRgb) -> torch.Tensor:
    """As nv12_to_rgb_planar, as uint8 [..., H, W, 3] (what `to_ndarray(format="rgb24")` returns)."""
    return nv12_to_rgb_planar(luma, chroma, c).to(torch.uint8).movedim(-3, -1).contiguous()


def split_nv12(frame: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An NV12 surface [1.5 x surface height, pitch] (luma rows, then half as many rows of interleaved chroma;
    NVDEC's layout) -> (luma [H, W], chroma [ceil(H/2), ceil(W/2), 2]) views of the picture's H x W area;
    padding rows and columns are ignored."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    luma = frame[..., :height, :width]
    rows = frame.shape[-2] * 2 // 3  # chroma starts after the surface's luma rows
    chroma = frame[..., rows:rows + ch, :2 * cw].unflatten(-1, (cw, 2))
    return luma, chroma
