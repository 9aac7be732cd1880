"""One device's pipeline: decode workers -> batcher -> runner -> finished inputs, handed to a sink.

Both executors run exactly this: the local job `--pipelines-per-gpu` per GPU (each in its own process when there
are several), the Ray executor one inside each of as many actors. A pipeline never writes files; its sink gets
each input once, as `finished(number, item, infos, features)` (features L2-normalised, in clip order) or
`failed(number, item, reason)`. Lifecycle: `start()`, `feed(number, item)` any time (`fed_all(backlog)` when the
executor has fed what it will for now, holding `backlog` more for this pipeline), `step()` until `busy` is false
(or `drain()`), `summary()`, `close()`.

Decoding happens in workers of two kinds (decode/workers.py): CPU processes (PyAV) that send each clip through
a pipe as resized uint8 frames [T, S, S, 3] (.npy inputs: float32 frames as stored; beside a GPU, 4:2:0
videos as their decoded planes, through shared memory, which this GPU converts and resizes: `planes_to_gpu`), and
GPU sessions (NVDEC threads in this process) whose clips are uint8 CUDA tensors that never leave the GPU. Idle
workers take the next input (`auto`: both kinds pull from one queue, CPU workers leaving the job's tail to the GPU;
`nvdec`: the GPU takes every input it can and CPU workers the rest; `cpu`). An input that fails on the GPU (or
that NVDEC cannot take) is decoded again on the CPU; one that fails on both is reported with both reasons.

`step` copies each clip into its slot of a preallocated batch buffer of its kind (pinned host memory, or GPU
memory for GPU clips, after the clip's CUDA event) and hands full batches to the inference thread through a
bounded queue (`QUEUE_DEPTH`), so receiving and assembling the next batches overlaps with the encoder. The
inference thread runs `runner.submit_uint8` (two batches in flight, so the next upload overlaps the current
compute) or `runner.infer_uint8`; GPU batches reach runners that only take host arrays through one
device-to-host copy. Features come back, are L2-normalised, and finished inputs go to the sink. A batch buffer
is recycled only after its features came back. While a full batch waits for the queue, `step` stops reading
the workers (pipes and the GPU outbox are bounded), so host and GPU memory stay flat whatever the job size. An
exception of the inference thread is raised by `step`. A worker silent for longer than `decode_timeout_s` on
one input is replaced; the input fails (or, from a GPU worker, is retried on the CPU).

`summary()` says where the time went: clips and busy time per decode path, the encoder's busy fraction, and
which stage bounded the run.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from ..compare import RunningComparison, l2_normalize
from ..decode.clips import Windowing
from ..decode.gpu_frames import YuvClip
from ..decode.inputs import InputItem
from ..decode.plan import DEFAULT_NVDEC_SESSIONS, DecoderPlan, default_decode_threads, default_probe_processes
from ..decode.source import iter_clips
from ..decode.workers import CpuWorker, GpuWorker, GpuWorkerPool, worker_context
from .batching import QUEUE_DEPTH, Batch, InferenceThread, on_stream
from .host import cpu_shares, cpu_times
from .stages import (
    InputClips,
    batch_size_for,
    check_frame_count,
    clip_frames_problem,
    host_buffer,
    is_cuda_tensor,
    timeout_reason,
    warm_up,
)

log = logging.getLogger(__name__)

PARTIAL_BATCH_WAIT_S = 0.5  # how long clips wait for more to fill a batch while decoders are working
CPU_SLOWER_THAN_NVDEC = 2.0  # a CPU worker's seconds per video over an NVDEC session's, until the job has measured
                             # both (720p H.264, H200, 16 cores, 9ff2adf: 16 workers 111.6 clips/s, 8 sessions 109.0)


@dataclass
class JobOptions:
    """How a pipeline decodes and batches (the executor's `progress` rides along)."""

    windowing: Windowing
    img_size: int = 224
    batch_size: int = 16
    workers: int | None = 2         # CPU decode workers (None: decode.plan.default_workers)
    decode_timeout_s: float = 120.0
    progress: bool = True
    decoder: str = "cpu"            # auto | nvdec | cpu
    nvdec_sessions: int = DEFAULT_NVDEC_SESSIONS
    gpu: int = 0                    # the GPU whose decoders (and, for GPU runners, memory) the pipeline uses
    cpu_share: float = 1.0          # the fraction of the machine's cores this pipeline's default workers take
    source: Callable = iter_clips   # what CPU workers run per input (benchmarks pass a synthetic one)
    gpu_convert: bool = True        # on a GPU, CPU workers hand decoded planes over; the GPU converts and resizes
    shared_memory: bool = True      # ... through shared memory (decode/plane_ring.py), else through their pipes
    decode_threads: int = 0         # FFmpeg threads per CPU worker's video (0: decode.plan.default_decode_threads)
    encoder_graphs: bool = True     # beside GPU decoding, the eager encoder replays a graph captured at the start
    probe_processes: int | None = None  # helper processes for NVDEC's demux passes (None: plan.default_probe_processes;
                                        # 0: in the NVDEC sessions' threads)


class Sink(Protocol):
    """Where a pipeline's finished inputs go (each input exactly once); `close()`, where a sink has it, is called
    when the pipeline closes."""

    def finished(self, number: int, item: InputItem, infos: list[dict[str, Any]], features: np.ndarray) -> None: ...

    def failed(self, number: int, item: InputItem, reason: str) -> None: ...


class WriterSink:
    """A sink that writes straight through: finished inputs to a FeatureWriter (committed when the pipeline
    closes), failures to a FailureLog. For one pipeline on its own (benchmarks, tests); the executors write
    through their own loop."""

    def __init__(self, writer, failures):
        self.writer, self.failures = writer, failures

    def finished(self, number: int, item: InputItem, infos: list[dict[str, Any]], features: np.ndarray) -> None:
        self.writer.add_video(item.path, item.id, item.kind, infos, features)

    def failed(self, number: int, item: InputItem, reason: str) -> None:
        self.failures.add(item.path, item.id, reason)

    def close(self) -> None:
        self.writer.flush()


@dataclass(kw_only=True)
class _Video(InputClips):
    item: InputItem
    number: int                       # the executor's number for the input
    nvdec_failure: str | None = None  # why the GPU path could not decode it (then it is on the CPU path)


class _PathStats:
    """Work done by one decode path (cpu | nvdec) in a run."""

    def __init__(self, workers: int):
        self.workers = workers
        self.inputs = self.clips = self.fallbacks = 0
        self.fallback_categories: dict[str, int] = {}  # NVDEC: fallbacks to the CPU by decode.nvdec category
        self.busy_s = 0.0  # summed over workers: time spent on an input
        self.frames: dict[str, int] | None = None  # NVDEC: frames decoded, and dropped before decoding

    def as_dict(self, elapsed: float) -> dict[str, Any]:
        return {"workers": self.workers, "inputs": self.inputs, "clips": self.clips,
                "clips_per_s": round(self.clips / max(elapsed, 1e-9), 3),
                "busy_fraction": round(self.busy_s / max(elapsed * self.workers, 1e-9), 3) if self.workers else 0.0}


class Pipeline:
    """Decode workers, batcher and runner of one device, feeding `sink`."""

    def __init__(self, runner, options: JobOptions, sink: Sink, reference=None, name: str = "local"):
        self.runner, self.o, self.sink, self.reference, self.name = runner, options, sink, reference, name
        self.comparison = RunningComparison() if reference is not None else None
        self.batch_size = batch_size_for(options.batch_size, runner.max_batch)
        check_frame_count(runner, options.windowing.frames)
        self.videos: dict[int, _Video] = {}      # inputs in hand, by the pipeline's own number
        self.open: dict[tuple, Batch] = {}      # batches being filled, one per (device, dtype, clip shape)
        self.ready: deque[Batch] = deque()      # full (or flushed) batches waiting for room in the queue
        self._free: dict[tuple, list[Any]] = {}  # batch buffers to reuse
        self.gpu_queue: deque = deque()         # inputs any worker may take (all of them without GPU workers)
        self.cpu_queue: deque = deque()         # inputs for CPU workers only
        self.workers: list = []
        self.pool: GpuWorkerPool | None = None
        self.loop_cpu_s = 0.0                   # CPU time of the thread running `step`
        self._process_cpu0 = time.process_time()
        self._host_cpu: dict[str, float] | None = None  # host_cpu_s as the pipeline closed
        self._machine_cpu0 = cpu_times()                 # the machine's CPU time when the run began
        self._machine_cpu: dict[str, float] | None = None  # its shares over the run, as the pipeline closed
        self.planes_to_gpu = False  # CPU workers hand planes over, this GPU converts them (gpu_convert)
        self.plan: DecoderPlan | None = None
        self.inference: InferenceThread | None = None
        self.stats = {"inputs": 0, "ok": 0, "failed": 0, "clips": 0, "batches": 0, "infer_s": 0.0}
        self.paths: dict[str, _PathStats] = {"cpu": _PathStats(0), "nvdec": _PathStats(0)}
        self._next_number = 0
        self.backlog: int | None = None         # inputs the executor still holds for this pipeline (fed_all; None:
                                                # not said since the last feed)
        self.started = time.perf_counter()
        self._last_received = time.monotonic()
        # GPU batches are assembled and encoded on a stream of the pipeline's own, not the legacy default stream,
        # which synchronises with every other blocking stream (and so with the GPU decoders' copies)
        self.cuda_stream = None
        self._closed = False
        self._convert_stream = None

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self, expected: Sequence[InputItem] | None = None) -> "Pipeline":
        """Start the runner's compile in the background (the decoders do not wait for it: until it is ready the
        eager model serves), the decode workers and the inference thread. `expected`: the inputs this pipeline
        will get, when known, so it starts no more workers than they need (an empty list: none at all)."""
        if expected is None or expected:
            self._start_workers(expected)
            predecoded = expected is not None and all(item.kind == "npy" for item in expected)
            decodes_on_gpu = self.pool is not None or self.planes_to_gpu
            if decodes_on_gpu and not predecoded and hasattr(self.runner, "serve_eager") and \
                    self.runner.serve_eager((self.batch_size, self.o.windowing.frames) if self.o.encoder_graphs
                                            else None):
                # measured on an H200: beside NVDEC threads a background compile cut them to a third (its Python
                # work holds their GIL) and graph captures during the job were spoilt (the job died); so the eager
                # model serves, its graph captured here, before anything is decoded, and only replayed after
                graphs = getattr(self.runner, "cuda_graphs", False)
                log.info("the encoder runs eager (no torch.compile%s): the GPU decodes in this process, and decoding, "
                         "not the encoder, bounds the job", ", one CUDA graph captured before decoding starts" if
                         graphs else ", no CUDA graphs")
            warm_up(self.runner, self.batch_size, self.o.windowing.frames, self.o.img_size, wait=False)
            if self.reference is not None:
                warm_up(self.reference, self.batch_size, self.o.windowing.frames, self.o.img_size)
        if self.pool is not None:
            import torch

            if torch.cuda.is_available():  # (the scheduler's tests run a fake GPU path on CPU-only machines)
                self.cuda_stream = torch.cuda.Stream(torch.device("cuda", self.o.gpu))
        self.inference = InferenceThread(self.runner, self.reference, cuda_stream=self.cuda_stream)
        self.started = time.perf_counter()
        self._machine_cpu0 = cpu_times()
        return self

    def feed(self, number: int, item: InputItem) -> None:
        """Take an input (the executor's `number` comes back with it in the sink)."""
        self.backlog = None
        self.stats["inputs"] += 1
        # (a file that is not there goes to the CPU path, which reports it, rather than counting as NVDEC's fallback)
        on_gpu = self.pool is not None and self.plan.gpu_takes(item) and os.path.exists(item.path)
        (self.gpu_queue if on_gpu else self.cpu_queue).append((self._new_video(item, number), item))

    def fed_all(self, backlog: int = 0) -> None:
        """The executor has fed what it will for now, and holds `backlog` more inputs for this pipeline (its share;
        0: what is in hand is the job's tail). CPU workers then take an input the GPU could decode only if they
        finish it before the GPU would have (`_cpu_may_share`). A later `feed` undoes it until told again."""
        self.backlog = backlog

    @property
    def queued(self) -> int:
        """Inputs in hand that no worker has started."""
        return len(self.gpu_queue) + len(self.cpu_queue)

    @property
    def busy(self) -> bool:
        """Inputs fed and not yet handed to the sink."""
        return bool(self.videos)

    def drain(self) -> None:
        while self.busy:
            self.step()

    def close(self, interrupted: bool = False) -> None:
        """Stop the inference thread and the workers (killed when `interrupted`), then close the sink; again:
        nothing."""
        if self._closed:
            return
        self._closed = True
        started = time.perf_counter()
        if self.inference is not None:
            self.inference.close(timeout=5 if interrupted else 60)
        if self.pool is not None:
            self.pool.close()
        for wk in self.workers:  # all told, then all waited for: their exits overlap
            wk.stop(kill=interrupted, wait=False)
        for wk in self.workers:
            wk.join()
        gpu = self._gpu_workers()
        if gpu:
            self.paths["nvdec"].frames = {"decoded": sum(w.frames_decoded for w in gpu),
                                          "dropped_non_reference": sum(w.frames_dropped for w in gpu)}
        self._host_cpu = self._host_cpu_s()
        self._machine_cpu = cpu_shares(self._machine_cpu0, cpu_times())
        log.debug("pipeline %s: inference thread and %d decoder(s) stopped in %.2f s", self.name, len(self.workers),
                  time.perf_counter() - started)
        self.workers = []
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()

    # --- one round -----------------------------------------------------------------------------------------
    def step(self, also_wait: Iterable = ()) -> list:
        """One round: idle workers take inputs, clips arriving within a short wait go into batches, full batches
        to the encoder, finished inputs to the sink, stalled workers are replaced. Returns which of `also_wait`
        (other waitables, e.g. an executor's pipe) turned ready meanwhile."""
        started = time.thread_time()
        try:
            return self._step(also_wait)
        finally:
            self.loop_cpu_s += time.thread_time() - started

    def _step(self, also_wait: Iterable) -> list:
        self._assign()
        busy = [wk for wk in self.workers if wk.task is not None]
        room = not self.ready and self._open_clips() < 2 * self.batch_size
        listen = [wk.conn for wk in busy if wk.path == "cpu"] if room else []
        if room and self.pool is not None:
            listen.append(self.pool)
        also_wait = list(also_wait)
        ready = wait(listen + [self.inference] + also_wait, timeout=0.05 if self.open else 0.2)
        received = False
        for wk in busy:
            if wk.path == "cpu" and wk.conn in ready:
                self._receive(wk)
                received = True
        if self.pool is not None and self.pool in ready:
            for wk, message in self.pool.messages():
                received = True
                if wk.abandoned:
                    continue
                wk.last_heard = time.monotonic()
                if self._handle(message, "nvdec") is not None:
                    self._release(wk)
        if received:
            self._last_received = time.monotonic()
        # a partial batch only once the decoders have gone quiet (or are all idle)
        quiet = not room or not received and (time.monotonic() - self._last_received > PARTIAL_BATCH_WAIT_S or
                                              all(wk.task is None for wk in self.workers))
        if quiet and not self.ready:
            self._flush_partial()
        self._pump()
        self._check_timeouts()
        return [w for w in also_wait if w in ready]

    def run_preloaded(self, videos: Iterable[Iterable[np.ndarray]]) -> dict[str, Any]:
        """The inference stage alone, on clips already decoded: each element of `videos` is one input's clips as
        the workers send them (uint8 [T, S, S, 3] resized frames, host arrays or CUDA tensors, or float32 [T, 3,
        S, S]). They go through the same message handling, batch assembly, inference thread, L2-normalisation
        and sink as in `step` (inputs named preloaded/<n>); returns the summary. For benchmarks and tests."""
        self.start(expected=[])
        info = {"start_s": math.nan, "end_s": math.nan, "indices": []}
        try:
            for n, clips in enumerate(videos):
                name = f"preloaded/{n}"
                number = self._new_video(InputItem(name, name, "video"), n)
                self.stats["inputs"] += 1
                count = 0
                for array in clips:
                    while self.ready:  # the queue is full: wait for the encoder (memory stays bounded)
                        self._pump(wait_s=0.5)
                    self._handle(("clip", number, info, array, None))
                    self._pump()
                    count += 1
                self._handle(("done", number, count))
            self._drain_batches()
        finally:
            self.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """This pipeline's counts and where its time went."""
        elapsed = time.perf_counter() - self.started
        s = self.stats
        decoders = {}
        for name, p in self.paths.items():
            if p.workers:
                decoders[name] = p.as_dict(elapsed)
                if name == "nvdec":
                    decoders[name].update(fallbacks_to_cpu=p.fallbacks, fallbacks_by_category=p.fallback_categories,
                                          frames=p.frames)
        encoder_busy = self.inference.busy_s / max(elapsed, 1e-9) if self.inference is not None else 0.0
        out = {"name": self.name, "device": getattr(self.runner, "device_name", None) or _device_name(self.runner),
               "inputs": s["inputs"], "ok": s["ok"], "failed": s["failed"], "clips": s["clips"],
               "batches": s["batches"], "seconds": round(elapsed, 3),
               "clips_per_s": round(s["clips"] / max(elapsed, 1e-9), 3), "infer_seconds": round(s["infer_s"], 3),
               "batch_size": self.batch_size, "decoder": self.o.decoder, "decoders": decoders,
               "encoder_busy_fraction": round(encoder_busy, 3), "bound_by": bound_by(encoder_busy, decoders)}
        out["host_cpu_s"] = self._host_cpu or self._host_cpu_s()
        machine = self._machine_cpu or cpu_shares(self._machine_cpu0, cpu_times())
        if machine is not None:  # (Linux) the whole machine's CPUs over the run: busy, idle, stolen by a hypervisor
            out["machine_cpu"] = machine
        if self.comparison is not None:
            out["compare_pytorch"] = self.comparison.as_dict()
        return out

    def _host_cpu_s(self) -> dict[str, float]:
        """CPU seconds of this pipeline's threads: its NVDEC sessions', the loop that batches (`step`), the
        inference thread's, and this whole process's (those and the rest: compile, allocator, Python). Against
        the run's seconds they say where the host time went; a thread busy for longer than its CPU time waited
        (for the GIL, the GPU, a pipe)."""
        return {"nvdec_threads": round(sum(w.cpu_s for w in self._gpu_workers()), 3),
                "pipeline_loop": round(self.loop_cpu_s, 3),
                "inference_thread": round(self.inference.cpu_s, 3) if self.inference is not None else 0.0,
                "process": round(time.process_time() - self._process_cpu0, 3)}

    def _gpu_workers(self) -> list:
        return [w for w in self.workers if w.path == "nvdec"]

    # --- results -------------------------------------------------------------------------------------------
    def _new_video(self, item: InputItem, number: int) -> int:
        key, self._next_number = self._next_number, self._next_number + 1
        self.videos[key] = _Video(item=item, number=number)
        return key

    def _discard(self, key: int) -> _Video:
        """Forget an input: its clips leave the open and ready batches (features in flight are ignored)."""
        video = self.videos.pop(key)
        with on_stream(self.cuda_stream):
            for batch in [*self.open.values(), *self.ready]:
                batch.drop(key)
        for batch_key, batch in list(self.open.items()):
            if not len(batch):
                del self.open[batch_key]
                self._recycle(batch)
        for batch in [b for b in self.ready if not len(b)]:
            self.ready.remove(batch)
            self._recycle(batch)
        return video

    def _fail(self, key: int, reason: str) -> None:
        video = self._discard(key)
        if video.nvdec_failure:
            reason = f"NVDEC: {video.nvdec_failure}; CPU: {reason}"
        self.stats["failed"] += 1
        self.sink.failed(video.number, video.item, reason)

    def _to_cpu_path(self, key: int, reason: str, category: str) -> None:
        """The GPU path could not decode an input: it starts again on the CPU path under a new key (so features
        of its clips still in flight cannot mix in). The log says so once per fallback category (the summary
        counts them all), every file with -v."""
        video = self._discard(key)
        stats = self.paths["nvdec"]
        stats.fallbacks += 1
        stats.fallback_categories[category] = stats.fallback_categories.get(category, 0) + 1
        first = stats.fallback_categories[category] == 1
        log.log(logging.INFO if first else logging.DEBUG, "NVDEC could not decode %s (%s: %s); decoding it on the "
                "CPU%s", video.item.path, category, reason, " (further files of this kind: in the summary)" if first
                else "")
        retry = self._new_video(video.item, video.number)
        self.videos[retry].nvdec_failure = reason
        self.cpu_queue.appendleft((retry, video.item))

    def _finish_ready(self, key: int) -> None:
        video = self.videos.get(key)
        if video is None or not video.complete:
            return
        if video.count == 0:
            self._fail(key, "no clips")
            return
        del self.videos[key]
        self.stats["ok"] += 1
        self.sink.finished(video.number, video.item, *video.ordered())

    def _handle(self, message: tuple, path: str = "cpu") -> int | None:
        """Take one worker message; returns the input's key when the worker is done with it."""
        kind, key = message[0], message[1]
        if key not in self.videos:
            return None
        if kind == "clip":
            _, _, info, array, ready = message
            if isinstance(array, YuvClip):  # a CPU worker's planes: converted and resized here, on the GPU
                array, ready = self._convert(array)
            problem = clip_frames_problem(array.shape[0], self.runner.frame_range, self.runner.name)
            if problem:
                self._fail(key, problem)
                return key
            video = self.videos[key]
            clip = len(video.infos)
            video.infos[clip] = info
            self._add_clip(key, clip, array, ready)
            self.paths[path].clips += 1
            return None
        if kind == "done":
            self.videos[key].count = message[2]
            self.paths[path].inputs += 1
            self._finish_ready(key)
        elif path == "nvdec":
            self._to_cpu_path(key, message[2], message[3] if len(message) > 3 else "stream_error")
        else:
            self._fail(key, message[2])
        return key

    def _convert(self, clip: YuvClip):
        """A CPU worker's clip as the model's uint8 frames on this pipeline's GPU, with the event after which
        they may be read (the same conversion and resize as the NVDEC path's, on a stream of their own)."""
        import torch

        device = torch.device("cuda", self.o.gpu)
        if self._convert_stream is None:
            self._convert_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._convert_stream):
            frames = clip.to_model_frames(device, self.o.img_size)
            ready = torch.cuda.Event()
            ready.record(self._convert_stream)
        return frames, ready

    def _gpu_converts(self) -> bool:
        """Whether CPU workers hand planes over: the runner takes frames on this GPU, and the option is on."""
        if not (self.o.gpu_convert and getattr(self.runner, "takes_cuda_frames", False)):
            return False
        import torch

        return torch.cuda.is_available()

    # --- batching ------------------------------------------------------------------------------------------
    def _add_clip(self, key: int, clip: int, array, ready=None) -> None:
        """Copy a clip into its slot of the open batch of its kind; a full batch becomes ready. A GPU clip is
        copied on the stream the inference thread computes on (the pipeline's, else the default stream) once the
        decoder's stream has written it (`ready`)."""
        if is_cuda_tensor(array):
            import torch

            stream = self.cuda_stream or torch.cuda.current_stream(array.device)
            if ready is not None:
                stream.wait_event(ready)
            array.record_stream(stream)  # its memory is not reused before the copy below has run
            batch_key = (str(array.device), str(array.dtype), tuple(array.shape))
        else:
            batch_key = ("cpu", np.dtype(array.dtype).str, tuple(array.shape))
        with on_stream(self.cuda_stream if batch_key[0] != "cpu" else None):
            batch = self.open.get(batch_key)
            if batch is None:
                batch = self.open[batch_key] = Batch(batch_key, self._buffer(batch_key))
            batch.add(key, clip, array)
        if batch.full:
            self.ready.append(self.open.pop(batch_key))

    def _buffer(self, batch_key: tuple):
        free = self._free.get(batch_key)
        if free:
            return free.pop()
        device, dtype, shape = batch_key[0], batch_key[1], (self.batch_size, *batch_key[2])
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
        batch_key = max(self.open, key=lambda k: len(self.open[k]))
        self.ready.append(self.open.pop(batch_key))
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
        for (key, clip), feature in zip(rows, features):
            video = self.videos.get(key)
            if video is not None:  # else it failed while its clips were in flight
                video.features[clip] = feature
        for key in dict.fromkeys(k for k, _ in rows):
            self._finish_ready(key)

    def _drain_batches(self) -> None:
        """Every clip received so far through the encoder (used when no more clips can come)."""
        while self.open or self.ready or self.inference.in_flight:
            if not self.ready:
                self._flush_partial()
            self._pump(wait_s=0.5)

    # --- scheduling ----------------------------------------------------------------------------------------
    def _start_workers(self, expected: Sequence[InputItem] | None) -> None:
        """The decode workers: as the plan says, and no more than the expected inputs need."""
        o = self.o
        plan = self.plan = DecoderPlan(o.decoder, o.workers, o.nvdec_sessions, o.gpu, o.cpu_share)
        n_gpu, n_cpu = plan.gpu_sessions, plan.cpu_workers
        if expected is not None:
            n_gpu = min(n_gpu, sum(map(plan.gpu_takes, expected)))
            n_cpu = max(1, min(n_cpu, len(expected)))  # nvdec: what the GPU cannot take
        self.paths = {"cpu": _PathStats(n_cpu), "nvdec": _PathStats(n_gpu)}
        self.ctx = worker_context()
        self.source = o.source
        self.planes_to_gpu = o.source is iter_clips and self._gpu_converts()
        if o.source is iter_clips:
            threads = o.decode_threads or default_decode_threads(n_cpu, o.cpu_share)
            self.source = functools.partial(iter_clips, planes=self.planes_to_gpu, threads=threads)
            log.info("%d CPU decoding process(es), %d FFmpeg thread(s) each", n_cpu, threads)
        self.workers = [self._cpu_worker() for _ in range(n_cpu)]
        if self.planes_to_gpu and n_cpu:
            rings = sum(wk.ring is not None for wk in self.workers)
            if rings == n_cpu:
                path = "shared memory"
            elif rings:
                path = f"shared memory for {rings} of {n_cpu} workers, the pipe for the rest"
            else:
                path = "the workers' pipes " + ("(--no-shared-memory)" if not o.shared_memory else
                                                "(no shared memory to be had here)")
            log.info("CPU workers hand decoded frames to GPU %d, which converts and resizes them; they pass through "
                     "%s", o.gpu, path)
        if n_gpu:
            probes = default_probe_processes(n_gpu) if o.probe_processes is None else o.probe_processes
            self.pool = GpuWorkerPool(o.gpu, o.windowing, o.img_size, probes)
            log.info("NVDEC's demux passes run in %s", f"{probes} helper process(es)" if probes else
                     "the sessions' threads")
            self.workers += [GpuWorker(self.pool, f"iv2trt-nvdec-{i}") for i in range(n_gpu)]

    def _cpu_worker(self) -> CpuWorker:
        return CpuWorker(self.ctx, self.o.windowing, self.o.img_size, self.source,
                         ring=self.planes_to_gpu and self.o.shared_memory)

    def _assign(self) -> None:
        """Idle workers take inputs: GPU workers from the shared queue; CPU workers from their own queue (inputs
        only the CPU can decode, and retries of what failed on the GPU) first, then from the shared queue
        unless the GPU takes it all (`plan.gpu_first`: `--decoder nvdec`) or would finish it sooner
        (`_cpu_may_share`)."""
        for wk in self.workers:
            if wk.task is not None:
                continue
            if wk.path == "nvdec":
                source = self.gpu_queue
            elif self.cpu_queue or self.plan.gpu_first:
                source = self.cpu_queue
            else:
                source = self.gpu_queue if self._cpu_may_share() else None
            if source:
                key, item = source.popleft()
                wk.assign(key, item)
                wk.started = time.monotonic()

    def _cpu_may_share(self) -> bool:
        """Whether a CPU worker may take an input the GPU could decode: only while the GPU workers would still be
        busy with the rest of the queue (in hand and the executor's `backlog` for this pipeline) when the CPU worker
        finished it (a CPU worker takes a few times longer per video than an NVDEC session: one holding the last
        video would make the whole job wait for it). Always while the executor has not said what it holds."""
        gpu, cpu = self.paths["nvdec"], self.paths["cpu"]
        if self.backlog is None or not gpu.workers or not gpu.inputs:
            return True
        gpu_s = gpu.busy_s / gpu.inputs  # one GPU worker's seconds per input so far
        cpu_s = cpu.busy_s / cpu.inputs if cpu.inputs else CPU_SLOWER_THAN_NVDEC * gpu_s
        return (len(self.gpu_queue) + self.backlog) * gpu_s / gpu.workers >= cpu_s

    def _release(self, wk) -> None:
        self.paths[wk.path].busy_s += time.monotonic() - wk.started
        wk.task = None

    def _receive(self, wk: CpuWorker) -> None:
        try:
            message, slot = wk.receive()
        except (EOFError, OSError):
            key = wk.task
            self._replace(wk)
            self._fail(key, wk.why_gone())
            return
        wk.last_heard = time.monotonic()
        try:
            finished = self._handle(message, "cpu") is not None
        finally:
            if slot is not None:  # the clip's planes are on the GPU (or dropped): the worker may reuse the slot
                wk.give_back(slot)
        if finished:
            self._release(wk)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for wk in list(self.workers):
            if not wk.silent_too_long(now, self.o.decode_timeout_s):
                continue
            key = wk.task
            self._replace(wk)
            reason = timeout_reason(self.o.decode_timeout_s)
            if key in self.videos:
                if wk.path == "nvdec":
                    self._to_cpu_path(key, reason, "timeout")
                else:
                    self._fail(key, reason)

    def _replace(self, wk) -> None:
        self._release(wk)
        wk.stop(kill=True)
        fresh = self._cpu_worker() if wk.path == "cpu" else GpuWorker(wk.pool, wk.thread.name + "+")
        self.workers[self.workers.index(wk)] = fresh


def _device_name(runner) -> str:
    device = getattr(runner, "device", None)
    return str(device) if device is not None else "cpu"


def bound_by(encoder_busy: float, decoders: dict[str, dict]) -> str:
    """Which stage limited a run: the encoder (busy most of the time), decoding (decoders busy most of the
    time while the encoder waited), or neither (too few inputs to keep either busy)."""
    if encoder_busy >= 0.85:
        return "encoder"
    if decoders and max(d["busy_fraction"] for d in decoders.values()) >= 0.6:
        return "decode"
    return "inputs (too few to keep decoders or encoder busy)"
