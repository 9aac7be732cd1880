"""The fused path's matrix products with the block's norms in their epilogues, on quack's CuTe DSL GEMMs.

models.deferred_norm defers each RMSNorm of the block through the products: four epilogues, in float32 on
the accumulator, each a `torch.library` custom op (so torch.compile and the CUDA graphs see one op):

- `row_scaled(a, w, rstd)`: (a @ w^T) * rstd[:, None] (qkv after norm1);
- `row_scaled_sums(a, w, rstd, unfold)`: the same and each row's sums of y^2 * unfold in 192-column parts (qkv
  with the q/k norms' weights folded in: the q/k norms then happen in attention);
- `residual_rms(a, w, scale, shift, residual)` -> (y, the sums of y^2 over each row's 192-column parts),
  y = residual + (a @ w^T) * scale + shift (proj and fc2, with LayerScale and the bias in scale and shift);
- `row_scaled_gelu(a, w, rstd, bias)`: GELU((a @ w^T) * rstd[:, None] + bias), GELU's tanh form as in the
  fused path's cuBLASLt epilogue (the erf form ran 37% slower here).

Imported only where fused_ops.quack_gemms allows: quack (`quack-kernels`, with its
`nvidia-cutlass-dsl`) on a Hopper GPU (compute capability 9.0; the only one it was measured on). The DSL
compiles each kernel at first use (about 1.5 s; quack caches it on disk). Tiles are fixed per product, never
autotuned in a job, so a new batch size costs no tuning sweep.
"""
from __future__ import annotations

import logging

import torch
from quack import activation
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.ops import ColVecLoad, ColVecReduce, RowVecLoad
from quack.gemm_config import GemmConfig

from ..deferred_norm import TorchGemms

log = logging.getLogger(__name__)


@gemm_epilogue(ops={"rstd": ColVecLoad("rstd")})
def _row_scaled(acc, rstd):
    return {"D": acc * rstd}


@gemm_epilogue(ops={"rstd": ColVecLoad("rstd"), "unfold": RowVecLoad("unfold")},
               reduces={"sqsum": ColVecReduce("sqsum", scaled=True)})
def _row_scaled_sums(acc, rstd, unfold):
    y = acc * rstd
    return {"D": y, "sqsum": (y, y * unfold)}


@gemm_epilogue(
    ops={"scale": RowVecLoad("scale"), "shift": RowVecLoad("shift")},
    reduces={"sqsum": ColVecReduce("sqsum", scaled=True)},
)
def _residual_rms(acc, c, scale, shift):
    y = acc * scale + shift + c
    return {"D": y, "sqsum": (y, y)}


@gemm_epilogue(ops={"rstd": ColVecLoad("rstd"), "bias": RowVecLoad("bias")})
def _row_scaled_gelu(acc, rstd, bias):
    return {"D": activation.gelu_tanh_approx(acc * rstd + bias)}


def _hopper(tile_m: int, cluster_m: int, cluster_n: int, pingpong: bool = True) -> GemmConfig:
    """Tiles tile_m x 192 on a Hopper GPU, a statically scheduled persistent kernel (EpiMod.gemm's default)."""
    return GemmConfig(tile_m=tile_m, tile_n=192, pingpong=pingpong, cluster_m=cluster_m, cluster_n=cluster_n,
                      is_dynamic_persistent=False, device_capacity=9)


# Tiles of S/14's products (N, K) on Hopper by rows M: (fewest rows, {(N, K): tiles}), first match. Among the
# fastest of quack's configurations in tools/bench_quack_gemms.py (calls differed by up to 15% for the same
# tiles). Other products (other model sizes) take DEFAULT_CONFIG.
HOPPER_CONFIGS: list[tuple[int, dict[tuple[int, int], GemmConfig]]] = [
    (49152, {  # 32x8 on one stream (65,568 rows)
        (1152, 384): _hopper(128, cluster_m=2, cluster_n=1),  # qkv
        (384, 384): _hopper(128, cluster_m=1, cluster_n=2),  # proj
        (1536, 384): _hopper(128, cluster_m=2, cluster_n=1),  # fc1
        (384, 1536): _hopper(128, cluster_m=2, cluster_n=1),  # fc2
    }),
    (0, {  # the half batch of 32x8 on two graph streams (32,784 rows), and fewer
        (1152, 384): _hopper(128, cluster_m=1, cluster_n=2),
        (384, 384): _hopper(256, cluster_m=1, cluster_n=2, pingpong=False),
        (1536, 384): _hopper(256, cluster_m=1, cluster_n=2, pingpong=False),
        (384, 1536): _hopper(128, cluster_m=2, cluster_n=1),
    }),
]
DEFAULT_CONFIG = _hopper(128, cluster_m=2, cluster_n=1)

SUM_TILE_N = TorchGemms.PART  # residual_rms gives row sums in ceil(N / 192) parts: every tile is 192 wide
assert all(c.tile_n == SUM_TILE_N for _, table in HOPPER_CONFIGS for c in (*table.values(), DEFAULT_CONFIG))


def config_for(w: torch.Tensor, rows: int) -> GemmConfig:
    """The fixed tiles for a product of `rows` rows with weight w [N, K]."""
    table = next(configs for least, configs in HOPPER_CONFIGS if rows >= least)
    return table.get(tuple(w.shape), DEFAULT_CONFIG)


