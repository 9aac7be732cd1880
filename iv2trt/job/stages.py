"""The job's stages as plain functions, called by the pipeline (job/pipeline.py) that both executors run.

source -> batcher -> runner -> writer:
  source  decode/ (`decode.source.iter_clips` in CPU workers, NVDEC sessions on the GPU): one input -> its clips
          (uint8 [T, S, S, 3] resized frames, float32 [T, 3, S, S] for .npy inputs); `clip_frames_problem` and
          `timeout_reason` give an input's failure reason
  runner  `start_inference(runner, frames)` -> a function that waits for the raw features; `encode` adds the
          L2 normalisation
  writer  output/ (`FeatureWriter`, `FailureLog`, `write_summary`); `summarize` and `log_done` give both
          executors the same summary.json fields and closing log line
Nothing here knows which executor calls it.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..compare import l2_normalize
from ..runners.base import infer_frames, is_cuda_tensor

log = logging.getLogger(__name__)


# --- source -------------------------------------------------------------------------------------------------
def clip_frames_problem(frames: int, frame_range: tuple[int, int | None], runner_name: str) -> str | None:
    """Why a clip of `frames` frames cannot go through the model (an input's failure reason), or None."""
    lo, hi = frame_range
    if frames < lo or hi is not None and frames > hi:
        return f"clips of {frames} frames; the {runner_name} model takes {lo}..{hi}"
    return None


def check_frame_count(runner, frames: int) -> None:
    """PipelineError unless the runner's model takes clips of `frames` frames (checked before a job starts)."""
    if clip_frames_problem(frames, runner.frame_range, runner.name):
        from ..errors import PipelineError

        lo, hi = runner.frame_range
        raise PipelineError(f"frames={frames} is outside what the {runner.name} model takes ({lo}..{hi}); "
                            "pass --frames in that range, or export/build for more frames")


def timeout_reason(timeout_s: float) -> str:
    return f"decoding timed out (no progress for {timeout_s:g}s)"


# --- an input's clips, as they arrive -----------------------------------------------------------------------
@dataclass
class InputClips:
    """One input's clips as they arrive, in any order: each clip's window info and feature, and the input's clip
    count once known (both executors collect inputs in these)."""
    infos: dict[int, dict[str, Any]] = field(default_factory=dict)
    features: dict[int, np.ndarray] = field(default_factory=dict)
    count: int | None = None

    @property
    def complete(self) -> bool:
        """Every clip's feature is in (the count known)."""
        return self.count is not None and len(self.features) >= self.count

    def ordered(self) -> tuple[list[dict[str, Any]], np.ndarray]:
        """(infos, features [count, D]) in clip order, for the writer."""
        order = range(self.count or 0)
        return [self.infos[i] for i in order], np.stack([self.features[i] for i in order])


# --- runner -------------------------------------------------------------------------------------------------
def batch_size_for(asked: int, max_batch: int | None) -> int:
    """The batch size a job runs: the one asked for, capped by the runner's maximum (its engine's or graph's)."""
    return max(1, min(asked, max_batch or asked))


def warm_up(runner, batch: int, frames: int, img_size: int, wait: bool = True) -> None:
    """Get the runner ready for full batches where it has that step (PyTorch on a GPU: compile, and with `wait`
    capture the CUDA graph now, so that partial batches replay it)."""
    step = getattr(runner, "warm_up", None)
    if step is not None:
        step(batch, frames, img_size, wait=wait)


def host_buffer(runner, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty host array to assemble a batch in: the runner's (page-locked memory for GPU runners), else
    plain memory."""
    alloc = getattr(runner, "new_host_buffer", None)
    return alloc(shape, dtype) if alloc is not None else np.empty(shape, dtype)


def start_inference(runner, frames) -> Callable[[], np.ndarray]:
    """Begin inference of a batch (a host array, or a CUDA tensor of GPU-decoded clips); returns a function that
    waits for its raw features. Runners with `submit_uint8` (uint8 frames) return at once, so the caller can
    prepare the next batch meanwhile."""
    submit = getattr(runner, "submit_uint8", None)
    if submit is not None and (is_cuda_tensor(frames) or frames.dtype == np.uint8):
        return submit(frames)
    result = infer_frames(runner, frames)
    return lambda: result


def encode(runner, frames: np.ndarray) -> np.ndarray:
    """L2-normalised float32 features [B, D] of one batch of clips."""
    return l2_normalize(start_inference(runner, frames)())


# --- writer: counts and summary -----------------------------------------------------------------------------
def summarize(stats: dict[str, Any], inputs: int, elapsed: float, backend: str, batch_size: int) -> dict[str, Any]:
    """summary.json's fields from a run's counts (`stats`: ok, failed, clips, batches, infer_s)."""
    s = stats
    return {"inputs": inputs, "ok": s["ok"], "failed": s["failed"], "clips": s["clips"], "batches": s["batches"],
            "seconds": round(elapsed, 3), "videos_per_s": round((s["ok"] + s["failed"]) / max(elapsed, 1e-9), 3),
            "clips_per_s": round(s["clips"] / max(elapsed, 1e-9), 3), "infer_seconds": round(s["infer_s"], 3),
            "backend": backend, "batch_size": batch_size}


class ResultClock:
    """When an executor's results came in: the first (the pipelines' start-up and first inputs behind it) and the
    latest; `steady()`: clips per second between them, the first result's clips left out."""

    def __init__(self):
        self.started = time.perf_counter()
        self.first_s: float | None = None
        self.last_s = 0.0
        self.clips = self.clips_in_first = 0

    def add(self, clips: int) -> None:
        self.last_s = time.perf_counter() - self.started
        if self.first_s is None:
            self.first_s, self.clips_in_first = self.last_s, clips
        self.clips += clips

    def steady(self) -> dict[str, float | None]:
        """{first_result_s, steady_clips_per_s} for summary.json (None where there is no span to measure)."""
        span, clips = self.last_s - (self.first_s or 0.0), self.clips - self.clips_in_first
        return {"first_result_s": None if self.first_s is None else round(self.first_s, 3),
                "steady_clips_per_s": round(clips / span, 3) if span > 0 and clips > 0 else None}


FAILURES_SAID = 50  # failed inputs the log names one by one; after these, a count by reason when the job ends


class FailureLines:
    """What the log says of failed inputs (failures.jsonl lists them all): each of the first FAILURES_SAID, then that
    the rest go unnamed, and at the end how many failed for each reason (its words before any detail)."""

    def __init__(self, logger: logging.Logger = log):
        self.log, self.count, self.by_reason = logger, 0, Counter()

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        self.by_reason[reason.split(" (")[0].split(":")[0]] += 1
        if self.count <= FAILURES_SAID:
            self.log.warning("failed %s: %s", path, reason)
        elif self.count == FAILURES_SAID + 1:
            self.log.warning("more than %d inputs failed: the others are only listed in failures.jsonl, and counted "
                             "by reason when the job ends", FAILURES_SAID)

    def close(self) -> None:
        if self.count > FAILURES_SAID:
            self.log.warning("%d inputs failed; by reason: %s", self.count,
                             "; ".join(f"{n} {reason}" for reason, n in self.by_reason.most_common(10)))


def whole_run(start_s: float, wall_s: float) -> dict[str, float]:
    """An executor's own start-up (from its call to its first input fed: runners built, pipelines or Ray actors'
    work begun) and its whole run, the same way for both executors: `seconds` is timed from the first input fed,
    so the local job's start-up is outside it and Ray's actors' start inside it."""
    return {"start_s": round(start_s, 3), "wall_s": round(wall_s, 3)}


def log_done(summary: dict[str, Any], failures_path) -> None:
    """The closing line of a job."""
    whole = (f"; {summary['wall_s']:.1f}s with the executor's start-up ({summary['start_s']:.1f}s)"
             if "wall_s" in summary else "")
    log.info("done: %d ok, %d failed, %d skipped (already done); %d clips in %.1fs (%.2f videos/s, %.1f clips/s)%s%s",
             summary["ok"], summary["failed"], summary.get("skipped_already_done", 0), summary["clips"],
             summary["seconds"], summary["videos_per_s"], summary["clips_per_s"], whole,
             f"; failures listed in {failures_path}" if summary["failed"] else "")
