"""The NVDEC path's demux pass in helper processes.

Before NVDEC decodes a video, PyAV reads it once without decoding (pyav.probe_video: every packet's timestamp and
byte position, the keyframes, the first frame's rotation and, for 10/12-bit streams, its chroma siting). Done in
the NVDEC sessions' threads, that pass held the job process's GIL the sessions, the batcher and the encoder share
(py-spy on an H200: a quarter of the sessions' time, 14% of their GIL time). A `ProbePool` runs it in a few
processes of its own; the session's thread waits without the GIL. With no processes it runs in the calling thread,
as before."""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .clips import DecodeError
from .fallbacks import NvdecError, NvdecUnsupported, refuse_timestamps
from .pyav import VideoProbe, probe_video

log = logging.getLogger(__name__)


@dataclass
class Probed:
    """What the demux pass learnt of a video for NVDEC: the probe, the rotation (counter-clockwise degrees) and
    the chroma siting swscale applies to its first frame (10/12-bit 4:2:0 only; None inside: none reproduced)."""

    probe: VideoProbe
    rotation: float
    sitings: list = field(default_factory=list)


def probe_for_nvdec(path: str, header: Callable[[VideoProbe], Any] | None = None,
                    accept: Callable[[VideoProbe], Any] | None = None) -> Probed:
    """The demux pass, the first frame decoded on the CPU; `header` and `accept` as pyav.probe_video's."""
    sitings: list = []

    def inspect(frame) -> None:  # swscale filters 10/12-bit 4:2:0 chroma by the frame's chroma location
        from .colorspace import pix_fmt_layout, swscale_chroma_siting

        if frame is not None and pix_fmt_layout(frame.format.name) in ((10, "420"), (12, "420")):
            sitings.append(swscale_chroma_siting(frame))

    probe, rotation = probe_video(path, header=header, accept=accept, first_frame=inspect)
    return Probed(probe, rotation, sitings)


def _in_process(path: str) -> Probed | tuple[str, str]:
    """A helper process's work: the Probed, or (category, reason) where the file cannot be probed (exceptions with
    their own constructors do not all survive pickling)."""
    try:
        return probe_for_nvdec(path, accept=refuse_timestamps)
    except NvdecError as exc:
        return exc.category, exc.reason
    except DecodeError as exc:
        return "stream_error", exc.reason


def _started() -> None:
    """A helper process's start: PyAV imported (not in the first file's time) and one torch thread (the siting
    check's few small tensors)."""
    import av  # noqa: F401

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _serve(conn) -> None:
    """A helper process: says it is up, then answers each path with `_in_process`'s outcome until None or EOF."""
    _started()
    conn.send("up")
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):
            return
        if path is None:
            return
        conn.send(_in_process(path))


