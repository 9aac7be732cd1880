"""`benchmark.py --ray-scaling`: the Ray job with one pipeline actor vs several (one per GPU), encoder-bound.

The inputs are synthetic: each "video" is `--ray-clips-per-video` clips of uint8 frames [T, S, S, 3], all
the same random pattern, so the source (the pipelines' CPU decode workers run it) costs next to nothing and
the encoders are the bottleneck. Everything else is the real job (ray_job.run_ray_job): partitions, pipeline
actors (the PyTorch runner of --variant / --checkpoint / --seed), the driver's writer and summary. Per
backend (torch-fp16, torch-fp32) and pipeline count, the table gives clips/s over the whole run and in steady
state (first result to last: actor start-up left out), the speed-up over one pipeline, and the encoder alone
on one GPU in one Ray task (the ceiling per pipeline).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..decode.inputs import InputItem

log = logging.getLogger(__name__)

TARGET_TWO_GPU_SPEEDUP = 1.8


@functools.lru_cache(maxsize=4)
def _pattern(frames: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def synthetic_clips(item: InputItem, windowing, img_size: int):
    """A source (like decode.source.iter_clips): `item.path` = "synthetic/<clips>/<n>" -> <clips> clips of one
    pattern."""
    frames = _pattern(windowing.frames, img_size)
    for c in range(int(item.path.split("/")[-2])):
        yield {"start_s": float(c), "end_s": float(c + 1), "indices": list(range(windowing.frames))}, frames


def synthetic_items(videos: int, clips_per_video: int) -> list[InputItem]:
    return [InputItem(f"synthetic/{clips_per_video}/{n}", f"synthetic/{n:07d}", "synthetic") for n in range(videos)]


@dataclass(frozen=True)
class TorchRunnerFactory:
    """Builds the PyTorch runner on whichever node calls it (same weights everywhere: checkpoint or seed)."""

    variant: dict[str, Any]  # a VisionConfig as a dict (the YAML files under configs/ may not be on the node)
    checkpoint: str | None
    seed: int
    precision: str

    def __call__(self):
        from ..model import ModelSettings, load_model
        from ..models import VisionConfig
        from ..runners.torch_runner import TorchRunner

        model = load_model(ModelSettings(variant=VisionConfig(**self.variant), checkpoint=self.checkpoint,
                                         random_init=not self.checkpoint, seed=self.seed))
        return TorchRunner(model, precision=self.precision)


def encoder_alone(make_runner, batch: int, frames: int, img_size: int, seconds: float) -> dict[str, Any]:
    """clips/s of `stages.encode` (what an encoder actor calls) on one device, same uint8 batch over and over."""
    from ..engine.engine_map import local_gpu_name
    from ..job.stages import encode, warm_up

    runner = make_runner()
    warm_up(runner, batch, frames, img_size)  # compile and capture first, as the pipeline actors do
    x = np.random.default_rng(1).integers(0, 256, (batch, frames, img_size, img_size, 3), dtype=np.uint8)
    for _ in range(3):
        encode(runner, x)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        encode(runner, x)
        calls += 1
    elapsed = time.perf_counter() - started
    return {"clips_per_s": round(calls * batch / elapsed, 2), "calls": calls, "device": local_gpu_name() or "cpu"}


def run_ray_scaling(a, img_size: int, tmpdir: str) -> dict[str, Any]:
    """The benchmark (arguments `a` from bench.main.build_parser); returns its results."""
    from ..distributed.ray_job import ray_session
    from ..export.onnx_export import parse_shape

    batch, frames = parse_shape(a.ray_shape)
    address = a.ray_address or "local"
    options = {}
    if address == "local":  # a local Ray of --ray-cpus CPUs (by default ray_session would start one with all)
        store = int(a.ray_object_store_gb * 2**30) if a.ray_object_store_gb else None
        options = {"num_cpus": a.ray_cpus, "object_store_memory": store, "log_to_driver": False,
                   "logging_level": logging.WARNING}
    return _measure(ray_session(address, **options), a, batch, frames, img_size, tmpdir, address)


def _measure(session, a, batch: int, frames: int, img_size: int, tmpdir: str, address: str) -> dict[str, Any]:
    from ..decode.clips import Windowing
    from ..distributed.ray_job import cluster_resources, run_ray_job
    from ..job.settings import InferSettings
    from ..model import vision_config

    rows: list[dict[str, Any]] = []
    with session as ray:
        resources = cluster_resources(ray)
        gpus = int(resources["gpus"])
        counts = a.ray_pipelines or sorted({1, max(2, gpus)})
        backends = a.ray_backends or (["torch-fp16", "torch-fp32"] if gpus else ["torch-fp32"])
        log.info("ray scaling: %d node(s), %g CPUs, %d GPUs; pipelines %s; backends %s", resources["nodes"],
                 resources["cpus"], gpus, counts, backends)
        checkpoint = os.path.abspath(a.checkpoint) if a.checkpoint else None
        variant = dataclasses.asdict(vision_config(a.variant))
        for backend in backends:
            factory = TorchRunnerFactory(variant, checkpoint, a.seed, backend.split("-")[1])
            need = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
            task = ray.remote(max_calls=1, **need)(encoder_alone)
            alone = ray.get(task.remote(factory, batch, frames, img_size, a.target_seconds))
            log.info("%s alone on %s: %.1f clips/s", backend, alone["device"], alone["clips_per_s"])
            for n in counts:
                clips = max(4 * n * batch, int(alone["clips_per_s"] * n * a.ray_seconds))
                videos = math.ceil(clips / a.ray_clips_per_video)
                out = Path(tmpdir) / f"ray_{backend}_{n}"
                s = InferSettings(inputs=["synthetic"], output=str(out), backend="torch", variant=a.variant,
                                  checkpoint=a.checkpoint, random_init=not a.checkpoint, seed=a.seed, frames=frames,
                                  batch_size=batch, progress=False, ray=address, ray_pipelines=n,
                                  decoder="cpu",  # the synthetic source decodes nothing: no NVDEC sessions beside
                                  ray_partition_size=max(1, 4096 // a.ray_clips_per_video))
                summary = run_ray_job(s, synthetic_items(videos, a.ray_clips_per_video), Windowing(frames),
                                      source=synthetic_clips, make_runner=factory)
                r = summary["ray"]
                infer_s = sum(p["infer_seconds"] for p in summary["pipelines"])
                rows.append({"backend": backend, "pipelines": n, "gpus": gpus, "clips": summary["clips"],
                             "videos": videos, "seconds": summary["seconds"], "clips_per_s": summary["clips_per_s"],
                             "steady_clips_per_s": summary["steady_clips_per_s"], "startup_s": r["startup_s"],
                             "encode_clips_per_busy_s": round(summary["clips"] / infer_s, 3) if infer_s else None,
                             "pipelines_seen": len(summary["pipelines"]),
                             "encoder_alone_clips_per_s": alone["clips_per_s"], "device": alone["device"]})
                log.info("%s x%d: %.1f clips/s steady, %.1f over the run", backend, n,
                         summary["steady_clips_per_s"] or 0, summary["clips_per_s"])
    for r in rows:
        one = next((o for o in rows if o["backend"] == r["backend"] and o["pipelines"] == 1), None)
        r["speedup_steady"] = (round(r["steady_clips_per_s"] / one["steady_clips_per_s"], 3)
                               if one and one["steady_clips_per_s"] and r["steady_clips_per_s"] else None)
        r["speedup_run"] = round(r["clips_per_s"] / one["clips_per_s"], 3) if one and one["clips_per_s"] else None
    return {"batch": batch, "frames": frames, "img_size": img_size, "clips_per_video": a.ray_clips_per_video,
            "address": address, "cluster": resources, "rows": rows}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"## Ray scaling (synthetic uint8 clips, B={result['batch']}, T={result['frames']}, "
             f"{result['img_size']} px; {result['cluster']['nodes']} node(s), {result['cluster']['gpus']:g} GPUs, "
             f"{result['cluster']['cpus']:g} CPUs)", "",
             "clips/s (run): all clips / whole job time (actor start-up included); (steady): first result to last. "
             "speed-up: against one pipeline, steady. alone: `stages.encode` in one Ray task on one device.", "",
             "| backend | pipelines | clips | run s | clips/s (run) | clips/s (steady) | speed-up | start-up s "
             "| alone, clips/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['pipelines']} | {r['clips']} | {r['seconds']:.1f} | "
                     f"{r['clips_per_s']:.1f} | {r['steady_clips_per_s'] or 0:.1f} | "
                     f"{'n/a' if r['speedup_steady'] is None else format(r['speedup_steady'], '.2f')}x | "
                     f"{r['startup_s'] or 0:.1f} | {r['encoder_alone_clips_per_s']:.1f} ({r['device']}) |")
    return lines + [""]


def target(result: dict[str, Any]) -> dict[str, str]:
    name = f"two GPUs >= {TARGET_TWO_GPU_SPEEDUP}x one (Ray pipelines, steady state)"
    two = [r for r in result["rows"] if r["pipelines"] == 2 and r["gpus"] >= 2 and r["speedup_steady"]]
    if not two:
        return {"name": name, "status": "not measured", "detail": "needs a cluster with 2 GPUs"}
    best = max(two, key=lambda r: r["speedup_steady"])
    detail = "; ".join(f"{r['backend']}: {r['speedup_steady']:.2f}x ({r['steady_clips_per_s']:.0f} clips/s)"
                       for r in two)
    return {"name": name, "status": "met" if best["speedup_steady"] >= TARGET_TWO_GPU_SPEEDUP else "MISSED",
            "detail": detail}
