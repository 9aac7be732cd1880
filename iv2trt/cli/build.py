"""`build_engine.py`: settings and orchestration of stage 2 (ONNX -> TensorRT engine + <engine>.json)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

from ..engine.build import build_engine_file, metadata_path, request_from
from ..settings import parse_settings, setting

log = logging.getLogger(__name__)


@dataclass
class BuildSettings:
    onnx: str = setting("build/internvideo2_clip_s14_fp16.onnx", "ONNX file from export_onnx.py")
    output: str = setting("build/internvideo2_clip_s14_fp16.engine",
                          "where to write the engine (its metadata goes to <output>.json)")
    precision: str = setting("fp16", "fp16: build from an FP16 graph (an FP32 ONNX is converted first, norms/"
                             "softmax/reductions kept fp32); fp32: FP32 graph", choices=("fp16", "fp32"))
    min: str = setting("1x1", "smallest BATCHxFRAMES the engine accepts")
    opt: str = setting("32x8", "BATCHxFRAMES TensorRT tunes kernels for (your usual batch)")
    max: str = setting("64x16", "largest BATCHxFRAMES (at most the ONNX's max_batch/max_frames)")
    workspace_gb: float = setting(0.0, "builder workspace limit in GiB (0: TensorRT's default, all free memory)")
    optimization_level: int = setting(3, "builder optimisation level 0..5 (higher: longer build, maybe faster)")
    timing_cache: str | None = setting("build/timing.cache", "timing cache file read and updated across builds; one "
                                       "from another GPU or TensorRT version is replaced ('' or null: none; "
                                       "TensorRT-RTX has none)")
    backend: str = setting("auto", "TensorRT flavour: tensorrt, tensorrt-rtx, or auto (tensorrt; tensorrt-rtx when "
                           "tensorrt is missing or cannot start here)", choices=("auto", "tensorrt", "tensorrt-rtx"))


DESCRIPTION = """Stage 2: build a TensorRT engine from the ONNX file of export_onnx.py.

The network is strongly typed: the ONNX file's types decide the precision (an FP32 graph asked for
--precision fp16 is converted to FP16 first). The profile (--min/--opt/--max, BATCHxFRAMES) is checked
against the ONNX's dynamic axes before building. Writes the engine and <engine>.json (TensorRT version,
GPU, profile, I/O, ONNX sha256) atomically: a failed build leaves no engine file.

Build the engine on (a GPU of the same model as) the one that runs it, with the same TensorRT version.
Full TensorRT needs that GPU and a driver new enough for its wheel's CUDA (tensorrt-cu12: r535+,
tensorrt-cu13: r580+); TensorRT-RTX builds without a GPU, for RTX-class GPUs (compute capability
7.5, 8.0, 8.6, 8.9, 12.x; not H100 or B200). Default paths are relative to the working directory.

Exit codes: 0 ok, 2 bad input/config or failed build, 4 TensorRT not installed or unable to start here."""

EPILOG = ("example: python build_engine.py --onnx build/x_fp16.onnx --output build/x.engine "
          "--min 1x1 --opt 4x8 --max 16x16")


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_settings(BuildSettings, ("build",), DESCRIPTION, argv, epilog=EPILOG)
    request = request_from(s)
    metadata = build_engine_file(request)
    summary = {k: metadata[k] for k in ("tensorrt", "gpu", "precision", "profile")}
    print(f"engine: {request.output}\nmetadata: {metadata_path(request.output)}\n{json.dumps(summary)}", flush=True)
    return 0
