"""The batcher and the runner stage of a pipeline: clips assembled in place into fixed-shape batches, and the
inference thread that runs them through the runner (two in flight) beside the pipeline's thread.

`Batch` holds clips of one kind (device, dtype, clip shape) in a preallocated buffer (pinned host memory, or GPU
memory for GPU-decoded clips); `InferenceThread` takes full batches through a bounded queue and hands back raw
features.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque

import numpy as np

from ..doorbell import Doorbell
from .stages import start_inference

QUEUE_DEPTH = 2             # batches ready for the inference thread (besides the one it is running)


def on_stream(stream):
    """A context making `stream` the thread's current CUDA stream; no-op for None."""
    if stream is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.stream(stream)


class Batch:
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
    exception of the thread (after which the thread has stopped). The batches that finished before the
    exception come first: they are returned, and the exception raised by the next call (of `submit` too).
    `fileno()` turns readable when a result is ready, so multiprocessing.connection.wait can wait for workers
    and results together.
    `busy_s` is the time at least one batch was in the runner's hands (the encoder's busy time).
    """

    def __init__(self, runner, reference=None, depth: int = QUEUE_DEPTH, cuda_stream=None):
        from ..runners.base import infer_frames

        self.runner, self.reference, self._infer = runner, reference, infer_frames
        self.cuda_stream = cuda_stream  # the CUDA stream the runners compute on (the job's; None: the default)
        self.inbox: queue.Queue = queue.Queue(maxsize=depth)
        self.outbox: queue.Queue = queue.Queue()
        self.in_flight = 0  # submitted and not yet returned by results() (main thread only)
        self._doorbell = Doorbell()  # rung when a result is ready
        self._stop = threading.Event()
        self._error: BaseException | None = None  # the thread's exception, once results() has met it
        self.busy_s = 0.0
        self.cpu_s = 0.0  # this thread's CPU time so far (updated after each batch)
        self.thread = threading.Thread(target=self._loop, name="iv2trt-inference", daemon=True)
        self.thread.start()

    def fileno(self) -> int:
        return self._doorbell.fileno()

    def submit(self, batch: Batch) -> bool:
        if self._error is not None:
            raise self._error
        if not self.thread.is_alive() and self.outbox.empty():
            raise RuntimeError("the inference thread has stopped")
        try:
            self.inbox.put_nowait(batch)
        except queue.Full:
            return False
        self.in_flight += 1
        return True

    def results(self, timeout: float = 0.0) -> list[tuple]:
        """Finished batches, in submission order; waits up to `timeout` s for the first when none is ready.
        Raises the thread's exception once no finished batch precedes it."""
        if self._error is not None:
            raise self._error
        self._doorbell.clear()
        done = []
        try:
            if timeout > 0 and self.in_flight:
                done.append(self.outbox.get(timeout=timeout))
            while True:
                done.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        self.in_flight -= len(done)
        errors = [item for item in done if isinstance(item, BaseException)]
        if errors:  # the thread's last item: it has stopped
            self._error = errors[0]
            done = [item for item in done if not isinstance(item, BaseException)]
            if not done:
                raise self._error
        return done

    def _loop(self) -> None:
        with on_stream(self.cuda_stream):
            self._run_batches()

    def _run_batches(self) -> None:
        """Runs batches in order. A runner with `submit_uint8` gets the next batch submitted before the
        previous one is waited for, so its upload overlaps the previous compute."""
        pending: deque = deque()  # (batch, started, wait-for-features) submitted, not yet finished
        busy_since = 0.0
        while not self._stop.is_set() or pending:
            try:
                batch = None if self._stop.is_set() else self.inbox.get(timeout=0.0 if pending else 0.1)
            except queue.Empty:
                batch = None
            try:
                if batch is not None:
                    if not pending:
                        busy_since = time.perf_counter()
                    pending.append((batch, time.perf_counter(), self._start(batch.frames[:len(batch)])))
                if pending and (batch is None or len(pending) > 1):
                    done, started, wait = pending.popleft()
                    raw = wait()
                    seconds = time.perf_counter() - started
                    frames = done.frames[:len(done)]
                    ref = self._infer(self.reference, frames) if self.reference is not None else None
                    if not pending:
                        self.busy_s += time.perf_counter() - busy_since
                    self.cpu_s = time.thread_time()
                    self.outbox.put((done, raw, ref, seconds))
                    self._doorbell.ring()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._finish(pending)
                self.outbox.put(exc)
                self._doorbell.ring()
                return

    def _finish(self, pending: deque) -> None:
        """After an exception: the results of the batches started before it, where they still come (an error
        there stands for the rest)."""
        while pending:
            done, started, wait = pending.popleft()
            try:
                raw = wait()
                seconds = time.perf_counter() - started
                ref = self._infer(self.reference, done.frames[:len(done)]) if self.reference is not None else None
            except BaseException:  # noqa: BLE001 - the first exception is the one the main thread raises
                return
            self.outbox.put((done, raw, ref, seconds))

    def _start(self, frames):
        """Begin inference of `frames` (a host array, or a CUDA tensor of GPU-decoded clips); returns a function
        that waits for the raw features."""
        return start_inference(self.runner, frames)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (after the batch it is running) and free its sockets."""
        self._stop.set()
        self.thread.join(timeout)
        self._doorbell.close()
