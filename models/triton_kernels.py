"""Triton kernels of the fused fp16 path on a GPU: what TensorRT folds into its matrix products and attention.

- `qkv_rmsnorm`: the qkv projection with the q and k RMSNorms in its epilogue: one program holds whole
  rows of q, k or v (384 columns, three accumulators of 128), normalises q's and k's and writes them once.
- `attention_cls_split`: cuDNN's flash attention over the 2,048 patch tokens alone (a whole number of
  tiles; the 2,049th token costs cuDNN a quarter more), merged with the cls key through the log-sum-exp
  cuDNN returns, and the cls query on its own.

Imported only on a machine with Triton and a CUDA GPU (models.fused_ops decides); CPU runs never load it.
Arithmetic mirrors the eager model's roundings: the matrix product is rounded to the activation dtype
before the residual add and the norms, which are computed in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128  # columns per accumulator: a row of the model's width is CHUNKS accumulators of CHUNK


@triton.jit
def _dot_chunk(a, w_ptrs, acc, offset):
    return tl.dot(a, tl.trans(tl.load(w_ptrs + offset)), acc)


@triton.jit
def _bias_round(acc, bias_ptr, cols, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    """acc (+ bias), rounded to the activation dtype (as a stored matrix product is), back in float32."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return acc.to(dtype).to(tl.float32)


@triton.jit
def _store_row(ptrs, y0, y1, y2, y3, mask, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, dtype: tl.constexpr):
    tl.store(ptrs, y0.to(dtype), mask=mask)
    if CHUNKS > 1:
        tl.store(ptrs + CHUNK, y1.to(dtype), mask=mask)
    if CHUNKS > 2:
        tl.store(ptrs + 2 * CHUNK, y2.to(dtype), mask=mask)
    if CHUNKS > 3:
        tl.store(ptrs + 3 * CHUNK, y3.to(dtype), mask=mask)


@triton.jit
def _store_normed_row(ptrs, y0, y1, y2, y3, w_ptr, mask, eps, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                      dtype: tl.constexpr):
    """RMSNorm of the row held in y0..y3 (float32), times its weight, stored in dtype."""
    ss = tl.sum(y0 * y0, 1)
    if CHUNKS > 1:
        ss += tl.sum(y1 * y1, 1)
    if CHUNKS > 2:
        ss += tl.sum(y2 * y2, 1)
    if CHUNKS > 3:
        ss += tl.sum(y3 * y3, 1)
    inv = tl.rsqrt(ss / (CHUNK * CHUNKS) + eps)[:, None]
    rn = tl.arange(0, CHUNK)
    tl.store(ptrs, (y0 * inv * tl.load(w_ptr + rn).to(tl.float32)[None, :]).to(dtype), mask=mask)
    if CHUNKS > 1:
        tl.store(ptrs + CHUNK, (y1 * inv * tl.load(w_ptr + CHUNK + rn).to(tl.float32)[None, :]).to(dtype),
                 mask=mask)
    if CHUNKS > 2:
        tl.store(ptrs + 2 * CHUNK, (y2 * inv * tl.load(w_ptr + 2 * CHUNK + rn).to(tl.float32)[None, :]).to(dtype),
                 mask=mask)
    if CHUNKS > 3:
        tl.store(ptrs + 3 * CHUNK, (y3 * inv * tl.load(w_ptr + 3 * CHUNK + rn).to(tl.float32)[None, :]).to(dtype),
                 mask=mask)


