"""Stage 1: PyTorch vision tower -> ONNX with dynamic batch and frame axes (validate.py checks the result)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..errors import PipelineError
from ..version import __version__

log = logging.getLogger(__name__)


INPUT_NAME, OUTPUT_NAME = "frames", "features"

MIN_OPSET = 18  # torch.onnx's exporter writes nothing older (it silently wrote 18 when asked for less)


def check_opset(opset: int) -> None:
    """PipelineError unless the exporter can write `opset` (MIN_OPSET .. the installed onnx's newest)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise PipelineError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET}..{newest} (the installed onnx's "
                            f"newest); pass one of those ({MIN_OPSET}, the default, suits TensorRT 10/11 and ONNX "
                            "Runtime)")


def parse_shape(text: str) -> tuple[int, int]:
    """'4x8' -> (batch 4, frames 8)."""
    try:
        batch, frames = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise PipelineError(f"shape {text!r} is not BATCHxFRAMES (for example 4x8)") from None
    if batch < 1 or frames < 1:
        raise PipelineError(f"shape {text!r} must be positive")
    return batch, frames


def export_onnx(model: torch.nn.Module, output: str | Path, precision: str = "fp32", opset: int = 18,
                max_batch: int = 64, max_frames: int = 32, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as ONNX (input `frames` [B, T, 3, H, W], output `features` [B, D]) to `output`.

    precision fp16 exports an FP16 copy: weights and matmuls in half, norms, softmax and reductions
    in float32 (the model casts around them), as TensorRT strongly typed networks want.
    """
    import onnx

    if precision not in ("fp32", "fp16"):
        raise PipelineError(f"precision must be fp32 or fp16, got {precision!r}")
    check_opset(opset)
    cfg = model.cfg
    dtype = torch.float16 if precision == "fp16" else torch.float32
    export_model = _copy_for_export(model, dtype)
    sample = torch.randn(2, max(2, min(cfg.num_frames, max_frames)), cfg.in_chans, cfg.img_size, cfg.img_size,
                         dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    frames = torch.export.Dim("frames", min=1, max=max_frames)
    output = Path(output)
    started = time.perf_counter()
    program = torch.onnx.export(export_model, (sample,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes={"frames": {0: batch, 1: frames}}, opset_version=opset,
                                dynamo=True, verbose=False)
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise PipelineError(f"the exporter wrote opset {written} when asked for --opset {opset}: pass --opset "
                            f"{written}")
    props = {"producer": f"iv2trt {__version__}", "variant": cfg.name, "precision": precision,
             "trained_frames": str(cfg.num_frames), "min_frames": "1", "max_frames": str(max_frames),
             "max_batch": str(max_batch), "input_layout": "B,T,C,H,W float, ImageNet-normalised RGB",
             "output": "encode_vision features, not L2-normalised", **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(output))
    onnx.checker.check_model(str(output))
    log.info("wrote %s (%s, opset %d, %.1f MB) in %.1fs", output, precision, opset,
             output.stat().st_size / 1e6, time.perf_counter() - started)
    return output


def _copy_for_export(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(model).to(dtype=dtype).eval()
    return clone.set_fused_kernels(False)
