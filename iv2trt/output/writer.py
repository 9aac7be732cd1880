"""Output directory: sharded features + Parquet manifests, failures.jsonl, job.json, summary.json.

Layout of an output directory:
  job.json                     settings that decide the features (checked when resuming)
  shards/shard-00000-<digest>.npy      float16/float32 [N, D], L2-normalised (absent with per_video_npy)
  shards/shard-00000-<digest>.parquet  one row per feature row: row (global), video, id, kind, clip, num_clips,
                                       window, frame indices, file, file_row
  (<digest>: of the ids the shard holds; results.shard_name, the same scheme for both executors)
  videos/<id>.npy              with per_video_npy: [clips, D] per video
  failures.jsonl               inputs that could not be read in the last run: path, id, reason
  summary.json                 counts and speeds of the last run, and the directory's totals

A shard holds whole videos only and its manifest is written last (atomically), so a video is
finished exactly when a committed manifest names it: a run killed at any moment resumes cleanly.
Reading it back is results.py's job (`iv2trt.load_features`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..fileio import atomic_path, write_text_atomic
from .results import SHARD_DIR, finished_ids, load_features, manifest_paths, shard_index, shard_name  # noqa: F401

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
VIDEO_DIR = "videos"
FAILURES_FILE = "failures.jsonl"
SUMMARY_FILE = "summary.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def prepare_output(out_dir: str | Path, job: dict[str, Any], overwrite: bool) -> set[str]:
    """Create or reopen an output directory for `job`; return the ids already finished there.

    Refuses to mix runs: a job.json naming other settings is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    job_path = out_dir / JOB_FILE
    check_directory(out_dir)
    if overwrite and out_dir.exists():
        for name in (SHARD_DIR, VIDEO_DIR):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in (JOB_FILE, FAILURES_FILE, SUMMARY_FILE):
            (out_dir / name).unlink(missing_ok=True)
    if job_path.exists():
        previous = json.loads(job_path.read_text())
        diff = [f"{k}: {previous.get(k)!r} there, {job.get(k)!r} now" for k in sorted(set(previous) | set(job))
                if previous.get(k) != job.get(k)]
        if diff:
            backend_hint = (f", or --backend {previous['backend']} to go on with that job"
                            if previous.get("backend") not in (None, job.get("backend")) else "")
            raise PipelineError(f"output directory {out_dir} holds features of another job ({'; '.join(diff)}); "
                                f"pass a new --output, or --overwrite to delete them{backend_hint}")
    elif out_dir.exists() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
        raise PipelineError(f"output directory {out_dir} is not empty and has no {JOB_FILE}: "
                            "pass a new --output, or --overwrite to reuse it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.tmp"):  # temp files of a killed run
        stale.unlink(missing_ok=True)
    write_text_atomic(job_path, json.dumps(job, indent=2, sort_keys=True) + "\n")
    done = finished_ids(out_dir)
    if done:
        log.info("resuming in %s: %d inputs already done", out_dir, len(done))
    return done


