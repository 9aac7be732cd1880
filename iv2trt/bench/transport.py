"""`benchmark.py --plane-transport`: how CPU decode workers' planes reach the job's process, shared memory
(decode/plane_ring.py) against the pipe, with decoding left out: each worker sends the same synthetic clip
over and over, and the job's process takes them in as the pipeline does (then copies them to the GPU where
there is one, else into a staging buffer, as the CUDA driver does for a copy from pageable memory).

The figure that matters is the job's process's CPU time per clip: that process also runs the NVDEC sessions'
threads and the batching loop, under one GIL."""
from __future__ import annotations

import logging
import time
from multiprocessing.connection import wait
from typing import Any, Iterator

import numpy as np

from ..decode.clips import Windowing
from ..decode.gpu_frames import YuvClip
from ..decode.inputs import InputItem

log = logging.getLogger(__name__)

_PLANES: dict[tuple[int, int, int], np.ndarray] = {}


def synthetic_clips(item: InputItem, w: Windowing, img_size: int) -> Iterator[tuple[dict, YuvClip]]:
    """A worker's source: `item.path` is "WIDTHxHEIGHT:CLIPS"; yields that many clips of the same random planes."""
    size, count = item.path.split(":")
    width, height = map(int, size.split("x"))
    key = (w.frames, height, width)
    if key not in _PLANES:
        _PLANES[key] = np.random.default_rng(0).integers(0, 256, (w.frames, height * 3 // 2, width), np.uint8)
    for i in range(int(count)):
        yield {"start_s": float(i), "end_s": float(i + 1), "indices": []}, YuvClip(_PLANES[key], 1, 1, "yuv420p",
                                                                                    height, width, 0.0)


def _take_in(planes: np.ndarray, staging) -> None:
    if isinstance(staging, np.ndarray):
        np.copyto(staging[:planes.size].reshape(planes.shape), planes)
    else:
        import torch

        staging[:planes.size].view(planes.shape).copy_(torch.from_numpy(planes), non_blocking=False)


def transport_run(size: tuple[int, int], frames: int, workers: int, clips: int, shared_memory: bool
                  ) -> dict[str, Any]:
    """`workers` CPU workers each send `clips` clips of `size` (width, height); the job's process takes them in."""
    from ..decode.workers import CpuWorker, worker_context

    width, height = size
    nbytes = frames * height * 3 // 2 * width
    try:
        import torch

        staging = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if torch.cuda.is_available() else None
    except ImportError:
        staging = None
    if staging is None:
        staging = np.empty(nbytes, np.uint8)
    ctx = worker_context()
    pool = [CpuWorker(ctx, Windowing(frames), 224, synthetic_clips, ring=shared_memory) for _ in range(workers)]
    try:
        rings = sum(wk.ring is not None for wk in pool)
        for i, wk in enumerate(pool):  # one clip each first: the workers' start-up is not timed
            wk.assign(i, InputItem(f"{width}x{height}:1", "warm", "video"))
        _drain(pool, staging)
        for i, wk in enumerate(pool):
            wk.assign(i, InputItem(f"{width}x{height}:{clips}", "run", "video"))
        wall, cpu = time.perf_counter(), time.thread_time()
        received = _drain(pool, staging)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    finally:
        for wk in pool:
            wk.stop()
    return {"size": f"{width}x{height}", "frames": frames, "clip_mb": round(nbytes / 1e6, 2), "workers": workers,
            "transport": "shared memory" if shared_memory and rings == workers else "pipe", "clips": received,
            "seconds": round(wall, 3), "clips_per_s": round(received / wall, 1),
            "receiver_cpu_ms_per_clip": round(1000 * cpu / received, 3), "gpu": not isinstance(staging, np.ndarray)}


def _drain(pool, staging) -> int:
    """Take in every message until each worker says done; the clips received."""
    busy, received = set(pool), 0
    while busy:
        for conn in wait([wk.conn for wk in busy]):
            wk = next(w for w in busy if w.conn is conn)
            message, slot = wk.receive()
            if message[0] == "clip":
                _take_in(message[3].planes, staging)
                received += 1
                if slot is not None:
                    wk.give_back(slot)
            else:
                busy.discard(wk)
                wk.task = None
    return received


def run_plane_transport(sizes: list[str], frames: int, workers: list[int], clips: int) -> dict[str, Any]:
    rows = []
    for size in sizes:
        width, height = map(int, size.lower().split("x"))
        for n in workers:
            for shared in (False, True):
                row = transport_run((width, height), frames, n, clips, shared)
                log.info("%s, %d worker(s), %s: %.1f clips/s, %.2f ms of the job's process's CPU per clip", size, n,
                         row["transport"], row["clips_per_s"], row["receiver_cpu_ms_per_clip"])
                rows.append(row)
    return {"rows": rows, "clips_per_worker": clips}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["## CPU workers' planes to the job's process (--plane-transport; decoding left out)", "",
             "| clip | workers | transport | clips/s | job's process CPU ms per clip | taken in by |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['size']} x {r['frames']} ({r['clip_mb']} MB) | {r['workers']} | {r['transport']} | "
                     f"{r['clips_per_s']:.1f} | {r['receiver_cpu_ms_per_clip']:.2f} | "
                     f"{'copy to the GPU' if r['gpu'] else 'copy to a staging buffer'} |")
    return lines + [""]
