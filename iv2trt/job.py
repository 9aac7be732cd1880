"""The extraction job: decode + preprocess in worker processes, infer in batches, write shards.

Each worker process (forkserver or spawn: never a fork of the main process) takes one input at a time and sends its preprocessed clips back
through its own pipe; the main process batches clips across inputs up to the batch size, runs
the runner, L2-normalises and hands finished inputs to the writer. Pipes block when the main
process is behind, so memory stays flat whatever the job size. A worker silent for longer than
`decode_timeout_s` while on one input is killed and replaced; the input is recorded as failed.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Iterator

import numpy as np

from .compare import l2_normalize
from .inputs import InputItem
from .video import DecodeError, Windowing, read_clips
from .writer import FailureLog, FeatureWriter, write_summary

log = logging.getLogger(__name__)

PARTIAL_BATCH_WAIT_S = 0.5  # how long clips wait for more to fill a batch while decoders are working


@dataclass
class JobOptions:
    windowing: Windowing
    img_size: int = 224
    batch_size: int = 16
    workers: int = 2
    decode_timeout_s: float = 120.0
    progress: bool = True


def iter_preprocessed(item: InputItem, w: Windowing, img_size: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(clip info, float32 [T, 3, S, S]) for every clip of one input. Raises DecodeError."""
    if item.kind == "npy":
        try:
            array = np.load(item.path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DecodeError(f"not a readable .npy file ({exc})") from None
        if array.ndim == 4:
            array = array[None]
        if array.ndim != 5 or array.shape[2] != 3 or array.shape[3:] != (img_size, img_size) or not len(array):
            raise DecodeError(f".npy frames must be [B, T, 3, {img_size}, {img_size}] or [T, 3, ...], "
                              f"got {tuple(array.shape)}")
        for clip in array:
            yield {"start_s": math.nan, "end_s": math.nan, "indices": []}, np.asarray(clip, np.float32)
        return
    from .transforms import preprocess_frames

    for clip in read_clips(item.path, w):
        yield ({"start_s": clip.start_s, "end_s": clip.end_s, "indices": clip.indices},
               preprocess_frames(clip.frames, img_size).numpy())


def check_frame_count(runner, frames: int) -> None:
    """PipelineError unless the runner's model takes clips of `frames` frames."""
    from .errors import PipelineError

    lo, hi = runner.frame_range
    if frames < lo or hi is not None and frames > hi:
        raise PipelineError(f"frames={frames} is outside what the {runner.name} model takes ({lo}..{hi}); "
                            "pass --frames in that range, or export/build for more frames")


def worker_context():
    """forkserver (torch imported once, workers start fast) where the platform has it, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["iv2trt.job", "iv2trt.transforms"])
        return ctx
    return mp.get_context("spawn")


def _worker_main(conn, w: Windowing, img_size: int) -> None:
    """Worker process: receive (number, item), send ("clip", number, info, array)..., then ("done"|"failed")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    import torch

    torch.set_num_threads(1)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        number, item = task
        try:
            count = 0
            for info, array in iter_preprocessed(item, w, img_size):
                conn.send(("clip", number, info, array))
                count += 1
            conn.send(("done", number, count))
        except DecodeError as exc:
            conn.send(("failed", number, exc.reason))
        except (BrokenPipeError, EOFError):
            return
        except Exception as exc:  # a decoder bug must not stop the job: report it as this input's failure
            conn.send(("failed", number, f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, ctx, w: Windowing, img_size: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, w, img_size), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None
        self.last_heard = time.monotonic()

    def assign(self, number: int, item: InputItem) -> None:
        self.task, self.last_heard = number, time.monotonic()
        self.conn.send((number, item))

    def stop(self, kill: bool = False) -> None:
        if kill or self.task is not None:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


@dataclass
class _Video:
    item: InputItem
    infos: dict[int, dict] = field(default_factory=dict)
    features: dict[int, np.ndarray] = field(default_factory=dict)
    count: int | None = None  # known once the worker says done


@dataclass
class Comparison:
    """Running agreement of the job's runner with a reference runner (raw features)."""

    min_cosine: float = 1.0
    max_abs_error: float = 0.0
    max_ref: float = 0.0
    clips: int = 0

    def update(self, reference: np.ndarray, output: np.ndarray) -> None:
        from .compare import compare

        c = compare(reference, output)
        self.min_cosine = min(self.min_cosine, c.min_cosine)
        self.max_abs_error = max(self.max_abs_error, c.max_abs_error)
        self.max_ref = max(self.max_ref, float(np.abs(reference).max()))
        self.clips += len(reference)

    @property
    def max_rel_error(self) -> float:
        return self.max_abs_error / (self.max_ref or 1.0)


class Job:
    """One run over `items` with `runner`, writing through `writer`; `run()` returns the summary."""

    def __init__(self, items: list[InputItem], runner, writer: FeatureWriter, failures: FailureLog,
                 options: JobOptions, reference=None):
        self.items, self.runner, self.writer, self.failures, self.o = items, runner, writer, failures, options
        self.reference = reference
        self.comparison = Comparison() if reference is not None else None
        self.batch_size = max(1, min(options.batch_size, runner.max_batch or options.batch_size))
        check_frame_count(runner, options.windowing.frames)
        self.videos: dict[int, _Video] = {}
        self.pending: dict[tuple, list[tuple[int, int, np.ndarray]]] = {}
        self.stats = {"ok": 0, "failed": 0, "clips": 0, "batches": 0, "infer_s": 0.0}

    # --- results -------------------------------------------------------------------------------------------
    def _fail(self, number: int, reason: str) -> None:
        video = self.videos.pop(number)
        for key in list(self.pending):
            self.pending[key] = [p for p in self.pending[key] if p[0] != number]
        self.failures.add(video.item.path, video.item.id, reason)
        self.stats["failed"] += 1
        log.warning("failed %s: %s", video.item.path, reason)
        self.bar.update(1)

    def _finish_ready(self, number: int) -> None:
        video = self.videos.get(number)
        if video is None or video.count is None or len(video.features) < video.count:
            return
        if video.count == 0:
            self._fail(number, "no clips")
            return
        del self.videos[number]
        order = range(video.count)
        self.writer.add_video(video.item.path, video.item.id, video.item.kind, [video.infos[i] for i in order],
                              np.stack([video.features[i] for i in order]))
        self.stats["ok"] += 1
        self.bar.update(1)

    def _handle(self, message: tuple) -> int | None:
        kind, number = message[0], message[1]
        if number not in self.videos:
            return None
        if kind == "clip":
            _, _, info, array = message
            lo, hi = self.runner.frame_range
            if not lo <= array.shape[0] <= (hi or array.shape[0]):
                self._fail(number, f"clips of {array.shape[0]} frames; the {self.runner.name} model takes {lo}..{hi}")
                return number
            video = self.videos[number]
            clip = len(video.infos)
            video.infos[clip] = info
            self.pending.setdefault(array.shape, []).append((number, clip, array))
        elif kind == "done":
            self.videos[number].count = message[2]
            self._finish_ready(number)
        else:
            self._fail(number, message[2])
        return number if kind != "clip" else None

    # --- inference -----------------------------------------------------------------------------------------
    def _pending_clips(self) -> int:
        return sum(len(v) for v in self.pending.values())

    def _infer_one_batch(self, only_full: bool) -> bool:
        if not self.pending:
            return False
        key = max(self.pending, key=lambda k: len(self.pending[k]))
        if only_full and len(self.pending[key]) < self.batch_size:
            return False
        batch, self.pending[key] = self.pending[key][:self.batch_size], self.pending[key][self.batch_size:]
        if not self.pending[key]:
            del self.pending[key]
        if not batch:
            return False
        frames = np.stack([b[2] for b in batch])
        started = time.perf_counter()
        raw = self.runner.infer(frames)
        self.stats["infer_s"] += time.perf_counter() - started
        if self.comparison is not None:
            self.comparison.update(self.reference.infer(frames), raw)
        features = l2_normalize(raw)
        self.stats["batches"] += 1
        self.stats["clips"] += len(batch)
        for (number, clip, _), feature in zip(batch, features):
            self.videos[number].features[clip] = feature
        for number in {b[0] for b in batch}:
            self._finish_ready(number)
        return True

    # --- main loop -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        started = time.perf_counter()
        todo = deque(enumerate(self.items))
        ctx = worker_context()
        n_workers = max(1, min(self.o.workers, len(self.items)))
        workers = [_Worker(ctx, self.o.windowing, self.o.img_size) for _ in range(n_workers)] if self.items else []
        self.bar = tqdm(total=len(self.items), unit="video", disable=not self.o.progress, mininterval=1.0,
                        dynamic_ncols=True, file=sys.stderr)
        interrupted = False
        last_received = time.monotonic()
        try:
            while todo or self.videos:
                for wk in workers:
                    if wk.task is None and todo:
                        number, item = todo.popleft()
                        self.videos[number] = _Video(item)
                        wk.assign(number, item)
                busy = [wk for wk in workers if wk.task is not None]
                room = self._pending_clips() < 2 * self.batch_size
                ready = wait([wk.conn for wk in busy], timeout=0.05 if self.pending else 0.2) if busy and room else []
                for wk in busy:
                    if wk.conn in ready:
                        self._receive(ctx, workers, wk)
                        last_received = time.monotonic()
                # a partial batch only once the decoders have gone quiet (or are all idle)
                quiet = not room or not ready and (time.monotonic() - last_received > PARTIAL_BATCH_WAIT_S or
                                                   all(wk.task is None for wk in workers))
                if not self._infer_one_batch(only_full=True) and quiet:
                    self._infer_one_batch(only_full=False)
                self._check_timeouts(ctx, workers)
                elapsed = time.perf_counter() - started
                self.bar.set_postfix_str(f"{self.stats['clips'] / max(elapsed, 1e-9):.1f} clips/s", refresh=False)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.bar.close()
            for wk in workers:
                wk.stop(kill=interrupted)
            self.writer.flush()  # finished videos are kept even when the job stops early
        return self._summary(time.perf_counter() - started)

    def _receive(self, ctx, workers: list[_Worker], wk: _Worker) -> None:
        try:
            message = wk.conn.recv()
        except (EOFError, OSError):
            number = wk.task
            self._replace(ctx, workers, wk)
            self._fail(number, f"decoder process died (exit code {wk.process.exitcode})")
            return
        wk.last_heard = time.monotonic()
        if self._handle(message) is not None:
            wk.task = None

    def _check_timeouts(self, ctx, workers: list[_Worker]) -> None:
        now = time.monotonic()
        for wk in list(workers):
            if wk.task is not None and now - wk.last_heard > self.o.decode_timeout_s and not wk.conn.poll():
                number = wk.task
                self._replace(ctx, workers, wk)
                self._fail(number, f"decoding timed out (no progress for {self.o.decode_timeout_s:g}s)")

    def _replace(self, ctx, workers: list[_Worker], wk: _Worker) -> None:
        wk.stop(kill=True)
        workers[workers.index(wk)] = _Worker(ctx, self.o.windowing, self.o.img_size)

    def _summary(self, elapsed: float) -> dict[str, Any]:
        s = self.stats
        summary = {"inputs": len(self.items), "ok": s["ok"], "failed": s["failed"], "clips": s["clips"],
                   "batches": s["batches"], "seconds": round(elapsed, 3),
                   "videos_per_s": round((s["ok"] + s["failed"]) / max(elapsed, 1e-9), 3),
                   "clips_per_s": round(s["clips"] / max(elapsed, 1e-9), 3), "infer_seconds": round(s["infer_s"], 3),
                   "backend": self.runner.name, "batch_size": self.batch_size}
        if self.comparison is not None:
            c = self.comparison
            summary["compare_pytorch"] = {"clips": c.clips, "min_cosine": c.min_cosine,
                                          "max_abs_error": c.max_abs_error, "max_rel_error": c.max_rel_error}
        return summary


def run_job(items: list[InputItem], runner, out_dir, writer: FeatureWriter, options: JobOptions,
            reference=None, skipped: int = 0) -> dict[str, Any]:
    """Run a job and write summary.json (counts, speeds); returns the summary."""
    failures = FailureLog(out_dir)
    summary = Job(items, runner, writer, failures, options, reference).run()
    summary["skipped_already_done"] = skipped
    write_summary(out_dir, summary)
    log.info("done: %d ok, %d failed, %d skipped (already done); %d clips in %.1fs (%.2f videos/s, %.1f clips/s)%s",
             summary["ok"], summary["failed"], skipped, summary["clips"], summary["seconds"],
             summary["videos_per_s"], summary["clips_per_s"],
             f"; failures listed in {failures.path}" if summary["failed"] else "")
    return summary
