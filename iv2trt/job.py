"""The extraction job: decode + resize in worker processes, infer in batches, write shards.

Each worker process (forkserver or spawn: never a fork of the main process) takes one input at a
time and sends its clips back through its own pipe as resized uint8 frames [T, S, S, 3] (4x fewer
bytes than float32; .npy inputs hold float32 frames already preprocessed and are sent as they are).
The main thread copies each clip into its slot of a preallocated batch buffer (pinned memory when
the runner offers it) and hands full batches to the inference thread through a bounded queue
(`QUEUE_DEPTH`), so receiving and assembling the next batches overlaps with the encoder. The
inference thread runs `runner.infer_uint8` (normalisation where the runner does it best) or, when the
runner has it, `runner.submit_uint8`, keeping two batches in flight so the next upload overlaps the
current compute; it sends raw features back and the main thread L2-normalises them and hands finished
inputs to the writer. A batch buffer is recycled only after its features came back (a runner may read
a caller's pinned buffer until then). Batch buffers are recycled and the main thread stops reading the pipes while a full batch waits for
the queue, so memory stays flat whatever the job size. An exception in the inference thread is
re-raised in the main thread. A worker silent for longer than `decode_timeout_s` while on one input
is killed and replaced; the input is recorded as failed.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Iterable, Iterator

import numpy as np

from .compare import l2_normalize
from .inputs import InputItem
from .video import DecodeError, Windowing, read_clips
from .writer import FailureLog, FeatureWriter, write_summary

log = logging.getLogger(__name__)

PARTIAL_BATCH_WAIT_S = 0.5  # how long clips wait for more to fill a batch while decoders are working
QUEUE_DEPTH = 2             # batches ready for the inference thread (besides the one it is running)


def default_workers() -> int:
    """Decoding processes when none are asked for: one per core but one (for the main process), at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass
class JobOptions:
    windowing: Windowing
    img_size: int = 224
    batch_size: int = 16
    workers: int = 2
    decode_timeout_s: float = 120.0
    progress: bool = True