@triton.jit
def _qkv_rmsnorm_kernel(a_ptr, w_ptr, bias_ptr, q_norm_ptr, k_norm_ptr, out_ptr, M, stride_am, stride_wn,
                        stride_om, eps, K: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        ROWS_MAJOR: tl.constexpr):
    """One program: BLOCK_M rows of one section (q, k or v) of R = CHUNK * CHUNKS columns of a W^T (+ b); q's
    and k's rows are RMSNorm'd over their R columns before they are stored. ROWS_MAJOR: the three programs of
    the same rows are neighbours, so their shared rows of `a` come from L2 after the first read."""
    dtype = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if ROWS_MAJOR:
        pid_m = pid // 3
        section = pid % 3
    else:
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        section = pid // num_m
    R: tl.constexpr = CHUNK * CHUNKS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < M)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    rk = tl.arange(0, BLOCK_K)[None, :]
    rn = tl.arange(0, CHUNK)
    a_ptrs = a_ptr + rows64 * stride_am + rk
    w_ptrs = w_ptr + (section * R + rn)[:, None] * stride_wn + rk
    step = CHUNK * stride_wn
    acc0 = tl.zeros((BLOCK_M, CHUNK), tl.float32)
    acc1 = tl.zeros((BLOCK_M, CHUNK), tl.float32)
    acc2 = tl.zeros((BLOCK_M, CHUNK), tl.float32)
    acc3 = tl.zeros((BLOCK_M, CHUNK), tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_ok, other=0.0)
        acc0 = _dot_chunk(a, w_ptrs, acc0, 0)
        if CHUNKS > 1:
            acc1 = _dot_chunk(a, w_ptrs, acc1, step)
        if CHUNKS > 2:
            acc2 = _dot_chunk(a, w_ptrs, acc2, 2 * step)
        if CHUNKS > 3:
            acc3 = _dot_chunk(a, w_ptrs, acc3, 3 * step)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c0 = section * R + rn
    acc0 = _bias_round(acc0, bias_ptr, c0, HAS_BIAS, dtype)
    if CHUNKS > 1:
        acc1 = _bias_round(acc1, bias_ptr, c0 + CHUNK, HAS_BIAS, dtype)
    if CHUNKS > 2:
        acc2 = _bias_round(acc2, bias_ptr, c0 + 2 * CHUNK, HAS_BIAS, dtype)
    if CHUNKS > 3:
        acc3 = _bias_round(acc3, bias_ptr, c0 + 3 * CHUNK, HAS_BIAS, dtype)
    out_ptrs = out_ptr + rows64 * stride_om + c0[None, :]
    if section == 0:
        _store_normed_row(out_ptrs, acc0, acc1, acc2, acc3, q_norm_ptr, row_ok, eps, CHUNK, CHUNKS, dtype)
    elif section == 1:
        _store_normed_row(out_ptrs, acc0, acc1, acc2, acc3, k_norm_ptr, row_ok, eps, CHUNK, CHUNKS, dtype)
    else:
        _store_row(out_ptrs, acc0, acc1, acc2, acc3, row_ok, CHUNK, CHUNKS, dtype)


# (BLOCK_M, BLOCK_K, num_warps, num_stages): the fastest of a sweep for S/14's qkv (K = 384) on an H200
# (tools/bench_fused_kernels.py --gemms).
QKV_CONFIG = (128, 32, 8, 4)


def row_chunks(width: int) -> int:
    """Accumulators per row of `width` columns; the kernel holds up to 4 (rows of 128 to 512)."""
    if width % CHUNK or not 1 <= width // CHUNK <= 4:
        raise ValueError(f"qkv_rmsnorm needs a width of 128, 256, 384 or 512 columns, got {width}")
    return width // CHUNK


def qkv_rmsnorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_norm: torch.Tensor,
                k_norm: torch.Tensor, eps: float, config: tuple[int, int, int, int] | None = None,
                rows_major: bool = True) -> torch.Tensor:
    """x [..., C] @ weight[3C, C]^T (+ bias) -> [..., 3C] = [RMSNorm(q) * q_norm, RMSNorm(k) * k_norm, v]."""
    K = x.shape[-1]
    N = weight.shape[0]
    width = N // 3
    chunks = row_chunks(width)
    block_m, block_k, warps, stages = config or QKV_CONFIG
    if N != 3 * width or K % block_k or weight.stride(-1) != 1:
        raise ValueError(f"qkv_rmsnorm: weight {tuple(weight.shape)} is not [3C, K] with K a multiple of {block_k}")
    a = x.reshape(-1, K)
    if a.stride(-1) != 1:
        a = a.contiguous()
    M = a.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m) * 3,)
    _qkv_rmsnorm_kernel[grid](a, weight, bias if bias is not None else weight, q_norm, k_norm, out, M, a.stride(0),
                              weight.stride(0), out.stride(0), eps, K=K, CHUNK=CHUNK, CHUNKS=chunks, BLOCK_M=block_m,
                              BLOCK_K=block_k, HAS_BIAS=bias is not None, ROWS_MAJOR=rows_major, num_warps=warps,
                              num_stages=stages)
    return out.reshape(*x.shape[:-1], N)


