"""The fused path's own kernels: which ones serve a model, and the Triton attention kernel as a custom op.

`quack_gemms(device, dtype)`: the matrix products with the block's norms in their epilogues
(quack_gemms), for fp16 models where quack is installed, the GPU is a Hopper one and a test product
there matches torch's; `IV2TRT_QUACK_GEMMS=off` turns them off. `flash_attn4_serves(device, dtype)`: the same
rule for FlashAttention-4 (flash_attn4) and a test attention; `IV2TRT_FLASH_ATTN4=off`.
`flash_attn4_row_scales_serve`: FA4 with the queries' norms in its softmax (flash_attn4_row_scaled), where
FA4 serves and a test attention of that kernel passes; `IV2TRT_FLASH_ATTN4_ROW_SCALES=off`.

The Triton kernels are custom ops, so torch.compile and CUDA graphs treat each as one op.

`qk_norm_attention(qkv, parts, ...)`: the deferred blocks' attention with the q/k RMSNorms inside, on Hopper
GPUs: FlashAttention-4 after a Triton pass that normalises k (the queries' norms in FA4's softmax) or q and k,
where it serves (flash_attn4), else the Triton kernel (triton_kernels.qk_norm_attention); the
same arithmetic in torch ops off the GPU.

`attention_cls_split(q, k, v, scale)` -> [B, N, heads * head_dim]: exact attention with token 0 (the cls
token) apart, so cuDNN's flash kernel sees the 2,048 patch keys, a whole number of its tiles
(triton_kernels). Used only where `available` holds (a CUDA GPU of compute capability 8.0 or later,
fp16/bf16, Triton importable, cuDNN's attention allowed); elsewhere the model keeps torch's SDPA.
`IV2TRT_TRITON_KERNELS=off` turns it off. Every switch, and the one that turns them all off: switches.py.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import time

import torch

from .. import deferred_norm
from . import flash_attn4, switches

log = logging.getLogger(__name__)


@functools.cache
def _kernels():
    """models.kernels.triton_kernels, or None where Triton cannot be imported."""
    try:
        from . import triton_kernels
    except Exception:  # no Triton (CPU installs) or a broken one: the model keeps its torch ops
        return None
    return triton_kernels


def _optional_import(load, missing: tuple[str, ...], off: str):
    """load() (an optional GPU library's import), or None where it cannot be imported: silently where it is not
    installed (a ModuleNotFoundError naming one of `missing`), with a warning that begins with `off` otherwise."""
    try:
        return load()
    except ModuleNotFoundError as exc:
        if exc.name not in missing:
            log.warning("%s: %s: %s", off, type(exc).__name__, exc)
    except Exception as exc:  # installed but broken
        log.warning("%s: importing it failed: %s: %s", off, type(exc).__name__, exc)
    return None


def _passes_test(device: str, run, noun: str, off: str, on: str) -> bool:
    """Whether run() -> (got, want), a small kernel of an optional library on `device` and torch's result, agree
    to 1e-2 of want's largest value. The library's DSL compiles the kernel here, so a driver or toolkit it cannot
    serve is found now, not in a job's first batch. Logs the outcome: `off` (a warning) or `on` (with the time)."""
    started = time.perf_counter()
    try:
        got, want = run()
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        if not err < 1e-2:
            raise RuntimeError(f"relative error {err:.2e} against torch's {noun}")
    except Exception as exc:
        log.warning("%s on %s: a test %s failed: %s: %s", off, device, noun, type(exc).__name__, str(exc)[:300])
        return False
    log.info("%s (test %s compiled or loaded in %.1f s)", on, noun, time.perf_counter() - started)
    return True


def _hopper_fp16(var: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """"cuda:<index>" where $var is on and `device` is a Hopper GPU running fp16 (what was measured for quack and
    FA4), else None; CUDA is asked last, so a switched-off or CPU model never asks it."""
    if not switches.enabled(var) or device.type != "cuda" or dtype != torch.float16:
        return None
    if torch.cuda.get_device_capability(device)[0] != 9:
        return None
    return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"


QUACK_OFF = "quack's matrix products are off"
FLASH_ATTN4_OFF = "FlashAttention-4 is off"
ROW_SCALES_OFF = "FlashAttention-4 with the queries' norms in its softmax is off (a pass normalises q and k)"


@functools.cache
def _quack():
    """models.kernels.quack_gemms, or None where quack (or its CuTe DSL) cannot be imported (it is optional:
    requirements-gpu.txt; the blocks then run as written)."""
    return _optional_import(lambda: importlib.import_module(".quack_gemms", __package__), ("quack", "cutlass"),
                            QUACK_OFF)


@functools.cache
def _quack_runs(device: str) -> bool:
    """Whether a small product of quack's matches torch's on `device` (the other kernels compile at first use)."""
    def run():
        a, w = (torch.randn(256, 64, device=device, dtype=torch.float16) for _ in range(2))
        rstd = torch.rand(256, device=device) + 0.5
        return _quack().row_scaled(a, w, rstd), (a.float() @ w.float().t()) * rstd[:, None]

    cache = os.environ.get("QUACK_CACHE_DIR", "quack's cache")
    return _passes_test(device, run, "product", QUACK_OFF, f"quack's matrix products serve {device} (cache: {cache})")


@functools.cache
def _flash_attn4_imports() -> bool:
    """Whether flash-attn-4 (and its CuTe DSL) can be imported (it is optional: requirements-gpu.txt)."""
    return _optional_import(lambda: importlib.import_module("flash_attn.cute"),
                            ("flash_attn", "flash_attn.cute", "cutlass"), FLASH_ATTN4_OFF) is not None


def _attention_test(device: str, row_scales: bool):
    """A small attention for FA4 (run by _passes_test): its output and torch's, with a softmax scale per query
    row (flash_attn4.attend_row_scaled) or one scale (flash_attn4.attend)."""
    q, k, v = (torch.randn(2, 257, 6, 64, device=device, dtype=torch.float16) for _ in range(3))
    scales = torch.rand(2, 257, device=device) * 0.2 + 0.05 if row_scales else \
        torch.full((2, 257), 0.125, device=device)
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q.float() * scales[:, :, None, None], k, v)), scale=1.0)
    got = flash_attn4.attend_row_scaled(q, k, v, scales * flash_attn4.LOG2E) if row_scales else \
        flash_attn4.attend(q, k, v, 0.125)
    return got, want.transpose(1, 2)


