"""The decode workers that run beside the local job: CPU processes (PyAV, one input at a time each) and GPU
sessions (NVDEC, one thread each), behind one interface.

A worker takes one input at a time (`assign(number, item)`) and reports, in order:
  ("clip", number, info, frames, ready)  frames: uint8 [T, S, S, 3] resized clip (numpy from a CPU worker,
                                         a CUDA tensor from a GPU one, float32 [T, 3, S, S] for .npy inputs);
                                         ready: None, or the CUDA event after which a GPU tensor may be read
  ("done", number, clip count) | ("failed", number, reason), a GPU worker's with the fallback category
CPU workers answer through their pipe (`conn`), a clip's planes for the GPU through their ring of shared memory
(plane_ring.py) where they have one; GPU workers through their pool's shared outbox, which has a
`fileno()` so the job waits on pipes, the pool and the inference thread with one `wait`. A worker silent too
long on one input is replaced: a CPU worker is killed; a GPU worker (a thread cannot be killed) is abandoned,
its later messages ignored. How many of each run, and which inputs the GPU takes, is plan.py's choice."""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from multiprocessing import reduction
from typing import Callable

from ..doorbell import Doorbell
from .clips import Windowing, failure_reason
from .fallbacks import fallback_category
from .gpu_frames import YuvClip
from .inputs import InputItem
from .plane_ring import InSlot, PlaneRing
from .source import iter_clips

log = logging.getLogger(__name__)

CPU_WORKER_NICENESS = 10    # CPU workers run at lower priority: they take the cores the job's process leaves
WORKER_START_S = 120.0      # a CPU worker's process may take this long to come up before a task's timeout runs

GPU_OUTBOX_CLIPS = 64       # clips decoded on the GPU and not yet taken by the job (bounds GPU memory)


