"""Stage 2: ONNX -> serialized TensorRT engine (TensorRT 10.x, 11.x or TensorRT-RTX), plus `<engine>.json`.

Small pieces in the Polygraphy manner: read what the ONNX declares, check the optimisation profile against it,
parse, configure, build, describe. One code path serves every flavour (tensorrt.py imports it): networks are
strongly typed (the ONNX file decides fp16 vs fp32), nothing removed in TensorRT 10 or 11 is called. This module
builds engines only; running them is runners/tensorrt_runner.py's job."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, PipelineError
from ..export.onnx_export import INPUT_NAME, parse_shape
from ..fileio import sha256_file, shown_path, write_bytes_atomic, write_text_atomic
from ..version import __version__
from .cuda_env import gpu_info
from .tensorrt import TensorRT, network_flags, start_builder

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- what the ONNX declares

@dataclass(frozen=True)
class OnnxInfo:
    """The ONNX file's input declaration and metadata, read without parsing it for TensorRT."""

    path: Path
    precision: str                        # fp32 | fp16 | other
    input_name: str
    input_dims: tuple[int | str, ...]     # ints for fixed axes, dim_param names (or "?") for dynamic ones
    metadata: dict[str, str]

    @property
    def max_batch(self) -> int | None:
        return int(self.metadata["max_batch"]) if "max_batch" in self.metadata else None

    @property
    def max_frames(self) -> int | None:
        return int(self.metadata["max_frames"]) if "max_frames" in self.metadata else None


def read_onnx_info(path: str | Path) -> OnnxInfo:
    """Input name, shape, precision and metadata of an ONNX file; PipelineError if it cannot be read."""
    import onnx
    from google.protobuf.message import DecodeError

    from ..export.fp16 import onnx_precision

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"ONNX file {shown_path(path)} not found: run export_onnx.py first or pass --onnx PATH")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise PipelineError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc}); "
                            "re-export it with export_onnx.py") from exc
    if not model.graph.input:
        raise PipelineError(f"{path} has no graph inputs: it is truncated or not a model; re-export it")
    inp = model.graph.input[0]
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in inp.type.tensor_type.shape.dim)
    if inp.name != INPUT_NAME or len(dims) != 5:
        raise PipelineError(f"{path}: expected input '{INPUT_NAME}' [batch, frames, 3, H, W], found "
                            f"'{inp.name}' {list(dims)}; export it with export_onnx.py")
    return OnnxInfo(path, onnx_precision(model), inp.name, dims, {p.key: p.value for p in model.metadata_props})


# ---------------------------------------------------------------- optimisation profile

