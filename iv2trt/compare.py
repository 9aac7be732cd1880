"""Comparators: is an output close enough to a higher-precision reference? (Kept apart from runners.)"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP32_MAX_REL_ERROR = 1e-4   # relative to the reference's largest magnitude: float rounding
FP16_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Comparison:
    max_abs_error: float
    max_rel_error: float  # max |out - ref| / max |ref|
    min_cosine: float

    def passes(self, precision: str) -> bool:
        if precision == "fp32":
            return self.max_rel_error <= FP32_MAX_REL_ERROR
        return self.min_cosine >= FP16_MIN_COSINE

    @staticmethod
    def threshold(precision: str) -> str:
        return f"rel err <= {FP32_MAX_REL_ERROR:g}" if precision == "fp32" else f"min cos >= {FP16_MIN_COSINE}"


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(denom, 1e-30)


def compare(reference: np.ndarray, output: np.ndarray) -> Comparison:
    reference = np.asarray(reference, np.float64)
    output = np.asarray(output, np.float64)
    if reference.shape != output.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs output {output.shape}")
    abs_err = float(np.abs(reference - output).max())
    scale = float(np.abs(reference).max()) or 1.0
    return Comparison(abs_err, abs_err / scale, float(cosine_rows(reference, output).min()))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclass
class RunningComparison:
    """Agreement of a runner with a reference runner over many batches (raw features), mergeable across
    pipelines: the worst row over all of them."""

    min_cosine: float = 1.0
    max_abs_error: float = 0.0
    max_ref: float = 0.0
    clips: int = 0

    def update(self, reference: np.ndarray, output: np.ndarray) -> None:
        c = compare(reference, output)
        self.min_cosine = min(self.min_cosine, c.min_cosine)
        self.max_abs_error = max(self.max_abs_error, c.max_abs_error)
        self.max_ref = max(self.max_ref, float(np.abs(reference).max()))
        self.clips += len(reference)

    def merge(self, other: "RunningComparison") -> None:
        self.min_cosine = min(self.min_cosine, other.min_cosine)
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.max_ref = max(self.max_ref, other.max_ref)
        self.clips += other.clips

    @property
    def max_rel_error(self) -> float:
        return self.max_abs_error / (self.max_ref or 1.0)

    def result(self) -> Comparison:
        return Comparison(self.max_abs_error, self.max_rel_error, self.min_cosine)

    def as_dict(self) -> dict:
        """summary.json's `compare_pytorch` (and what `from_dict` reads back)."""
        return {"clips": self.clips, "min_cosine": self.min_cosine, "max_abs_error": self.max_abs_error,
                "max_rel_error": self.max_rel_error, "max_ref": self.max_ref}

    @classmethod
    def from_dict(cls, d: dict) -> "RunningComparison":
        return cls(d["min_cosine"], d["max_abs_error"], d.get("max_ref", 0.0), d["clips"])
