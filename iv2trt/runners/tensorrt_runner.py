"""Stage 3's TensorRT runner: the only module that touches TensorRT's execution API and pycuda.

Written against the TensorRT 10/11 name-based API (num_io_tensors, get_tensor_*, set_input_shape,
set_tensor_address, execute_async_v3). pycuda uses the device's PRIMARY context (no pycuda.autoinit),
the one PyTorch and TensorRT use too, retained once per process and pushed around every call. One
lock per runner covers inference and `close()`, so an engine is never freed under a running call
(Ctrl-C while the job's inference thread is inside execute_async_v3). The pure logic (metadata
checks, batch plans, shape checks, dtypes) is in plain functions testable without a GPU.
"""
from __future__ import annotations

import json
import logging
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendUnavailable, EngineMismatch, PipelineError
from ..fileio import sha256_file, shown_path

log = logging.getLogger(__name__)

DTYPES = {"float": np.float32, "float32": np.float32, "half": np.float16, "float16": np.float16,
          "bf16": None, "int32": np.int32, "int64": np.int64, "int8": np.int8, "bool": np.bool_}


# ---------------------------------------------------------------- pure logic

def numpy_dtype(trt_dtype: Any) -> type:
    """numpy dtype for a TensorRT DataType (or its name): DataType.HALF -> np.float16."""
    name = str(trt_dtype).split(".")[-1].lower()
    dtype = DTYPES.get(name)
    if dtype is None:
        raise PipelineError(f"engine tensor type {trt_dtype} is not supported here (fp32/fp16 engines only): "
                            "rebuild with build_engine.py --precision fp16 or fp32")
    return dtype


def load_engine_metadata(engine_path: str | Path) -> dict[str, Any]:
    """`<engine>.json` written by build_engine.py; PipelineError when missing or unreadable, EngineMismatch when it
    describes another engine file (an interrupted rebuild, or files copied apart)."""
    from ..engine.build import metadata_path

    path = metadata_path(engine_path)
    if not Path(engine_path).is_file():
        raise PipelineError(f"engine {shown_path(engine_path)} not found: build it with python build_engine.py "
                            f"--onnx ONNX --output {engine_path}, or pass --engine PATH")
    if not path.is_file():
        raise PipelineError(f"{path} (the engine's metadata) is missing: rebuild the engine with build_engine.py, "
                            "which writes both files")
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise PipelineError(f"{path} is not readable JSON ({exc}): rebuild the engine with build_engine.py") from exc
    expected = metadata.get("engine_sha256")
    if expected and sha256_file(engine_path) != expected:
        raise EngineMismatch(f"{engine_path} is not the engine {path} describes (its sha256 differs): rebuild it: "
                             f"{rebuild_command(metadata, engine_path)}")
    return metadata


def rebuild_command(metadata: dict[str, Any], engine_path: str | Path, backend: str | None = None) -> str:
    """The build_engine.py command line that rebuilds this engine here."""
    profile = metadata.get("profile", {})
    args = ["python", "build_engine.py", "--onnx", metadata.get("onnx", {}).get("path", "ONNX"),
            "--output", str(engine_path), "--precision", metadata.get("precision", "fp16")]
    for key in ("min", "opt", "max"):
        if key in profile:
            args += [f"--{key}", profile[key]]
    if backend:
        args += ["--backend", backend]
    return shlex.join(args)


