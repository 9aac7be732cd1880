"""Encoder benchmark: every selected backend on the same random inputs over a grid of (batch, frames).

Order of work: the inputs of every cell are drawn once (seeded per cell); the PyTorch fp32 model
(TF32 off) runs them first and its outputs are the reference; then each backend in turn is created,
timed on every cell and released, so peak GPU memory of a cell holds that backend alone.

Timing, per row (the `timing` column of the table):
  device  CUDA events around the model call, inputs already on the GPU (encoder only; torch on a GPU)
  host    time.perf_counter around `runner.infer(numpy float32)` -> numpy: host to host, transfers and
          dtype conversion included (ORT, TensorRT, torch on CPU, and a second row for torch on a GPU)
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..compare import cosine_rows

log = logging.getLogger(__name__)

BACKENDS = ("torch-fp32", "torch-fp16", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
DEFAULT_GRID = ("1x1", "8x1", "32x1", "1x8", "8x8", "32x8")


@dataclass(frozen=True)
class TimingPlan:
    """Warm-up calls, then `iters` timed calls; iters=None picks enough to fill ~target_s (within bounds)."""

    warmup: int = 3
    iters: int | None = None
    target_s: float = 2.0
    min_iters: int = 5
    max_iters: int = 200

    def count(self, seconds_per_call: float) -> int:
        if self.iters:
            return self.iters
        return int(min(self.max_iters, max(self.min_iters, round(self.target_s / max(seconds_per_call, 1e-6)))))


def percentiles(seconds: list[float] | np.ndarray) -> dict[str, float]:
    """Latency statistics in milliseconds (linear-interpolated percentiles, numpy's default)."""
    ms = np.asarray(seconds, np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings")
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "iters": int(ms.size)}


def throughput(batch: int, stats: dict[str, float]) -> float:
    """Clips per second: batch / mean latency (= clips timed / total timed seconds)."""
    return batch / (stats["mean_ms"] / 1e3)


def parse_grid(cells: list[str]) -> list[tuple[int, int]]:
    from ..export.onnx_export import parse_shape

    return [parse_shape(c) for c in cells]


def make_input(batch: int, frames: int, img_size: int, seed: int = 0) -> np.ndarray:
    """The random input of one cell: float32 [B, T, 3, S, S], the same for every backend."""
    rng = np.random.default_rng([seed, batch, frames])
    return rng.standard_normal((batch, frames, 3, img_size, img_size), dtype=np.float32)


# --- timers ------------------------------------------------------------------------------------------------
def time_host(call: Callable[[], Any], plan: TimingPlan) -> tuple[list[float], Any]:
    """perf_counter around each call (the call returns host data, so it has finished)."""
    out = None
    for _ in range(max(plan.warmup, 1)):
        started = time.perf_counter()
        out = call()
    n = plan.count(time.perf_counter() - started)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - started)
    return times, out


def time_cuda(torch, call: Callable[[], Any], plan: TimingPlan) -> tuple[list[float], Any]:
    """CUDA events around each call, recorded back to back (queue kept full), read after one sync."""
    out = None
    for _ in range(max(plan.warmup, 1)):
        out = call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    n = plan.count(time.perf_counter() - started)
    events = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in events], out


# --- backends ----------------------------------------------------------------------------------------------
@dataclass
class Env:
    """What this process can run: torch device, ORT providers, TensorRT."""

    cuda: bool
    ort_providers: list[str]
    trt_missing: str | None

    @classmethod
    def probe(cls, engine: str | None) -> "Env":
        import torch

        try:
            import onnxruntime as ort

            providers = ort.get_available_providers()
        except ImportError:
            providers = []
        from ..runners.choice import tensorrt_missing

        return cls(torch.cuda.is_available(), providers, tensorrt_missing(engine))

    def unavailable(self, backend: str) -> str | None:
        """Why `backend` cannot run here, or None."""
        if backend == "torch-fp16" and not self.cuda:
            return "no CUDA GPU (PyTorch fp16 on a CPU is not a deployment path)"
        if backend.startswith("onnxruntime") and not self.ort_providers:
            return "onnxruntime is not installed"
        if backend == "onnxruntime-cuda" and "CUDAExecutionProvider" not in self.ort_providers:
            return f"onnxruntime has no CUDAExecutionProvider (has {', '.join(self.ort_providers)}; " \
                   "install onnxruntime-gpu)"
        if backend == "tensorrt":
            return self.trt_missing
        return None


