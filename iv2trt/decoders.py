"""The job's source stage: decode workers on the CPU (PyAV, one process each) and on the GPU (NVDEC sessions,
one thread each), behind one interface, and the choice between them (`--decoder auto|nvdec|cpu`).

A worker takes one input at a time (`assign(number, item)`) and reports, in order:
  ("clip", number, info, frames, ready)  frames: uint8 [T, S, S, 3] resized clip (numpy from a CPU worker,
                                         a CUDA tensor from a GPU one, float32 [T, 3, S, S] for .npy inputs);
                                         ready: None, or the CUDA event after which a GPU tensor may be read
  ("done", number, clip count) | ("failed", number, reason)
CPU workers answer through their pipe (`conn`); GPU workers through their pool's shared outbox, which has a
`fileno()` so the job waits on pipes, the pool and the inference thread with one `wait`. A worker silent too
long on one input is replaced: a CPU worker is killed; a GPU worker (a thread cannot be killed) is abandoned,
its later messages ignored.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import Any, Iterator

import numpy as np

from .doorbell import Doorbell
from .errors import BackendUnavailable
from .inputs import InputItem
from .video import DecodeError, Windowing, read_clips

log = logging.getLogger(__name__)

DECODERS = ("auto", "nvdec", "cpu")
DEFAULT_NVDEC_SESSIONS = 8  # decoder sessions that saturate the NVDEC engines (docs/benchmarks.md, H100/H200)
CPU_WORKER_NICENESS = 10    # CPU workers run at lower priority: they take the cores the job's process leaves
GPU_OUTBOX_CLIPS = 64       # clips decoded on the GPU and not yet taken by the job (bounds GPU memory)


CPU_WORKERS_PER_CORE_WITH_NVDEC = 0.25  # measured on 16 cores: 4 CPU workers beside 8 NVDEC sessions gave 74
                                         # clips/s end to end, 14 workers 58 (they slow the GPU path more than
                                         # they add), none 80 (docs/benchmarks.md)


def default_workers(nvdec: bool = False) -> int:
    """CPU decoding processes when none are asked for: one per core; a quarter of the cores while NVDEC sessions
    run in the job's process (more CPU workers cost the GPU path more than they add)."""
    cores = os.cpu_count() or 1
    return max(1, int(cores * CPU_WORKERS_PER_CORE_WITH_NVDEC) if nvdec else cores)


# --- the CPU path ---------------------------------------------------------------------------------------------
def iter_clips(item: InputItem, w: Windowing, img_size: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(clip info, frames) for every clip of one input on the CPU: uint8 [T, S, S, 3] resized frames for videos,
    images and frame folders (normalised later, by the runner); float32 [T, 3, S, S] as stored for .npy
    inputs. Raises DecodeError."""
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


def worker_context():
    """forkserver (torch imported once, workers start fast) where the platform has it, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["iv2trt.decoders", "iv2trt.transforms"])
        return ctx
    return mp.get_context("spawn")


