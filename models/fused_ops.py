"""The fused path's Triton kernels as custom ops, so torch.compile and CUDA graphs treat each as one op.

- `qkv_rmsnorm(x, weight, bias, q_norm, k_norm, eps)` -> [..., 3C]: the qkv projection with the q and k
  RMSNorms in its epilogue.
- `attention_cls_split(q, k, v, scale)` -> [B, N, heads * head_dim]: exact attention with token 0 (the cls
  token) apart, so cuDNN's flash kernel sees the 2,048 patch keys, a whole number of its tiles.

Kernels: models.triton_kernels. Used only where `available` holds (a CUDA GPU of compute capability 8.0 or
later, fp16/bf16, Triton importable, cuDNN's attention allowed); elsewhere the model keeps its torch ops.
`IV2TRT_TRITON_KERNELS=off` turns both off.
"""
from __future__ import annotations

import functools
import os

import torch

ENV_VAR = "IV2TRT_TRITON_KERNELS"
QUERIES = "all"  # cuDNN takes all queries, the merge all rows (see triton_kernels.attention_cls_split)


@functools.cache
def _kernels():
    """models.triton_kernels, or None where Triton cannot be imported."""
    try:
        from . import triton_kernels
    except Exception:  # no Triton (CPU installs) or a broken one: the model keeps its torch ops
        return None
    return triton_kernels


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the custom ops serve a model on this device in this dtype."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if os.environ.get(ENV_VAR, "on").lower() in ("off", "0", "false", "no") or _kernels() is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0) and torch.backends.cuda.cudnn_sdp_enabled()


def qkv_width_ok(width: int, in_features: int) -> bool:
    """q, k and v rows of `width` columns fit the kernel's accumulators; the input width its K blocks."""
    return width % 128 == 0 and 128 <= width <= 512 and in_features % 32 == 0


def cls_split_shape_ok(q: torch.Tensor) -> bool:
    """q [B, heads, N, head_dim] has a cls token to split off and a head dim cuDNN's kernel takes."""
    return q.shape[-2] >= 2 and q.shape[-1] in (32, 64, 128)


@torch.library.custom_op("iv2trt::qkv_rmsnorm", mutates_args=())
def qkv_rmsnorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_norm: torch.Tensor,
                k_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """x @ weight^T (+ bias) -> [..., 3C] with its q and k thirds RMSNorm'd (weights q_norm, k_norm)."""
    return _kernels().qkv_rmsnorm(x, weight, bias, q_norm, k_norm, eps)


@qkv_rmsnorm.register_fake
def _(x, weight, bias, q_norm, k_norm, eps):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("iv2trt::attention_cls_split", mutates_args=())
def attention_cls_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, heads, N, head_dim] -> [B, N, heads * head_dim], token 0 apart."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _kernels().attention_cls_split(q, k, v, scale, queries=QUERIES)


@attention_cls_split.register_fake
def _(q, k, v, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, N, H * D)
