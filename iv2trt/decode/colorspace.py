"""YUV -> RGB the way the CPU path (FFmpeg's swscale through PyAV) does it, as torch ops on any device.

The CPU path turns decoded frames into RGB with `frame.to_ndarray(format="rgb24")`, and swscale takes one of three
routes there, each reproduced here exactly (tests check every one against PyAV, value by value):

- 8-bit 4:2:0 (`nv12_to_rgb`): swscale's unscaled yuv420p -> rgb24 converter. On x86-64 it works in 16-bit fixed
  point (the SIMD path): luma and each chroma term are multiplied separately, keeping the high 16 bits (`pmulhw`:
  floor of the product / 65536), summed, and saturated to 0..255; each chroma sample serves its 2 x 2 luma block
  (no chroma interpolation). The coefficients come from FFmpeg's per-matrix table (`ff_yuv2rgb_coeffs`), scaled
  for the range as swscale does.
- 10- and 12-bit 4:2:0 (`Yuv420HighDepth`): no unscaled converter exists, so swscale's scaler runs at scale 1:
  samples become 15-bit (`hScale16To15`), chroma is filtered to the output grid (bilinear: vertically 2x, and
  horizontally when the frame's chroma location is not centred, as H.264/HEVC decoders set it), luma and chroma
  are rounded to 8 bits and looked up in swscale's C tables (`ff_yuv2rgb_c_init_tables`, `yuv2rgb24_1_c`). The
  chroma location is not exposed by PyAV; `swscale_chroma_siting` asks swscale itself with a test pattern.
- 4:4:4 at any depth (`Yuv444`): swscale forces full chroma interpolation for unsubsampled input and computes
  each pixel in 30-bit fixed point (`yuv2rgb_full_1_c_template`, `yuv2rgb_write_full`), wrap-around of its
  unsigned arithmetic included.

NVDEC's surfaces are bit-identical to FFmpeg's decoded planes for H.264, HEVC, VP9 and AV1 (NV12: luma rows, then
interleaved U/V rows; P016: the same in 16-bit words, samples in the high bits; YUV444: three full planes), so the
GPU path produces the CPU path's RGB pixels. `surface_converter` picks the route for a stream.

Colour metadata is read as FFmpeg reads it: the matrix from the stream's `colorspace` (unspecified,
reserved and unknown values use BT.601, swscale's default), the range from `color_range` (unspecified
means limited/MPEG range; `yuvj*` pixel formats are full/JPEG range).
"""
from __future__ import annotations

import functools
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


def _colour(colorspace: int | None, color_range: int | None, pix_fmt: str | None) -> tuple[int, bool]:
    cs = int(colorspace or 2)
    if cs in UNSUPPORTED_COLORSPACES:
        raise ValueError(f"colour matrix {UNSUPPORTED_COLORSPACES[cs]} is not converted by FFmpeg's swscale")
    return cs, int(color_range or 0) == AVCOL_RANGE_JPEG or bool(pix_fmt and pix_fmt.startswith("yuvj"))


def _matrix(colorspace: int, full_range: bool) -> tuple[int, int, int, int, int, int]:
    """cy, oy, crv, cbu, cgu, cgv as ff_yuv2rgb_c_init_tables starts (contrast and saturation 1, brightness 0)."""
    crv, cbu, cgu, cgv = _FFMPEG_YUV2RGB_COEFFS.get(colorspace, _BT601)
    cgu, cgv = -cgu, -cgv
    if full_range:
        cy, oy = 1 << 16, 0
        crv, cbu, cgu, cgv = (_scale_toward_zero(c, 224, 255) for c in (crv, cbu, cgu, cgv))
    else:
        cy, oy = (1 << 16) * 255 // 219, 16 << 16
    return cy, oy, crv, cbu, cgu, cgv


def yuv_to_rgb(colorspace: int, full_range: bool) -> YuvToRgb:
    """Coefficients for an AVColorSpace value and range, computed as swscale's sws_setColorspaceDetails does."""
    cy, oy, crv, cbu, cgu, cgv = _matrix(colorspace, full_range)
    return YuvToRgb(colorspace, full_range, _round_to_int16(cy << 13), _round_to_int16(oy << 3),
                    _round_to_int16(crv << 13), _round_to_int16(cbu << 13), _round_to_int16(cgu << 13),
                    _round_to_int16(cgv << 13))