@triton.jit
def _cls_merge_kernel(o_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, oc_ptr, out_ptr, P, H, scale,
                      so_b, so_h, so_n, sl_b, sl_h, sl_n, sq_b, sq_h, sq_n, sk_b, sk_h, sv_b, sv_h,
                      soc_b, soc_h, sout_b, sout_n,
                      D: tl.constexpr, BLOCK_P: tl.constexpr, Q0: tl.constexpr):
    """out[b, Q0 + p, h*D:(h+1)*D] = query Q0 + p's attention over [cls, patches]: cuDNN's output over the
    patch keys alone (o, with its log-sum-exp lse) merged with the cls key's share,
    o + sigmoid(s - lse) * (v_cls - o), s = q . k_cls * scale. Q0 = 1: cuDNN saw the patch queries only, and
    the first program of each (b, h) also writes the cls query's own output (oc) to row 0."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = (p < P)[:, None]
    d = tl.arange(0, D)[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + (p + Q0)[:, None] * sq_n + d, mask=ok, other=0.0).to(tl.float32)
    k_cls = tl.load(k_ptr + b * sk_b + h * sk_h + d).to(tl.float32)
    v_cls = tl.load(v_ptr + b * sv_b + h * sv_h + d).to(tl.float32)
    s = tl.sum(q * k_cls, 1) * scale
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + p * sl_n, mask=p < P, other=0.0)
    w = (1.0 / (1.0 + tl.exp(lse - s)))[:, None]
    o = tl.load(o_ptr + b * so_b + h * so_h + p[:, None] * so_n + d, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + b * sout_b + (p + Q0)[:, None] * sout_n + h * D + d, (o + w * (v_cls - o)).to(dtype),
             mask=ok)
    if Q0 == 1:
        if pid == 0:
            tl.store(out_ptr + b * sout_b + h * D + d, tl.load(oc_ptr + b * soc_b + h * soc_h + d))


MERGE_CONFIG = (64, 4)  # BLOCK_P, num_warps


def attention_cls_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        queries: str = "all", config: tuple[int, int] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v [B, H, N, D] -> [B, N, H * D], token 0 (the cls token) apart.

    cuDNN attends over the N - 1 patch keys and returns its log-sum-exp; `_cls_merge_kernel` merges the cls
    key's share in. queries="all": cuDNN takes all N queries; "patches": the N - 1 patch queries, and the
    cls query attends all N keys on its own (torch's SDPA)."""
    import torch.nn.functional as F

    B, H, N, D = q.shape
    first = 0 if queries == "all" else 1
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q[:, :, first:], k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False, scale=scale)[:2]
    oc = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale) if first else None
    return cls_merge(o, lse.reshape(B, H, N - first), q, k, v, oc, scale, config=config)


def cls_merge(o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              oc: torch.Tensor | None, scale: float, config: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, N, H * D]: attention over the patch keys (o [B, H, P, D] with its natural-log lse [B, H, P], for
    the last P = N or N - 1 queries) merged with the cls key's share; with P = N - 1, the cls query's own
    output oc [B, H, 1, D] goes to row 0."""
    B, H, N, D = q.shape
    P = o.shape[2]
    first = N - P
    if first not in (0, 1) or (first == 1) != (oc is not None):
        raise ValueError(f"cls_merge: {P} merged rows for {N} tokens needs oc exactly when P = N - 1")
    block_p, warps = config or MERGE_CONFIG
    out = torch.empty(B, N, H * D, device=q.device, dtype=q.dtype)
    oc_ = oc if oc is not None else o
    grid = (triton.cdiv(P, block_p), B * H)
    _cls_merge_kernel[grid](o, lse, q, k, v, oc_, out, P, H, scale,
                            o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                            v.stride(0), v.stride(1), oc_.stride(0), oc_.stride(1), out.stride(0), out.stride(1),
                            D=D, BLOCK_P=block_p, Q0=first, num_warps=warps)
    return out
