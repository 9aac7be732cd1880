"""FlashAttention-4's Hopper kernel (Tri Dao's `flash-attn-4`, in NVIDIA's CuTe DSL) for the deferred blocks'
q/k-norm attention.

`qk_norm_attention(qkv, parts, ...)` takes what triton_kernels.qk_norm_attention takes: the qkv
product's rows with the q/k norms' weights folded in, and their sums of squares. FA4 attends over all N tokens
(cls included), q and v read in place from qkv, in one of two ways:
- row_scales (the default where it serves): a Triton pass writes the normalised k and each query's rstd * scale
  (triton_kernels.key_norm_rows); FA4's kernel takes those as its softmax scale per query row
  (flash_attn4_row_scaled), at no extra arithmetic. 2.2% faster end to end at S/14's 32x8 on an H100
  (docs/benchmarks.md, the H100 32x8 table);
- else a Triton pass writes the normalised q and k (triton_kernels.qk_norm_rows) for FA4's own kernel.
  At 32x8 on an H100 that took 525 µs a layer against the Triton kernel's 562 (issue 11, in the git history of
  docs/benchmarks.md).

Where each serves: fused_ops.flash_attn4_serves (fp16 on a Hopper GPU where `flash-attn-4` is installed,
requirements-gpu.txt, and a small attention of its matches torch's; `IV2TRT_FLASH_ATTN4=off` turns FA4 off,
and the Triton kernel then serves) and fused_ops.flash_attn4_row_scales_serve (its own test attention;
`IV2TRT_FLASH_ATTN4_ROW_SCALES=off`). FA4 compiles a kernel per shape class at first use (seconds); the runner
turns its disk cache on (iv2trt.models.kernels.caches).
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch

# The CuTe DSL says so of FA4's unused score-mod data at each compile (4.0.0b36 with nvidia-cutlass-dsl 4.8.1)
warnings.filterwarnings("ignore", message=r"Argument aux_data \(position \d+\) cannot be converted to a JitArgument")

# FA4's calls one at a time in a process: attend_row_scaled swaps FA4's kernel classes in for its call (and a
# kernel it compiles), which a call from another thread (a background compile, say) must not see
_CALLS = threading.Lock()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, N, heads, head_dim] (strided views allowed) -> [B, N, heads, head_dim]."""
    from flash_attn.cute import flash_attn_func  # fused_ops.flash_attn4_serves found that it imports

    # FA4 launches on the current device's current stream (q on the CPU: the CPU tests' stand-in)
    with _CALLS, torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _output(flash_attn_func(q, k, v, softmax_scale=scale))


def _output(result) -> torch.Tensor:
    """The attention output of what FA4's flash_attn_func returns ((out, lse) in the versions measured)."""
    return result[0] if isinstance(result, tuple) else result


def shape_ok(C: int, heads: int, part: int) -> bool:
    """Whether qk_norm_attention takes rows of width C in `heads` heads with sums of squares in parts of `part`
    columns: whole parts for q and k, a head dim FA4's Hopper kernel takes (a multiple of 8 up to 256)."""
    D = C // heads
    return C == heads * D and C % part == 0 and D % 8 == 0 and 8 <= D <= 256 and C % 16 == 0


LOG2E = 1.4426950408889634


def attend_row_scaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales_log2: torch.Tensor) -> torch.Tensor:
    """softmax(s_bi * q_i k_j^T) v over [B, N, heads, head_dim] (strided views allowed) -> [B, N, heads,
    head_dim]; scales_log2 float32 [B, N]: each query's softmax scale s_bi (the same for every head) times log2(e)
    (flash_attn4_row_scaled: FA4's Hopper kernel with a softmax scale per query row)."""
    from .flash_attn4_row_scaled import attend

    with _CALLS, torch.cuda.device(q.device):
        return _output(attend(q, k, v, scales_log2))


def qk_norm_attention(qkv: torch.Tensor, parts: torch.Tensor, heads: int, scale: float, q_eps: float,
                      k_eps: float, row_scales: bool = True) -> torch.Tensor:
    """softmax(norm_q(q) norm_k(k)^T * scale) v -> [B, N, C] from qkv [B, N, 3C] (q * wq, k * wk, v) and parts
    [B * N, P] (each row's sums of squares without the weights, in P parts of 3C / P columns). row_scales: the
    pass normalises k alone and FA4 takes each query's rstd * scale as its softmax scale (attend_row_scaled);
    else the pass normalises q and k for FA4's own kernel (attend)."""
    from . import triton_kernels

    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    qkv_heads = qkv.view(B, N, 3, heads, D)
    if row_scales:
        kn, scales = triton_kernels.key_norm_rows(qkv, parts, q_eps, k_eps, scale * LOG2E)
        return attend_row_scaled(qkv_heads[:, :, 0], kn.view(B, N, heads, D), qkv_heads[:, :, 2],
                                 scales).reshape(B, N, C)
    qk = triton_kernels.qk_norm_rows(qkv, parts, q_eps, k_eps).view(B, N, 2, heads, D)
    return attend(qk[:, :, 0], qk[:, :, 1], qkv_heads[:, :, 2], scale).reshape(B, N, C)