def stream_yuv_to_rgb(colorspace: int | None, color_range: int | None, pix_fmt: str | None) -> YuvToRgb:
    """The conversion FFmpeg applies to a stream's 8-bit 4:2:0 frames, from its metadata; ValueError for matrices
    swscale (and so the CPU path) does not convert."""
    return yuv_to_rgb(*_colour(colorspace, color_range, pix_fmt))


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


# --- the pixel formats the CPU path decodes to ------------------------------------------------------------------
# FFmpeg pixel format -> (bit depth, chroma format). What is not listed (4:2:2, 4:4:0, gray, alpha, RGB, packed or
# big-endian formats) has no conversion here.
PIX_FMTS = {"yuv420p": (8, "420"), "yuvj420p": (8, "420"), "yuv420p10le": (10, "420"), "yuv420p12le": (12, "420"),
            "yuv444p": (8, "444"), "yuvj444p": (8, "444"), "yuv444p10le": (10, "444"), "yuv444p12le": (12, "444")}


def pix_fmt_layout(pix_fmt: str | None) -> tuple[int, str] | None:
    """(bit depth, chroma format "420"/"422"/"444"/"400") of an FFmpeg pixel format, from its name; None when the
    name says neither (RGB, packed, alpha formats)."""
    if pix_fmt in PIX_FMTS:
        return PIX_FMTS[pix_fmt]
    import re

    m = re.fullmatch(r"(?:yuvj?|gray)(420|422|444|440|411|410)?p?(\d+)?(?:le|be)?", pix_fmt or "")
    if not m:
        return None
    return int(m.group(2) or 8), ("400" if pix_fmt.startswith("gray") else m.group(1))


