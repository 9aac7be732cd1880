"""Triton kernels of the fused fp16 path on a GPU.

`attention_cls_split`: exact attention over [cls, 2,048 patch tokens] with the cls key apart. cuDNN's flash
kernel takes all queries against the patch keys and values alone (a whole number of its 128-key tiles:
the 2,049th key costs it a fifth to a quarter more) and returns its log-sum-exp; `_cls_merge_kernel`
merges in the cls key's share. Attention over a set of keys is the merge of attention over any split of it:

    out = o + sigmoid(s - lse) * (v_cls - o),   s = q . k_cls * scale,

with o and lse cuDNN's output and natural-log log-sum-exp over the patch keys.

Imported only on a machine with Triton and a CUDA GPU (models.fused_ops decides); CPU installs never load it
(tests run the merge kernel in Triton's interpreter).
"""
from __future__ import annotations

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
