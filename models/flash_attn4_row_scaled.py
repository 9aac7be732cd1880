"""FlashAttention-4's Hopper forward kernel with a softmax scale per query row: the queries' RMSNorms
applied in the scores, where the kernel already holds them, instead of by a pass over q.

softmax(norm(q_i) . k_j * scale) = softmax(q_i . k_j * s_i) with s_i = rstd(q_i) * scale, the same for every
head (the norm runs over all heads' channels). FA4 (4.0.0b36) calls its kernel's `apply_score_mod` on each block
of scores where a score_mod is given; `RowScaledForwardSm90` overrides that method to multiply each row by its
query's s_i, read from FA4's aux tensor 0 (float32 [B, N]). `attend` hands FA4 the marker `row_scales` as the
score_mod (never called; its hash names this file's source in FA4's compile caches) and has FA4's interface
build this class for the call.

Imported only where models.fused_ops found that FA4 serves (its imports are FA4's and the CuTe DSL's).
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, const_expr
from flash_attn.cute import interface
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData
from quack import layout_utils


class RowScaledForwardSm90(FlashAttentionForwardSm90):
    """FA4's Hopper forward kernel; each row of scores is multiplied by aux tensor 0 at [batch, query], read
    once per tile of queries (at the tile's first block of keys, the first call traced in `mma`) into registers."""

    variant = "cached"

    def mma(self, *args, **kwargs):
        self._row_scales = None  # trace-time: the registers the tile's first block fills
        return super().mma(*args, **kwargs)

    @cute.jit
    def apply_score_mod(self, thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block, softmax_scale, seqlen,
                        aux_data: AuxData = AuxData(), fastdiv_mods=None):
        scales = aux_data.tensors[0]
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
        rows = cute.size(acc_S_mn.shape[0])
        if const_expr(self.variant == "param"):  # timing only: the multiply without the loads
            for r in cutlass.range(rows, unroll_full=True):
                acc_S_mn[r, None].store(acc_S_mn[r, None].load() * softmax_scale)
        else:
            if const_expr(self.variant == "loads" or getattr(self, "_row_scales", None) is None):
                tScS_mn = layout_utils.reshape_acc_to_mn(
                    thr_mma_qk.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n))))
                regs = cute.make_rmem_tensor(rows, Float32)
                for r in cutlass.range(rows, unroll_full=True):
                    row = cutlass.min(m_block * self.tile_m + tScS_mn[r, 0][0], seqlen.seqlen_q - 1)
                    regs[r] = scales[batch_idx, row]
                self._row_scales = regs
            regs = self._row_scales
            for r in cutlass.range(rows, unroll_full=True):
                acc_S_mn[r, None].store(acc_S_mn[r, None].load() * regs[r])


class _PerBlockLoads(RowScaledForwardSm90):
    variant = "loads"


class _MultiplyOnly(RowScaledForwardSm90):
    variant = "param"


VARIANTS = {"cached": RowScaledForwardSm90, "loads": _PerBlockLoads, "param": _MultiplyOnly}


def row_scales(score, b, h, q_idx, kv_idx, seqlen_info, aux_tensors):
    """The score_mod FA4 is given with RowScaledForwardSm90: never called (the class's apply_score_mod stands in
    for FA4's per-score calls)."""
    raise AssertionError("FA4 called the row-scale marker: RowScaledForwardSm90 was not the kernel it built")


_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _marker(variant: str):
    def marker(score, b, h, q_idx, kv_idx, seqlen_info, aux_tensors):
        return row_scales(score, b, h, q_idx, kv_idx, seqlen_info, aux_tensors)
    marker.__cute_hash__ = f"iv2trt-row-scales-{variant}-{_SOURCE_HASH}"
    return marker


_MARKERS = {v: _marker(v) for v in VARIANTS}


@contextlib.contextmanager
def _kernel_class(cls):
    """FA4's interface builds its Hopper forward kernel from the class it names: this one for the block."""
    before = interface.FlashAttentionForwardSm90
    interface.FlashAttentionForwardSm90 = cls
    try:
        yield
    finally:
        interface.FlashAttentionForwardSm90 = before


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor,
           variant: str = "cached") -> torch.Tensor:
    """softmax(scales[b, i] * q_i k_j^T) v over [B, N, heads, head_dim] on the current device and stream."""
    with _kernel_class(VARIANTS[variant]):
        out = interface.flash_attn_func(q, k, v, softmax_scale=1.0, score_mod=_MARKERS[variant],
                                        aux_tensors=[scales])
    return out[0] if isinstance(out, tuple) else out