def _c_div(a: int, b: int) -> int:
    """C's integer a / b (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


# --- swscale's scaling filters (initFilter, bilinear), for chroma at scale 1 or 2 ----------------------------------
def _local_pos(subsample: int, pos: int) -> int:
    """get_local_pos: a chroma position (1/256 luma pixel, -513 unset) relative to the left/top edge of its grid."""
    if pos == -1 or pos <= -513:
        pos = (128 << subsample) - 128
    return (pos + 128) >> subsample


def bilinear_filter(src: int, dst: int, src_pos: int, dst_pos: int, one: int, align: int = 1
                    ) -> tuple[list[int], list[list[int]]]:
    """swscale's initFilter for SWS_BILINEAR without extra vectors: (first source sample, integer taps summing to
    `one`) for each of `dst` outputs from `src` samples, with the unscaled shortcut, the size reduction, the border
    fix-up and the error-diffusing normalisation of libswscale/utils.c. `align` is the x86 filter alignment (4 for
    horizontal, 2 for vertical filters; a 1-tap vertical filter stays 1)."""
    inc = ((src << 16) + (dst >> 1)) // dst
    fone = 1 << (54 - min((src // dst).bit_length() - 1 if src >= dst else 0, 8))
    if abs(inc - 0x10000) < 10 and src_pos == dst_pos:
        pos, rows, size = list(range(dst)), [[fone] for _ in range(dst)], 1
    else:
        size = max(min(1 + 2 if inc <= 1 << 16 else 1 + (2 * src + dst - 1) // dst, src - 2), 1)
        pos, rows = [], []
        x = ((dst_pos * inc) >> 7) - ((src_pos * 0x10000) >> 7)
        for _ in range(dst):
            xx = _c_div(x - (size - 2) * (1 << 16), 1 << 17)
            pos.append(xx)
            row = []
            for j in range(size):
                d = abs((xx + j) * (1 << 17) - x) << 13
                if inc > 1 << 16:
                    d = _c_div(d * dst, src)
                row.append(max((1 << 30) - d, 0) * (fone >> 30))
            rows.append(row)
            x += 2 * inc
    cutoff = 0.002 * fone  # SWS_MAX_REDUCE_CUTOFF
    min_size = 0
    for i in range(dst - 1, -1, -1):  # drop near-zero taps on the left (shifting), count those on the right
        acc = 0
        for _ in range(size):
            acc += abs(rows[i][0])
            if acc > cutoff or (i < dst - 1 and pos[i] >= pos[i + 1]):
                break
            rows[i] = rows[i][1:] + [0]
            pos[i] += 1
        keep, acc = size, 0
        for j in range(size - 1, 0, -1):
            acc += abs(rows[i][j])
            if acc > cutoff:
                break
            keep -= 1
        min_size = max(min_size, keep)
    if min_size == 1 and align == 2:
        align = 1
    out_size = (min_size + align - 1) & ~(align - 1)
    rows = [(r + [0] * out_size)[:out_size] for r in rows]
    for i in range(dst):  # borders
        if pos[i] < 0:
            for j in range(1, out_size):
                left = max(j + pos[i], 0)
                rows[i][left] += rows[i][j]
                rows[i][j] = 0
            pos[i] = 0
        if pos[i] + out_size > src:
            shift = pos[i] + min(out_size - src, 0)
            acc = sum(rows[i][j] for j in range(out_size) if pos[i] + j >= src)
            rows[i] = [0 if j < shift else (0 if pos[i] + j - shift >= src else rows[i][j - shift])
                       for j in range(out_size)]
            pos[i] -= shift
            rows[i][src - 1 - pos[i]] += acc
    taps = []
    for i in range(dst):
        total = max((sum(rows[i]) + one // 2) // one, 1)
        err, out = 0, []
        for v in rows[i]:
            v += err
            q = _c_div(v + (total // 2 if v >= 0 else -(total // 2)), total)  # ROUNDED_DIV
            out.append(q)
            err = v - q * total
        taps.append(out)
    return pos, taps


@dataclass(frozen=True)
class _Filter:
    """A bilinear_filter as tensors on one device: output i takes sum_j x[index[i, j]] * weight[i, j]."""

    index: torch.Tensor
    weight: torch.Tensor
    packed1: bool  # at most 2 taps summing to 4096: swscale's yuv2packed1 runs (else yuv2packedX, which clips)

    def __call__(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.movedim(dim, -1)
        return (x[..., self.index] * self.weight).sum(-1, dtype=torch.int32).movedim(-1, dim)


@functools.lru_cache(maxsize=64)
def _chroma_filters(height: int, width: int, h_pos: int, v_pos: int, device: str) -> tuple[_Filter, _Filter]:
    """swscale's (horizontal, vertical) chroma filters for a height x width 4:2:0 frame at this chroma siting: the
    chroma grid onto 15-bit samples for each output pair of pixels, then onto every output row. Made once per
    frame size, siting and device (a 1080p frame's take tens of milliseconds in Python)."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    made = []
    for (pos, taps), src in ((bilinear_filter(cw, cw, _local_pos(1, h_pos), _local_pos(1, -513), 1 << 14, align=4),
                              cw),
                             (bilinear_filter(ch, height, _local_pos(1, v_pos), _local_pos(0, -513), 1 << 12, align=2),
                              ch)):
        index = torch.tensor([[min(p + j, src - 1) for j in range(len(taps[0]))] for p in pos], device=device)
        weight = torch.tensor(taps, dtype=torch.int32, device=device)
        made.append(_Filter(index, weight, all(len(t) <= 2 and sum(t) == 4096 for t in taps)))
    return made[0], made[1]


# --- 10- and 12-bit 4:2:0: the scaler's C output (yuv2rgb24_1_c) -----------------------------------------------
@dataclass(frozen=True)
class Yuv420HighDepth:
    """swscale's route for yuv420p10/12 -> rgb24 at one colour matrix, range and chroma siting (`h_pos`, `v_pos`:
    AVChromaLocation positions in 1/256 luma pixel, -513 when the frame has none)."""

    bit_depth: int
    colorspace: int
    full_range: bool
    h_pos: int = -513
    v_pos: int = -513

    def to_rgb_planar(self, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Samples (in `bit_depth` bits) y [..., H, W], u and v [..., ceil(H/2), ceil(W/2)] -> RGB int32
        [..., 3, H, W], 0..255, as swscale computes them."""
        h, w = y.shape[-2:]
        d = self.bit_depth
        horizontal, vertical = _chroma_filters(h, w, self.h_pos, self.v_pos, str(y.device))
        luma = ((y.to(torch.int32) << (15 - d)) + 64) >> 7  # the 1-tap vertical luma filter's rounding
        if not vertical.packed1:
            luma = luma.clamp_(max=255)
        chroma = []
        for c in (u, v):
            c15 = (horizontal(c.to(torch.int32), -1) >> (d - 1)).clamp_(max=(1 << 15) - 1)  # hScale16To15
            c8 = (vertical(c15, -2) + (1 << 18)) >> 19
            chroma.append(c8.clamp_(0, 255).repeat_interleave(2, dim=-1)[..., :w])
        return _c_table_rgb(luma, chroma[0], chroma[1], self.colorspace, self.full_range)


@functools.lru_cache(maxsize=32)
def _c_tables(colorspace: int, full: bool, device: str) -> tuple[torch.Tensor, ...]:
    """swscale's 24-bit C tables (ff_yuv2rgb_c_init_tables): y_table[i] = clip((yb + i * cy + 0x8000) >> 16), and
    for each 8-bit chroma value the offset table_rV[V] (table_gU[U] + table_gV[V], table_bU[U]) adds to the luma
    index: ((V * crv) >> 16) - (crv >> 9), the coefficients scaled by cy. Returned as (y_table from index `low`,
    low, R's V offsets, G's U offsets, G's V offsets, B's U offsets)."""
    cy, oy, crv, cbu, cgu, cgv = _matrix(colorspace, full)
    crv, cbu, cgu, cgv = (_c_div(c * (1 << 16) + 0x8000, cy) for c in (crv, cbu, cgu, cgv))
    offsets = [[((x * k) >> 16) - (k >> 9) for x in range(256)] for k in (crv, cgu, cgv, cbu)]
    low = min(min(offsets[0]), min(offsets[1]) + min(offsets[2]), min(offsets[3]))
    high = 256 + max(max(offsets[0]), max(offsets[1]) + max(offsets[2]), max(offsets[3]))
    base = -(384 << 16) - oy + (384 if full else 326) * cy + 0x8000
    y_table = [max(0, min(255, (base + i * cy) >> 16)) for i in range(low, high + 1)]
    return (torch.tensor(y_table, dtype=torch.int32, device=device), low,
            *(torch.tensor(o, dtype=torch.int32, device=device) for o in offsets))


def _c_table_rgb(luma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, colorspace: int, full: bool) -> torch.Tensor:
    """RGB from 8-bit Y (up to 256), U and V (0..255) through swscale's 24-bit C tables, looked up as it does."""
    y_table, low, rv, gu, gv, bu = _c_tables(colorspace, full, str(luma.device))
    y, u, v = luma.long() - low, u.long(), v.long()
    return torch.stack([y_table[y + rv[v]], y_table[y + gu[u] + gv[v]], y_table[y + bu[u]]], -3)


# --- 4:4:4: full chroma interpolation (yuv2rgb_full_1_c) ----------------------------------------------------------
@dataclass(frozen=True)
class Yuv444:
    """swscale's route for yuv444p (8, 10 or 12-bit) -> rgb24: its 16-bit `yuv2rgb_*_coeff` and 30-bit sums."""

    bit_depth: int
    colorspace: int
    full_range: bool

    def to_rgb_planar(self, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Samples (in `bit_depth` bits) y, u, v [..., H, W] -> RGB int32 [..., 3, H, W], 0..255."""
        cy, oy, crv, cbu, cgu, cgv = _matrix(self.colorspace, self.full_range)
        y_coeff, y_offset = _round_to_int16(cy << 13), _round_to_int16(oy << 9)
        v2r, v2g, u2g, u2b = (_round_to_int16(c << 13) for c in (crv, cgv, cgu, cbu))
        shift = 15 - self.bit_depth
        luma = ((y.to(torch.int64) << shift) * 4 - y_offset) * y_coeff + (1 << 21)
        cu = ((u.to(torch.int64) << shift) - (128 << 7)) * 4
        cv = ((v.to(torch.int64) << shift) - (128 << 7)) * 4
        rgb = torch.stack([luma + cv * v2r, luma + cv * v2g + cu * u2g, luma + cu * u2b], -3)
        rgb = ((rgb + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # C's unsigned 32-bit sums, read back as int
        overflow = ((rgb < 0) | (rgb >= 1 << 30)).any(dim=-3, keepdim=True)  # (R | G | B) & 0xC0000000
        rgb = torch.where(overflow, rgb.clamp(0, (1 << 30) - 1), rgb)
        return (rgb >> 22).to(torch.int32)


# --- NVDEC's surfaces -----------------------------------------------------------------------------------------
def dense_surface(frame: torch.Tensor) -> torch.Tensor:
    """A decoded 2-D surface [rows, W] as a dense row-major view. PyNvVideoCodec exports its 16-bit surfaces with
    strides that are not the buffer's layout (`LoadDLPack(shape, {width, 2}, "|u2", ...)` for P016 in its
    PyNvVideoCodecUtils.hpp, while NvDecoder copies them out packed, `dstPitch = GetWidth() * m_nBPP`): the
    buffer holds rows of W samples, one after the other."""
    w = frame.shape[-1]
    if frame.stride()[-2:] == (w, 1):
        return frame
    return frame.as_strided(frame.shape, (*frame.stride()[:-2], w, 1))


@dataclass(frozen=True)
class SurfaceConverter:
    """Decoder surfaces of one stream -> the CPU path's RGB: `layout` "nv12" (8-bit 4:2:0), "p016" (10/12-bit
    4:2:0, samples in the high bits of 16-bit words) or "yuv444" (8 or 16-bit words, three planes)."""

    layout: str
    bit_depth: int
    route: YuvToRgb | Yuv420HighDepth | Yuv444

    def rows(self, height: int) -> int:
        """Rows of a surface for a picture of `height` rows."""
        return 3 * height if self.layout == "yuv444" else height + (height + 1) // 2

    def to_rgb_planar(self, surfaces: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Surfaces [..., rows, >= W] (uint8 or uint16) -> RGB int32 [..., 3, H, W], 0..255."""
        if self.layout == "nv12":
            return nv12_to_rgb_planar(*split_nv12(surfaces, height, width), self.route)
        x = surfaces.to(torch.int32)
        if surfaces.dtype != torch.uint8:
            x = x >> (16 - self.bit_depth)  # 16-bit words, samples in the high bits (P016)
        if self.layout == "yuv444":
            y, u, v = (x[..., i * height:(i + 1) * height, :width] for i in range(3))
            return self.route.to_rgb_planar(y, u, v)
        luma, chroma = split_nv12(x, height, width)
        return self.route.to_rgb_planar(luma, chroma[..., 0], chroma[..., 1])


def surface_converter(colorspace: int | None, color_range: int | None, pix_fmt: str | None,
                      siting: tuple[int, int] = (-513, -513)) -> SurfaceConverter:
    """The conversion for a stream FFmpeg decodes to `pix_fmt` with these colour tags (and, for 10/12-bit 4:2:0,
    this chroma siting); ValueError for what swscale does not convert or no route here reproduces."""
    layout = pix_fmt_layout(pix_fmt)
    if layout is None or layout[1] not in ("420", "444") or layout[0] not in (8, 10, 12):
        raise ValueError(f"no RGB conversion of pixel format {pix_fmt} reproduces the CPU path's")
    cs, full = _colour(colorspace, color_range, pix_fmt)
    depth, chroma = layout
    if chroma == "444":
        return SurfaceConverter("yuv444", depth, Yuv444(depth, cs, full))
    if depth == 8:
        return SurfaceConverter("nv12", 8, yuv_to_rgb(cs, full))
    return SurfaceConverter("p016", depth, Yuv420HighDepth(depth, cs, full, *siting))


# --- which chroma siting swscale applies to a stream's frames -------------------------------------------------------
# AVChromaLocation -> (horizontal, vertical) position as av_chroma_location_enum_to_pos gives it; unspecified is
# swscale's default, which centres chroma like CENTER does.
CHROMA_SITINGS = {"unspecified": (-513, -513), "left": (0, 128), "topleft": (0, 0), "top": (128, 0),
                  "bottomleft": (0, 256), "bottom": (128, 256)}


def swscale_chroma_siting(frame) -> tuple[int, int] | None:
    """The chroma siting swscale applies to a decoded 10/12-bit 4:2:0 PyAV frame (the frame's chroma location, which
    PyAV does not expose): the frame's planes are overwritten with a test pattern, converted by swscale, and the
    candidate siting whose conversion here gives the same pixels is returned; None when none does. The frame is
    changed; pass one that is not needed any more."""
    import numpy as np

    depth = frame.format.components[0].bits
    h, w = min(frame.height, 24), min(frame.width, 24)
    mid = 1 << (depth - 1)
    rng = np.random.default_rng(0)
    frame.make_writable()
    planes = []
    for i, plane in enumerate(frame.planes):
        data = np.frombuffer(plane, np.uint16).reshape(-1, plane.line_size // 2)
        data[:] = mid
        if i:  # a patch of random chroma near the corner, away from the crop's far edges
            data[1:5, 1:5] = rng.integers(0, 1 << depth, (4, 4))
        planes.append(torch.from_numpy(data[:(h + 1) // 2 if i else h, :(w + 1) // 2 if i else w].astype(np.int32)))
    reference = torch.from_numpy(frame.to_ndarray(format="rgb24")[:h, :w]).permute(2, 0, 1).to(torch.int32)
    cs, full = _colour(frame.colorspace, frame.color_range, frame.format.name)
    for siting in CHROMA_SITINGS.values():
        if torch.equal(Yuv420HighDepth(depth, cs, full, *siting).to_rgb_planar(*planes), reference):
            return siting
    return None