class _Helper:
    """One helper process and the parent's end of its pipe. The pipe is closed once: by `end`, or, when a thread is
    inside `ask` then (a pool closing while a session waits on a hung file), by that thread once its read returns,
    so no thread reads a closed (or reused) descriptor and no close races another."""

    def __init__(self, context):
        parent, child = context.Pipe()
        self.conn = parent
        self._lock = threading.Lock()
        self._busy = False   # a thread is inside ask()
        self._ended = False  # end() ran
        self.process = context.Process(target=_serve, args=(child,), name="iv2trt-demux", daemon=True)
        self.process.start()
        child.close()

    def up(self) -> bool:
        """Wait for its start message; False: it died first."""
        try:
            return self.conn.recv() == "up"
        except (EOFError, OSError):
            return False

    def ask(self, path: str):
        with self._lock:
            if self._ended:
                raise EOFError("the demux helper was stopped")
            self._busy = True
        try:
            self.conn.send(path)
            return self.conn.recv()
        finally:
            with self._lock:
                self._busy = False
                if self._ended:
                    self._close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass

    def end(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the process to exit, then kill it; False: it had to be killed."""
        self.process.join(timeout)
        stopped = not self.process.is_alive()
        if not stopped:
            self.process.kill()
            self.process.join(1)
        with self._lock:
            self._ended = True
            if not self._busy:
                self._close()
        return stopped

    def _close(self) -> None:
        """(under self._lock) Close the parent's end of the pipe, once."""
        if not self.conn.closed:
            self.conn.close()


class ProbePool:
    """`processes` helper processes for the demux pass, shared by a pipeline's NVDEC sessions (threads); 0: in the
    calling thread. `context`: how the processes start (default spawn; the job passes its workers' forkserver). A
    process that dies on a file (a crash in FFmpeg) fails that file for the GPU path (stream_error: the CPU path
    takes it) and another takes its place.

    Each helper talks through a pipe of its own: no multiprocessing queue, so no named semaphores registered with
    multiprocessing's resource tracker. (A Ray actor's end kills the tracker while the actor is closing; each
    semaphore released after that printed a KeyError traceback, five per actor with a process pool.)"""

    def __init__(self, processes: int, context=None):
        self.processes = max(0, processes)
        self.context = context or mp.get_context("spawn")
        self._idle: queue.Queue[_Helper] = queue.Queue()  # helpers up and free
        self._helpers: list[_Helper] = []                 # all of them, for close()
        self._lock = threading.Lock()
        self._closed = False
        self._all_up = threading.Event()
        self._starter: threading.Thread | None = None

    def start(self) -> ProbePool:
        """Start the processes now, in the background (a process's start imports PyAV and PyTorch: seconds that
        would otherwise delay the first videos)."""
        with self._lock:
            if self._starter is None and self.processes:
                self._starter = threading.Thread(target=self._start_all, name="iv2trt-demux-start", daemon=True)
                self._starter.start()
        if not self.processes:
            self._all_up.set()
        return self

    def _start_all(self) -> None:
        try:
            self._add(self.processes)
        finally:
            self._all_up.set()

    def _add(self, count: int = 1) -> None:
        """Start `count` helpers at once; each in the idle queue once it is up."""
        with self._lock:
            if self._closed:
                return
            helpers = [_Helper(self.context) for _ in range(count)]
            self._helpers.extend(helpers)
        for helper in helpers:
            if helper.up():
                self._idle.put(helper)
                continue
            helper.end(5)  # (its pipe closed: it is exiting)
            with self._lock:
                if helper in self._helpers:
                    self._helpers.remove(helper)
                closed = self._closed
            if not closed:
                log.warning("a demux helper process died as it started (exit code %s)", helper.process.exitcode)

    def wait_started(self, timeout: float | None = None) -> None:
        """Wait (at most `timeout` seconds) until the processes `start` began are up."""
        self._all_up.wait(timeout)

    def probe(self, path: str, header: Callable[[VideoProbe], Any] | None = None,
              accept: Callable[[VideoProbe], Any] | None = None) -> Probed:
        """The demux pass over `path`. In the calling thread, `header` runs before it and `accept` after it; in a
        helper process both run after it (here), the probe's own timestamp check before (there). Raises
        DecodeError (NvdecUnsupported with its category from a helper: nothing was decoded on the GPU)."""
        if not self.processes:
            return probe_for_nvdec(path, header, accept)
        self.start()
        while True:
            if self._closed:
                raise RuntimeError("the probe pool is closed")
            try:
                helper = self._idle.get(timeout=0.5)
                break
            except queue.Empty:
                if self._all_up.is_set() and not self._helpers:  # none could start: this thread does it
                    return probe_for_nvdec(path, header, accept)
        try:
            outcome = helper.ask(path)
        except (EOFError, OSError):
            self._replace(helper)
            raise NvdecUnsupported("the demux pass's process died on this file", "stream_error") from None
        self._idle.put(helper)
        if isinstance(outcome, tuple):
            raise NvdecUnsupported(outcome[1], outcome[0])
        for check in (header, accept):
            if check is not None:
                check(outcome.probe)
        return outcome

    def _replace(self, helper: _Helper) -> None:
        helper.end(0)
        with self._lock:
            if helper in self._helpers:
                self._helpers.remove(helper)
        threading.Thread(target=self._add, name="iv2trt-demux-start", daemon=True).start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the processes: one probing a file finishes it (at most `timeout` seconds, then it is killed)."""
        with self._lock:
            self._closed = True
            helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.stop()
        deadline = time.monotonic() + timeout
        late = [h for h in helpers if not h.end(max(0.0, deadline - time.monotonic()))]
        if late:
            log.warning("%d demux helper process(es) did not stop within %.0f s; killed", len(late), timeout)
