"""`export_onnx.py`: settings and orchestration of stage 1 (export, validate, then publish)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import PipelineError
from ..export.onnx_export import check_opset, export_onnx, parse_shape
from ..export.validate import check_validation, report_validation, validate_onnx
from ..fileio import atomic_path, sha256_file
from ..model import ModelSettings, load_model
from ..runners.onnxruntime_runner import OnnxRuntimeRunner
from ..settings import parse_settings, setting

log = logging.getLogger(__name__)


@dataclass
class ExportSettings(ModelSettings):
    output: str = setting("build/internvideo2_clip_s14_fp16.onnx", "where to write the ONNX file")
    precision: str = setting("fp16", "fp16: FP16 graph with fp32 norms/softmax (TensorRT strongly typed); "
                             "fp32: float32 graph", choices=("fp16", "fp32"))
    opset: int = setting(18, "ONNX opset (18 or newer: what the exporter writes)")
    max_batch: int = setting(64, "largest batch the graph is declared for")
    max_frames: int = setting(32, "largest frame count the graph is declared for")
    validate: bool = setting(True, "compare ONNX Runtime with PyTorch fp32 before writing the file")
    validation_shapes: list[str] = setting(["1x1", "2x4", "2x8", "1x16"],
                                           "BATCHxFRAMES shapes to validate (T = 1 and the largest are wise)")


DESCRIPTION = """Stage 1: export the InternVideo2-CLIP vision encoder to ONNX (dynamic batch and frames).

Validates the graph with ONNX Runtime against PyTorch fp32 on fresh random inputs and writes the
file only when it passes (exit 3 otherwise). Exit codes: 0 ok, 2 bad input/config, 3 validation failed."""


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_settings(ExportSettings, ("model", "export"), DESCRIPTION, argv)
    shapes = [parse_shape(v) for v in s.validation_shapes]
    check_opset(s.opset)
    if s.max_batch < 2 or s.max_frames < 2:
        raise PipelineError("--max-batch and --max-frames must be at least 2 (the axes are dynamic; the profile "
                            "of build_engine.py can still pin batch or frames to 1)")
    if s.validate:
        shapes = [(b, t) for b, t in shapes if b <= s.max_batch and t <= s.max_frames]
        if not shapes:
            raise PipelineError(f"no --validation-shapes fit within --max-batch {s.max_batch} and --max-frames "
                                f"{s.max_frames}: give shapes such as 1x1 2x{min(8, s.max_frames)}")
    model = load_model(s)
    meta = {"random_init": str(not s.checkpoint).lower()}
    if s.checkpoint:
        meta["checkpoint"] = os.path.basename(s.checkpoint)
        meta["checkpoint_sha256"] = sha256_file(s.checkpoint)
    else:
        log.warning("exporting RANDOM weights: the ONNX metadata says random_init=true")
    with atomic_path(s.output) as tmp:
        export_onnx(model, tmp, s.precision, s.opset, s.max_batch, s.max_frames, meta)
        if s.validate:
            runner = OnnxRuntimeRunner(tmp, providers=["CPUExecutionProvider"])
            results = validate_onnx(model, runner, s.precision, shapes)
            print(report_validation(results, s.precision), flush=True)
            check_validation(results)
    log.info("ONNX ready: %s%s", Path(s.output), " (RANDOM weights)" if not s.checkpoint else "")
    return 0
