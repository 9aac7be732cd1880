"""A fake TensorRT module and a fake pycuda driver, enough to run TensorRTRunner on a CPU.

They follow the APIs trt_runtime.py calls (TensorRT 10/11 name-based API, pycuda's driver module) and
record what a real GPU would make unsafe: the pycuda context stack per thread, retains and releases of
the primary context, memory freed while an engine call is running. The fake engine computes
features[b, j] = (j + 1) * mean(frames[b]), so outputs can be checked against numpy.
"""
from __future__ import annotations

import json
import threading
import types
import weakref
from pathlib import Path

import numpy as np

FEATURES = 6
CHW = (3, 8, 8)
VERSION = "10.13.0.35"
GPU = ("NVIDIA H100 80GB HBM3", (9, 0))


def expected_features(frames: np.ndarray) -> np.ndarray:
    """What the fake engine computes, in float64."""
    means = np.asarray(frames, np.float64).reshape(len(frames), -1).mean(axis=1)
    return means[:, None] * np.arange(1, FEATURES + 1)


# ---------------------------------------------------------------- pycuda

class FakeDeviceMemory:
    def __init__(self, cuda, nbytes: int):
        self.cuda, self.data = cuda, np.zeros(nbytes, np.uint8)
        cuda.allocations.add(id(self))

    def __int__(self) -> int:
        return id(self)

    def __del__(self):
        self.cuda.allocations.discard(id(self))
        if self.cuda.executing:  # freed while an engine call is still reading or writing it
            self.cuda.use_after_free = True


class FakeContext:
    def __init__(self, cuda):
        self.cuda = cuda
        self.detached = False

    def push(self) -> None:
        self.cuda.stack().append(self)

    def pop(self) -> None:
        stack = self.cuda.stack()
        assert stack and stack[-1] is self, "pop of a context that is not current"
        stack.pop()

    def detach(self) -> None:  # pycuda's primary context: pushed, released, never popped
        self.detached = True
        self.cuda.stack().append(self)
        self.cuda.releases += 1


class FakeCuda:
    """pycuda.driver: Device, primary contexts, pinned memory, device memory, async copies, streams."""

    def __init__(self, gpu=GPU):
        self.gpu = gpu
        self.retains = self.releases = 0
        self.executing = 0
        self.use_after_free = False
        self.allocations: set[int] = set()
        self.memory: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # address -> live allocation
        self._stacks = threading.local()
        cuda = self

        class Device:
            def __init__(self, index):
                assert index == 0

            @staticmethod
            def count():
                return 1

            def name(self):
                return cuda.gpu[0]

            def compute_capability(self):
                return cuda.gpu[1]

            def retain_primary_context(self):
                cuda.retains += 1
                return FakeContext(cuda)

        class Stream:
            handle = 1234

            def synchronize(self):
                pass

        self.Device, self.Stream = Device, Stream

    def stack(self) -> list:
        if not hasattr(self._stacks, "stack"):
            self._stacks.stack = []
        return self._stacks.stack

    def init(self) -> None:
        pass

    def pagelocked_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def mem_alloc(self, nbytes: int) -> FakeDeviceMemory:
        memory = FakeDeviceMemory(self, nbytes)
        self.memory[id(memory)] = memory
        return memory

    def memcpy_htod_async(self, dst, src, stream) -> None:
        self._current()
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        dst.data[:raw.size] = raw

    def memcpy_dtoh_async(self, dst, src, stream) -> None:
        self._current()
        raw = dst.view(np.uint8).reshape(-1)
        raw[:] = src.data[:raw.size]

    def _current(self) -> None:
        assert self.stack(), "CUDA call without a current context"


# ---------------------------------------------------------------- tensorrt

class FakeExecutionContext:
    def __init__(self, engine):
        self.engine, self.addresses, self.shape = engine, {}, None
        self.started = threading.Event()   # set when execute_async_v3 begins
        self.release = threading.Event()   # execute_async_v3 returns once set
        self.release.set()

    def set_tensor_address(self, name, address) -> bool:
        self.addresses[name] = address
        return True

    def set_input_shape(self, name, shape) -> bool:
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name == self.engine.input_name:
            return self.shape
        return self.engine.context_output_shape(self.shape)

    def execute_async_v3(self, stream_handle) -> bool:
        cuda = self.engine.cuda
        cuda._current()
        cuda.executing += 1
        try:
            self.started.set()
            self.release.wait(10)
            inp, out = (cuda.memory[self.addresses[n]] for n in (self.engine.input_name, self.engine.output_name))
            frames = inp.data.view(self.engine.input_dtype)[:int(np.prod(self.shape))].reshape(self.shape)
            features = expected_features(frames).astype(self.engine.output_dtype)
            out.data[:features.nbytes] = features.view(np.uint8).reshape(-1)
            return True
        finally:
            cuda.executing -= 1


