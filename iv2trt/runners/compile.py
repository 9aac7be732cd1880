"""torch.compile for the PyTorch runner: fused Triton kernels for the fp16 model on a GPU.

TorchInductor fuses what the eager model runs as separate memory-bound passes (RMSNorm with the residual
and LayerScale adds, the q/k normalisation with the qkv split and head layout, the pooling head's float32
islands). Matrix products stay cuBLAS (fc1 with its bias and GELU in the epilogue, see models' Mlp) and
attention torch's SDPA (cuDNN's flash kernel on Hopper). `max-autotune` also tries Triton matrix products
with fused epilogues; on an H200 it was no faster for S/14 and took 80 s instead of 13 s to compile cold
(issue 11, in the git history of docs/benchmarks.md), so it is an option, not the default.

Compilation, per input shape class:
- one specialisation per frame count, the batch dimension dynamic from 2 (batch 1 is its own
  specialisation: torch specialises size-1 dimensions); if torch specialises the batch anyway (probed
  with a second batch size right after compiling), every batch size compiles on its own;
- compiled in a background thread on the first input of a new class; until it is ready, calls run the
  eager model, so a new shape never stalls a job;
- cached on disk across runs (TorchInductor's FX-graph, Triton and autotuning caches) in
  `TORCHINDUCTOR_CACHE_DIR` if set, else `$XDG_CACHE_HOME/iv2trt/torchinductor`
  (`~/.cache/iv2trt/torchinductor`): a warm cache turns a compile into a few seconds;
- logged: what is compiled, how long it took, and whether the cache answered.

A compile still running when the program ends cannot be stopped midway, and the interpreter's shutdown under
it aborts the process ("terminate called without an active exception", exit 134); and once TorchInductor has
compiled, its own exit hook waits for its compile worker processes (seen: over 6 s after a 20 s job, as
they were still starting). The stages' entry point (cli.exit_with) therefore leaves without that shutdown
once `compiled_here()`; any other program waits for a running compile at exit (an atexit hook) rather than
abort.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from ..errors import PipelineError
from ..models.kernels.switches import user_cache_dir

log = logging.getLogger(__name__)

# TorchInductor options per mode. Neither uses torch's own CUDA graphs: the runner captures one per shape.
MODES: dict[str, dict[str, Any]] = {
    "default": {},                           # fused pointwise/reduction kernels; matrix products stay cuBLAS
    "max-autotune": {"max_autotune": True},  # + Triton matrix products with fused epilogues where faster
}
DEFAULT_MODE = "default"
CHOICES = ("auto", "off", *MODES)
ENV_VAR = "IV2TRT_TORCH_COMPILE"
MAX_CLASSES = 6  # compiled specialisations per model (torch's recompile limit is 8); later classes run eager


def cache_dir() -> Path:
    """Where TorchInductor keeps its caches: $TORCHINDUCTOR_CACHE_DIR when the user chose it, else
    $XDG_CACHE_HOME/iv2trt/torchinductor (~/.cache/...). torch's own default, /tmp/torchinductor_<user>,
    which torch also writes into that variable once it has used it, does not outlive a reboot."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return user_cache_dir("torchinductor")


def resolve_mode(requested: str | None, device_type: str, dtype) -> str | None:
    """The compile mode a runner uses, or None for the eager model.

    requested: None (then $IV2TRT_TORCH_COMPILE, else `auto`), `auto` (DEFAULT_MODE for fp16/bf16 on a
    CUDA GPU, eager otherwise: the fp32 model is the reference), `off`, or a key of MODES."""
    import torch

    requested = requested or os.environ.get(ENV_VAR) or "auto"
    if requested not in CHOICES:
        raise PipelineError(f"torch compile mode must be one of {list(CHOICES)}, got {requested!r} "
                            f"(from {'$' + ENV_VAR if requested == os.environ.get(ENV_VAR) else 'the caller'})")
    if requested == "off":
        return None
    if device_type != "cuda":
        if requested != "auto":
            log.warning("torch compile mode %s ignored: compiling is for CUDA GPUs; the %s model runs eager",
                        requested, device_type)
        return None
    if requested == "auto":
        return DEFAULT_MODE if dtype in (torch.float16, torch.bfloat16) else None
    return requested


