"""Runners: one object per backend that turns preprocessed frames into raw (unnormalised) features.

Every runner takes float32 frames [B, T, 3, H, W] and returns float32 [B, D]. The TensorRT runner
lives in trt_runtime.py, the only module that touches TensorRT's execution API.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable, PipelineError

log = logging.getLogger(__name__)


class TorchRunner:
    """The PyTorch model; fp16 with SDPA kernels on a GPU, fp32 on CPU by default."""

    name = "torch"

    def __init__(self, model, device: str | None = None, precision: str | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.precision = precision
        self.model = model.to(device=self.device, dtype=self.dtype).eval().set_fused_attention(True)
        self.max_batch = None
        self.frame_range = (1, None)

    def infer(self, frames: np.ndarray):
        with self.torch.inference_mode():
            x = self.torch.as_tensor(frames).to(self.device, self.dtype, non_blocking=True)
            return self.model(x).float().cpu().numpy()


class OnnxRuntimeRunner:
    """An exported ONNX graph in ONNX Runtime (CUDA provider when present and asked for, else CPU)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is in requirements.txt
            raise BackendUnavailable("onnxruntime is not installed: pip install -r requirements.txt") from exc
        if not Path(onnx_path).is_file():
            raise PipelineError(f"ONNX file {onnx_path} not found: run export_onnx.py first")
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_batch = int(meta["max_batch"]) if "max_batch" in meta else None
        self.frame_range = (int(meta.get("min_frames", 1)), int(meta["max_frames"]) if "max_frames" in meta else None)
        self.providers = self.session.get_providers()
        log.debug("onnxruntime providers: %s", self.providers)

    def infer(self, frames: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(frames, dtype=self.input_dtype)})[0]
        return out.astype(np.float32)