@dataclass(frozen=True)
class Profile:
    """min/opt/max (batch, frames) of the `frames` input."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    @classmethod
    def parse(cls, min_shape: str, opt_shape: str, max_shape: str) -> "Profile":
        return cls(parse_shape(min_shape), parse_shape(opt_shape), parse_shape(max_shape))

    def as_text(self) -> dict[str, str]:
        return {k: f"{b}x{t}" for k, (b, t) in (("min", self.min), ("opt", self.opt), ("max", self.max))}


def check_profile(profile: Profile, info: OnnxInfo) -> None:
    """Refuse, before any build, a profile the ONNX graph cannot serve. The message names the fix."""
    shapes = {"min": profile.min, "opt": profile.opt, "max": profile.max}
    for name, shape in shapes.items():
        if min(shape) < 1:
            raise PipelineError(f"--{name} {shape[0]}x{shape[1]}: batch and frames must be positive")
    for axis, label in ((0, "batch"), (1, "frames")):
        lo, mid, hi = profile.min[axis], profile.opt[axis], profile.max[axis]
        if not lo <= mid <= hi:
            raise PipelineError(f"profile {label} must satisfy min <= opt <= max, got {lo}, {mid}, {hi}: "
                                f"fix --min/--opt/--max (BATCHxFRAMES)")
        declared = info.input_dims[axis]
        if isinstance(declared, int) and (lo, mid, hi) != (declared, declared, declared):
            raise PipelineError(f"{info.path.name} has a FIXED {label} axis of {declared}, but the profile asks "
                                f"for {label} {lo}..{hi}: re-export with export_onnx.py (dynamic axes) or set "
                                f"{label} to {declared} in --min, --opt and --max")
    onnx_max = {"batch": info.max_batch, "frames": info.max_frames}
    for axis, label in ((0, "batch"), (1, "frames")):
        limit = onnx_max[label]
        if limit is not None and profile.max[axis] > limit:
            raise PipelineError(f"--max {label} {profile.max[axis]} exceeds the {limit} the ONNX was exported for "
                                f"(metadata max_{label}): lower --max or re-export with --max-{label}")
    for axis in (2, 3, 4):
        if not isinstance(info.input_dims[axis], int):
            raise PipelineError(f"{info.path.name}: input axis {axis} ({info.input_dims[axis]}) is dynamic; only "
                                "batch and frames may be: re-export with export_onnx.py")


def full_shapes(profile: Profile, info: OnnxInfo) -> dict[str, tuple[int, ...]]:
    """The profile as full 5-D input shapes (channels and size from the ONNX)."""
    chw = tuple(int(d) for d in info.input_dims[2:])
    return {"min": (*profile.min, *chw), "opt": (*profile.opt, *chw), "max": (*profile.max, *chw)}


# ---------------------------------------------------------------- parse, configure, build

def parse_onnx(trt: TensorRT, builder, logger, onnx_path: Path):
    """(network, parser) for an ONNX file; PipelineError listing each parser error with its node and op."""
    network = builder.create_network(network_flags(trt))
    parser = trt.module.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return network, parser
    problems = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        problems.append(f"node {err.node()} '{err.node_name()}' (op {err.node_operator() or '?'}): {err.desc()}")
    raise PipelineError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  " + "\n  ".join(problems or ["?"])
                        + "\nFix the graph (re-export with export_onnx.py) or use a TensorRT version that supports "
                        "these ops")


def describe_io(network) -> list[dict[str, Any]]:
    """Name, direction, dtype and shape (-1 for dynamic) of the network's inputs and outputs."""
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            io.append({"name": tensor.name, "mode": mode, "dtype": str(tensor.dtype).split(".")[-1].lower(),
                       "shape": [int(d) for d in tensor.shape]})
    return io


def uses_timing_cache(trt: TensorRT, config) -> bool:
    """TensorRT has timing caches; in TensorRT-RTX (>= 1.2) they are deprecated no-ops."""
    return trt.flavour == "tensorrt" and hasattr(config, "create_timing_cache")