@dataclass
class Row:
    backend: str
    timing: str
    batch: int
    frames: int
    stats: dict[str, float]
    clips_per_s: float
    tflops: float
    peak_gpu_mib: float | None
    min_cosine: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "timing": self.timing, "batch": self.batch, "frames": self.frames,
                **self.stats, "clips_per_s": self.clips_per_s, "tflops": self.tflops,
                "peak_gpu_mib": self.peak_gpu_mib, "min_cosine": self.min_cosine, **self.extra}


class TorchBench:
    """TorchRunner on a private copy of the model; encoder-only (device) and host-to-host timing. With
    torch.compile on (`compile_mode`, default: the runner's), each shape is compiled and its graph captured
    before it is timed."""

    def __init__(self, model, precision: str, device: str, compile_mode: str | None = None):
        import torch

        from ..runners.torch_runner import TorchRunner

        self.torch = torch
        self.runner = TorchRunner(copy.deepcopy(model), device, precision, compile_mode=compile_mode)
        self.runner.replay_larger_graphs = False  # each cell times its own shape's graph
        self.cuda = self.runner.device.type == "cuda"

    def compile_info(self, batch: int, frames: int) -> dict[str, Any]:
        """{"compile": mode or "off", "compile_s": seconds its compile took in this process, or None}."""
        c = self.runner.compiled
        shape = (batch, frames, 3, self.runner.model.cfg.img_size, self.runner.model.cfg.img_size)
        return {"compile": self.runner.compile_mode or "off", "compile_s": c.compile_seconds(shape) if c else None,
                "compile_failed": c.failed.get(c.key(shape)) if c else None}

    def encoder_only(self, frames: np.ndarray, plan: TimingPlan) -> tuple[list[float], np.ndarray]:
        torch, r = self.torch, self.runner
        if self.cuda:
            r.prepare([frames.shape[:2]])
        x = torch.as_tensor(frames).to(r.device, r.dtype)
        with torch.inference_mode():
            call = lambda: r.forward_device(x)  # noqa: E731  (the runner's path: CUDA graph replay on a GPU)
            times, out = time_cuda(torch, call, plan) if self.cuda else time_host(call, plan)
        return times, out.float().cpu().numpy()

    def host_to_host(self, frames: np.ndarray, plan: TimingPlan) -> tuple[list[float], np.ndarray]:
        return time_host(lambda: self.runner.infer(frames), plan)


def gpu_memory(torch, cuda: bool) -> tuple[Callable[[], None], Callable[[], float | None]]:
    """(reset, read peak MiB) for torch's allocator; read gives None where nothing is measurable."""
    if not cuda:
        return (lambda: None), (lambda: None)

    def reset():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    return reset, (lambda: torch.cuda.max_memory_allocated() / 2**20)