def worker_context():
    """forkserver (torch imported once, workers start fast) where the platform has it, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["iv2trt.decode.workers", "iv2trt.transforms"])
        return ctx
    return mp.get_context("spawn")


def start_worker_server() -> threading.Thread | None:
    """Bring up the CPU workers' forkserver (its import of torch: seconds) in a background thread, so that it
    overlaps whatever this process does next (its runner's build, CUDA's start); the first CpuWorker then waits
    only for what is left of it. None where workers start otherwise (spawn)."""
    ctx = worker_context()
    if ctx.get_start_method() != "forkserver":
        return None
    thread = threading.Thread(target=_start_server, args=(ctx,), name="iv2trt-worker-server", daemon=True)
    thread.start()
    return thread


def _start_server(ctx) -> None:
    """The first process started through the forkserver starts the server (multiprocessing's public way)."""
    started = time.perf_counter()
    try:
        process = ctx.Process(target=_server_up, daemon=True)
        process.start()
        process.join()
    except Exception as exc:  # noqa: BLE001 - the first CpuWorker starts the server then, and says why not
        log.debug("the CPU workers' server did not start early (%s)", exc)
        return
    log.debug("the CPU workers' server is up in %.2f s", time.perf_counter() - started)


def _server_up() -> None:
    """A process that does nothing: started, it shows that the forkserver serves."""


def _cpu_worker_main(conn, w: Windowing, img_size: int, source: Callable, ring: tuple[int, int] | None = None,
                     up=None) -> None:
    """Worker process: set `up` (a shared byte, multiprocessing.RawValue) to 1 once started, then receive
    (number, item), send ("clip", ...)..., then ("done"|"failed", ...). With `ring` (slots, slot bytes), the
    ring's file descriptor comes first, and clips' planes go into its free slots; the job's process sends a slot's
    number back (an int) once it has read it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    os.nice(CPU_WORKER_NICENESS)  # the job's own process (GPU decoder threads, batching) goes first
    import torch

    torch.set_num_threads(1)
    slots = None
    if ring is not None:
        fd = reduction.recv_handle(conn)
        slots = _Slots(PlaneRing(fd, *ring))
    if up is not None:
        up.value = 1
    while True:
        try:
            task = conn.recv()
            while isinstance(task, int):  # a slot given back after the worker's last clip
                slots.free.append(task)
                task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        number, item = task
        try:
            count = 0
            for info, array in source(item, w, img_size):
                if slots is not None and isinstance(array, YuvClip) and slots.ring.fits(array.planes):
                    array = dataclasses.replace(array, planes=slots.put(array.planes, conn))
                conn.send(("clip", number, info, array, None))
                count += 1
            conn.send(("done", number, count))
        except (BrokenPipeError, EOFError, _Stopped):
            return
        except Exception as exc:  # noqa: BLE001 - this input's failure (clips.failure_reason)
            conn.send(("failed", number, failure_reason(exc)))


class _Stopped(Exception):
    """The job's process stopped the worker while it waited for a free slot."""


class _Slots:
    """A worker's side of its ring: which slots are free."""

    def __init__(self, ring: PlaneRing):
        self.ring, self.free = ring, list(range(ring.slots))

    def put(self, planes, conn) -> InSlot:
        """Write `planes` into a free slot, first waiting for the job's process to give one back."""
        while not self.free:
            message = conn.recv()
            if not isinstance(message, int):
                raise _Stopped
            self.free.append(message)
        return self.ring.write(self.free.pop(), planes)


class CpuWorker:
    """One decoding process: PyAV through `source` (decode.source.iter_clips; benchmarks pass their own). With
    `ring`, clips' planes (YuvClip) come through a ring of shared memory when one can be had here (`self.ring`)."""

    path = "cpu"

    def __init__(self, ctx, w: Windowing, img_size: int, source: Callable = iter_clips, ring: bool = False):
        self.conn, child = ctx.Pipe(duplex=True)
        self.ring = PlaneRing.create(w.frames) if ring else None
        spec = (self.ring.slots, self.ring.slot_bytes) if self.ring is not None else None
        # (a shared byte, not an Event: an Event is five named semaphores, which multiprocessing's resource tracker
        # follows; Ray kills an exiting actor's child processes, the tracker among them, and each semaphore's
        # release then printed a KeyError traceback)
        self._up, self._seen_up = ctx.RawValue("b", 0), False
        self.process = ctx.Process(target=_cpu_worker_main, args=(child, w, img_size, source, spec, self._up),
                                   daemon=True)
        self.process.start()
        child.close()
        if self.ring is not None:
            reduction.send_handle(self.conn, self.ring.fd, self.process.pid)
            self.ring.close_fd()
        self.task: int | None = None
        self.last_heard = self.started = time.monotonic()

    def assign(self, number: int, item: InputItem) -> None:
        self.up()
        self.task, self.last_heard = number, time.monotonic()
        self.conn.send((number, item))

    def up(self) -> bool:
        """Whether the process has started (its imports done: seconds on a loaded machine). When it is first seen
        up, its task's clock starts again."""
        if not self._seen_up and self._up.value:
            self._seen_up, self.last_heard = True, time.monotonic()
        return self._seen_up

    def silent_too_long(self, now: float, timeout_s: float) -> bool:
        """Busy, and silent for over `timeout_s` since it took its task or last sent something (its process's
        start, up to WORKER_START_S more, not counted)."""
        if self.task is None:
            return False
        limit = timeout_s if self.up() else timeout_s + WORKER_START_S
        return now - self.last_heard > limit and not self.conn.poll()

    def receive(self) -> tuple[tuple, int | None]:
        """The worker's next message, and the ring slot its clip's planes lie in (None: none). The planes are a
        view of the slot until `give_back(slot)`: read them before. Raises EOFError/OSError if it died."""
        message = self.conn.recv()
        if message[0] == "clip" and isinstance(getattr(message[3], "planes", None), InSlot):
            where = message[3].planes
            clip = dataclasses.replace(message[3], planes=self.ring.view(where.slot, where.shape, where.dtype),
                                       borrowed=True)
            return (*message[:3], clip, message[4]), where.slot
        return message, None

    def give_back(self, slot: int) -> None:
        try:
            self.conn.send(slot)
        except OSError:  # it died: the next receive says so
            pass

    def why_gone(self) -> str:
        return f"decoder process died (exit code {self.process.exitcode})"

    def stop(self, kill: bool = False, wait: bool = True) -> None:
        """Tell the process to exit (kill it when `kill` or busy); `wait`: also `join` it (a pipeline tells all
        its workers first, then joins them: their exits overlap)."""
        if kill or self.task is not None:
            self.process.kill()
        elif not self.conn.closed:
            try:
                self.conn.send(None)
            except OSError:
                pass
        if wait:
            self.join()

    def join(self) -> None:
        """Wait for the process (killed after 5 s), then free its pipe and ring; again: nothing."""
        if self.conn.closed:
            return
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()
        if self.ring is not None:
            self.ring.close()


# --- the GPU path ---------------------------------------------------------------------------------------------
class GpuWorkerPool:
    """The GPU workers' shared outbox: a bounded queue of (worker, message) and a socket that turns readable
    when messages wait (for multiprocessing.connection.wait); and the processes that run their demux passes
    (`probe_processes`, 0: in each worker's thread)."""

    def __init__(self, gpu: int, w: Windowing, img_size: int, probe_processes: int = 0):
        from .probe_pool import ProbePool

        self.gpu, self.w, self.img_size = gpu, w, img_size
        self.probes = ProbePool(probe_processes, worker_context()).start()  # the sessions' demux passes
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
        self.probes.close()


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
        self.cpu_s = 0.0          # this thread's CPU time so far (updated after each input)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def assign(self, number: int, item: InputItem) -> None:
        self.task, self.last_heard = number, time.monotonic()
        self.inbox.put((number, item))

    def silent_too_long(self, now: float, timeout_s: float) -> bool:
        """Busy, and silent for over `timeout_s` since it took its task or last sent something."""
        return self.task is not None and now - self.last_heard > timeout_s

    def why_gone(self) -> str:
        return "GPU decoder thread stopped"

    def stop(self, kill: bool = False, wait: bool = True) -> None:
        if kill or self.task is not None:
            self.abandoned = True
        self.inbox.put(None)

    def join(self) -> None:
        """Nothing to wait for: the thread ends on its own (a daemon)."""

    def _run(self) -> None:
        from . import nvdec

        session = None
        self.pool.probes.wait_started(60)  # (an input's decode timeout counts from when this thread takes it)
        with torch_device_scope(self.pool.gpu):
            while True:
                task = self.inbox.get()
                if task is None or self.pool.stopping.is_set():
                    return
                self.last_heard = time.monotonic()
                number, item = task
                try:
                    if session is None:
                        session = nvdec.NvdecSession(self.pool.gpu, self.pool.w, self.pool.img_size,
                                                     self.pool.probes)
                    count = 0
                    for info, frames, ready in session.clips(item.kind, item.path):
                        if not self.pool.put(self, ("clip", number, info, frames, ready)):
                            return
                        count += 1
                    message = ("done", number, count)
                except Exception as exc:  # noqa: BLE001 - this input's failure on the GPU path
                    message = ("failed", number, failure_reason(exc), fallback_category(exc))
                if session is not None:
                    self.frames_decoded, self.frames_dropped = session.frames_decoded, session.frames_dropped
                self.cpu_s = time.thread_time()
                if not self.pool.put(self, message):
                    return


def torch_device_scope(gpu: int):
    """The thread's current CUDA device for PyTorch (its allocations and streams)."""
    import torch

    return torch.cuda.device(gpu)
