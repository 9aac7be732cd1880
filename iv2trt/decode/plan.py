"""Where inputs are decoded (`--decoder auto|nvdec|cpu`): how many NVDEC sessions and CPU workers a job runs,
whether NVDEC can run here, and which inputs the GPU takes."""
from __future__ import annotations

import logging
import os

from ..errors import BackendUnavailable
from .inputs import InputItem

log = logging.getLogger(__name__)

DECODERS = ("auto", "nvdec", "cpu")

DEFAULT_NVDEC_SESSIONS = 8  # decoder sessions near the NVDEC engines' limit: raw 720p H.264 on an H200 gave
                            # 2,343 fps with 4 sessions, 2,832 with 8, 3,009 with 16

NVDEC_PIPELINES_PER_GPU = 2  # pipeline processes per GPU that decodes with NVDEC: the sessions of one process kept an
                             # H200's decoders 52-89% busy (nvidia-smi dmon, --decoder nvdec, two machines), of two
                             # 96-99%; 720p H.264 auto, 2,400 clips: 1 process 121.0 clips/s, 2 x 8 sessions 152.9,
                             # 3 x 4 154.1 (14309fa42e4c)

CPU_WORKERS_PER_CORE_WITH_NVDEC = 0.5  # beside NVDEC, sharing its videos (`auto`) and taking what it cannot take
# On an H200 with 16 cores (docs/benchmarks.md, 720p H.264 real footage, one FFmpeg thread per worker, planes through
# shared memory, the tail left to the GPU): NVDEC alone 82.6 clips/s end to end; with 8 CPU workers sharing its
# videos 103.4, 12 -> 99.2, 16 -> 85.3 (the CPU workers then take the cores the NVDEC threads need).


def default_workers(nvdec: bool = False, share: float = 1.0) -> int:
    """CPU decoding processes when none are asked for: one per core; half the cores while NVDEC sessions run in
    the job's process (more CPU workers cost the GPU path more than they add). `share`: the fraction of the
    machine's cores one pipeline has (a job's pipelines share them)."""
    cores = (os.cpu_count() or 1) * share
    return max(1, int(cores * CPU_WORKERS_PER_CORE_WITH_NVDEC) if nvdec else int(cores))


def default_probe_processes(sessions: int) -> int:
    """Helper processes for the NVDEC sessions' demux passes (probe_pool.py) when none are asked for: one per two
    sessions (the pass took about a quarter of a session's time in its thread)."""
    return max(1, sessions // 2)


def default_decode_threads(workers: int, share: float = 1.0) -> int:
    """FFmpeg threads per CPU worker when none are asked for: half a core each, at least one. Measured on an H200
    host with 16 cores (docs/benchmarks.md, 720p H.264): 16 workers decoded 75 clips/s with one thread each, 68 with
    two and 54 with FFmpeg's own choice (a thread per core each); 4 workers beside NVDEC did best with two."""
    cores = int((os.cpu_count() or 1) * share)
    return max(1, cores // (2 * max(1, workers)))


def pipelines_per_gpu(setting: int, decoder: str, nvdec_installed: bool | None = None,
                      encoder_on_cpu: bool = False) -> int:
    """Pipelines per GPU for `--pipelines-per-gpu` (0: NVDEC_PIPELINES_PER_GPU where NVDEC will decode, as far as
    can be told without starting CUDA here: not --decoder cpu, PyNvVideoCodec installed, the encoder not on the CPU
    (`encoder_on_cpu`: ONNX Runtime without a GPU provider, whose sessions each take every core); else 1).
    `nvdec_installed`: whether PyNvVideoCodec is there (None: look in this process)."""
    import importlib.util

    if setting:
        return setting
    if encoder_on_cpu:
        return 1
    if nvdec_installed is None:
        nvdec_installed = importlib.util.find_spec("PyNvVideoCodec") is not None
    return NVDEC_PIPELINES_PER_GPU if decoder != "cpu" and nvdec_installed else 1


def check_decoder(decoder: str, gpu: int = 0) -> str | None:
    """Why NVDEC will not be used (None when it will); BackendUnavailable for `nvdec` when it cannot run."""
    from . import nvdec

    if decoder == "cpu":
        return "--decoder cpu"
    reason = nvdec.nvdec_unavailable(gpu)
    if reason and decoder == "nvdec":
        raise BackendUnavailable(f"--decoder nvdec cannot run here: {reason}; use --decoder cpu (or auto)")
    return reason


# --- choosing -------------------------------------------------------------------------------------------------
class DecoderPlan:
    """How many workers of each kind a job runs, and which inputs the GPU ones take."""

    def __init__(self, decoder: str, cpu_workers: int | None, nvdec_sessions: int, gpu: int = 0, share: float = 1.0):
        from . import nvdec

        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}")
        self.decoder, self.gpu = decoder, gpu
        reason = check_decoder(decoder, gpu)
        self.gpu_sessions = 0 if reason else max(1, nvdec_sessions)
        self.cpu_workers = max(1, cpu_workers or default_workers(bool(self.gpu_sessions), share))
        self.jpeg = bool(self.gpu_sessions) and nvdec.gpu_jpeg_available()
        # CPU workers only take what the GPU cannot under nvdec; under auto they share the GPU's videos too
        self.gpu_first = decoder == "nvdec"
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
