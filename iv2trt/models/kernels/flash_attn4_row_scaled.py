"""FlashAttention-4's Hopper forward kernel with a softmax scale per query row: the queries' RMSNorms
applied in the softmax, where the kernel already scales the scores, instead of by a pass over q.

softmax(norm(q_i) . k_j * scale) = softmax(q_i . k_j * s_i) with s_i = rstd(q_i) * scale, the same for every
head (the norm runs over all heads' channels). FA4 (4.0.0b36) computes exp2(S * scale_log2 - max * scale_log2)
with one scale_log2 for the whole kernel; here each row takes its own, s_i * log2(e), at no extra arithmetic:
- `RowScaledSoftmax` is FA4's Softmax with a register per row for its scale (its online softmax adapted from
  FA4's, BSD-3-Clause, Tri Dao);
- `RowScaledForwardSm90` is FA4's Hopper kernel whose score-mod hook (called on each block of scores where a
  score_mod is given) fills those registers from FA4's aux tensor 0 (float32 [B, N]) at a tile's first block of
  keys, and leaves the scores as they are.
`attend` has FA4's interface build these two for the call and hands it the marker `row_scales` as the score_mod
(never called; its hash names this file's source in FA4's compile caches).

Imported only where fused_ops found that FA4 serves (its imports are FA4's and the CuTe DSL's).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, const_expr
from flash_attn.cute import flash_fwd_sm90, interface
from flash_attn.cute import utils as fa_utils
from flash_attn.cute.softmax import Softmax
from flash_attn.cute.utils import AuxData
from quack import layout_utils

_TRACE: dict = {}  # while a kernel is traced: its softmax, and whether the hook has filled its row scales


@dataclass
class RowScaledSoftmax(Softmax):
    """FA4's online softmax with scale_log2 per row (`row_scale_log2`, registers) instead of one scalar."""

    row_scale_log2: cute.Tensor | None = None

    @staticmethod
    def create(scale_log2: Float32, num_rows: cutlass.Constexpr[int], arch: cutlass.Constexpr[int] = 80,
               softmax_scale: Float32 | None = None):
        softmax = RowScaledSoftmax(scale_log2, num_rows, cute.make_rmem_tensor(num_rows, Float32),
                                   cute.make_rmem_tensor(num_rows, Float32), arch, softmax_scale,
                                   cute.make_rmem_tensor(num_rows, Float32))
        _TRACE.update(softmax=softmax, filled=False)
        return softmax

    @cute.jit
    def online_softmax(self, acc_S: cute.Tensor, is_first: cutlass.Constexpr[bool] = False,
                       check_inf: cutlass.Constexpr[bool] = True) -> cute.Tensor:
        """FA4's, but for each row's scale: returns the factor that rescales each row of O."""
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
        row_scale = cute.make_fragment_like(self.row_max, Float32)
        row_max, row_sum = self.row_max, self.row_sum
        for r in cutlass.range(cute.size(row_max), unroll_full=True):
            scale_log2 = self.row_scale_log2[r]
            acc_S_row = acc_S_mn[r, None].load()
            row_max_cur = fa_utils.fmax_reduce(acc_S_row, init_val=row_max[r] if const_expr(not is_first) else None,
                                               arch=self.arch)
            row_max_cur = cute.arch.warp_reduction_max(row_max_cur, threads_in_group=4)
            row_max_prev = row_max[r]
            row_max[r] = row_max_cur
            if const_expr(check_inf):
                row_max_cur = 0.0 if row_max_cur == -Float32.inf else row_max_cur
            acc_S_row_exp = cute.math.exp2(acc_S_row * scale_log2 - row_max_cur * scale_log2, fastmath=True)
            if const_expr(is_first):
                row_sum[r] = fa_utils.fadd_reduce(acc_S_row_exp, init_val=None, arch=self.arch)
                row_scale[r] = 1.0
            else:
                row_scale[r] = cute.math.exp2((row_max_prev - row_max_cur) * scale_log2, fastmath=True)
                row_sum[r] = fa_utils.fadd_reduce(acc_S_row_exp, init_val=row_sum[r] * row_scale[r], arch=self.arch)
            acc_S_mn[r, None].store(acc_S_row_exp)
        return row_scale


class RowScaledForwardSm90(flash_fwd_sm90.FlashAttentionForwardSm90):
    """FA4's Hopper forward kernel with RowScaledSoftmax: its score-mod hook reads each row's scale_log2 from aux
    tensor 0 at [batch, query] into the softmax's registers, once a tile of queries (the first call traced in
    the kernel's main loop is its first block of keys), and leaves the scores unscaled."""

    @cute.jit
    def apply_score_mod(self, thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block, softmax_scale, seqlen,
                        aux_data: AuxData = AuxData(), fastdiv_mods=None):
        if const_expr(not _TRACE["filled"]):
            scales = aux_data.tensors[0]
            registers = _TRACE["softmax"].row_scale_log2
            tScS_mn = layout_utils.reshape_acc_to_mn(
                thr_mma_qk.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n))))
            for r in cutlass.range(cute.size(registers), unroll_full=True):
                registers[r] = scales[batch_idx, cutlass.min(m_block * self.tile_m + tScS_mn[r, 0][0],
                                                             seqlen.seqlen_q - 1)]
            _TRACE["filled"] = True


def row_scales(score, b, h, q_idx, kv_idx, seqlen_info, aux_tensors):
    """The score_mod FA4 is given with RowScaledForwardSm90: never called (the class's apply_score_mod stands in
    for FA4's per-score calls)."""
    raise AssertionError("FA4 called the row-scale marker: RowScaledForwardSm90 was not the kernel it built")


row_scales.__cute_hash__ = "iv2trt-row-scales-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@contextlib.contextmanager
def _row_scaled_kernel():
    """FA4's interface builds its Hopper forward kernel from the class it names, and that kernel its softmax
    from the class its module names: these for the block."""
    before = interface.FlashAttentionForwardSm90, flash_fwd_sm90.Softmax
    interface.FlashAttentionForwardSm90, flash_fwd_sm90.Softmax = RowScaledForwardSm90, RowScaledSoftmax
    try:
        yield
    finally:
        interface.FlashAttentionForwardSm90, flash_fwd_sm90.Softmax = before
        _TRACE.clear()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales_log2: torch.Tensor):
    """FA4's flash_attn_func of softmax(s_bi * q_i k_j^T) v over [B, N, heads, head_dim] on the current device and
    stream; scales_log2 float32 [B, N]: each query's softmax scale s_bi times log2(e)."""
    with _row_scaled_kernel():
        return interface.flash_attn_func(q, k, v, softmax_scale=1.0, score_mod=row_scales, aux_tensors=[scales_log2])