def _cpu_worker_main(conn, w: Windowing, img_size: int) -> None:
    """Worker process: receive (number, item), send ("clip", ...)..., then ("done"|"failed", ...)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    os.nice(CPU_WORKER_NICENESS)  # the job's own process (GPU decoder threads, batching) goes first
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
                conn.send(("clip", number, info, array, None))
                count += 1
            conn.send(("done", number, count))
        except DecodeError as exc:
            conn.send(("failed", number, exc.reason))
        except (BrokenPipeError, EOFError):
            return
        except Exception as exc:  # a decoder bug must not stop the job: report it as this input's failure
            conn.send(("failed", number, f"{type(exc).__name__}: {exc}"))


class CpuWorker:
    """One decoding process (PyAV)."""

    path = "cpu"

    def __init__(self, ctx, w: Windowing, img_size: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_cpu_worker_main, args=(child, w, img_size), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None
        self.last_heard = self.started = time.monotonic()

    def assign(self, number: int, item: InputItem) -> None:
        self.task, self.last_heard = number, time.monotonic()
        self.conn.send((number, item))

    def why_gone(self) -> str:
        return f"decoder process died (exit code {self.process.exitcode})"

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


# --- the GPU path ---------------------------------------------------------------------------------------------
class GpuWorkerPool:
    """The GPU workers' shared outbox: a bounded queue of (worker, message) and a socket that turns readable
    when messages wait (for multiprocessing.connection.wait)."""

    def __init__(self, gpu: int, w: Windowing, img_size: int):
        self.gpu, self.w, self.img_size = gpu, w, img_size
        self.outbox: queue.Queue = queue.Queue(maxsize=GPU_OUTBOX_CLIPS)
        self.stopping = threading.Event()
        self._doorbell = Doorbell()  # rung when messages wait

    def fileno(self) -> int:
        return self._doorbell.fileno()

    def put(self, worker: "GpuWorker", message: tuple) -> bool:
        """Queue a message (waits while the outbox is full); False once the job is stopping."""
        while not self.stopping.is_set():
            try:
                self.outbox.put((worker, message), timeout=0.1)
            except queue.Full:
                continue
            self._doorbell.ring()
            return True
        return False

    def messages(self) -> list[tuple["GpuWorker", tuple]]:
        self._doorbell.clear()
        out = []
        try:
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self) -> None:
        self.stopping.set()
        self._doorbell.close()


class GpuWorker:
    """One NVDEC (and nvJPEG) session in a thread of the job's process; frames stay on the GPU."""

    path = "nvdec"

    def __init__(self, pool: GpuWorkerPool, name: str):
        self.pool = pool
        self.inbox: queue.Queue = queue.Queue()
        self.task: int | None = None
        self.last_heard = self.started = time.monotonic()
        self.abandoned = False
        self.frames_decoded = 0   # frames out of NVDEC (written by this worker's thread only)
        self.frames_dropped = 0   # non-reference access units never sent to NVDEC
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def assign(self, number: int, item: InputItem) -> None:
        self.task, self.last_heard = number, time.monotonic()
        self.inbox.put((number, item))

    def why_gone(self) -> str:
        return "GPU decoder thread stopped"

    def stop(self, kill: bool = False) -> None:
        if kill or self.task is not None:
            self.abandoned = True
        self.inbox.put(None)

    def _run(self) -> None:
        from . import nvdec

        session = None
        with torch_device_scope(self.pool.gpu):
            while True:
                task = self.inbox.get()
                if task is None or self.pool.stopping.is_set():
                    return
                number, item = task
                try:
                    if session is None:
                        session = nvdec.NvdecSession(self.pool.gpu, self.pool.w, self.pool.img_size)
                    count = 0
                    for info, frames, ready in session.clips(item.kind, item.path):
                        if not self.pool.put(self, ("clip", number, info, frames, ready)):
                            return
                        count += 1
                    message = ("done", number, count)
                except DecodeError as exc:
                    message = ("failed", number, exc.reason)
                except Exception as exc:  # noqa: BLE001 - reported as this input's failure on the GPU path
                    message = ("failed", number, f"{type(exc).__name__}: {exc}")
                if session is not None:
                    self.frames_decoded, self.frames_dropped = session.frames_decoded, session.frames_dropped
                if not self.pool.put(self, message):
                    return


def check_decoder(decoder: str, gpu: int = 0) -> str | None:
    """Why NVDEC will not be used (None when it will); BackendUnavailable for `nvdec` when it cannot run."""
    from . import nvdec

    if decoder == "cpu":
        return "--decoder cpu"
    reason = nvdec.nvdec_unavailable(gpu)
    if reason and decoder == "nvdec":
        raise BackendUnavailable(f"--decoder nvdec cannot run here: {reason}; use --decoder cpu (or auto)")
    return reason


def torch_device_scope(gpu: int):
    """The thread's current CUDA device for PyTorch (its allocations and streams)."""
    import torch

    return torch.cuda.device(gpu)


# --- choosing -------------------------------------------------------------------------------------------------
class DecoderPlan:
    """How many workers of each kind a job runs, and which inputs the GPU ones take."""

    def __init__(self, decoder: str, cpu_workers: int | None, nvdec_sessions: int, gpu: int = 0):
        from . import nvdec

        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}")
        self.decoder, self.gpu = decoder, gpu
        reason = check_decoder(decoder, gpu)
        self.gpu_sessions = 0 if reason else max(1, nvdec_sessions)
        self.cpu_workers = max(1, cpu_workers or default_workers(nvdec=bool(self.gpu_sessions)))
        self.jpeg = bool(self.gpu_sessions) and nvdec.gpu_jpeg_available()
        self.gpu_first = decoder == "nvdec"   # nvdec: CPU workers only take what the GPU cannot
        if decoder == "auto" and reason:
            log.info("decoder auto: NVDEC not used (%s); decoding on the CPU with %d worker(s)", reason,
                     self.cpu_workers)
        elif self.gpu_sessions:
            log.info("decoder %s: %d NVDEC session(s) on GPU %d%s and %d CPU worker(s)%s", decoder,
                     self.gpu_sessions, gpu, " (+ nvJPEG for JPEG images)" if self.jpeg else "", self.cpu_workers,
                     " for what NVDEC cannot take" if self.gpu_first else ", pulling from one queue")

    def gpu_takes(self, item: InputItem) -> bool:
        from .nvdec import gpu_takes

        return bool(self.gpu_sessions) and gpu_takes(item.kind, item.path, self.jpeg)
