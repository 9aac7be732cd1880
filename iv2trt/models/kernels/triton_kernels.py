"""Triton kernels of the fused fp16 path on a GPU.

`attention_cls_split`: exact attention over [cls, 2,048 patch tokens] with the cls key apart. cuDNN's flash
kernel takes all queries against the patch keys and values alone (a whole number of its 128-key tiles:
the 2,049th key costs it a fifth to a quarter more) and returns its log-sum-exp; `_cls_merge_kernel`
merges in the cls key's share. Attention over a set of keys is the merge of attention over any split of it:

    out = o + sigmoid(s - lse) * (v_cls - o),   s = q . k_cls * scale,

with o and lse cuDNN's output and natural-log log-sum-exp over the patch keys.

`qk_norm_attention`: the deferred blocks' attention with the q/k RMSNorms inside, from the qkv product's raw
rows and sums of squares. `qk_norm_rows`: those norms alone, for FlashAttention-4 (flash_attn4).

Imported only on a machine with Triton and a CUDA GPU (fused_ops decides); CPU installs never load it
(tests run the merge kernel in Triton's interpreter).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _cls_merge_kernel(o_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, out_ptr, N, H, scale,
                      so_b, so_h, so_n, sl_b, sl_h, sl_n, sq_b, sq_h, sq_n, sk_b, sk_h, sv_b, sv_h, sout_b, sout_n,
                      D: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, n, h*D:(h+1)*D] for BLOCK_N queries n of one (b, h) (program axes: query block, b * H + h):
    cuDNN's o over the patch keys merged with the cls key's (token 0's) share."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (n < N)[:, None]
    d = tl.arange(0, D)[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + n[:, None] * sq_n + d, mask=ok, other=0.0).to(tl.float32)
    k_cls = tl.load(k_ptr + b * sk_b + h * sk_h + d).to(tl.float32)
    v_cls = tl.load(v_ptr + b * sv_b + h * sv_h + d).to(tl.float32)
    s = tl.sum(q * k_cls, 1) * scale
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + n * sl_n, mask=n < N, other=0.0)
    w = (1.0 / (1.0 + tl.exp(lse - s)))[:, None]  # the cls key's share of each query's softmax
    o = tl.load(o_ptr + b * so_b + h * so_h + n[:, None] * so_n + d, mask=ok, other=0.0).to(tl.float32)
    out = o + w * (v_cls - o)
    tl.store(out_ptr + b * sout_b + n[:, None] * sout_n + h * D + d, out.to(out_ptr.dtype.element_ty), mask=ok)


# (BLOCK_N, num_warps): among the fastest of a sweep at S/14's 32x8 shape on an H200 (0.040 ms a layer;
# tools/bench_cls_split.py).
MERGE_CONFIG = (64, 4)


def attention_cls_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v [B, H, N, D] (any strides, head dim contiguous) whose token 0 is
    the cls token -> [B, N, H * D]."""
    B, H, N, D = q.shape
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False, scale=scale)[:2]
    return cls_merge(o, lse.reshape(B, H, N), q, k, v, scale)


