"""CUDA graph captures kept apart from NVDEC's CUDA calls in one process.

Thread-local capture mode is not enough beside PyNvVideoCodec: its decode calls synchronise the CUDA context,
which invalidates a capture running in another thread (CUDA error 901 in the decoder, "operation failed due to a
previous error during capture" in the capture), and the capture's kernels fail after it (seen on an H200 at the
start of a job, when the first batches are captured while the sessions open their decoders). So a capture waits
until no NVDEC call runs and holds new ones back until it is done: `GUARD.exclusive()` around a capture,
`GUARD.shared()` around each call into the decoder. Captures are rare (one per batch shape), decode calls short.

This covers NVDEC's calls only. In a job a capture was also spoilt by the CPU workers' frames copied to the GPU
meanwhile (fee47f8, H200), so a pipeline that decodes on the GPU serves its encoder without graphs at all
(job.pipeline.Pipeline.start); the guard serves code that captures beside NVDEC sessions outside the job's pipeline
(tests/test_pipelines_gpu.py, tools).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CaptureGuard:
    """A readers-writer lock that prefers its writer: many decode calls at once, or one capture."""

    def __init__(self):
        self._cond = threading.Condition()
        self._calls = 0          # decode calls running
        self._capturing = False  # a capture runs or waits for the calls to end

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Around a call that synchronises the CUDA context (an NVDEC decode, decoder creation or release)."""
        with self._cond:
            while self._capturing:
                self._cond.wait()
            self._calls += 1
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                if not self._calls:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Around a CUDA graph capture: waits for running decode calls, holds new ones back."""
        with self._cond:
            while self._capturing:
                self._cond.wait()
            self._capturing = True
            while self._calls:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()

    @property
    def calls(self) -> int:
        return self._calls


GUARD = CaptureGuard()
