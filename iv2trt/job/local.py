"""The extraction job (the local executor): decode workers -> batches -> inference thread -> writer.

Decoding happens in workers of two kinds (decoders.py): CPU processes (PyAV) that send each clip through a
pipe as resized uint8 frames [T, S, S, 3] (.npy inputs: float32 frames as stored), and GPU sessions (NVDEC
threads in this process) whose clips are uint8 CUDA tensors that never leave the GPU. One scheduler hands
inputs to whichever worker is idle (`--decoder auto`: both kinds pull from one queue; `nvdec`: the GPU takes
every input it can and CPU workers the rest; `cpu`). An input that fails on the GPU (or that NVDEC cannot
take) is decoded again on the CPU; one that fails on both is listed with both reasons.

The main thread copies each clip into its slot of a preallocated batch buffer of its kind (pinned host
memory, or GPU memory for GPU clips, after the clip's CUDA event) and hands full batches to the inference
thread through a bounded queue (`QUEUE_DEPTH`), so receiving and assembling the next batches overlaps with
the encoder. The inference thread runs `runner.submit_uint8` (two batches in flight, so the next upload
overlaps the current compute) or `runner.infer_uint8`; GPU batches reach runners that only take host arrays
through one device-to-host copy. It sends raw features back and the main thread L2-normalises them and hands
finished inputs to the writer. A batch buffer is recycled only after its features came back. The main thread
stops reading the workers while a full batch waits for the queue (pipes and the GPU outbox are bounded), so
host and GPU memory stay flat whatever the job size. An exception in the inference thread is re-raised in
the main thread. A worker silent for longer than `decode_timeout_s` on one input is replaced; the input is
recorded as failed (or, from a GPU worker, retried on the CPU).

The summary says where the time went: clips and busy time per decode path, the encoder's busy fraction, and
which stage bounded the run.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Iterable

import numpy as np

from ..compare import l2_normalize
from ..decode.clips import Windowing
from ..decode.inputs import InputItem
from ..decode.plan import DEFAULT_NVDEC_SESSIONS, DecoderPlan, default_workers
from ..decode.source import iter_clips
from ..decode.workers import CpuWorker, GpuWorker, GpuWorkerPool, worker_context
from ..output.writer import FailureLog, FeatureWriter, write_summary
from .batching import QUEUE_DEPTH, Batch, Comparison, InferenceThread, on_stream
from .stages import (
    InputClips,
    batch_size_for,
    check_frame_count,
    clip_frames_problem,
    host_buffer,
    is_cuda_tensor,
    log_done,
    summarize,
    timeout_reason,
    warm_up,
)

__all__ = ["Job", "JobOptions", "InferenceThread", "run_job", "check_frame_count", "iter_clips", "default_workers",
           "worker_context"]

log = logging.getLogger(__name__)

PARTIAL_BATCH_WAIT_S = 0.5  # how long clips wait for more to fill a batch while decoders are working


@dataclass
class JobOptions:
    windowing: Windowing
    img_size: int = 224
    batch_size: int = 16
    workers: int | None = 2         # CPU decode workers (None: decoders.default_workers)
    decode_timeout_s: float = 120.0
    progress: bool = True
    decoder: str = "cpu"            # auto | nvdec | cpu
    nvdec_sessions: int = DEFAULT_NVDEC_SESSIONS
    gpu: int = 0                    # the GPU whose decoders (and, for GPU runners, memory) the job uses


@dataclass(kw_only=True)
class _Video(InputClips):
    item: InputItem                 # (count is known once the worker says done)
    nvdec_failure: str | None = None  # why the GPU path could not decode it (then it is on the CPU path)


class _PathStats:
    """Work done by one decode path (cpu | nvdec) in a run."""

    def __init__(self, workers: int):
        self.workers = workers
        self.inputs = self.clips = self.fallbacks = 0
        self.busy_s = 0.0  # summed over workers: time spent on an input
        self.frames: dict[str, int] | None = None  # NVDEC: frames decoded, and dropped before decoding

    def as_dict(self, elapsed: float) -> dict[str, Any]:
        return {"workers": self.workers, "inputs": self.inputs, "clips": self.clips,
                "clips_per_s": round(self.clips / max(elapsed, 1e-9), 3),
                "busy_fraction": round(self.busy_s / max(elapsed * self.workers, 1e-9), 3) if self.workers else 0.0}


class Job:
    """One run over `items` with `runner`, writing through `writer`; `run()` returns the summary."""

    def __init__(self, items: list[InputItem], runner, writer: FeatureWriter, failures: FailureLog,
                 options: JobOptions, reference=None):
        self.items, self.runner, self.writer, self.failures, self.o = items, runner, writer, failures, options
        self.reference = reference
        self.comparison = Comparison() if reference is not None else None
        self.batch_size = batch_size_for(options.batch_size, runner.max_batch)
        check_frame_count(runner, options.windowing.frames)
        self.videos: dict[int, _Video] = {}
        self.open: dict[tuple, Batch] = {}      # batches being filled, one per (device, dtype, clip shape)
        self.ready: deque[Batch] = deque()      # full (or flushed) batches waiting for room in the queue
        self._free: dict[tuple, list[Any]] = {}  # batch buffers to reuse
        self.inference: InferenceThread | None = None
        self.stats = {"ok": 0, "failed": 0, "clips": 0, "batches": 0, "infer_s": 0.0}
        self.paths: dict[str, _PathStats] = {}
        self._next_number = 0
        # GPU batches are assembled and encoded on a stream of the job's own, not the legacy default stream,
        # which synchronises with every other blocking stream (and so with the GPU decoders' copies)
        self.cuda_stream = None

    # --- results -------------------------------------------------------------------------------------------
    def _discard(self, number: int) -> _Video:
        """Forget an input: its clips leave the open and ready batches (features in flight are ignored)."""
        video = self.videos.pop(number)
        with on_stream(self.cuda_stream):
            for batch in [*self.open.values(), *self.ready]:
                batch.drop(number)
        for key, batch in list(self.open.items()):
            if not len(batch):
                del self.open[key]
                self._recycle(batch)
        for batch in [b for b in self.ready if not len(b)]:
            self.ready.remove(batch)
            self._recycle(batch)
        return video

    def _fail(self, number: int, reason: str) -> None:
        video = self._discard(number)
        if video.nvdec_failure:
            reason = f"NVDEC: {video.nvdec_failure}; CPU: {reason}"
        self.failures.add(video.item.path, video.item.id, reason)
        self.stats["failed"] += 1
        log.warning("failed %s: %s", video.item.path, reason)
        self.bar.update(1)

    def _to_cpu_path(self, number: int, reason: str) -> None:
        """The GPU path could not decode an input: it starts again on the CPU path under a new number (so
        features of its clips still in flight cannot mix in)."""
        video = self._discard(number)
        self.paths["nvdec"].fallbacks += 1
        log.info("NVDEC could not decode %s (%s); decoding it on the CPU", video.item.path, reason)
        retry = self._new_video(video.item)
        self.videos[retry].nvdec_failure = reason
        self.cpu_queue.appendleft((retry, video.item))

    def _new_video(self, item: InputItem) -> int:
        number, self._next_number = self._next_number, self._next_number + 1
        self.videos[number] = _Video(item=item)
        return number

    def _finish_ready(self, number: int) -> None:
        video = self.videos.get(number)
        if video is None or not video.complete:
            return
        if video.count == 0:
            self._fail(number, "no clips")
            return
        del self.videos[number]
        self.writer.add_video(video.item.path, video.item.id, video.item.kind, *video.ordered())
        self.stats["ok"] += 1
        self.bar.update(1)

    def _handle(self, message: tuple, path: str = "cpu") -> int | None:
        """Take one worker message; returns the input's number when the worker is done with it."""
        kind, number = message[0], message[1]
        if number not in self.videos:
            return None
        if kind == "clip":
            _, _, info, array, ready = message
            problem = clip_frames_problem(array.shape[0], self.runner.frame_range, self.runner.name)
            if problem:
                self._fail(number, problem)
                return number
            video = self.videos[number]
            clip = len(video.infos)
            video.infos[clip] = info
            self._add_clip(number, clip, array, ready)
            self.paths[path].clips += 1
            return None
        if kind == "done":
            self.videos[number].count = message[2]
            self.paths[path].inputs += 1
            self._finish_ready(number)
        elif path == "nvdec":
            self._to_cpu_path(number, message[2])
        else:
            self._fail(number, message[2])
        return number

    # --- batching ------------------------------------------------------------------------------------------
    def _add_clip(self, number: int, clip: int, array, ready=None) -> None:
        """Copy a clip into its slot of the open batch of its kind; a full batch becomes ready. A GPU clip is
        copied on the stream the inference thread computes on (the job's, else the default stream) once the
        decoder's stream has written it (`ready`)."""
        if is_cuda_tensor(array):
            import torch

            stream = self.cuda_stream or torch.cuda.current_stream(array.device)
            if ready is not None:
                stream.wait_event(ready)
            array.record_stream(stream)  # its memory is not reused before the copy below has run
            key = (str(array.device), str(array.dtype), tuple(array.shape))
        else:
            key = ("cpu", np.dtype(array.dtype).str, tuple(array.shape))
        with on_stream(self.cuda_stream if key[0] != "cpu" else None):
            batch = self.open.get(key)
            if batch is None:
                batch = self.open[key] = Batch(key, self._buffer(key))
            batch.add(number, clip, array)
        if batch.full:
            self.ready.append(self.open.pop(key))

    def _buffer(self, key: tuple):
        free = self._free.get(key)
        if free:
            return free.pop()
        device, dtype, shape = key[0], key[1], (self.batch_size, *key[2])
        if device != "cpu":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
        return host_buffer(self.runner, shape, np.dtype(dtype))

    def _recycle(self, batch: Batch) -> None:
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

    def _complete(self, batch: Batch, raw: np.ndarray, ref: np.ndarray | None, seconds: float) -> None:
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

    # --- scheduling ----------------------------------------------------------------------------------------
    def _start_workers(self):
        """The decode workers of this run, and the GPU pool (None without GPU workers)."""
        o = self.o
        plan = DecoderPlan(o.decoder, o.workers, o.nvdec_sessions, o.gpu) if self.items else None
        n_gpu = min(plan.gpu_sessions, sum(map(plan.gpu_takes, self.items))) if plan else 0
        n_cpu = max(1, min(plan.cpu_workers, len(self.items))) if plan else 0  # nvdec: what the GPU cannot take
        self.plan = plan
        self.paths = {"cpu": _PathStats(n_cpu if self.items else 0), "nvdec": _PathStats(n_gpu)}
        if not self.items:
            return [], None
        self.ctx = worker_context()
        workers: list = [CpuWorker(self.ctx, o.windowing, o.img_size) for _ in range(n_cpu)]
        pool = None
        if n_gpu:
            pool = GpuWorkerPool(o.gpu, o.windowing, o.img_size)
            workers += [GpuWorker(pool, f"iv2trt-nvdec-{i}") for i in range(n_gpu)]
        return workers, pool

    def _assign(self, workers: list) -> None:
        """Idle workers take inputs: GPU workers from the shared queue; CPU workers from their own queue (inputs
        only the CPU can decode, and retries of what failed on the GPU) first, then from the shared queue
        unless the GPU takes it all (`--decoder nvdec`)."""
        for wk in workers:
            if wk.task is not None:
                continue
            if wk.path == "nvdec":
                source = self.gpu_queue
            else:
                source = self.cpu_queue if self.cpu_queue or self.plan.gpu_first else self.gpu_queue
            if source:
                number, item = source.popleft()
                wk.assign(number, item)
                wk.started = time.monotonic()

    def _release(self, wk) -> None:
        self.paths[wk.path].busy_s += time.monotonic() - wk.started
        wk.task = None

    # --- main loop -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        started = time.perf_counter()
        for runner in (self.runner, self.reference):  # CUDA graphs captured before GPU decoders share the GPU
            if runner is not None and self.items:
                warm_up(runner, self.batch_size, self.o.windowing.frames, self.o.img_size)
        workers, pool = self._start_workers()
        if pool is not None:
            import torch

            if torch.cuda.is_available():  # (the scheduler's tests run a fake GPU path on CPU-only machines)
                self.cuda_stream = torch.cuda.Stream(torch.device("cuda", self.o.gpu))
        self.gpu_queue: deque = deque()   # inputs any worker may take (all of them, when no GPU worker runs)
        self.cpu_queue: deque = deque()   # inputs for CPU workers only
        for item in self.items:
            on_gpu = pool is not None and self.plan.gpu_takes(item)
            (self.gpu_queue if on_gpu else self.cpu_queue).append((self._new_video(item), item))
        self.bar = tqdm(total=len(self.items), unit="video", disable=not self.o.progress, mininterval=1.0,
                        dynamic_ncols=True, file=sys.stderr)
        self.inference = InferenceThread(self.runner, self.reference, cuda_stream=self.cuda_stream)
        interrupted = False
        last_received = time.monotonic()
        try:
            while self.gpu_queue or self.cpu_queue or self.videos:
                self._assign(workers)
                busy = [wk for wk in workers if wk.task is not None]
                room = not self.ready and self._open_clips() < 2 * self.batch_size
                listen = [wk.conn for wk in busy if wk.path == "cpu"] if room else []
                if room and pool is not None:
                    listen.append(pool)
                ready = wait(listen + [self.inference], timeout=0.05 if self.open else 0.2)
                received = False
                for wk in busy:
                    if wk.path == "cpu" and wk.conn in ready:
                        self._receive(workers, wk)
                        received = True
                if pool is not None and pool in ready:
                    for wk, message in pool.messages():
                        received = True
                        if wk.abandoned:
                            continue
                        wk.last_heard = time.monotonic()
                        if self._handle(message, "nvdec") is not None:
                            self._release(wk)
                if received:
                    last_received = time.monotonic()
                # a partial batch only once the decoders have gone quiet (or are all idle)
                quiet = not room or not received and (time.monotonic() - last_received > PARTIAL_BATCH_WAIT_S or
                                                      all(wk.task is None for wk in workers))
                if quiet and not self.ready:
                    self._flush_partial()
                self._pump()
                self._check_timeouts(workers)
                elapsed = time.perf_counter() - started
                self.bar.set_postfix_str(f"{self.stats['clips'] / max(elapsed, 1e-9):.1f} clips/s", refresh=False)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.inference.close(timeout=5 if interrupted else 60)
            self.bar.close()
            if pool is not None:
                pool.close()
            for wk in workers:
                wk.stop(kill=interrupted)
            self.writer.flush()  # finished videos are kept even when the job stops early
        if pool is not None:
            self.paths["nvdec"].frames = {"decoded": sum(w.frames_decoded for w in workers if w.path == "nvdec"),
                                          "dropped_non_reference": sum(w.frames_dropped for w in workers
                                                                       if w.path == "nvdec")}
        return self._summary(time.perf_counter() - started)

    def run_preloaded(self, videos: Iterable[Iterable[np.ndarray]]) -> dict[str, Any]:
        """The job's inference stage alone, on clips already decoded: each element of `videos` is one input's
        clips as the workers send them (uint8 [T, S, S, 3] resized frames, host arrays or CUDA tensors, or
        float32 [T, 3, S, S]). They go through the same message handling, batch assembly, inference thread,
        L2-normalisation and writer as in `run` (inputs named preloaded/<n>); returns the summary. For
        benchmarks and tests."""
        from tqdm import tqdm

        started = time.perf_counter()
        self.items = []
        self.paths = {"cpu": _PathStats(0), "nvdec": _PathStats(0)}
        self.bar = tqdm(disable=True)
        self.inference = InferenceThread(self.runner, self.reference)
        info = {"start_s": math.nan, "end_s": math.nan, "indices": []}
        try:
            for clips in videos:
                name = f"preloaded/{len(self.items)}"
                self.items.append(InputItem(name, name, "video"))
                number = self._new_video(self.items[-1])
                count = 0
                for array in clips:
                    while self.ready:  # the queue is full: wait for the encoder (memory stays bounded)
                        self._pump(wait_s=0.5)
                    self._handle(("clip", number, info, array, None))
                    self._pump()
                    count += 1
                self._handle(("done", number, count))
            self._drain()
        finally:
            self.inference.close()
            self.writer.flush()
        return self._summary(time.perf_counter() - started)

    def _receive(self, workers: list, wk: CpuWorker) -> None:
        try:
            message = wk.conn.recv()
        except (EOFError, OSError):
            number = wk.task
            self._replace(workers, wk)
            self._fail(number, wk.why_gone())
            return
        wk.last_heard = time.monotonic()
        if self._handle(message, "cpu") is not None:
            self._release(wk)

    def _check_timeouts(self, workers: list) -> None:
        now = time.monotonic()
        for wk in list(workers):
            if wk.task is None or now - wk.last_heard <= self.o.decode_timeout_s:
                continue
            if wk.path == "cpu" and wk.conn.poll():
                continue
            number = wk.task
            self._replace(workers, wk)
            reason = timeout_reason(self.o.decode_timeout_s)
            if number in self.videos:
                if wk.path == "nvdec":
                    self._to_cpu_path(number, reason)
                else:
                    self._fail(number, reason)

    def _replace(self, workers: list, wk) -> None:
        self._release(wk)
        wk.stop(kill=True)
        fresh = (CpuWorker(self.ctx, self.o.windowing, self.o.img_size) if wk.path == "cpu"
                 else GpuWorker(wk.pool, wk.thread.name + "+"))
        workers[workers.index(wk)] = fresh

    def _summary(self, elapsed: float) -> dict[str, Any]:
        summary = summarize(self.stats, len(self.items), elapsed, self.runner.name, self.batch_size)
        decoders = {}
        for name, p in self.paths.items():
            if p.workers:
                decoders[name] = p.as_dict(elapsed)
                if name == "nvdec":
                    decoders[name].update(fallbacks_to_cpu=p.fallbacks, frames=p.frames)
        encoder_busy = self.inference.busy_s / max(elapsed, 1e-9) if self.inference is not None else 0.0
        summary["decoder"] = self.o.decoder
        summary["decoders"] = decoders
        summary["encoder_busy_fraction"] = round(encoder_busy, 3)
        summary["bound_by"] = bound_by(encoder_busy, decoders)
        if self.comparison is not None:
            c = self.comparison
            summary["compare_pytorch"] = {"clips": c.clips, "min_cosine": c.min_cosine,
                                          "max_abs_error": c.max_abs_error, "max_rel_error": c.max_rel_error}
        return summary


