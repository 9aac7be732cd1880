"""The TensorRT flavour in use (full TensorRT 10/11, or TensorRT-RTX), imported once for the build and the runtime:
which module and pip package, its builder and logger, and why it cannot start here (driver, GPU) in words a user
can act on."""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailable, PipelineError
from .cuda_env import driver_problem, gpu_info

log = logging.getLogger(__name__)


# backend name -> (python module, pip package); tensorrt-cu12 runs on drivers r535+, the bare `tensorrt`
# (= tensorrt-cu13 today) only on r580+ (see requirements-gpu.txt)
FLAVOURS = {"tensorrt": ("tensorrt", "tensorrt-cu12"), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx-cu13")}


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT Python module and which flavour it is."""

    module: Any
    flavour: str  # "tensorrt" or "tensorrt-rtx"

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def import_tensorrt(backend: str = "auto") -> TensorRT:
    """The TensorRT module for `backend` (tensorrt | tensorrt-rtx | auto: tensorrt, then tensorrt-rtx)."""
    if backend not in (*FLAVOURS, "auto"):
        raise PipelineError(f"backend must be auto, tensorrt or tensorrt-rtx, got {backend!r}")
    candidates = list(FLAVOURS) if backend == "auto" else [backend]
    errors = []
    for flavour in candidates:
        module_name, package = FLAVOURS[flavour]
        try:
            return TensorRT(importlib.import_module(module_name), flavour)
        except ImportError as exc:  # the package, or its CUDA libraries, are missing
            errors.append(f"{module_name}: {exc}")
    packages = " or ".join(f"pip install {FLAVOURS[f][1]}" for f in candidates)
    raise BackendUnavailable(f"no TensorRT Python module could be imported ({'; '.join(errors)}): {packages}")


def network_flags(trt: TensorRT) -> int:
    """Creation flags for a strongly typed network: the flag where it exists (10.x, RTX), none in 11.x+.

    TensorRT 11 networks are always strongly typed and the 10.x EXPLICIT_BATCH flag is gone, so
    neither is passed there.
    """
    flags = trt.module.NetworkDefinitionCreationFlag
    if trt.flavour == "tensorrt" and trt.major >= 11:
        return 0
    if not hasattr(flags, "STRONGLY_TYPED"):
        raise BackendUnavailable(f"{trt.flavour} {trt.version} has no strongly typed networks: "
                                 "install TensorRT 10.x or newer (pip install tensorrt)")
    return 1 << int(flags.STRONGLY_TYPED)


def make_logger(trt: TensorRT, verbose: bool = False):
    return trt.module.Logger(trt.module.Logger.INFO if verbose else trt.module.Logger.WARNING)


def cannot_start(trt: TensorRT, what: str, exc: BaseException) -> BackendUnavailable:
    """The error for a trt.Builder / trt.Runtime that could not be created (pybind11 raises TypeError "factory
    function returned nullptr" when TensorRT cannot start CUDA: no GPU visible, or a driver too old)."""
    reason = driver_problem(trt.flavour) or ("is a GPU visible (nvidia-smi), and is the driver new enough for "
                                             "this wheel's CUDA (see requirements-gpu.txt)?")
    return BackendUnavailable(f"{trt.flavour} {trt.version} could not start CUDA (trt.{what}: {exc}; TensorRT's "
                              f"own message is logged above): {reason}")


def create_builder(trt: TensorRT, logger):
    """trt.Builder(logger); BackendUnavailable with the reason when TensorRT cannot start.

    Full TensorRT needs CUDA to create a builder, so its wheel's CUDA is checked against the driver first.
    TensorRT-RTX builds without a GPU (for the compute capabilities it supports), so it is not.
    """
    problem = driver_problem(trt.flavour) if trt.flavour == "tensorrt" else None
    if problem:
        raise BackendUnavailable(f"{trt.flavour} {trt.version} cannot run here: {problem}")
    try:
        return trt.module.Builder(logger)
    except (TypeError, RuntimeError) as exc:
        raise cannot_start(trt, "Builder", exc) from None


def start_builder(backend: str = "auto", verbose: bool = False) -> tuple[TensorRT, Any, Any]:
    """(TensorRT, logger, builder) for `backend`; auto: full TensorRT, or TensorRT-RTX when full TensorRT is
    missing or cannot start here."""
    if backend not in (*FLAVOURS, "auto"):
        raise PipelineError(f"backend must be auto, tensorrt or tensorrt-rtx, got {backend!r}")
    candidates = list(FLAVOURS) if backend == "auto" else [backend]
    problems = []
    for flavour in candidates:
        try:
            try:
                trt = import_tensorrt(flavour)
            except BackendUnavailable as exc:
                raise not_installed(flavour, exc, asked=len(candidates) == 1) from None
            logger = make_logger(trt, verbose)
            builder = create_builder(trt, logger)
        except BackendUnavailable as exc:
            if len(candidates) == 1:
                raise
            problems.append(str(exc))
            continue
        if problems:
            log.warning("%s; building with %s %s instead%s", "; ".join(problems), trt.flavour, trt.version,
                        ", which builds engines without a GPU" if trt.flavour == "tensorrt-rtx" else "")
        warn_if_rtx_cannot_run_here(trt)
        return trt, logger, builder
    raise BackendUnavailable("no TensorRT can build here: " + "; ".join(problems))


def not_installed(flavour: str, exc: BackendUnavailable, asked: bool) -> BackendUnavailable:
    """`exc` (the module of `flavour` cannot be imported) with the fix that works on this machine: on one without a
    GPU, full TensorRT is no use (it builds only where a GPU is) and TensorRT-RTX is the way."""
    if gpu_info() is not None:
        return exc
    if flavour == "tensorrt":
        fix = ": build there, or pass --backend tensorrt-rtx (TensorRT-RTX builds without a GPU)" if asked else ""
        return BackendUnavailable(f"full TensorRT is not installed, and it builds only on a GPU host (none here){fix}")
    return BackendUnavailable(f"TensorRT-RTX is not installed (it builds engines without a GPU, as this machine "
                              f"needs): pip install {FLAVOURS[flavour][1]}")


def rtx_compute_capabilities(module) -> list[str]:
    """Compute capabilities ("8.9", "12.0", ...) the TensorRT-RTX module can target (its ComputeCapability enum;
    [] when it has none to tell)."""
    members = getattr(getattr(module, "ComputeCapability", None), "__members__", {})
    return [f"{name[2:-1]}.{name[-1]}" for name in members if re.fullmatch(r"SM\d{2,3}", name)]


def warn_if_rtx_cannot_run_here(trt: TensorRT) -> None:
    """A TensorRT-RTX build on a GPU that RTX engines do not run on (H100, B200) is for other GPUs: say so."""
    if trt.flavour != "tensorrt-rtx":
        return
    supported, gpu = rtx_compute_capabilities(trt.module), gpu_info()
    if supported and gpu and gpu["compute_capability"] not in supported:
        log.warning("this GPU (%s, compute capability %s) cannot run TensorRT-RTX engines: the engine being built "
                    "is for other GPUs; to run on this one, make full TensorRT work here (pip install -r "
                    "requirements-gpu.txt) and build with --backend tensorrt", gpu["name"], gpu["compute_capability"])
