"""The transformer block with its RMSNorms deferred into the matrix products' epilogues.

A pre-norm block computes norm(x) @ W^T with norm(x) = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per
row. The row scale commutes with the product and the norm weight folds into W:

    norm(x) @ W^T = rstd * (x @ (W * w)^T)

so no pass over the activations is needed to normalise them: the product that writes the residual stream
(proj, fc2) also returns each row's sum of squares, and the next product (fc1, the next block's qkv) scales
its rows by the rstd made from it. LayerScale and the bias fold into that writing product's epilogue:
x + gamma * (a @ W^T + b) = x + (a @ W^T) * gamma + gamma * b. What is left between the products is the
q/k norm and attention. The q/k norms defer the same way into attention where its kernel takes the shape
(models.kernels.triton_kernels.qk_norm_attention): their weights fold into the qkv product's q and k rows, the
product also returns its rows' sums of squares, and the rows' scales apply to the keys (a pass of their
own) and to the scores (each query's). The algebra is exact; the rounding differs from the unfused block only in where
fp16 roundings fall (the normalised activations are never rounded to fp16, the folded weights are).

`gemms` is the implementation of the fused products: models.kernels.quack_gemms on a GPU, `TorchGemms` (the
same arithmetic in torch ops) for tests of the algebra on any device. GELU is its tanh form, as in the fused
path's cuBLASLt epilogue (models.internvideo2_clip.Mlp).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_FOLDED = ("qkv_weight", "proj_scale", "proj_shift", "fc1_weight", "fc2_scale", "fc2_shift", "qkv_qk_weight",
           "qkv_unfold")


class TorchGemms:
    """The fused products' arithmetic in torch ops: products in the input's dtype, epilogues in float32,
    row sums of squares in parts of PART columns (as quack's tiles give them)."""

    PART = 192

    @staticmethod
    def row_scaled(a: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        return (F.linear(a, w).float() * rstd[:, None]).to(a.dtype)

    @classmethod
    def sums_in_parts(cls, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's sums of y^2 (times `weights` [N], per column) over its PART-column parts -> [M, parts]."""
        squares = y.square() if weights is None else y.square() * weights
        return torch.stack([part.sum(-1) for part in squares.split(cls.PART, -1)], -1)

    @classmethod
    def residual_rms(cls, a, w, scale, shift, residual) -> tuple[torch.Tensor, torch.Tensor]:
        y = residual.float() + F.linear(a, w).float() * scale + shift
        return y.to(a.dtype), cls.sums_in_parts(y)

    @classmethod
    def row_scaled_sums(cls, a, w, rstd, unfold) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.linear(a, w).float() * rstd[:, None]
        return y.to(a.dtype), cls.sums_in_parts(y, unfold)

    @staticmethod
    def row_scaled_gelu(a, w, rstd, bias) -> torch.Tensor:
        x = F.linear(a, w).float() * rstd[:, None] + bias.float()
        return F.gelu(x, approximate="tanh").to(a.dtype)


@torch.no_grad()
def fold(block: nn.Module) -> None:
    """Register the block's folded weights as non-persistent buffers (from its current weights, device and
    dtype, which `block.deferred_on` records; fold again after changing any of them)."""
    attn, mlp = block.attn, block.mlp
    if attn.qkv.bias is not None:
        raise ValueError("the deferred blocks' qkv product takes no bias; this model has one (qkv_bias)")
    folded = {
        "qkv_weight": attn.qkv.weight.float() * block.norm1.weight.float(),
        "proj_scale": block.ls1.gamma.float(),
        "proj_shift": block.ls1.gamma.float() * attn.proj.bias.float(),
        "fc1_weight": mlp.fc1.weight.float() * block.norm2.weight.float(),
        "fc2_scale": block.ls2.gamma.float(),
        "fc2_shift": block.ls2.gamma.float() * mlp.fc2.bias.float(),
    }
    wq, wk = (getattr(norm, "weight", None) for norm in (attn.q_norm, attn.k_norm))
    if wq is not None and wk is not None and bool((wq != 0).all() and (wk != 0).all()):
        # the q/k norms' weights fold in too (qk_norm_attention): the product's q and k rows scaled by them,
        # and the rows' sums of squares taken without them (each column's square times 1 / weight^2)
        C = wq.shape[0]
        ones = torch.ones(C, device=wq.device)
        folded["qkv_qk_weight"] = folded["qkv_weight"] * torch.cat([wq.float(), wk.float(), ones])[:, None]
        folded["qkv_unfold"] = torch.cat([wq.float() ** -2, wk.float() ** -2, ones])
    dtype = attn.qkv.weight.dtype
    for name, value in folded.items():
        value = value.to(dtype) if name.endswith("weight") else value
        block.register_buffer(f"deferred_{name}", value.contiguous(), persistent=False)
    block.deferred_on = (attn.qkv.weight.device, dtype)


def unfold(block: nn.Module) -> None:
    """Drop the folded buffers."""
    for name in _FOLDED:
        block._buffers.pop(f"deferred_{name}", None)
    block.deferred_on = None


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] -> sum(x^2) over C per row, float32 [B * N, 1]: the first block's norm statistics."""
    return x.reshape(-1, x.shape[-1]).float().square().sum(-1, keepdim=True)


def rstd(sums: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) per row from the parts of its sum of squares [M, parts]."""
    return torch.rsqrt(sums.sum(-1) / width + eps)


def qk_norm_attention(qkv: torch.Tensor, parts: torch.Tensor, heads: int, scale: float, q_eps: float,
                      k_eps: float) -> torch.Tensor:
    """Multi-head attention of qkv [B, N, 3C] from `row_scaled_sums` with the weight `qkv_qk_weight` (q and k
    times their norms' weights) and the sums of squares without those weights (parts [B * N, P]): the rows'
    RMSNorm scales of q and k from the parts, then softmax(q k^T * scale) v -> [B, N, C], in float32 (the
    reference of models.kernels.triton_kernels.qk_norm_attention)."""
    B, N, C3 = qkv.shape
    C, n = C3 // 3, C3 // 3 // (C3 // parts.shape[1])  # n: parts of q's (and of k's) columns
    q, k, v = qkv.float().chunk(3, -1)
    q = q * rstd(parts[:, :n], C, q_eps).reshape(B, N, 1)
    k = k * rstd(parts[:, n:2 * n], C, k_eps).reshape(B, N, 1)
    q, k, v = (t.reshape(B, N, heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, C).to(qkv.dtype)


def block_forward(block: nn.Module, x: torch.Tensor, sums: torch.Tensor, gemms) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on the residual stream x [B, N, C] with its rows' sums of squares (in parts, [B * N, parts])
    -> the same pair after the block. Where the attention's q/k-norm kernel takes the shape, the qkv product
    also gives its rows' sums of squares and the q/k norms happen in attention (Attention.attend_deferred)."""
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    r = rstd(sums, C, block.norm1.eps)
    if block.attn.takes_deferred(x) and hasattr(block, "deferred_qkv_unfold"):
        qkv, parts = gemms.row_scaled_sums(rows, block.deferred_qkv_qk_weight, r, block.deferred_qkv_unfold)
        o = block.attn.attend_deferred(qkv.reshape(B, N, 3 * C), parts).reshape(B * N, C)
    else:
        qkv = gemms.row_scaled(rows, block.deferred_qkv_weight, r)
        o = block.attn.attend_qkv(qkv.reshape(B, N, 3 * C)).reshape(B * N, C)
    rows, sums = gemms.residual_rms(o, block.attn.proj.weight, block.deferred_proj_scale,
                                    block.deferred_proj_shift, rows)
    h = gemms.row_scaled_gelu(rows, block.deferred_fc1_weight, rstd(sums, C, block.norm2.eps), block.mlp.fc1.bias)
    rows, sums = gemms.residual_rms(h, block.mlp.fc2.weight, block.deferred_fc2_scale,
                                    block.deferred_fc2_shift, rows)
    return rows.reshape(B, N, C), sums