def bound_by(encoder_busy: float, decoders: dict[str, dict]) -> str:
    """Which stage limited a run: the encoder (busy most of the time), decoding (decoders busy most of the
    time while the encoder waited), or neither (too few inputs to keep either busy)."""
    if encoder_busy >= 0.85:
        return "encoder"
    if decoders and max(d["busy_fraction"] for d in decoders.values()) >= 0.6:
        return "decode"
    return "inputs (too few to keep decoders or encoder busy)"


def run_job(items: list[InputItem], runner, out_dir, writer: FeatureWriter, options: JobOptions,
            reference=None, skipped: int = 0) -> dict[str, Any]:
    """Run a job and write summary.json (counts, speeds, where the time went); returns the summary."""
    failures = FailureLog(out_dir)
    summary = Job(items, runner, writer, failures, options, reference).run()
    summary["skipped_already_done"] = skipped
    write_summary(out_dir, summary)
    log_done(summary, failures.path)
    for name, d in summary["decoders"].items():
        log.info("decode %s: %d worker(s), %d inputs, %.1f clips/s, busy %.0f%%%s", name, d["workers"], d["inputs"],
                 d["clips_per_s"], 100 * d["busy_fraction"],
                 f", {d['fallbacks_to_cpu']} sent to the CPU" if d.get("fallbacks_to_cpu") else "")
    if summary["inputs"]:
        log.info("encoder busy %.0f%% of the run; bound by %s", 100 * summary["encoder_busy_fraction"],
                 summary["bound_by"])
    return summary