def cls_merge(o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              config: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, N, H * D]: the attention of q [B, H, N, D] over the keys after token 0 (o [B, H, N, D], its
    natural-log log-sum-exp lse [B, H, N]) merged with token 0's key and value (k, v [B, H, N, D])."""
    B, H, N, D = q.shape
    if o.shape != q.shape or lse.shape != (B, H, N):
        raise ValueError(f"cls_merge: o {tuple(o.shape)} and lse {tuple(lse.shape)} do not match q {tuple(q.shape)}")
    block_n, warps = config or MERGE_CONFIG
    out = torch.empty(B, N, H * D, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(N, block_n), B * H)
    _cls_merge_kernel[grid](o, lse, q, k, v, out, N, H, scale,
                            o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                            v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                            D=D, BLOCK_N=block_n, num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# q/k-normalised attention straight from the deferred blocks' qkv product (models.deferred_norm)
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rstd(parts_ptr, rows, sp, FIRST: tl.constexpr, COUNT: tl.constexpr, inv_width, eps):
    """1 / sqrt(mean(x^2) + eps) of rows whose sums of squares are parts FIRST .. FIRST + COUNT - 1."""
    total = tl.load(parts_ptr + rows * sp + FIRST)
    for j in tl.static_range(1, COUNT):
        total += tl.load(parts_ptr + rows * sp + FIRST + j)
    return tl.math.rsqrt(total * inv_width + eps)


@triton.jit
def _key_norm_kernel(qkv_ptr, parts_ptr, kn_ptr, cls_ptr, N, s_n, sp, skn, inv_c, q_eps, k_eps, qk_scale,
                     C: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr, BR: tl.constexpr, CHUNKS: tl.constexpr):
    """BR rows of clip b (program axes: row chunk, b): kn = k * its row's rstd (the k RMSNorm but for its
    weight, which the product's weight holds), and the cls query's attention over these rows' keys as a
    partial softmax state per head: cls_ptr[b, h, chunk] = (weighted values [D], max, sum), in log2 units."""
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    n = chunk * BR + tl.arange(0, BR)
    ok = n < N
    rows = (b * N + tl.minimum(n, N - 1)).to(tl.int64)
    cls = (b * N).to(tl.int64)
    rk = _rstd(parts_ptr, rows, sp, PARTS, PARTS, inv_c, k_eps)
    rq_c = _rstd(parts_ptr, cls, sp, 0, PARTS, inv_c, q_eps) * qk_scale
    d = tl.arange(0, D)
    for h in tl.static_range(C // D):
        cols = h * D + d[None, :]
        k = tl.load(qkv_ptr + rows[:, None] * s_n + C + cols)
        kn = (k.to(tl.float32) * rk[:, None]).to(k.dtype)
        tl.store(kn_ptr + rows[:, None] * skn + cols, kn, mask=ok[:, None])
        q_c = tl.load(qkv_ptr + cls * s_n + h * D + d).to(tl.float32) * rq_c
        s = tl.where(ok, tl.sum(kn.to(tl.float32) * q_c[None, :], 1), float("-inf"))
        m = tl.max(s, 0)
        p = tl.math.exp2(s - m)
        v = tl.load(qkv_ptr + rows[:, None] * s_n + 2 * C + cols).to(tl.float32)
        state = cls_ptr + ((b * (C // D) + h) * CHUNKS + chunk) * (D + 2)
        tl.store(state + d, tl.sum(p[:, None] * v, 0))
        tl.store(state + D, m)
        tl.store(state + D + 1, tl.sum(p, 0))


@triton.jit
def _cls_chunks_merge_kernel(cls_ptr, out_ptr, N, H, so_n, D: tl.constexpr, CHUNKS: tl.constexpr,
                             CHUNKS_P2: tl.constexpr):
    """out[b, 0, h*D:(h+1)*D]: the cls query's attention, the merge of its partial states over the row chunks."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    c = tl.arange(0, CHUNKS_P2)
    ok = c < CHUNKS
    d = tl.arange(0, D)
    state = cls_ptr + (bh * CHUNKS + c) * (D + 2)
    m = tl.load(state + D, mask=ok, other=float("-inf"))
    w = tl.where(ok, tl.math.exp2(m - tl.max(m, 0)), 0.0)
    total = tl.sum(w * tl.load(state + D + 1, mask=ok, other=0.0), 0)
    acc = tl.sum(w[:, None] * tl.load(state[:, None] + d[None, :], mask=ok[:, None], other=0.0), 0)
    tl.store(out_ptr + (b * N).to(tl.int64) * so_n + h * D + d, (acc / total).to(out_ptr.dtype.element_ty))


@triton.jit
def _qk_norm_attention_kernel(desc_q, desc_k, desc_v, desc_o, qkv_ptr, kn_ptr, parts_ptr, out_ptr,
                              N: tl.constexpr, H, s_n, skn, sp, inv_c, q_eps, qk_scale,
                              C: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr):
    """BM patch queries of one (b, h) (program axes: query block, b * H + h) against the cls key (the
    softmax's initial state) and the patch keys, on tensor cores.

    qkv holds q * wq (wq the q RMSNorm's weight) and v, kn the normalised keys (`_key_norm_kernel`); parts
    the rows' sums of squares of q without its weight (the first PARTS parts). Each query's rstd (times
    scale * log2(e)) scales its row of scores; it is positive, so the row maximum scales with it."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cls = (b * N).to(tl.int64)  # token 0 of clip b, a row of qkv
    d = tl.arange(0, D)
    k_cls = tl.load(kn_ptr + cls * skn + h * D + d).to(tl.float32)
    v_cls = tl.load(qkv_ptr + cls * s_n + 2 * C + h * D + d).to(tl.float32)
    first = b * N + 1 + block * BM
    rqs = _rstd(parts_ptr, (first + tl.arange(0, BM)).to(tl.int64), sp, 0, PARTS, inv_c, q_eps) * qk_scale
    q = desc_q.load([first, h * D])
    m_i = tl.sum(q.to(tl.float32) * k_cls[None, :], 1) * rqs
    l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
    acc = tl.zeros([BM, D], dtype=tl.float32) + v_cls[None, :]
    for offset in tl.range(1, N, BN, num_stages=STAGES):
        start = b * N + offset
        k = desc_k.load([start, h * D])
        v = desc_v.load([start, 2 * C + h * D])
        t = tl.dot(q, k.T)
        m_ij = tl.maximum(m_i, tl.max(t, 1) * rqs)
        p = tl.math.exp2(t * rqs[:, None] - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij
    desc_o.store([first, h * D], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty))


@triton.jit
def _qk_norm_rows_kernel(qkv_ptr, parts_ptr, qkn_ptr, qs_ptr, rows_total, s_n, sp, sqkn, inv_c, q_eps, k_eps,
                         q_scale, C: tl.constexpr, PARTS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                         Q_SCALES: tl.constexpr):
    """BR rows of qkv (program axis: row block): the q/k RMSNorms but for their weights (which the product's
    weight holds), from the rows' sums of squares in parts. qkn[r] = (q * rstd_q, k * rstd_k); with Q_SCALES,
    qkn[r] = k * rstd_k and qs[r] = rstd_q * q_scale (the queries' norms left to the attention kernel's softmax)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < rows_total
    rows = tl.minimum(r, rows_total - 1).to(tl.int64)
    rq = _rstd(parts_ptr, rows, sp, 0, PARTS, inv_c, q_eps)
    rk = _rstd(parts_ptr, rows, sp, PARTS, PARTS, inv_c, k_eps)
    if Q_SCALES:
        tl.store(qs_ptr + rows, rq * q_scale, mask=ok)
    c = tl.arange(0, BC)
    for j in tl.static_range(C // BC):
        cols = rows[:, None] * s_n + j * BC + c[None, :]
        out = rows[:, None] * sqkn + j * BC + c[None, :]
        k = tl.load(qkv_ptr + cols + C)
        if Q_SCALES:
            tl.store(qkn_ptr + out, (k.to(tl.float32) * rk[:, None]).to(k.dtype), mask=ok[:, None])
        else:
            q = tl.load(qkv_ptr + cols)
            tl.store(qkn_ptr + out, (q.to(tl.float32) * rq[:, None]).to(q.dtype), mask=ok[:, None])
            tl.store(qkn_ptr + out + C, (k.to(tl.float32) * rk[:, None]).to(k.dtype), mask=ok[:, None])


# (BM, BN, num_warps, num_stages): tiles of the patch queries and keys. The fastest of
# tools/bench_qk_norm_attention.py's sweep at S/14's 32x8 shape on an H200.
QK_NORM_CONFIG = (128, 128, 4, 3)
KEY_NORM_ROWS = 32  # rows of a _key_norm_kernel program
LOG2E = 1.4426950408889634


def _part_width(qkv: torch.Tensor, parts: torch.Tensor) -> int:
    """The columns of one part where qkv [B, N, 3C] and parts [B * N, P] are contiguous and fit (P parts of
    3C / P columns each), else 0."""
    B, N, C3 = qkv.shape
    fits = qkv.is_contiguous() and parts.is_contiguous() and parts.shape[0] == B * N and C3 % parts.shape[1] == 0
    return C3 // parts.shape[1] if fits else 0


def qk_norm_attention_shape_ok(N: int, C: int, heads: int, part: int, config=None) -> bool:
    """Whether qk_norm_attention takes N tokens (token 0 the cls token) of width C in `heads` heads with
    sums of squares in parts of `part` columns: whole tiles of patch queries and keys, whole parts for q and
    k, and a head dim for tensor cores."""
    bm, bn = (config or QK_NORM_CONFIG)[:2]
    D = C // heads
    return (N > bn and (N - 1) % bm == 0 and (N - 1) % bn == 0 and C % part == 0 and C == heads * D
            and D in (16, 32, 64, 128))


def key_norm(qkv: torch.Tensor, parts: torch.Tensor, heads: int, scale: float, q_eps: float, k_eps: float,
             rows: int = KEY_NORM_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_attention's first pass (`_key_norm_kernel`, then `_cls_chunks_merge_kernel`): the normalised keys
    [B * N, C] and the output [B * N, C] with each clip's cls row (row 0) written, the other rows left for the
    attention kernel."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    flat = qkv.view(B * N, C3)
    kn = torch.empty(B * N, C, device=qkv.device, dtype=qkv.dtype)
    chunks = triton.cdiv(N, rows)
    cls_states = torch.empty(B, heads, chunks, D + 2, device=qkv.device, dtype=torch.float32)
    _key_norm_kernel[(chunks, B)](flat, parts, kn, cls_states, N, flat.stride(0), parts.stride(0), kn.stride(0),
                                  1.0 / C, q_eps, k_eps, scale * LOG2E, C=C, D=D, PARTS=C // (C3 // parts.shape[1]),
                                  BR=rows, CHUNKS=chunks)
    out = torch.empty(B * N, C, device=qkv.device, dtype=qkv.dtype)
    _cls_chunks_merge_kernel[(B * heads,)](cls_states, out, N, heads, out.stride(0), D=D, CHUNKS=chunks,
                                           CHUNKS_P2=triton.next_power_of_2(chunks))
    return kn, out


def qk_norm_attention(qkv: torch.Tensor, parts: torch.Tensor, heads: int, scale: float, q_eps: float,
                      k_eps: float, config=None, key_norm_rows: int = KEY_NORM_ROWS) -> torch.Tensor:
    """softmax(norm_q(q) norm_k(k)^T * scale) v -> [B, N, C], token 0 the cls token: the keys normalised by a
    pass of their own, which also takes the cls query's attention in row chunks (`_key_norm_kernel`, merged by
    `_cls_chunks_merge_kernel`); the patch queries' norms in the attention kernel's scores.

    qkv [B, N, 3C]: q * wq, k * wk and v of `heads` heads side by side (wq, wk the RMSNorms' weights);
    parts [B * N, P] float32: each row's sums of squares of q, k (and v) without the weights, in P parts of
    3C / P columns."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, N, C3 = qkv.shape
    C = C3 // 3
    part = _part_width(qkv, parts)
    bm, bn, warps, stages = config or QK_NORM_CONFIG
    if not (part and qk_norm_attention_shape_ok(N, C, heads, part, config)):
        raise ValueError(f"qk_norm_attention: qkv {tuple(qkv.shape)} with parts {tuple(parts.shape)} in "
                         f"{heads} heads is not a shape it takes")
    D = C // heads
    flat = qkv.view(B * N, C3)
    sizes = dict(C=C, D=D, PARTS=C // part)
    kn, out = key_norm(qkv, parts, heads, scale, q_eps, k_eps, key_norm_rows)
    desc_q = TensorDescriptor.from_tensor(flat, [bm, D])
    desc_k = TensorDescriptor.from_tensor(kn, [bn, D])
    desc_v = TensorDescriptor.from_tensor(flat, [bn, D])
    desc_o = TensorDescriptor.from_tensor(out, [bm, D])
    _qk_norm_attention_kernel[((N - 1) // bm, B * heads)](
        desc_q, desc_k, desc_v, desc_o, flat, kn, parts, out, N, heads, flat.stride(0), kn.stride(0), parts.stride(0),
        1.0 / C, q_eps, scale * LOG2E, BM=bm, BN=bn, STAGES=stages, num_warps=warps, **sizes)
    return out.view(B, N, C)


QK_NORM_ROWS = 32  # rows of a _qk_norm_rows_kernel program


def _norm_rows(qkv: torch.Tensor, parts: torch.Tensor, q_eps: float, k_eps: float, q_scale: float | None):
    B, N, C3 = qkv.shape
    C = C3 // 3
    part = _part_width(qkv, parts)
    cols = math.gcd(C, 128)  # columns a step: a power of two
    if not (part and C % part == 0 and cols >= 16):
        raise ValueError(f"qk_norm_rows: qkv {tuple(qkv.shape)} with parts {tuple(parts.shape)} is not a shape it "
                         f"takes")
    flat = qkv.view(B * N, C3)
    width = C if q_scale is not None else 2 * C
    qkn = torch.empty(B * N, width, device=qkv.device, dtype=qkv.dtype)
    qs = torch.empty(B * N if q_scale is not None else 1, device=qkv.device, dtype=torch.float32)
    _qk_norm_rows_kernel[(triton.cdiv(B * N, QK_NORM_ROWS),)](
        flat, parts, qkn, qs, B * N, flat.stride(0), parts.stride(0), qkn.stride(0), 1.0 / C, q_eps, k_eps,
        1.0 if q_scale is None else q_scale, C=C, PARTS=C // part, BR=QK_NORM_ROWS, BC=cols,
        Q_SCALES=q_scale is not None, num_warps=4)
    return qkn.view(B, N, width), qs


def qk_norm_rows(qkv: torch.Tensor, parts: torch.Tensor, q_eps: float, k_eps: float) -> torch.Tensor:
    """[B, N, 2C]: the normalised q and k of the deferred blocks' qkv [B, N, 3C] (q * wq, k * wk, v; wq, wk the
    RMSNorms' weights) side by side, from parts [B * N, P], each row's sums of squares without the weights in
    P parts of 3C / P columns. For attention kernels that take normalised q and k (flash_attn4)."""
    return _norm_rows(qkv, parts, q_eps, k_eps, None)[0]


def key_norm_rows(qkv: torch.Tensor, parts: torch.Tensor, q_eps: float, k_eps: float,
                  q_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What qk_norm_rows takes -> (the normalised k [B, N, C], each query's rstd times q_scale, float32 [B, N]):
    for attention kernels with a softmax scale per query (flash_attn4_row_scaled)."""
    kn, qs = _norm_rows(qkv, parts, q_eps, k_eps, q_scale)
    return kn, qs.view(qkv.shape[0], qkv.shape[1])
