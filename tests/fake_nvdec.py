"""A fake NVDEC for CPU machines: the scheduler's and the executors' tests run the GPU decode path without a GPU.

`FakeSession` stands in for decode.nvdec.NvdecSession: it runs the demux pass as the session does (in the
pipeline's helper processes) and decodes with the CPU path's code, in the GPU worker's thread, but refuses files named *nvfail* (as NVDEC refuses a codec), fails mid-file on *nvbreak* (after one clip),
and hangs on *nvhang* until released (`RELEASE_HANG`) or `hang_s` passed. `install()` puts it in place in this
process; `ray_worker_setup` is a Ray worker's setup hook that does so there."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from iv2trt.decode import nvdec
from iv2trt.decode.clips import DecodeError
from iv2trt.decode.source import iter_clips

RELEASE_HANG = threading.Event()


class FakeSession:
    decoded: list[str] = []  # the inputs it decoded, in this process
    hang_s = 30.0

    def __init__(self, gpu, windowing, img_size, probes=None):
        self.w, self.size, self.probes = windowing, img_size, probes
        self.frames_decoded = self.frames_dropped = 0

    def clips(self, kind, path):
        from iv2trt.decode.inputs import InputItem

        name = Path(path).name
        if "nvfail" in name:
            raise nvdec.NvdecUnsupported("fake NVDEC does not take this codec")
        if kind == "video" and self.probes is not None:
            self.probes.probe(path)  # the demux pass where the job runs it (the pipeline's helper processes)
        if "nvhang" in name:
            RELEASE_HANG.wait(self.hang_s)
            raise DecodeError("released")
        count = 0
        for info, frames in iter_clips(InputItem(path, name, kind), self.w, self.size):
            if "nvbreak" in name and count == 1:
                raise DecodeError("fake NVDEC error mid-stream")
            count += 1
            self.frames_decoded += len(info["indices"])
            yield info, frames, None
        FakeSession.decoded.append(name)


def patches() -> dict[str, object]:
    """What the fake replaces, by dotted name: NVDEC reported usable, nvJPEG not, sessions fake, no CUDA device
    scope around the GPU workers."""
    return {"iv2trt.decode.nvdec.nvdec_unavailable": lambda gpu=0: None,
            "iv2trt.decode.nvdec.gpu_jpeg_available": lambda: False,
            "iv2trt.decode.nvdec.NvdecSession": FakeSession,
            "iv2trt.decode.workers.torch_device_scope": lambda gpu: contextlib.nullcontext()}


def install(hang_s: float = 30.0) -> None:
    """The fake in place for the rest of this process (a Ray worker's)."""
    import importlib

    FakeSession.hang_s = hang_s
    for dotted, value in patches().items():
        module, name = dotted.rsplit(".", 1)
        setattr(importlib.import_module(module), name, value)


def ray_worker_setup() -> None:
    """Ray's worker_process_setup_hook for tests: the job's own hook, then the fake (hang: $FAKE_NVDEC_HANG_S)."""
    from iv2trt.distributed.ray_stages import worker_setup

    worker_setup()
    install(float(os.environ.get("FAKE_NVDEC_HANG_S", "30")))
