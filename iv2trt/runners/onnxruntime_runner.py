"""The ONNX Runtime runner: an exported ONNX file on the providers this install has (CUDA where onnxruntime-gpu is
installed, else the CPU)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, PipelineError
from ..fileio import shown_path
from .base import HostNormalize

log = logging.getLogger(__name__)


def _load_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's errors for a model file it cannot take (its pybind module's exception types)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NoModel", "NotImplemented", "Fail")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))


PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # in order of preference, those installed


def default_providers() -> list[str]:
    """The providers a runner takes when none are asked for: of PROVIDERS, those this onnxruntime has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in PROVIDERS if p in available]


class OnnxRuntimeRunner(HostNormalize):
    """An exported ONNX graph in ONNX Runtime (CUDA provider when present and asked for, else CPU)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is in requirements.txt
            raise BackendUnavailable("onnxruntime is not installed: pip install -r requirements.txt") from exc
        if not Path(onnx_path).is_file():
            raise PipelineError(f"ONNX file {shown_path(onnx_path)} not found: run export_onnx.py first, or pass "
                                "--onnx PATH")
        providers = providers or default_providers()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except _load_errors() as exc:  # not an ONNX model (a truncated copy, another file), or not one it takes
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise PipelineError(f"ONNX Runtime cannot load {shown_path(onnx_path)}: {reason}. Export it again "
                                "(python export_onnx.py), or pass the --onnx PATH it wrote") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_batch = int(meta["max_batch"]) if "max_batch" in meta else None
        self.frame_range = (int(meta.get("min_frames", 1)), int(meta["max_frames"]) if "max_frames" in meta else None)
        self.providers = self.session.get_providers()
        # where it encodes, for the job's logs and summary (the CUDA provider's default device: 0)
        self.device = "cuda:0" if self.providers[:1] == ["CUDAExecutionProvider"] else "cpu"
        log.debug("onnxruntime providers: %s", self.providers)

    def infer(self, frames: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(frames, dtype=self.input_dtype)})[0]
        return out.astype(np.float32)