def check_directory(out_dir: Path) -> None:
    """PipelineError when `out_dir`, or a folder above it, is a file: the output cannot be made there."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise PipelineError(f"--output {out_dir}: {path} is a file, not a directory: pass a directory (a new "
                                    "one, or this job's earlier output) as --output")
            return


class FeatureWriter:
    """Buffers finished videos and commits them shard by shard (features first, manifest last): once `shard_size`
    rows wait, or (with `commit_seconds`) once the oldest waiting video finished that many seconds ago, so a killed
    run loses about that much work at most. A shard holds whole videos only."""

    def __init__(self, out_dir: str | Path, dtype: str = "float16", shard_size: int = 4096,
                 per_video_npy: bool = False, commit_seconds: float | None = None):
        import pyarrow.parquet as pq

        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.shard_size = shard_size
        self.commit_seconds = commit_seconds
        self.per_video_npy = per_video_npy
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        manifests = manifest_paths(self.out_dir)
        self.next_shard = max(map(shard_index, manifests), default=-1) + 1
        self.next_row = sum(pq.read_metadata(p).num_rows for p in manifests)  # rows are numbered across shards
        for npy in (self.out_dir / SHARD_DIR).glob("shard-*.npy"):  # features whose manifest never landed
            if not npy.with_suffix(".parquet").exists():
                npy.unlink()
        self.pending: list[tuple[list[dict[str, Any]], np.ndarray]] = []  # (manifest rows, features) per video
        self.pending_rows = 0
        self.pending_since = 0.0  # when the oldest pending video finished (time.monotonic)

    def add_video(self, path: str, video_id: str, kind: str, clips: list[dict[str, Any]], features: np.ndarray):
        """Queue one video's clips (`clips[i]` has start_s, end_s, indices) and its features [clips, D]."""
        file = self._video_file(video_id) if self.per_video_npy else None
        if file is not None:
            _save_npy(self.out_dir / file, features.astype(self.dtype))
        rows = [{"video": path, "id": video_id, "kind": kind, "clip": i, "num_clips": len(clips),
                 "window_start_s": clip["start_s"], "window_end_s": clip["end_s"],
                 "frame_indices": clip["indices"], "file": file, "file_row": i if file else None}
                for i, clip in enumerate(clips)]
        if len(rows) != len(features):
            raise ValueError(f"{path}: {len(rows)} clips but {len(features)} feature rows")
        now = time.monotonic()
        if not self.pending:
            self.pending_since = now
        self.pending.append((rows, features))  # one append: an interrupt never splits rows from features
        self.pending_rows += len(rows)
        waited = self.commit_seconds is not None and now - self.pending_since >= self.commit_seconds
        if self.pending_rows >= self.shard_size or waited:
            self.flush()

    def _video_file(self, video_id: str) -> str:
        rel = Path(video_id)
        if rel.is_absolute() or ".." in rel.parts:
            raise PipelineError(f"id {video_id!r} cannot name a file under {VIDEO_DIR}/: use relative ids")
        return f"{VIDEO_DIR}/{rel.as_posix()}.npy"

    def flush(self, name: str | None = None) -> None:
        """Commit the buffered videos as one shard: the next numbered one, or `name` (results.shard_name's, relative
        to the output directory, no suffix; an existing shard of that name is replaced)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        numbered = name is None
        if numbered:
            name = shard_name(self.next_shard, [row["id"] for rows, _ in self.pending for row in rows[:1]])
        rows = [row for video_rows, _ in self.pending for row in video_rows]
        if not self.per_video_npy:
            _save_npy(self.out_dir / f"{name}.npy", np.concatenate([f for _, f in self.pending]).astype(self.dtype))
            for row_number, row in enumerate(rows):
                row["file"], row["file_row"] = f"{name}.npy", row_number
        schema = pa.schema([("row", pa.int64()), ("video", pa.string()), ("id", pa.string()), ("kind", pa.string()),
                            ("clip", pa.int32()), ("num_clips", pa.int32()), ("window_start_s", pa.float64()),
                            ("window_end_s", pa.float64()), ("frame_indices", pa.list_(pa.int32())),
                            ("file", pa.string()), ("file_row", pa.int64())])
        table = pa.Table.from_pylist([{"row": self.next_row + i, **r} for i, r in enumerate(rows)], schema)
        with atomic_path(self.out_dir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
        log.debug("committed %s (%d rows)", name, len(rows))
        self.next_shard += numbered
        self.next_row += len(rows)
        self.pending, self.pending_rows = [], 0


class FailureLog:
    """failures.jsonl of this run: one line per failed input, appended by a single write (a killed job leaves whole
    lines; rewriting the file per failure cost time quadratic in the failures: 406 s for 20,000)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / FAILURES_FILE
        self.count = 0
        self.path.unlink(missing_ok=True)

    def add(self, path: str, video_id: str, reason: str) -> None:
        line = (json.dumps({"path": path, "id": video_id, "reason": reason}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while line:
                line = line[os.write(fd, line):]
        finally:
            os.close(fd)
        self.count += 1


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> None:
    write_text_atomic(Path(out_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