def iter_clips(item: InputItem, w: Windowing, img_size: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(clip info, frames) for every clip of one input: uint8 [T, S, S, 3] resized frames for videos, images
    and frame folders (normalised later, by the runner); float32 [T, 3, S, S] as stored for .npy inputs.
    Raises DecodeError."""
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
    from .transforms import resize_frames

    for clip in read_clips(item.path, w):
        yield ({"start_s": clip.start_s, "end_s": clip.end_s, "indices": clip.indices},
               resize_frames(clip.frames, img_size))


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
            for info, array in iter_clips(item, w, img_size):
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


class _Batch:
    """Clips of one (dtype, shape) assembled in place: `frames[:len(self)]` are the rows, `rows` their owners."""

    def __init__(self, key: tuple, frames: np.ndarray):
        self.key, self.frames = key, frames
        self.rows: list[tuple[int, int]] = []  # (input number, clip index)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) == len(self.frames)

    def add(self, number: int, clip: int, array: np.ndarray) -> None:
        self.frames[len(self.rows)] = array
        self.rows.append((number, clip))

    def drop(self, number: int) -> None:
        """Remove the rows of a failed input (the others move up)."""
        keep = [i for i, (n, _) in enumerate(self.rows) if n != number]
        if len(keep) == len(self.rows):
            return
        for slot, i in enumerate(keep):
            if slot != i:
                self.frames[slot] = self.frames[i]
        self.rows = [self.rows[i] for i in keep]


class InferenceThread:
    """Runs batches through the runner (and the reference runner, if any) in a thread of its own.

    `submit` never blocks (False when QUEUE_DEPTH batches are already waiting); `results` returns the
    finished batches as (batch, raw features, reference features, runner seconds) and re-raises an
    exception of the thread (after which the thread has stopped). `fileno()` turns readable when a
    result is ready, so multiprocessing.connection.wait can wait for workers and results together.
    """

    def __init__(self, runner, reference=None, depth: int = QUEUE_DEPTH):
        from .runners import infer_frames

        self.runner, self.reference, self._infer = runner, reference, infer_frames
        self.inbox: queue.Queue = queue.Queue(maxsize=depth)
        self.outbox: queue.Queue = queue.Queue()
        self.in_flight = 0  # submitted and not yet returned by results() (main thread only)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="iv2trt-inference", daemon=True)
        self.thread.start()

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def submit(self, batch: _Batch) -> bool:
        if not self.thread.is_alive() and self.outbox.empty():
            raise RuntimeError("the inference thread has stopped")
        try:
            self.inbox.put_nowait(batch)
        except queue.Full:
            return False
        self.in_flight += 1
        return True

    def results(self, timeout: float = 0.0) -> list[tuple]:
        """Finished batches, in submission order; waits up to `timeout` s for the first when none is ready."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        done = []
        try:
            if timeout > 0 and self.in_flight:
                done.append(self.outbox.get(timeout=timeout))
            while True:
                done.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        self.in_flight -= len(done)
        for item in done:
            if isinstance(item, BaseException):
                raise item
        return done

    def _loop(self) -> None:
        """Runs batches in order. A runner with `submit_uint8` gets the next batch submitted before the
        previous one is waited for, so its upload overlaps the previous compute."""
        pending: deque = deque()  # (batch, started, wait-for-features) submitted, not yet finished
        while not self._stop.is_set() or pending:
            try:
                batch = None if self._stop.is_set() else self.inbox.get(timeout=0.0 if pending else 0.1)
            except queue.Empty:
                batch = None
            try:
                if batch is not None:
                    pending.append((batch, time.perf_counter(), self._start(batch.frames[:len(batch)])))
                if pending and (batch is None or len(pending) > 1):
                    done, started, wait = pending.popleft()
                    raw = wait()
                    seconds = time.perf_counter() - started
                    frames = done.frames[:len(done)]
                    ref = self._infer(self.reference, frames) if self.reference is not None else None
                    self.outbox.put((done, raw, ref, seconds))
                    self._notify()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self.outbox.put(exc)
                self._notify()
                return

    def _start(self, frames: np.ndarray):
        """Begin inference of `frames`; returns a function that waits for the raw features."""
        submit = getattr(self.runner, "submit_uint8", None)
        if submit is not None and frames.dtype == np.uint8:
            return submit(frames)
        result = self._infer(self.runner, frames)
        return lambda: result

    def _notify(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # full: the main thread has wake-ups pending anyway
            pass

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (after the batch it is running) and free its sockets."""
        self._stop.set()
        self.thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()


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
        self.open: dict[tuple, _Batch] = {}      # batches being filled, one per (dtype, clip shape)
        self.ready: deque[_Batch] = deque()      # full (or flushed) batches waiting for room in the queue
        self._free: dict[tuple, list[np.ndarray]] = {}  # batch buffers to reuse
        self.inference: InferenceThread | None = None
        self.stats = {"ok": 0, "failed": 0, "clips": 0, "batches": 0, "infer_s": 0.0}

    # --- results -------------------------------------------------------------------------------------------
    def _fail(self, number: int, reason: str) -> None:
        video = self.videos.pop(number)
        for batch in [*self.open.values(), *self.ready]:
            batch.drop(number)
        for key, batch in list(self.open.items()):
            if not len(batch):
                del self.open[key]
                self._recycle(batch)
        for batch in [b for b in self.ready if not len(b)]:
            self.ready.remove(batch)
            self._recycle(batch)
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
            self._add_clip(number, clip, array)
        elif kind == "done":
            self.videos[number].count = message[2]
            self._finish_ready(number)
        else:
            self._fail(number, message[2])
        return number if kind != "clip" else None

    # --- batching ------------------------------------------------------------------------------------------
    def _add_clip(self, number: int, clip: int, array: np.ndarray) -> None:
        """Copy a clip into its slot of the open batch of its kind; a full batch becomes ready."""
        key = (np.dtype(array.dtype).str, tuple(array.shape))
        batch = self.open.get(key)
        if batch is None:
            batch = self.open[key] = _Batch(key, self._buffer(key))
        batch.add(number, clip, array)
        if batch.full:
            self.ready.append(self.open.pop(key))

    def _buffer(self, key: tuple) -> np.ndarray:
        free = self._free.get(key)
        if free:
            return free.pop()
        shape, dtype = (self.batch_size, *key[1]), np.dtype(key[0])
        alloc = getattr(self.runner, "new_host_buffer", None)  # pinned memory for GPU runners
        return alloc(shape, dtype) if alloc is not None else np.empty(shape, dtype)

    def _recycle(self, batch: _Batch) -> None:
        free = self._free.setdefault(batch.key, [])
        if len(free) < QUEUE_DEPTH + 2:
            free.append(batch.frames)

    def _open_clips(self) -> int:
        return sum(len(b) for b in self.open.values())

    def _flush_partial(self) -> bool:
        """Make the fullest open batch ready although not full (decoders quiet, or too many open clips)."""
        if not self.open:
            return False
        key = max(self.open, key=lambda k: len(self.open[k]))
        self.ready.append(self.open.pop(key))
        return True

    # --- inference -----------------------------------------------------------------------------------------
    def _pump(self, wait_s: float = 0.0) -> None:
        """Hand ready batches to the inference thread; take in finished ones (waiting up to `wait_s` for one
        when some are in flight). Re-raises an exception of the inference thread."""
        while self.ready and self.inference.submit(self.ready[0]):
            self.ready.popleft()
        done = self.inference.results(wait_s)
        for result in done:
            self._complete(*result)
        while done and self.ready and self.inference.submit(self.ready[0]):
            self.ready.popleft()

    def _complete(self, batch: _Batch, raw: np.ndarray, ref: np.ndarray | None, seconds: float) -> None:
        self.stats["infer_s"] += seconds
        if self.comparison is not None:
            self.comparison.update(ref, raw)
        features = l2_normalize(raw)
        self.stats["batches"] += 1
        self.stats["clips"] += len(batch)
        rows = batch.rows
        self._recycle(batch)
        for (number, clip), feature in zip(rows, features):
            video = self.videos.get(number)
            if video is not None:  # else it failed while its clips were in flight
                video.features[clip] = feature
        for number in dict.fromkeys(n for n, _ in rows):
            self._finish_ready(number)

    def _drain(self) -> None:
        """Every clip received so far through the encoder and written (used when no more clips can come)."""
        while self.open or self.ready or self.inference.in_flight:
            if not self.ready:
                self._flush_partial()
            self._pump(wait_s=0.5)

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
        self.inference = InferenceThread(self.runner, self.reference)
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
                room = not self.ready and self._open_clips() < 2 * self.batch_size
                listen = [wk.conn for wk in busy] if room else []
                ready = wait(listen + [self.inference], timeout=0.05 if self.open else 0.2)
                received = False
                for wk in busy:
                    if wk.conn in ready:
                        self._receive(ctx, workers, wk)
                        received = True
                        last_received = time.monotonic()
                # a partial batch only once the decoders have gone quiet (or are all idle)
                quiet = not room or not received and (time.monotonic() - last_received > PARTIAL_BATCH_WAIT_S or
                                                      all(wk.task is None for wk in workers))
                if quiet and not self.ready:
                    self._flush_partial()
                self._pump()
                self._check_timeouts(ctx, workers)
                elapsed = time.perf_counter() - started
                self.bar.set_postfix_str(f"{self.stats['clips'] / max(elapsed, 1e-9):.1f} clips/s", refresh=False)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.inference.close(timeout=5 if interrupted else 60)
            self.bar.close()
            for wk in workers:
                wk.stop(kill=interrupted)
            self.writer.flush()  # finished videos are kept even when the job stops early
        return self._summary(time.perf_counter() - started)

    def run_preloaded(self, videos: Iterable[Iterable[np.ndarray]]) -> dict[str, Any]:
        """The job's inference stage alone, on clips already decoded: each element of `videos` is one input's
        clips as the workers send them (uint8 [T, S, S, 3] resized frames, or float32 [T, 3, S, S]). They go
        through the same message handling, batch assembly, inference thread, L2-normalisation and writer as
        in `run` (inputs named preloaded/<n>); returns the summary. For benchmarks and tests."""
        from tqdm import tqdm

        started = time.perf_counter()
        self.items = []
        self.bar = tqdm(disable=True)
        self.inference = InferenceThread(self.runner, self.reference)
        info = {"start_s": math.nan, "end_s": math.nan, "indices": []}
        try:
            for clips in videos:
                number = len(self.items)
                self.items.append(InputItem(f"preloaded/{number}", f"preloaded/{number}", "video"))
                self.videos[number] = _Video(self.items[-1])
                count = 0
                for array in clips:
                    while self.ready:  # the queue is full: wait for the encoder (memory stays bounded)
                        self._pump(wait_s=0.5)
                    self._handle(("clip", number, info, array))
                    self._pump()
                    count += 1
                self._handle(("done", number, count))
            self._drain()
        finally:
            self.inference.close()
            self.writer.flush()
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