@functools.cache
def _flash_attn4_runs(device: str) -> bool:
    """Whether a small attention of FA4's matches torch's on `device`."""
    return _passes_test(device, lambda: _attention_test(device, False), "attention", FLASH_ATTN4_OFF,
                        f"FlashAttention-4 serves the q/k-norm attention on {device}")


@functools.cache
def _flash_attn4_row_scales_run(device: str) -> bool:
    """Whether a small attention of FA4's kernel with a softmax scale per query row matches torch's on `device`."""
    return _passes_test(device, lambda: _attention_test(device, True), "attention", ROW_SCALES_OFF,
                        f"FlashAttention-4 with the queries' norms in its softmax serves {device}")


def quack_gemms(device: torch.device, dtype: torch.dtype):
    """models.kernels.quack_gemms.QuackGemms where it serves a model on this device in this dtype, else None."""
    where = _hopper_fp16(switches.QUACK, device, dtype)
    if where is None or _quack() is None:
        return None
    return _quack().QuackGemms if _quack_runs(where) else None


def flash_attn4_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FA4 serves the q/k-norm attention of a model on this device in this dtype: fp16 on a Hopper GPU
    (its sm90 kernel), installed and passing a test attention; `IV2TRT_FLASH_ATTN4=off` turns it off."""
    where = _hopper_fp16(switches.FLASH_ATTN4, device, dtype)
    return where is not None and _flash_attn4_imports() and _flash_attn4_runs(where)


def flash_attn4_row_scales_serve(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FA4 with the queries' norms in its softmax (flash_attn4_row_scaled) serves: where FA4 does
    and its own test attention passes; `IV2TRT_FLASH_ATTN4_ROW_SCALES=off` turns it off (FA4 then follows a pass
    that normalises q and k)."""
    if not (switches.enabled(switches.FLASH_ATTN4_ROW_SCALES) and flash_attn4_serves(device, dtype)):
        return False
    return _flash_attn4_row_scales_run(_hopper_fp16(switches.FLASH_ATTN4, device, dtype))


