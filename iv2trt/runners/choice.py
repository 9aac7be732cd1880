"""Choosing and creating the runner for feature extraction (tensorrt | onnxruntime | torch | auto)."""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

from ..errors import BackendUnavailable, PipelineError
from ..fileio import shown_path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


def tensorrt_missing(engine: str | None) -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        return "neither tensorrt nor tensorrt_rtx is installed (pip install -r requirements-gpu.txt)"
    if importlib.util.find_spec("pycuda") is None:
        return "python package 'pycuda' is not installed (pip install -r requirements-gpu.txt)"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return "no CUDA GPU found"
    except Exception as exc:  # driver missing or broken
        return f"CUDA is not usable ({exc})"
    if not engine or not Path(engine).is_file():
        return f"engine file {shown_path(engine or '')} not found (build it with build_engine.py, or pass --engine)"
    return None


def torch_gpu_missing() -> str | None:
    """Why the PyTorch runner cannot run on a CUDA GPU here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"


def has_weights(s) -> bool:
    """Whether settings `s` give the PyTorch model weights (--checkpoint, or --random-init to try the pipeline)."""
    return bool(getattr(s, "checkpoint", None) or getattr(s, "random_init", False))


def fallback_backend(s, reason: str) -> tuple[str, str]:
    """(backend, why) of `auto` when TensorRT cannot run (`reason`): the PyTorch fp16 model on a CUDA GPU when
    weights are given (the fastest path without TensorRT: several times ONNX Runtime's CUDA provider), else
    ONNX Runtime on the ONNX file."""
    if has_weights(s) and torch_gpu_missing() is None:
        return "torch", f"auto: {reason}; PyTorch fp16 on the GPU, the fastest path without TensorRT"
    return "onnxruntime", f"auto: {reason}"


def resolve_backend(s) -> tuple[str, str]:
    """(backend, why) for settings `s` (backend, engine, checkpoint, random_init). `auto`: TensorRT when it can
    run; else PyTorch on a CUDA GPU when weights are given; else ONNX Runtime."""
    if s.backend != "auto":
        return s.backend, "asked for"
    reason = tensorrt_missing(s.engine)
    if reason is None:
        return "tensorrt", f"auto: TensorRT, a GPU and {s.engine} are present"
    return fallback_backend(s, f"TensorRT unavailable ({reason})")


def encoder_on_cpu(s) -> bool:
    """Whether the runner settings `s` name would encode on the CPU on this machine, GPUs or not: ONNX Runtime
    (asked for, or what `auto` comes to) without a GPU provider installed. Decided without building the runner."""
    if resolve_backend(s)[0] != "onnxruntime":
        return False
    try:
        from .onnxruntime_runner import default_providers

        return default_providers()[:1] == ["CPUExecutionProvider"]
    except ImportError:
        return False  # the runner's own error says what to install


def create_runner(s) -> object:
    """The runner named by settings `s` (fields backend, engine, onnx and the model settings). With backend auto,
    a TensorRT that is installed but cannot start here (driver, GPU) falls back as `fallback_backend` says, and
    a PyTorch model that cannot be loaded (variant, checkpoint) falls back to the ONNX file when there is one."""
    backend, why = resolve_backend(s)
    if backend == "tensorrt":
        try:
            return tensorrt_runner(s, why)
        except BackendUnavailable as exc:
            if s.backend != "auto":
                raise
            backend, why = fallback_backend(s, "TensorRT cannot run here")
            log.warning("TensorRT cannot run here: %s; using %s", exc,
                        "PyTorch" if backend == "torch" else "ONNX Runtime")
    if backend == "torch":
        from ..models import CheckpointError

        try:
            return torch_runner(s, why)
        except (PipelineError, CheckpointError) as exc:
            if s.backend != "auto" or not s.onnx or not Path(s.onnx).is_file():
                raise
            log.warning("PyTorch cannot load the model (%s); using ONNX Runtime on %s", exc, s.onnx)
            backend, why = "onnxruntime", "auto: the PyTorch model could not be loaded"
    if backend == "onnxruntime":
        return onnxruntime_runner(s.onnx, why)
    raise PipelineError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def torch_runner(s, why: str):
    from ..model import load_model
    from .torch_runner import TorchRunner

    if not has_weights(s):
        raise PipelineError("backend torch needs --checkpoint PATH (or --random-init to try the pipeline)")
    runner = TorchRunner(load_model(s))
    log.info("backend torch (%s): %s %s on %s", why, s.variant, runner.precision, runner.device)
    return runner


def tensorrt_runner(s, why: str):
    reason = tensorrt_missing(s.engine)
    if reason:
        raise BackendUnavailable(f"backend tensorrt cannot run: {reason}; or pass --backend onnxruntime")
    from .tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner(s.engine)
    log.info("backend tensorrt (%s): engine %s", why, s.engine)
    return runner


def onnxruntime_runner(onnx_path: str | None, why: str):
    """ONNX Runtime on `onnx_path`. Where it runs on the CPU, an FP16 graph is converted to FP32 first (most
    CPUs emulate fp16 arithmetic: the fp16 graph was measured at half the fp32 speed); the runner's
    `precision` stays fp16 (the weights') and `converted_from` says so."""
    import numpy as np

    from .onnxruntime_runner import OnnxRuntimeRunner

    if not onnx_path:
        raise PipelineError("backend onnxruntime needs --onnx PATH (made by export_onnx.py)")
    runner = OnnxRuntimeRunner(onnx_path)
    if runner.providers[0] == "CPUExecutionProvider" and runner.input_dtype == np.float16:
        runner = cpu_fp32_runner(onnx_path)
        log.info("backend onnxruntime (%s): %s converted to fp32 for the CPU (fp16 weights widened exactly, fp32 "
                 "compute; most CPUs emulate fp16 arithmetic)", why, onnx_path)
    else:
        log.info("backend onnxruntime (%s): %s on %s", why, onnx_path, ", ".join(runner.providers))
    return runner


def cpu_fp32_runner(onnx_path: str | Path):
    """An ONNX Runtime CPU runner of the FP32 conversion of an FP16 ONNX file."""
    import onnx

    from ..export.fp16 import convert_to_fp32
    from .onnxruntime_runner import OnnxRuntimeRunner

    with tempfile.TemporaryDirectory(prefix="iv2trt_fp32_") as tmp:  # the session keeps the model in memory
        path = Path(tmp) / "model_fp32.onnx"
        onnx.save(convert_to_fp32(onnx.load(str(onnx_path))), str(path))
        runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"])
    runner.precision, runner.converted_from = "fp16", "fp16"  # fp16 weights: fp16 comparison thresholds
    return runner


def runner_random_init(runner, s) -> bool | None:
    """Whether the runner's weights are random (--random-init); None when its model file does not say."""
    if getattr(runner, "name", "") == "torch":
        return not s.checkpoint
    return {"true": True, "false": False}.get(str(model_file_metadata(runner, "random_init")).lower())


def runner_variant(runner) -> str | None:
    """The model variant the runner's model file was exported for, or None when the file does not say."""
    value = model_file_metadata(runner, "variant")
    return value if value not in (None, "", "unknown") else None


def model_file_metadata(runner, key: str) -> str | None:
    """A key of the ONNX metadata export_onnx.py wrote (an engine's <engine>.json carries its ONNX's)."""
    if getattr(runner, "session", None) is not None:
        return runner.session.get_modelmeta().custom_metadata_map.get(key)
    return (getattr(runner, "metadata", None) or {}).get("onnx", {}).get(key)


def runner_img_size(runner, default: int = 224) -> int:
    """The square input size a runner expects (from the model, the ONNX input shape, or `img_size`)."""
    size = getattr(runner, "img_size", None) or (getattr(runner, "chw", None) or (None,))[-1]
    if size:
        return int(size)
    model = getattr(runner, "model", None)
    if model is not None and hasattr(model, "cfg"):
        return int(model.cfg.img_size)
    session = getattr(runner, "session", None)
    if session is not None:
        last = session.get_inputs()[0].shape[-1]
        if isinstance(last, int):
            return last
    return default


def runner_feature_dim(runner) -> int | None:
    """The size of the features a runner returns, where it says without running (its engine's output, the
    model's config, the ONNX output shape); None otherwise."""
    dim = getattr(runner, "feature_dim", None)
    model = getattr(runner, "model", None)
    if dim is None and model is not None and hasattr(model, "cfg"):
        dim = model.cfg.align_dim
    session = getattr(runner, "session", None)
    if dim is None and session is not None:
        last = session.get_outputs()[0].shape[-1]
        dim = last if isinstance(last, int) else None
    return int(dim) if dim else None


def runner_precision(runner) -> str:
    """fp16 or fp32: the precision the runner computes in (decides the comparison threshold)."""
    precision = getattr(runner, "precision", None)
    if precision in ("fp16", "fp32"):
        return precision
    if getattr(runner, "input_dtype", None) is not None:
        import numpy as np

        return "fp16" if runner.input_dtype == np.float16 else "fp32"
    return "fp16" if getattr(runner, "name", "") == "tensorrt" else "fp32"  # engines are built fp16 by default