def shape_class(shape: tuple[int, ...], dynamic_batch: bool = True) -> tuple:
    """Inputs that share one compiled specialisation: same trailing dims, batch 1 or batch >= 2."""
    if not dynamic_batch:
        return tuple(shape)
    return ("batch1" if shape[0] == 1 else "batch2+", *shape[1:])


def _counter(group: str, name: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters[group].get(name, 0))


_LIVE: "weakref.WeakSet[CompiledForward]" = weakref.WeakSet()  # instances whose compile thread has started
_COMPILED_HERE = threading.Event()  # set once any compile has been asked for in this process
EXIT_WAIT_S = 120.0  # finish_compiles: the longest wait for a running compile at exit


def compiled_here() -> bool:
    """Whether this process has asked for a torch.compile (TorchInductor's workers and exit hook may exist)."""
    return _COMPILED_HERE.is_set()


def compiles_in_flight() -> list[str]:
    """What this process's background compiles are still working on ("Model [B>=2, 8, 3, 224, 224]")."""
    return [f"{c.name} {_describe(key)}" for c in list(_LIVE) for key in c.pending()]


@atexit.register
def finish_compiles(timeout: float = EXIT_WAIT_S) -> None:
    """Drop queued background compiles and wait up to `timeout` seconds for the running ones (at exit, instead
    of letting the interpreter's shutdown abort under them; tests call it too)."""
    for compiled in list(_LIVE):
        compiled.close()  # queued compiles are dropped; the running one finishes
    for what in compiles_in_flight():
        log.info("waiting up to %.0f s for the background torch.compile of %s to finish before exiting (it "
                 "cannot be stopped midway)", timeout, what)
    deadline = time.monotonic() + timeout
    for compiled in list(_LIVE):
        try:
            compiled.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("leaving with the background torch.compile of %s still running",
                        ", ".join(compiles_in_flight()))
            return


COMPILE_NICENESS = 15  # background compiles (and the compile workers they start) below the CPU decoders' 10


