"""Is the exported graph right? A runner of it (ONNX Runtime, chosen by the caller) against the PyTorch fp32 model on
fresh random inputs per shape, judged by the comparator's thresholds (iv2trt.compare). Running and judging stay
apart, as in Polygraphy: this module never builds a runner."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..compare import Comparison, compare
from ..errors import ValidationFailed
from .onnx_export import _copy_for_export


@dataclass(frozen=True)
class ShapeCheck:
    batch: int
    frames: int
    comparison: Comparison
    passed: bool


def validate_onnx(model: torch.nn.Module, runner, precision: str, shapes: list[tuple[int, int]],
                  seed: int | None = None) -> list[ShapeCheck]:
    """`runner.infer` (the exported graph, e.g. in ONNX Runtime) against the fp32 PyTorch `model` on fresh random
    inputs per shape; each shape passes by the thresholds of `precision`."""
    reference = _copy_for_export(model, torch.float32).set_fused_kernels(True)
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    results = []
    for batch, frames in shapes:
        x = rng.standard_normal((batch, frames, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=np.float32)
        with torch.inference_mode():
            ref = reference(torch.from_numpy(x)).numpy()
        out = runner.infer(x)
        comparison = compare(ref, out)
        results.append(ShapeCheck(batch, frames, comparison, comparison.passes(precision)))
    return results


def report_validation(results: list[ShapeCheck], precision: str) -> str:
    lines = [f"validation: ONNX Runtime ({precision}) vs PyTorch fp32, fresh random inputs; "
             f"pass if {Comparison.threshold(precision)}",
             f"{'B x T':>8} {'max abs err':>12} {'rel err':>10} {'min cosine':>11}  result"]
    for r in results:
        c = r.comparison
        lines.append(f"{f'{r.batch}x{r.frames}':>8} {c.max_abs_error:12.3e} {c.max_rel_error:10.2e} "
                     f"{c.min_cosine:11.7f}  {'ok' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def check_validation(results: list[ShapeCheck]) -> None:
    failed = [f"{r.batch}x{r.frames}" for r in results if not r.passed]
    if failed:
        raise ValidationFailed(f"ONNX output disagrees with PyTorch at {failed}; no ONNX file was written. "
                               "Try --precision fp32, or report the table above")