def _launch(mod, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, c=None, config=None, **epi_args) -> None:
    cfg = config or config_for(w, a.shape[0])
    with torch.cuda.device(a.device):  # the kernel goes to the current stream of a's GPU
        mod.gemm(a, w.t(), out, c, epi_args=epi_args, tile_M=cfg.tile_m, tile_N=cfg.tile_n, tile_K=cfg.tile_k,
                 cluster_M=cfg.cluster_m, cluster_N=cfg.cluster_n, pingpong=cfg.pingpong,
                 max_swizzle_size=cfg.max_swizzle_size, b_kn=True)


_FAILED: set[str] = set()  # products whose quack kernel failed in this process: torch ops from then on


def _quack_or_torch(name: str, quack, fallback):
    """quack(), or fallback() (the same arithmetic in torch ops, models.deferred_norm.TorchGemms) once that
    product's kernel has failed here: a kernel the DSL cannot build or run slows a job, it does not stop it."""
    if name not in _FAILED:
        try:
            return quack()
        except Exception as exc:
            _FAILED.add(name)
            log.warning("quack's %s product failed (%s: %s); from now on it runs as cuBLAS and torch ops", name,
                        type(exc).__name__, str(exc)[:300])
    return fallback()


@torch.library.custom_op("iv2trt::quack_row_scaled", mutates_args=())
def row_scaled(a: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ w [N, K]^T with row m scaled by rstd[m] (float32) -> [M, N] in a's dtype."""
    def quack():
        out = a.new_empty(a.shape[0], w.shape[0])
        _launch(_row_scaled, a, w, out, rstd=rstd)
        return out
    return _quack_or_torch("row_scaled", quack, lambda: TorchGemms.row_scaled(a, w, rstd))


@row_scaled.register_fake
def _(a, w, rstd):
    return a.new_empty(a.shape[0], w.shape[0])


@torch.library.custom_op("iv2trt::quack_row_scaled_sums", mutates_args=())
def row_scaled_sums(a: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                    unfold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = (a @ w^T) * rstd[:, None] ([M, N], a's dtype) and the sums of y^2 * unfold over each row's 192-column
    tiles (float32 [M, ceil(N / 192)]; unfold [N] float32 undoes weights folded into w's rows)."""
    def quack():
        out = a.new_empty(a.shape[0], w.shape[0])
        parts = a.new_empty(a.shape[0], -(-w.shape[0] // SUM_TILE_N), dtype=torch.float32)
        _launch(_row_scaled_sums, a, w, out, rstd=rstd, unfold=unfold, sqsum=parts)
        return out, parts
    return _quack_or_torch("row_scaled_sums", quack, lambda: TorchGemms.row_scaled_sums(a, w, rstd, unfold))


@row_scaled_sums.register_fake
def _(a, w, rstd, unfold):
    return (a.new_empty(a.shape[0], w.shape[0]),
            a.new_empty(a.shape[0], -(-w.shape[0] // SUM_TILE_N), dtype=torch.float32))


@torch.library.custom_op("iv2trt::quack_residual_rms", mutates_args=())
def residual_rms(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = residual + (a @ w^T) * scale + shift ([M, N], a's dtype) and the sums of y^2 over each row's
    192-column tiles (float32 [M, ceil(N / 192)]: a row's sum of squares is the sum of its parts)."""
    def quack():
        out = a.new_empty(a.shape[0], w.shape[0])
        parts = a.new_empty(a.shape[0], -(-w.shape[0] // SUM_TILE_N), dtype=torch.float32)
        _launch(_residual_rms, a, w, out, residual, scale=scale, shift=shift, sqsum=parts)
        return out, parts
    return _quack_or_torch("residual_rms", quack, lambda: TorchGemms.residual_rms(a, w, scale, shift, residual))


@residual_rms.register_fake
def _(a, w, scale, shift, residual):
    return (a.new_empty(a.shape[0], w.shape[0]),
            a.new_empty(a.shape[0], -(-w.shape[0] // SUM_TILE_N), dtype=torch.float32))


@torch.library.custom_op("iv2trt::quack_row_scaled_gelu", mutates_args=())
def row_scaled_gelu(a: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) of (a @ w^T) * rstd[:, None] + bias -> [M, N] in a's dtype."""
    def quack():
        out = a.new_empty(a.shape[0], w.shape[0])
        _launch(_row_scaled_gelu, a, w, out, rstd=rstd, bias=bias)
        return out
    return _quack_or_torch("row_scaled_gelu", quack, lambda: TorchGemms.row_scaled_gelu(a, w, rstd, bias))


@row_scaled_gelu.register_fake
def _(a, w, rstd, bias):
    return a.new_empty(a.shape[0], w.shape[0])


class QuackGemms:
    """The four products as models.deferred_norm's `gemms` (a class, so models holding it deep-copy)."""

    row_scaled = staticmethod(row_scaled)
    row_scaled_sums = staticmethod(row_scaled_sums)
    residual_rms = staticmethod(residual_rms)
    row_scaled_gelu = staticmethod(row_scaled_gelu)