def set_tf32(torch, enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def run_encoder_grid(model, backends: list[str], grid: list[tuple[int, int]], plan: TimingPlan,
                     onnx_path: str | None = None, engine: str | None = None, seed: int = 0,
                     onnx_factory: Callable[[], str] | None = None, ort_threads: int = 0,
                     torch_compile: str | None = None) -> dict[str, Any]:
    """Time `backends` on every (B, T) of `grid`; returns {"rows", "unavailable", "flops_per_clip", ...}.
    torch_compile: the torch-fp16 runner's compile mode (None: its default; see runners/compile.py)."""
    import torch

    env = Env.probe(engine)
    device = "cuda" if env.cuda else "cpu"
    cfg = model.cfg
    set_tf32(torch, False)  # strict fp32 for the reference and the torch-fp32 rows
    inputs = {cell: make_input(*cell, cfg.img_size, seed) for cell in grid}
    flops = {t: cfg.flops_per_clip(t) for t in sorted({t for _, t in grid})}
    reset_mem, peak_mem = gpu_memory(torch, env.cuda)
    rows: list[Row] = []
    unavailable: dict[str, str] = {}
    reference: dict[tuple[int, int], np.ndarray] = {}

    def add(backend, timing, cell, times, out, peak, extra=None):
        stats = percentiles(times)
        rate = throughput(cell[0], stats)
        cos = float(cosine_rows(reference[cell], out).min()) if cell in reference else None
        rows.append(Row(backend, timing, *cell, stats, rate, rate * flops[cell[1]] / 1e12, peak, cos, extra or {}))
        log.info("%-16s %-6s B=%-3d T=%-2d p50 %8.2f ms  %8.1f clips/s  min cos %s", backend, timing, *cell,
                 stats["p50_ms"], rate, "-" if cos is None else f"{cos:.6f}")

    # the reference first: torch fp32, TF32 off; timed when torch-fp32 is asked for
    ref = TorchBench(model, "fp32", device)
    for cell, x in inputs.items():
        if "torch-fp32" in backends:
            reset_mem()
            times, out = ref.encoder_only(x, plan)
            reference[cell] = out
            add("torch-fp32", "device" if ref.cuda else "host", cell, times, out, peak_mem())
            if ref.cuda:
                times, out = ref.host_to_host(x, plan)
                add("torch-fp32", "host", cell, times, out, None)
        else:
            reference[cell] = ref.runner.infer(x)
    del ref
    _release(torch, env.cuda)

    for backend in backends:
        if backend == "torch-fp32":
            continue
        reason = env.unavailable(backend)
        if reason is None and backend.startswith("onnxruntime") and not onnx_path:
            onnx_path = onnx_factory() if onnx_factory else None
            reason = None if onnx_path else "no ONNX file (pass --onnx)"
        if reason:
            unavailable[backend] = reason
            log.warning("%s: not available: %s", backend, reason)
            continue
        if backend == "torch-fp16":
            bench = TorchBench(model, "fp16", device, torch_compile)
            for cell, x in inputs.items():
                reset_mem()
                times, out = bench.encoder_only(x, plan)
                add(backend, "device", cell, times, out, peak_mem(), bench.compile_info(*cell))
                times, out = bench.host_to_host(x, plan)
                add(backend, "host", cell, times, out, None, bench.compile_info(*cell))
            bench.runner.close()
            del bench
        else:
            runner = _make_runner(backend, onnx_path, engine, ort_threads)
            max_batch = getattr(runner, "max_batch", None)
            for cell, x in inputs.items():
                if max_batch and cell[0] > max_batch and backend != "tensorrt":
                    unavailable[f"{backend} {cell[0]}x{cell[1]}"] = f"graph's max batch is {max_batch}"
                    continue
                times, out = time_host(lambda: runner.infer(x), plan)
                add(backend, "host", cell, times, out, None, {"providers": getattr(runner, "providers", None)})
            del runner
        _release(torch, env.cuda)
    return {"rows": [r.as_dict() for r in rows], "unavailable": unavailable,
            "flops_per_clip": {str(t): f for t, f in flops.items()}, "device": device,
            "tf32": False, "input_seed": seed, "img_size": cfg.img_size, "variant": cfg.name}


def _make_runner(backend: str, onnx_path: str | None, engine: str | None, threads: int):
    if backend == "tensorrt":
        from ..runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(engine)
    from ..runners.onnxruntime_runner import OnnxRuntimeRunner

    provider = "CUDAExecutionProvider" if backend == "onnxruntime-cuda" else "CPUExecutionProvider"
    return OnnxRuntimeRunner(onnx_path, [provider], threads)


def _release(torch, cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def tensorrt_version() -> str | None:
    """`tensorrt X` or `tensorrt_rtx X` from the installed package's metadata, else None (no import: slow)."""
    from importlib import metadata

    for name, dists in (("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
                        ("tensorrt_rtx", ("tensorrt-rtx-cu13", "tensorrt-rtx-cu12", "tensorrt-rtx"))):
        if importlib.util.find_spec(name) is None:
            continue
        for dist in dists:
            try:
                return f"{name} {metadata.version(dist)}"
            except metadata.PackageNotFoundError:
                continue
        return f"{name} (version unknown)"
    return None