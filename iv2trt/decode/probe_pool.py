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
import threading
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
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


class ProbePool:
    """`processes` helper processes for the demux pass, started on first use and shared by a pipeline's NVDEC
    sessions (threads); 0: in the calling thread. `context`: how the processes start (default spawn; the job
    passes its workers' forkserver). A process that dies on a file (a crash in FFmpeg) fails that file for the GPU
    path (stream_error: the CPU path takes it) and the pool starts anew."""

    def __init__(self, processes: int, context=None):
        self.processes = max(0, processes)
        self.context = context or mp.get_context("spawn")
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._starting: list = []

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the probe pool is closed")
            if self._executor is None:
                self._executor = ProcessPoolExecutor(self.processes, mp_context=self.context, initializer=_started)
            return self._executor

    def start(self) -> ProbePool:
        """Start the processes now, in the background (a process's start imports PyAV and PyTorch: seconds that
        would otherwise delay the first videos)."""
        if self.processes:
            executor = self._get()
            self._starting = [executor.submit(_started) for _ in range(self.processes)]
        return self

    def wait_started(self, timeout: float | None = None) -> None:
        """Wait (at most `timeout` seconds) until the processes `start` began are up."""
        wait(self._starting, timeout)

    def _broken(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def probe(self, path: str, header: Callable[[VideoProbe], Any] | None = None,
              accept: Callable[[VideoProbe], Any] | None = None) -> Probed:
        """The demux pass over `path`. In the calling thread, `header` runs before it and `accept` after it; in a
        helper process both run after it (here), the probe's own timestamp check before (there). Raises
        DecodeError (NvdecUnsupported with its category from a helper: nothing was decoded on the GPU)."""
        if not self.processes:
            return probe_for_nvdec(path, header, accept)
        executor = self._get()
        try:
            outcome = executor.submit(_in_process, path).result()
        except BrokenProcessPool:
            self._broken(executor)
            raise NvdecUnsupported("the demux pass's process died on this file", "stream_error") from None
        if isinstance(outcome, tuple):
            raise NvdecUnsupported(outcome[1], outcome[0])
        for check in (header, accept):
            if check is not None:
                check(outcome.probe)
        return outcome

    def close(self, timeout: float = 10.0) -> None:
        """Stop the processes: files not begun are cancelled, one being probed is waited for (at most `timeout`
        seconds, then left to end on its own). Waiting lets the pool's queues go here, their five named semaphores
        unregistered from multiprocessing's resource tracker while it runs: a Ray actor's end kills the tracker
        before the interpreter exits, and each semaphore released after that printed a KeyError traceback."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is None:
            return
        closer = threading.Thread(target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True},
                                  name="probe-pool-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning("the demux pass's helper processes did not stop within %.0f s; left to end on their own",
                        timeout)