def check_engine_metadata(metadata: dict[str, Any], engine_path: str | Path, flavour: str, version: str,
                          gpu_name: str, compute_capability: str, rtx_supported: Sequence[str] | None = None) -> None:
    """EngineMismatch (with the rebuild command) unless the engine was built for this TensorRT and GPU.

    TensorRT engines are bound to the exact TensorRT version and the GPU model; TensorRT-RTX engines
    to the RTX version and the compute capabilities they target (JIT-compiled at load). A runtime of
    TensorRT-RTX passes `rtx_supported`, the compute capabilities it runs on: on any other GPU (H100,
    B200, ...) the engine is refused before TensorRT sees it, with the full TensorRT rebuild command.
    """
    built = metadata.get("tensorrt", {})
    if flavour == "tensorrt-rtx" and rtx_supported is not None and compute_capability not in rtx_supported:
        needs = (f"TensorRT-RTX does not run on this GPU ({gpu_name}, compute capability {compute_capability}; it "
                 f"runs on {', '.join(rtx_supported)}): this GPU needs full TensorRT (pip install -r "
                 "requirements-gpu.txt)")
        if built.get("flavour") == "tensorrt-rtx":
            raise EngineMismatch(f"engine {engine_path} was built with TensorRT-RTX. {needs}; then rebuild the "
                                 f"engine: {rebuild_command(metadata, engine_path, 'tensorrt')}")
        raise BackendUnavailable(f"engine {engine_path} was built with {built.get('flavour')}, which is not "
                                 f"installed. {needs}")
    problems = []
    if built.get("flavour") != flavour:
        problems.append(f"built with {built.get('flavour')}, this runtime is {flavour}")
    elif built.get("version") != version:
        problems.append(f"built with {flavour} {built.get('version')}, this runtime is {version}")
    if flavour == "tensorrt-rtx":
        targets = metadata.get("rtx_compute_capabilities") or []
        explicit = [t for t in targets if t.upper().startswith("SM")]
        here = "SM" + compute_capability.replace(".", "")
        if explicit and here not in [t.upper() for t in explicit]:
            problems.append(f"built for {', '.join(explicit)}, this GPU ({gpu_name}) is {here}")
    else:
        gpu = metadata.get("gpu", {})
        if gpu.get("compute_capability") != compute_capability:
            problems.append(f"built on {gpu.get('name')} (compute capability {gpu.get('compute_capability')}), "
                            f"this GPU is {gpu_name} ({compute_capability})")
        elif gpu.get("name") != gpu_name:
            problems.append(f"built on {gpu.get('name')}, this GPU is {gpu_name}")
    if problems:
        raise EngineMismatch(f"engine {engine_path} does not fit this machine: {'; '.join(problems)}. Rebuild it "
                             f"here: {rebuild_command(metadata, engine_path, flavour)}")


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of a batch, run as an engine batch of `run_batch` (>= rows; extra rows zero)."""

    start: int
    stop: int
    run_batch: int


def plan_batches(batch: int, min_batch: int, max_batch: int) -> list[Chunk]:
    """Split `batch` rows into engine-sized chunks; a chunk under the profile minimum is zero-padded."""
    if batch < 1:
        raise PipelineError("empty batch: pass at least one clip")
    chunks = []
    for start in range(0, batch, max_batch):
        stop = min(start + max_batch, batch)
        chunks.append(Chunk(start, stop, max(stop - start, min_batch)))
    return chunks


def check_frames_shape(shape: tuple[int, ...], frame_range: tuple[int, int], chw: tuple[int, int, int]) -> None:
    """Refuse input the engine cannot take: not [B, T, C, H, W], T outside the profile, another size."""
    if len(shape) != 5:
        raise PipelineError(f"frames must be [batch, frames, 3, H, W], got shape {tuple(shape)}")
    lo, hi = frame_range
    if not lo <= shape[1] <= hi:
        raise PipelineError(f"{shape[1]} frames per clip is outside this engine's profile range {lo}..{hi}: "
                            f"sample {lo}..{hi} frames or rebuild the engine with another --min/--max")
    if tuple(shape[2:]) != tuple(chw):
        raise PipelineError(f"frames are {tuple(shape[2:])} per frame, the engine takes {tuple(chw)}: fix the "
                            "preprocessing size")


def check_output_dims(dims: Sequence[int], engine_path: str | Path, name: str) -> int:
    """The feature size of an engine output declared [batch, D] with D fixed; PipelineError otherwise (the
    output buffers are sized max_batch x D)."""
    dims = [int(d) for d in dims]
    if len(dims) != 2 or dims[-1] < 1:
        raise PipelineError(f"{engine_path}: output '{name}' has shape {dims} (-1: dynamic); this runtime needs "
                            "[batch, features] with a fixed feature size: rebuild it from export_onnx.py's ONNX")
    return dims[-1]


# ---------------------------------------------------------------- GPU part

_PRIMARY_CONTEXTS: dict[int, Any] = {}  # device ordinal -> pycuda context, retained once per process
_PRIMARY_LOCK = threading.Lock()


def primary_context(cuda, device: int):
    """The device's primary context (PyTorch's and TensorRT's too), retained once per process and kept.

    Never detached: pycuda's detach() of a primary context pushes it and releases it without popping it,
    which would leave a context on the calling thread's stack for every runner closed.
    """
    with _PRIMARY_LOCK:
        context = _PRIMARY_CONTEXTS.get(device)
        if context is None:
            context = _PRIMARY_CONTEXTS[device] = cuda.Device(device).retain_primary_context()
        return context


def _import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailable("pycuda is not installed: pip install -r requirements-gpu.txt (needs a CUDA GPU)") \
            from exc
    cuda.init()
    if cuda.Device.count() == 0:
        raise BackendUnavailable("no CUDA GPU visible: the TensorRT backend needs an NVIDIA GPU")
    return cuda


class TensorRTRunner:
    """A TensorRT engine as a runner: float32 frames [B, T, 3, H, W] (infer) or uint8 resized frames
    [B, T, H, W, 3] (infer_uint8) -> float32 features [B, D] (raw)."""

    name = "tensorrt"
    takes_cuda_frames = True  # infer_uint8 also takes a uint8 CUDA tensor (GPU-decoded clips) and stays on the GPU

    def __init__(self, engine_path: str | Path, device: int = 0):
        from ..engine.cuda_env import driver_problem
        from ..engine.tensorrt import import_tensorrt, rtx_compute_capabilities

        self._lock = threading.Lock()  # one inference call or close() at a time
        self.context_cuda = None
        self.device = f"cuda:{device}"  # (the job's logs and summary name it)
        self.engine_path = Path(engine_path)
        self.metadata = load_engine_metadata(self.engine_path)
        try:
            trt = import_tensorrt(self.metadata.get("tensorrt", {}).get("flavour", "auto"))
        except BackendUnavailable:  # the other flavour may be here: check_engine_metadata says rebuild
            trt = import_tensorrt("auto")
        problem = driver_problem(trt.flavour)
        if problem:
            raise BackendUnavailable(f"{trt.flavour} {trt.version} cannot run here: {problem}")
        cuda = _import_pycuda()
        self.cuda, self.trt = cuda, trt.module
        dev = cuda.Device(device)
        cc = "{}.{}".format(*dev.compute_capability())
        rtx_supported = (rtx_compute_capabilities(trt.module) or None) if trt.flavour == "tensorrt-rtx" else None
        check_engine_metadata(self.metadata, self.engine_path, trt.flavour, trt.version, dev.name(), cc,
                              rtx_supported)
        context = primary_context(cuda, device)
        context.push()
        try:
            self._load(trt)
        finally:
            context.pop()
        self.context_cuda = context
        log.info("TensorRT engine %s on %s: input %s %s, batch <= %d, frames %d..%d", self.engine_path.name,
                 dev.name(), self.input_name, np.dtype(self.input_dtype).name, self.max_batch, *self.frame_range)

    def _load(self, trt) -> None:
        from ..engine.tensorrt import cannot_start

        cuda, module = self.cuda, trt.module
        self.logger = module.Logger(module.Logger.WARNING)
        try:
            self.runtime = module.Runtime(self.logger)
        except (TypeError, RuntimeError) as exc:  # pybind11: "factory function returned nullptr"
            raise cannot_start(trt, "Runtime", exc) from None
        init_plugins = getattr(module, "init_libnvinfer_plugins", None)
        if init_plugins is not None:  # engines may hold TensorRT's standard plugins (as Polygraphy does)
            init_plugins(self.logger, "")
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"{trt.flavour} {trt.version} could not deserialise {self.engine_path} (corrupt, or "
                                 f"built by another version). Rebuild it: "
                                 f"{rebuild_command(self.metadata, self.engine_path, trt.flavour)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == module.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == module.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineError(f"{self.engine_path} has inputs {inputs} and outputs {outputs}; expected one each "
                                "(frames -> features): rebuild it from export_onnx.py's ONNX")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = numpy_dtype(self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = numpy_dtype(self.engine.get_tensor_dtype(self.output_name))
        lo, _opt, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        if len(hi) != 5:
            raise PipelineError(f"{self.engine_path}: input '{self.input_name}' has rank {len(hi)}; expected "
                                "[batch, frames, 3, H, W]: rebuild it from export_onnx.py's ONNX")
        self.min_batch, self.max_batch = lo[0], hi[0]
        self.frame_range = (lo[1], hi[1])
        self.chw = hi[2:]
        self.feature_dim = check_output_dims(self.engine.get_tensor_shape(self.output_name), self.engine_path,
                                             self.output_name)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PipelineError(f"TensorRT could not create an execution context for {self.engine_path} "
                                "(out of GPU memory?): free GPU memory or rebuild with a smaller --max")
        # buffers for the profile maximum, allocated once
        self.host_in = cuda.pagelocked_empty((self.max_batch, self.frame_range[1], *self.chw), self.input_dtype)
        self.host_out = cuda.pagelocked_empty((self.max_batch, self.feature_dim), self.output_dtype)
        self.device_in = cuda.mem_alloc(self.host_in.nbytes)
        self.device_out = cuda.mem_alloc(self.host_out.nbytes)
        self.stream = cuda.Stream()
        self.context.set_tensor_address(self.input_name, int(self.device_in))
        self.context.set_tensor_address(self.output_name, int(self.device_out))

    def infer(self, frames: np.ndarray) -> np.ndarray:
        """float frames [B, T, 3, H, W] -> float32 features [B, D]."""
        frames = np.asarray(frames)
        check_frames_shape(frames.shape, self.frame_range, self.chw)
        return self._infer_rows(frames.shape,
                                self._host_input(lambda dst, a, b: np.copyto(dst, frames[a:b], casting="unsafe")))

    def infer_uint8(self, frames: np.ndarray) -> np.ndarray:
        """uint8 resized frames [B, T, H, W, 3] -> float32 features [B, D]; normalised on the host straight
        into the pinned input buffer, in the engine's input dtype (no full-size float32 temporary)."""
        from ..transforms import normalize_frames
        from .base import check_uint8_frames, is_cuda_tensor, normalized_shape

        if is_cuda_tensor(frames):
            return self._infer_device(frames)
        frames = check_uint8_frames(frames)
        shape = normalized_shape(frames.shape)
        check_frames_shape(shape, self.frame_range, self.chw)
        return self._infer_rows(shape, self._host_input(lambda dst, a, b: normalize_frames(frames[a:b], out=dst)))

    def _infer_device(self, frames) -> np.ndarray:
        """uint8 frames [B, T, H, W, 3] in GPU memory (a torch CUDA tensor): normalised there by PyTorch into the
        engine's dtype, copied device to device into the engine's input; no pixel goes through host memory."""
        import torch

        from ..transforms import normalize_frames
        from .base import check_uint8_frames, normalized_shape

        check_uint8_frames(frames)
        shape = normalized_shape(tuple(frames.shape))
        check_frames_shape(shape, self.frame_range, self.chw)
        dtype = torch.from_numpy(np.empty(0, self.input_dtype)).dtype
        x = normalize_frames(frames, out=torch.empty(shape, dtype=dtype, device=frames.device))
        torch.cuda.current_stream(frames.device).synchronize()  # x is written before pycuda's stream reads it
        row = x[0].numel() * x.element_size()

        def put(chunk: Chunk, run_shape: tuple[int, ...]) -> None:
            rows = chunk.stop - chunk.start
            self.cuda.memcpy_dtod_async(self.device_in, x.data_ptr() + chunk.start * row, rows * row, self.stream)
            if chunk.run_batch > rows:  # zero the padding rows of the profile's minimum batch
                self.cuda.memset_d8_async(int(self.device_in) + rows * row, 0, (chunk.run_batch - rows) * row,
                                          self.stream)
        return self._infer_rows(shape, put)

    def _host_input(self, fill):
        """put() for host frames: fill(dst, start, stop) writes rows [start, stop) into dst, a view of the pinned
        input buffer in the engine's dtype; padding rows are zeroed; one upload."""
        def put(chunk: Chunk, run_shape: tuple[int, ...]) -> None:
            rows = chunk.stop - chunk.start
            host_in = self.host_in.reshape(-1)[:int(np.prod(run_shape))].reshape(run_shape)  # pinned buffer view
            fill(host_in[:rows], chunk.start, chunk.stop)  # -> engine dtype, on the host
            if chunk.run_batch > rows:
                host_in[rows:] = 0
            self.cuda.memcpy_htod_async(self.device_in, host_in, self.stream)
        return put

    def _infer_rows(self, shape: tuple[int, ...], put) -> np.ndarray:
        """Run all rows of a [B, T, C, H, W] batch; put(chunk, run_shape) places a chunk's rows (padded to the
        run shape) into the engine's input buffer on the runner's stream."""
        out = np.empty((shape[0], self.feature_dim), np.float32)
        with self._lock:
            if self.context_cuda is None:
                raise PipelineError(f"the TensorRT runner of {self.engine_path} is closed")
            self.context_cuda.push()
            try:
                for chunk in plan_batches(shape[0], self.min_batch, self.max_batch):
                    out[chunk.start:chunk.stop] = self._run(chunk, shape[1], put)
            finally:
                self.context_cuda.pop()
        return out

    def _run(self, chunk: Chunk, n_frames: int, put) -> np.ndarray:
        """One engine call on rows that fit the profile (zero-padded up to run_batch)."""
        rows, run_batch = chunk.stop - chunk.start, chunk.run_batch
        shape = (run_batch, n_frames, *self.chw)
        if not self.context.set_input_shape(self.input_name, shape):
            raise PipelineError(f"the engine refused input shape {shape}: profile is batch {self.min_batch}.."
                                f"{self.max_batch}, frames {self.frame_range[0]}..{self.frame_range[1]}")
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        if out_shape != (run_batch, self.feature_dim):  # the buffer holds [max_batch, D]
            raise PipelineError(f"for input {shape} the engine's output '{self.output_name}' is {list(out_shape)}, "
                                f"not [{run_batch}, {self.feature_dim}]: rebuild it from export_onnx.py's ONNX")
        put(chunk, shape)
        if not self.context.execute_async_v3(self.stream.handle):
            raise PipelineError(f"TensorRT execution failed for shape {shape} (see its log above)")
        host_out = self.host_out[:run_batch]
        self.cuda.memcpy_dtoh_async(host_out, self.device_out, self.stream)
        self.stream.synchronize()
        return host_out[:rows].astype(np.float32)

    def close(self, timeout: float = 60.0) -> None:
        """Free the engine and its buffers in the primary context, once an inference call still running in
        another thread has returned (waits up to `timeout` s; past that they are left to the process exit
        rather than freed under a running engine)."""
        if not self._lock.acquire(timeout=timeout):
            log.warning("TensorRT inference still running after %gs: its engine and buffers are left to the "
                        "process exit", timeout)
            return
        try:
            if self.context_cuda is None:
                return
            self.context_cuda.push()
            try:
                for attr in ("context", "engine", "runtime", "device_in", "device_out", "host_in", "host_out",
                             "stream"):
                    if hasattr(self, attr):
                        delattr(self, attr)
            finally:
                self.context_cuda.pop()
                self.context_cuda = None  # the primary context itself stays retained for the process
        finally:
            self._lock.release()
