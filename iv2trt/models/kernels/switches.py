"""The fused fp16 path's switches and kernel caches, in one place.

Every fused kernel serves only where it is installed, on the GPU it was written for, and where a small test of
it matches torch on that GPU; the log says which serve. Each can also be turned off by an environment variable
(`on` by default; `off`, `0`, `false` or `no` turns it off; anything else is refused with the variable named):

  IV2TRT_FUSED_KERNELS           all of the switches below at once: the model as written (torch ops, SDPA,
                                 cuBLAS), one graph stream
  IV2TRT_TRITON_KERNELS          no Triton kernel: torch's SDPA for attention, the q/k norms apart
  IV2TRT_QK_NORM_ATTENTION       the q/k RMSNorms apart from attention (a pass of their own)
  IV2TRT_QUACK_GEMMS             cuBLAS products with the block's norms apart (no quack epilogues)
  IV2TRT_FLASH_ATTN4             the q/k-norm attention on the runner's Triton kernel, not FlashAttention-4
  IV2TRT_FLASH_ATTN4_ROW_SCALES  FlashAttention-4 after a pass that normalises q and k, not with the queries'
                                 norms in its softmax
  IV2TRT_GRAPH_STREAMS=N         (a number from 1 to 8, not on/off) the PyTorch runner's CUDA graph of a large batch
                                 in N parallel parts

The PyTorch runner's compile mode has its own variable, `IV2TRT_TORCH_COMPILE` (iv2trt.runners.compile).
quack's and FlashAttention-4's compiled kernels are kept on disk under `$XDG_CACHE_HOME/iv2trt/`
(`~/.cache/iv2trt/quack`, `.../flash_attn4`) unless the user chose their own cache variables.
"""
from __future__ import annotations

import os
from pathlib import Path

ALL = "IV2TRT_FUSED_KERNELS"
TRITON = "IV2TRT_TRITON_KERNELS"
QK_NORM_ATTENTION = "IV2TRT_QK_NORM_ATTENTION"
QUACK = "IV2TRT_QUACK_GEMMS"
FLASH_ATTN4 = "IV2TRT_FLASH_ATTN4"
FLASH_ATTN4_ROW_SCALES = "IV2TRT_FLASH_ATTN4_ROW_SCALES"
GRAPH_STREAMS = "IV2TRT_GRAPH_STREAMS"

_ON, _OFF = ("on", "1", "true", "yes", ""), ("off", "0", "false", "no")


def _switch(var: str) -> bool:
    value = os.environ.get(var, "on").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"${var} must be on or off, got {os.environ[var]!r}")
    return value in _ON


def enabled(var: str = TRITON) -> bool:
    """Whether switch `var` is on: $IV2TRT_FUSED_KERNELS and $var both on (the default); ValueError naming the
    variable for a value that is neither on nor off."""
    return _switch(ALL) and _switch(var)


def graph_streams(default: int) -> int:
    """$IV2TRT_GRAPH_STREAMS (a whole number from 1 to 8), else `default`; 1 with $IV2TRT_FUSED_KERNELS=off.
    ValueError naming the variable."""
    value = os.environ.get(GRAPH_STREAMS, "").strip()
    if value and (not value.isdigit() or not 1 <= int(value) <= 8):
        raise ValueError(f"${GRAPH_STREAMS} must be a whole number from 1 to 8 (1: one stream), got {value!r}")
    if not _switch(ALL):
        return 1
    return int(value) if value else default


def user_cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/iv2trt/<name> (~/.cache/iv2trt/<name>): caches that outlive a reboot."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iv2trt" / name


def quack_cache_dir() -> Path:
    """Where quack keeps the matrix-product kernels its CuTe DSL compiled: $QUACK_CACHE_DIR when the user chose
    it, else $XDG_CACHE_HOME/iv2trt/quack (quack's own default is under /tmp, which a reboot empties)."""
    chosen = os.environ.get("QUACK_CACHE_DIR")
    return Path(chosen) if chosen else user_cache_dir("quack")


def flash_attn4_cache_env() -> dict[str, str]:
    """What FlashAttention-4 reads when first imported to keep its compiled kernels on disk: its cache on, in
    $XDG_CACHE_HOME/iv2trt/flash_attn4 (its own default is off, and under /tmp). Nothing where the user set either
    variable."""
    names = ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    if any(name in os.environ for name in names):
        return {}
    return dict(zip(names, ("1", str(user_cache_dir("flash_attn4")))))


def set_cache_env() -> None:
    """Point quack's and FlashAttention-4's caches at their persistent places; they read the variables when first
    imported (fused_ops imports them lazily, the first time a GPU model asks)."""
    os.environ.setdefault("QUACK_CACHE_DIR", str(quack_cache_dir()))
    os.environ.update(flash_attn4_cache_env())