def _triton_serves(device: torch.device, dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Triton kernels on, a CUDA device of at least `capability`, fp16/bf16, Triton importable (CUDA is asked
    last, so a switched-off or CPU model never asks it)."""
    if not switches.enabled() or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return _kernels() is not None and torch.cuda.get_device_capability(device) >= capability


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the custom op serves a model on this device in this dtype."""
    return _triton_serves(device, dtype, (8, 0)) and torch.backends.cuda.cudnn_sdp_enabled()


def cls_split_shape_ok(q: torch.Tensor) -> bool:
    """q [B, heads, N, head_dim] has a cls token to split off and a head dim cuDNN's kernel takes."""
    return q.shape[-2] >= 2 and q.shape[-1] in (32, 64, 128)


def qk_norm_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Which kernel runs qk_norm_attention for a model on this device in this dtype, the first that serves:
    "flash_attn4_row_scales" (FA4 with the queries' norms in its softmax, after a pass that normalises k),
    "flash_attn4" (FA4 after a pass that normalises q and k; flash_attn4), "triton" (the runner's own
    kernel; it loads tiles by TMA: Hopper or later). None keeps the q/k norms apart, as does
    `IV2TRT_QK_NORM_ATTENTION=off` (or IV2TRT_TRITON_KERNELS=off). All need Triton (for the norm passes)."""
    if not (switches.enabled(switches.QK_NORM_ATTENTION) and _triton_serves(device, dtype, (9, 0))):
        return None
    if flash_attn4_row_scales_serve(device, dtype):
        return "flash_attn4_row_scales"
    return "flash_attn4" if flash_attn4_serves(device, dtype) else "triton"


def qk_norm_attention_takes(x: torch.Tensor, heads: int, part: int, kernel: str) -> bool:
    """Whether qk_norm_attention takes the qkv of x [B, N, C] with sums of squares in parts of `part` columns:
    any shape off the GPU (torch ops), any token count for FA4, whole tiles for the Triton kernel."""
    if not x.is_cuda:
        return True
    if kernel.startswith("flash_attn4"):
        return flash_attn4.shape_ok(x.shape[2], heads, part)
    return _kernels() is not None and _kernels().qk_norm_attention_shape_ok(x.shape[1], x.shape[2], heads, part)


@torch.library.custom_op("iv2trt::qk_norm_attention", mutates_args=())
def qk_norm_attention(qkv: torch.Tensor, parts: torch.Tensor, heads: int, scale: float, q_eps: float,
                      k_eps: float, backend: str) -> torch.Tensor:
    """q/k-normalised attention of the deferred blocks' qkv and its rows' sums of squares ->  [B, N, C]
    (models.deferred_norm.qk_norm_attention): the kernel `backend` names (qk_norm_kernel's choice) on a GPU,
    torch ops elsewhere. (Not "kernel": TorchInductor's fallback for custom ops takes an argument of that name.)"""
    if qkv.is_cuda and backend.startswith("flash_attn4"):
        return flash_attn4.qk_norm_attention(qkv.contiguous(), parts.contiguous(), heads, scale, q_eps, k_eps,
                                             row_scales=backend == "flash_attn4_row_scales")
    if qkv.is_cuda:
        return _kernels().qk_norm_attention(qkv.contiguous(), parts.contiguous(), heads, scale, q_eps, k_eps)
    return deferred_norm.qk_norm_attention(qkv, parts, heads, scale, q_eps, k_eps)


@qk_norm_attention.register_fake
def _(qkv, parts, heads, scale, q_eps, k_eps, backend):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3)


@torch.library.custom_op("iv2trt::attention_cls_split", mutates_args=())
def attention_cls_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, heads, N, head_dim] -> [B, N, heads * head_dim], token 0 apart."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _kernels().attention_cls_split(q, k, v, scale)


@attention_cls_split.register_fake
def _(q, k, v, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, N, H * D)