def load_timing_cache(trt: TensorRT, config, path: Path | None) -> Path | None:
    """Attach the timing cache of `path`, or a fresh one when the file is missing or TensorRT rejects it (made on
    another GPU or by another TensorRT version): the build then rewrites the file. Returns `path` when a cache is
    attached, None when none is (no path, or a flavour without timing caches)."""
    if path is None:
        return None
    if not uses_timing_cache(trt, config):
        log.info("timing cache: not used by %s %s (no tactic timing to cache)", trt.flavour, trt.version)
        return None
    data = path.read_bytes() if path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, False):
                log.info("timing cache: %s (%d bytes loaded)", path, len(data))
                return path
        except Exception as exc:  # noqa: BLE001 - a damaged cache must not stop the build
            log.debug("timing cache %s: %s", path, exc)
        log.warning("timing cache %s does not fit this GPU or TensorRT version: starting a fresh one, which "
                    "replaces it after the build", path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("timing cache: TensorRT refused a fresh one; building without it")
        return None
    log.info("timing cache: %s (new)", path)
    return path


def save_timing_cache(config, path: Path | None) -> None:
    """Write the attached timing cache (updated by the build) to `path` (None: nothing attached)."""
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is None:
        return
    write_bytes_atomic(path, bytes(cache.serialize()))
    log.info("timing cache saved: %s", path)


class ProgressTicker:
    """Prints 'building... Ns' every `every` seconds from a thread while a build runs."""

    def __init__(self, label: str, every: float = 10.0):
        self.label, self.every = label, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(f"{self.label}... {time.perf_counter() - self.started:.0f}s", flush=True)

    def __enter__(self) -> "ProgressTicker":
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ---------------------------------------------------------------- GPU description

def build_gpu(trt: TensorRT) -> dict[str, str]:
    """The GPU the engine is built on, for `<engine>.json`. Full TensorRT engines are bound to it, so a build
    whose GPU cannot be named fails (instead of writing "none", which every runtime would refuse); TensorRT-RTX
    builds without a GPU for the compute capabilities it targets, and records "none" then."""
    gpu = gpu_info()
    if gpu is not None:
        return gpu
    if trt.flavour == "tensorrt":
        raise BackendUnavailable("TensorRT started, but neither pycuda nor the CUDA driver library (libcuda.so.1) "
                                 "could name the GPU for the engine's metadata: pip install -r requirements-gpu.txt "
                                 "(pycuda), and check nvidia-smi")
    return {"name": "none", "compute_capability": "none"}


def rtx_targets(trt: TensorRT, config) -> list[str]:
    """The compute capabilities a TensorRT-RTX engine is built for ([] = every one RTX supports)."""
    if not hasattr(config, "num_compute_capabilities"):
        return []
    return [str(config.get_compute_capability(i)).split(".")[-1] for i in range(config.num_compute_capabilities)]


# ---------------------------------------------------------------- the whole build

@dataclass
class BuildRequest:
    onnx: Path
    output: Path
    precision: str = "fp16"
    profile: Profile = field(default_factory=lambda: Profile((1, 1), (32, 8), (64, 16)))
    workspace_gb: float = 0.0
    optimization_level: int = 3
    timing_cache: Path | None = None
    backend: str = "auto"
    verbose: bool = False


def metadata_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def prepare_onnx(request: BuildRequest, info: OnnxInfo, workdir: Path) -> Path:
    """The ONNX file to parse: the given one, or its FP16 conversion when fp16 is asked of an FP32 graph."""
    if info.precision == request.precision:
        return info.path
    if info.precision == "fp32" and request.precision == "fp16":
        from ..export.fp16 import convert_file

        log.info("%s is FP32: converting it to FP16 (norms/softmax/reductions stay fp32)", info.path.name)
        return convert_file(info.path, workdir / (info.path.stem + "_fp16.onnx"))
    raise PipelineError(f"{info.path.name} is {info.precision} but --precision {request.precision} was asked: "
                        f"build with --precision {info.precision} or export an FP32 graph "
                        "(export_onnx.py --precision fp32)")


def build_engine_file(request: BuildRequest) -> dict[str, Any]:
    """Build `request.output` and `<output>.json`; return the metadata. No engine file is left on failure."""
    if request.precision not in ("fp16", "fp32"):
        raise PipelineError(f"precision must be fp16 or fp32, got {request.precision!r}")
    if not 0 <= request.optimization_level <= 5:
        raise PipelineError(f"--optimization-level must be 0..5, got {request.optimization_level}")
    if request.workspace_gb < 0:
        raise PipelineError(f"--workspace-gb must be 0 (no limit) or a positive size in GiB, got "
                            f"{request.workspace_gb:g}")
    info = read_onnx_info(request.onnx)
    check_profile(request.profile, info)
    trt, logger, builder = start_builder(request.backend, request.verbose)
    gpu = build_gpu(trt)
    log.info("%s %s on %s, ONNX %s (%s), profile %s", trt.flavour, trt.version, gpu["name"], info.path,
             info.precision, request.profile.as_text())
    with tempfile.TemporaryDirectory(prefix="iv2trt_build_") as workdir:
        onnx_path = prepare_onnx(request, info, Path(workdir))
        network, _parser = parse_onnx(trt, builder, logger, onnx_path)
        io = describe_io(network)
        config = builder.create_builder_config()
        if request.workspace_gb > 0:
            config.set_memory_pool_limit(trt.module.MemoryPoolType.WORKSPACE, int(request.workspace_gb * (1 << 30)))
        config.builder_optimization_level = request.optimization_level
        tf32 = getattr(trt.module.BuilderFlag, "TF32", None)
        if request.precision == "fp32" and tf32 is not None:
            config.clear_flag(tf32)  # fp32 means fp32 matmuls, not TF32 (on by default in TensorRT 10)
        shapes = full_shapes(request.profile, info)
        profile = builder.create_optimization_profile()
        profile.set_shape(info.input_name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
        timing_cache = load_timing_cache(trt, config, request.timing_cache)
        with ProgressTicker(f"building {request.output.name} ({trt.flavour} {trt.version})") as ticker:
            serialized = builder.build_serialized_network(network, config)
        build_seconds = ticker.elapsed
    if serialized is None:
        raise PipelineError(f"TensorRT could not build {request.output} (its errors are logged above); no engine "
                            "was written. Out of memory: free memory or change --workspace-gb (0: no limit); "
                            "otherwise try --optimization-level 2 or --precision fp32")
    save_timing_cache(config, timing_cache)
    metadata = engine_metadata(trt, request, info, io, rtx_targets(trt, config), build_seconds, gpu, timing_cache)
    plan = memoryview(serialized)
    metadata["engine_bytes"] = plan.nbytes
    metadata["engine_sha256"] = hashlib.sha256(plan).hexdigest()  # ties the .json to this very engine file
    write_bytes_atomic(request.output, plan)
    write_text_atomic(metadata_path(request.output), json.dumps(metadata, indent=2) + "\n")
    log.info("engine ready: %s (%.1f MB, built in %.1fs)", request.output, metadata["engine_bytes"] / 1e6,
             build_seconds)
    return metadata


def engine_metadata(trt: TensorRT, request: BuildRequest, info: OnnxInfo, io: list[dict[str, Any]],
                    targets: list[str], build_seconds: float, gpu: dict[str, str],
                    timing_cache: Path | None) -> dict[str, Any]:
    """What `<engine>.json` holds: enough for the TensorRT runner to refuse a foreign engine and to rebuild it."""
    meta: dict[str, Any] = {
        "producer": f"iv2trt {__version__}",
        "tensorrt": {"flavour": trt.flavour, "module": trt.module.__name__, "version": trt.version},
        "gpu": gpu,
        "precision": request.precision,
        "profile": {"input": info.input_name, **request.profile.as_text()},
        "io": io,
        "onnx": {"path": str(info.path), "sha256": sha256_file(info.path), "precision": info.precision,
                 "converted_to_fp16": info.precision != request.precision,
                 "variant": info.metadata.get("variant", "unknown"),
                 "random_init": info.metadata.get("random_init", "unknown"),
                 "max_batch": info.max_batch, "max_frames": info.max_frames},
        "build": {"seconds": round(build_seconds, 2),
                  "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "workspace_gb": request.workspace_gb, "optimization_level": request.optimization_level,
                  "timing_cache": str(timing_cache) if timing_cache else None},
    }
    if trt.flavour == "tensorrt-rtx":
        meta["rtx_compute_capabilities"] = targets or ["all supported by TensorRT-RTX"]
    return meta


def request_from(settings: Any) -> BuildRequest:
    """A BuildRequest from the build command's settings (same field names)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(BuildRequest)
              if hasattr(settings, f.name) and f.name != "profile"}
    values["onnx"] = Path(values["onnx"])
    values["output"] = Path(values["output"])
    values["timing_cache"] = Path(values["timing_cache"]) if values.get("timing_cache") else None
    return BuildRequest(profile=Profile.parse(settings.min, settings.opt, settings.max), **values)