class FakeEngine:
    input_name, output_name = "frames", "features"

    def __init__(self, cuda, profile=((1, 1), (4, 4), (4, 8)), output_shape=(-1, FEATURES), input_dtype=np.float16,
                 context_output_shape=None):
        self.cuda, self.profile, self.output_shape = cuda, profile, output_shape
        self.input_dtype, self.output_dtype = input_dtype, np.float16
        self.context_output_shape = context_output_shape or (lambda shape: (shape[0], FEATURES))
        self.num_io_tensors = 2
        self.contexts: list[FakeExecutionContext] = []

    def get_tensor_name(self, index):
        return (self.input_name, self.output_name)[index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == self.input_name else "OUTPUT"

    def get_tensor_dtype(self, name):
        dtype = self.input_dtype if name == self.input_name else self.output_dtype
        return "DataType.HALF" if dtype == np.float16 else "DataType.FLOAT"

    def get_tensor_profile_shape(self, name, profile_index):
        return [(b, t, *CHW) for b, t in self.profile]

    def get_tensor_shape(self, name):
        return (-1, -1, *CHW) if name == self.input_name else self.output_shape

    def create_execution_context(self):
        self.contexts.append(FakeExecutionContext(self))
        return self.contexts[-1]


def fake_tensorrt(cuda: FakeCuda, engine: FakeEngine | None = None, version: str = VERSION, runtime_starts=True,
                  flavour_module: str = "tensorrt", compute_capabilities=None):
    """A module with the TensorRT names trt_runtime.py uses; `calls` records the order of the calls that matter."""
    calls: list[str] = []
    module = types.SimpleNamespace(__version__=version, __name__=flavour_module, calls=calls)
    module.engine = engine or FakeEngine(cuda)

    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, severity=2):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            if not runtime_starts:  # what pybind11 raises when createInferRuntime returns nullptr
                raise TypeError("pybind11::init(): factory function returned nullptr")
            calls.append("Runtime")

        def deserialize_cuda_engine(self, plan):
            calls.append("deserialize_cuda_engine")
            return module.engine if plan == b"fake plan" else None

    def init_libnvinfer_plugins(logger, namespace):
        calls.append(f"init_libnvinfer_plugins({namespace!r})")
        return True

    module.Logger, module.Runtime, module.init_libnvinfer_plugins = Logger, Runtime, init_libnvinfer_plugins
    module.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    if compute_capabilities is not None:  # TensorRT-RTX's enum of the compute capabilities it targets
        members = {"NONE": 0, "CURRENT": 1, **{f"SM{cc.replace('.', '')}": 0 for cc in compute_capabilities}}
        module.ComputeCapability = types.SimpleNamespace(__members__=members)
    return module


def write_engine(folder: Path, flavour: str = "tensorrt", version: str = VERSION, gpu=GPU) -> Path:
    """A fake plan and its <engine>.json as build_engine.py writes them."""
    import hashlib

    engine = folder / "fake.engine"
    engine.write_bytes(b"fake plan")
    meta = {"tensorrt": {"flavour": flavour, "module": flavour.replace("-", "_"), "version": version},
            "gpu": {"name": gpu[0], "compute_capability": "{}.{}".format(*gpu[1])}, "precision": "fp16",
            "profile": {"input": "frames", "min": "1x1", "opt": "4x4", "max": "4x8"},
            "onnx": {"path": "build/x_fp16.onnx", "random_init": "true"},
            "engine_sha256": hashlib.sha256(b"fake plan").hexdigest()}
    Path(str(engine) + ".json").write_text(json.dumps(meta))
    return engine


def install(monkeypatch, cuda: FakeCuda, trt_module, flavour: str = "tensorrt") -> None:
    """Make the TensorRT runner use the fakes (and forget primary contexts retained by earlier tests)."""
    import iv2trt.runners.tensorrt_runner as rt
    from iv2trt.engine import cuda_env, tensorrt

    monkeypatch.setattr(rt, "_import_pycuda", lambda: cuda)
    monkeypatch.setattr(rt, "_PRIMARY_CONTEXTS", {})
    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda backend="auto": tensorrt.TensorRT(trt_module, flavour))
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: None)