def _lower_priority() -> None:
    """This thread at COMPILE_NICENESS (Linux: a thread's own nice value; the compile worker processes it starts
    inherit it), so a compile in the background takes the cores the decoders leave."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)
    except (OSError, AttributeError):  # not Linux, or not allowed
        pass


class CompiledForward:
    """A model and its torch.compile'd twin; `__call__` runs the twin for inputs whose specialisation is
    compiled and the eager model otherwise (asking for that compile the first time it sees the class).

    One background thread compiles, one class at a time (`background=False`: in the caller's thread); a
    compile still running at the program's end is left (cli.exit_with) or waited for (see the module's doc).
    Calls come from one thread (the runner's); `busy` is True while a compile is in flight or queued, and
    callers must not capture CUDA graphs then (the compile thread launches work of its own).
    `backend` is torch.compile's (a callable in tests; MODES' options apply to "inductor" only).
    """

    def __init__(self, model, mode: str, *, background: bool = True, backend: str | Callable = "inductor",
                 dynamic_batch: bool = True):
        import torch

        if mode not in MODES:
            raise PipelineError(f"torch compile mode must be one of {list(MODES)}, got {mode!r}")
        self.torch = torch
        self.model = model
        self.mode = mode
        self.dynamic_batch = dynamic_batch
        self.name = type(model).__name__
        self._compile_options = ({"backend": "inductor", "options": dict(MODES[mode]) or None}
                                 if backend == "inductor" else {"backend": backend})
        self._compiled = None  # the twin, made by the first compile: torch.compile imports TorchDynamo (seconds),
        self._twin_lock = threading.Lock()  # which a runner that never compiles (beside NVDEC) does without
        self.background = background
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requested: dict[tuple, threading.Event] = {}  # class -> set once its compile has finished
        self._ready: set[tuple] = set()
        self.failed: dict[tuple, str] = {}
        self.seconds: dict[tuple, float] = {}
        self.run_compiled = self._run_compiled  # one bound method: callers compare what select() returns

    # --- state --------------------------------------------------------------------------------------------
    def key(self, shape) -> tuple:
        """The class of an input shape: `shape_class`, and the name the model's `compile_variant(shape)` gives
        where it has one (a model whose forward takes another path for some batch sizes: each path compiles
        apart, and a batch size never recompiles the other's graph in the caller's thread)."""
        variant = getattr(self.model, "compile_variant", None)
        key = shape_class(tuple(shape), self.dynamic_batch)
        name = variant(tuple(shape)) if variant is not None else None
        return key + (name,) if name else key

    def ready(self, shape) -> bool:
        return self.key(shape) in self._ready

    @property
    def busy(self) -> bool:
        return bool(self.pending())

    def pending(self) -> list[tuple]:
        """The classes whose compile is queued or running."""
        with self._lock:
            return [key for key, done in self._requested.items() if not done.is_set()]

    def compile_seconds(self, shape) -> float | None:
        return self.seconds.get(self.key(shape))

    # --- compiling ----------------------------------------------------------------------------------------
    def request(self, x) -> None:
        """Start compiling for x's class unless it is compiled, compiling or failed (shape, dtype, device
        are taken from x; the compile runs on fresh random inputs, never on x itself)."""
        key = self.key(x.shape)
        _COMPILED_HERE.set()
        with self._lock:
            if key in self._requested:
                return
            done = self._requested[key] = threading.Event()
            if len(self._requested) > MAX_CLASSES:
                self.failed[key] = f"more than {MAX_CLASSES} input shape classes"
                log.warning("torch.compile of %s: input %s runs the eager model (%s)", self.name, _describe(key),
                            self.failed[key])
                done.set()
                return
            job = (key, tuple(x.shape), x.dtype, x.device, done)
            if self.background:
                log.info("torch.compile (%s) of %s for input %s queued in the background; until it is ready "
                         "this shape runs the eager model (cache: %s)", self.mode, self.name,
                         _describe(key), os.environ.get("TORCHINDUCTOR_CACHE_DIR") or user_cache_dir("torchinductor"))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="torch-compile", daemon=True)
                    self._thread.start()
                    _LIVE.add(self)
                self._queue.put(job)
                return
        self._compile_job(job)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every requested compile has finished (compiled or failed); TimeoutError after
        `timeout` seconds for one of them."""
        with self._lock:
            events = list(self._requested.values())
        for done in events:
            if not done.wait(timeout):
                raise TimeoutError(f"torch.compile of {self.name} still running after {timeout} s")

    def _work(self) -> None:
        _lower_priority()
        while (job := self._queue.get()) is not None:
            self._compile_job(job)

    def _compile_job(self, job: tuple) -> None:
        key, shape, dtype, device, done = job
        try:
            self._compile(key, shape, dtype, device)
        finally:
            done.set()

    def _compile(self, key: tuple, shape: tuple, dtype, device) -> None:
        started = time.perf_counter()
        hits, misses = _counter("inductor", "fxgraph_cache_hit"), _counter("inductor", "fxgraph_cache_miss")
        try:
            graphs = _counter("stats", "unique_graphs")
            self._run_example(shape, dtype, device)
            compiled_graphs = _counter("stats", "unique_graphs") - graphs
            probe = self._probe_batch(key, shape)
            if probe is not None:
                # a second batch size: if torch specialised the batch, it compiles again (here, not later
                # in the caller's thread) and from now on every batch size is its own specialisation
                graphs = _counter("stats", "unique_graphs")
                self._run_example((probe, *shape[1:]), dtype, device)
                if _counter("stats", "unique_graphs") > graphs:
                    log.warning("torch.compile specialised the batch size of %s; each batch size compiles "
                                "on its own", _describe(key))
                    key = self._mark_static(key, shape, probe)
        except Exception as exc:  # a compiler failure must not fail the job: this class stays eager
            self.failed[key] = f"{type(exc).__name__}: {exc}"
            log.warning("torch.compile (%s) of %s for input %s failed after %.1f s; it runs the eager model: %s",
                        self.mode, self.name, _describe(key), time.perf_counter() - started, self.failed[key])
            return
        seconds = time.perf_counter() - started
        hits = _counter("inductor", "fxgraph_cache_hit") - hits
        misses = _counter("inductor", "fxgraph_cache_miss") - misses
        self.seconds[key] = seconds
        with self._lock:
            self._ready.add(key)
        log.info("torch.compile (%s) of %s for input %s ready in %.1f s (%d graph(s); FX graph cache: %d hit(s), "
                 "%d miss(es))", self.mode, self.name, _describe(key), seconds, compiled_graphs, hits, misses)

    def _probe_batch(self, key: tuple, shape: tuple) -> int | None:
        """Another batch size of the same class (the next, else the previous one), or None."""
        if not self.dynamic_batch or shape[0] < 2:
            return None
        return next((b for b in (shape[0] + 1, shape[0] - 1) if b >= 2 and self.key((b, *shape[1:])) == key), None)

    def _run_example(self, shape: tuple, dtype, device) -> None:
        torch = self.torch
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(torch._dynamo.config.patch(automatic_dynamic_shapes=False))
            if device.type == "cuda":
                stack.enter_context(torch.cuda.device(device))
                stream = torch.cuda.Stream(device)
                stack.enter_context(torch.cuda.stream(stream))
            x = torch.randn(shape, device=device).to(dtype)
            if self.dynamic_batch and shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(x, 0)
            self._twin()(x)
            if device.type == "cuda":
                stream.synchronize()

    def _mark_static(self, key: tuple, shape: tuple, probe: int) -> tuple:
        """From now on every batch size is a class of its own; returns shape's new class."""
        with self._lock:
            self.dynamic_batch = False
            static_key = self.key(shape)
            self._requested[static_key] = self._requested.pop(key)
            probe_key = self.key((probe, *shape[1:]))
            self._requested.setdefault(probe_key, threading.Event()).set()
            self._ready.add(probe_key)
        return static_key

    # --- running ------------------------------------------------------------------------------------------
    def select(self, x) -> Callable:
        """The callable for x: `run_compiled` when x's class is ready, else the eager model (and the
        class's compile is requested)."""
        if self.ready(x.shape):
            return self.run_compiled
        if self.key(x.shape) not in self.failed:
            self.request(x)
        return self.run_compiled if self.ready(x.shape) else self.model

    def _twin(self):
        """The model's torch.compile'd twin, made on first use (after that, no lock on the compiled call's path)."""
        if self._compiled is not None:
            return self._compiled
        with self._twin_lock:
            if self._compiled is None:
                if self._compile_options["backend"] == "inductor":
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
                self._compiled = self.torch.compile(self.model, **self._compile_options)
            return self._compiled

    def _run_compiled(self, x):
        """The compiled twin on x, as an inference tensor: compiled for one, the twin would compile again for
        an ordinary tensor (torch guards on the dispatch keys), so those are copied into one first."""
        with self.torch.inference_mode():
            return self._twin()(x if x.is_inference() else x.clone())

    def __call__(self, x):
        return self.select(x)(x)

    def close(self) -> None:
        """Stop the compile thread after its current compile (without waiting for it); queued ones are dropped."""
        if self._thread is not None:
            with self._lock:
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    job[-1].set()  # never compiled: not pending
            self._queue.put(None)
            self._thread = None


def _describe(key: tuple) -> str:
    if key and key[0] in ("batch1", "batch2+"):
        return f"[{'1' if key[0] == 'batch1' else 'B>=2'}, {', '.join(map(str, key[1:]))}]"
    return str(list(key))
