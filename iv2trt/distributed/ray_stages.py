"""What runs on the Ray cluster: the decode tasks and the encoder actors (the driver is ray_job.py).

Both wrap the shared stages (job/stages.py, decode.source.iter_clips); this module only adds the row format Ray Data
moves between them. One row per clip:

  number       position of the input in the job's input list (the driver maps it back to path and id)
  clip         clip index within the input
  count        the input's number of clips, on its last clip row (0 on the others)
  info         JSON of the clip's window: start_s, end_s, indices
  error        "" for a clip; else the input's failure reason (the row then carries no frames)
  frames       uint8 [T, S, S, 3]; float32 .npy clips travel as their bytes (uint8, last axis x4) with
               is_float set, so the column keeps one dtype
  is_float     see frames
  decode_s     seconds the source spent on this row; decode_node
The encoder replaces frames by `feature` (float32 [D], L2-normalised; zeros on failure rows) and adds
encode_s (its share of the batch's inference time), encoder ("node/actor") and batch_id.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..compare import l2_normalize
from ..job.stages import (
    DecodeStalled,
    check_frame_count,
    clip_frames_problem,
    clips_with_deadline,
    host_buffer,
    start_inference,
    timeout_reason,
    warm_up,
)

ROWS_PER_OUTPUT = 8  # decoded clips per output batch of a decode task (keeps the stream moving)
NO_FRAMES = np.zeros((0, 0, 0, 0), np.uint8)


def worker_setup() -> None:
    """Ray's worker_process_setup_hook for the job (ray_job.runtime_env): every worker imports torch when it
    starts, before any task. Imported lazily inside a task instead (the decoders' resize on first use), an
    import interrupted with its task (cancelled as a job stops) leaves a half-imported torch in a worker that
    Ray reuses, and every later import of it there fails ("Only a single TORCH_LIBRARY can be used to register
    the namespace triton": seen once in a CI run of tests/test_ray_job.py)."""
    import torch  # noqa: F401


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def _info_json(info: dict[str, Any]) -> str:
    return json.dumps({"start_s": float(info["start_s"]), "end_s": float(info["end_s"]),
                       "indices": [int(i) for i in info["indices"]]})


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode task needs: the source (decode.source.iter_clips, or a benchmark's), how to cut clips, what the
    model takes (frames outside its range fail the input, as in the local job) and the per-clip deadline."""

    source: Callable
    windowing: Any
    img_size: int
    frame_range: tuple[int, int | None]
    runner_name: str
    timeout_s: float


def decode_rows(item, number: int, spec: DecodeSpec, node: str) -> Iterator[dict[str, Any]]:
    """The rows of one input: its clips (the last one with `count`), or one failure row."""
    from ..decode.clips import DecodeError

    def failure(reason: str, seconds: float) -> dict[str, Any]:
        return {"number": number, "clip": -1, "count": 0, "info": "", "error": reason, "frames": NO_FRAMES,
                "is_float": False, "decode_s": seconds, "decode_node": node}

    held, count = None, 0  # the newest clip is held back until we know whether it is the last
    started = time.perf_counter()
    try:
        for info, frames in clips_with_deadline(spec.source(item, spec.windowing, spec.img_size), spec.timeout_s):
            seconds = time.perf_counter() - started
            problem = clip_frames_problem(frames.shape[0], spec.frame_range, spec.runner_name)
            if problem:
                raise DecodeError(problem)
            if held is not None:
                yield held
            is_float = frames.dtype != np.uint8
            held = {"number": number, "clip": count, "count": 0, "info": _info_json(info), "error": "",
                    "frames": np.ascontiguousarray(frames, np.float32).view(np.uint8) if is_float else frames,
                    "is_float": is_float, "decode_s": seconds, "decode_node": node}
            count += 1
            started = time.perf_counter()
    except DecodeError as exc:
        yield failure(exc.reason, time.perf_counter() - started)
        return
    except DecodeStalled:
        yield failure(timeout_reason(spec.timeout_s), time.perf_counter() - started)
        return
    except Exception as exc:  # a decoder bug must not stop the job: it is this input's failure
        yield failure(f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
        return
    if held is None:
        yield failure("no clips", time.perf_counter() - started)
        return
    held["count"] = count
    yield held


def _batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {key: np.array([r[key] for r in rows]) for key in rows[0] if key != "frames"}
    frames = [r["frames"] for r in rows]
    out["frames"] = np.stack(frames) if len({f.shape for f in frames}) == 1 else frames
    return out


def decode_batch(batch: dict[str, np.ndarray], spec: DecodeSpec) -> Iterator[dict[str, Any]]:
    """Ray Data UDF (task): inputs (number, path, id, kind) -> clip rows, a few at a time."""
    from ..decode.inputs import InputItem

    node = _node()
    rows: list[dict[str, Any]] = []
    for number, path, item_id, kind in zip(batch["number"], batch["path"], batch["id"], batch["kind"]):
        for row in decode_rows(InputItem(str(path), str(item_id), str(kind)), int(number), spec, node):
            rows.append(row)
            if len(rows) == ROWS_PER_OUTPUT:
                yield _batch(rows)
                rows = []
    if rows:
        yield _batch(rows)


def clip_frames(frames: np.ndarray, is_float: bool) -> np.ndarray:
    """A row's frames as the runner takes them (float32 .npy clips viewed back from their bytes)."""
    return frames.view(np.float32) if is_float else frames


class Encoder:
    """Ray Data UDF (actor, one per GPU): clip rows -> feature rows, through the runner `make_runner` builds.

    Clips are grouped by (dtype, shape), copied into a batch buffer (pinned when the runner offers one)
    and run through `stages.start_inference`; a lock covers the start only, so with two calls in flight
    (max_concurrency=2) a runner with submit_uint8 uploads the next batch while computing this one.
    A runner with `warm_up` (PyTorch on a GPU) compiles and captures its full-batch CUDA graph in __init__,
    before any call: a capture must not overlap another thread's CUDA calls, and partial batches replay the
    full batch's graph. A runner that cannot be built here (an engine for another GPU, say) fails the actor's
    first batch with that PipelineError: raised in __init__, it would reach the driver as a bare ActorDiedError."""

    PASSED = ("number", "clip", "count", "info", "error", "decode_s", "decode_node")

    def __init__(self, make_runner: Callable[[], Any], feature_dim: int, batch_size: int, frames: int,
                 img_size: int):
        import ray

        from ..errors import PipelineError

        self.runner, self.broken = None, None
        try:
            self.runner = make_runner()
            warm_up(self.runner, batch_size, frames, img_size)
        except PipelineError as exc:
            self.broken = exc
        self.feature_dim, self.batch_size = feature_dim, batch_size
        self.name = f"{_node()}/{ray.get_runtime_context().get_actor_id()[:12]}"  # node/actor
        self.lock = threading.Lock()
        self.free: dict[tuple, list[np.ndarray]] = {}
        self.calls = 0

    def _buffer(self, key: tuple, rows: int) -> np.ndarray:
        """A free batch buffer for clips of `key` (allocated under the lock: pinning memory is a CUDA call)."""
        with self.lock:
            free = self.free.get(key)
            if free:
                return free.pop()
            return host_buffer(self.runner, (max(rows, self.batch_size), *key[1]), np.dtype(key[0]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.broken is not None:
            raise self.broken
        n = len(batch["number"])
        features = np.zeros((n, self.feature_dim), np.float32)
        encode_s = np.zeros(n)
        clips: dict[tuple, list[tuple[int, np.ndarray]]] = {}  # (dtype, shape) -> (row, frames) of each clip
        for i in np.flatnonzero(batch["error"] == ""):
            frames = clip_frames(batch["frames"][i], bool(batch["is_float"][i]))
            clips.setdefault((frames.dtype.str, frames.shape), []).append((int(i), frames))
        for key, group in clips.items():
            rows = [i for i, _ in group]
            buf = self._buffer(key, len(rows))
            for slot, (_, frames) in enumerate(group):
                buf[slot] = frames
            started = time.perf_counter()
            with self.lock:
                wait = start_inference(self.runner, buf[:len(rows)])
            features[rows] = l2_normalize(wait())
            encode_s[rows] = (time.perf_counter() - started) / len(rows)
            with self.lock:
                if len(buf) >= self.batch_size:
                    self.free.setdefault(key, []).append(buf)
        with self.lock:
            self.calls += 1
            call = self.calls
        out = {key: batch[key] for key in self.PASSED}
        out.update(feature=features, encode_s=encode_s, encoder=np.full(n, self.name), batch_id=np.full(n, call))
        return out


@dataclass(frozen=True)
class SettingsRunner:
    """Builds the job's runner on whichever node calls it (a picklable factory for Ray): `create_runner` with
    the engine the engine map names for this node's GPU. `variant`: the PyTorch model's config as a dict (the
    YAML files under configs/ stay on the driver's machine). Errors name the node and GPU."""

    settings: Any
    variant: dict[str, Any] | None = None

    def __call__(self):
        from ..engine.engine_map import local_gpu_name, settings_for_this_gpu
        from ..errors import PipelineError
        from ..runners.choice import create_runner

        s = self.settings
        if self.variant is not None:
            from ..models import VisionConfig

            s = dataclasses.replace(s, variant=VisionConfig(**self.variant))
        try:
            return create_runner(settings_for_this_gpu(s))
        except PipelineError as exc:
            gpu = local_gpu_name()
            hint = f"; to use another engine on {gpu}, add it to --engines as '{gpu}=PATH'" if gpu else ""
            raise type(exc)(f"{exc} [Ray node {_node()}, GPU {gpu or 'none'}{hint}]") from None


def probe_runner(make_runner: Callable[[], Any], frames: int, settings) -> dict[str, Any]:
    """What the driver needs to know about the runner before the job (run on a node like the encoders'):
    name, input size, frame range, max batch, feature size, and the job's identity (`job.identity.job_identity`,
    which needs the runner). Raises what the runner raises, and PipelineError when it does not take clips
    of `frames` frames."""
    from ..job.identity import job_identity
    from ..runners.base import infer_frames
    from ..runners.choice import runner_img_size

    runner = make_runner()
    try:
        check_frame_count(runner, frames)
        img_size = runner_img_size(runner)
        feature_dim = infer_frames(runner, np.zeros((1, frames, img_size, img_size, 3), np.uint8)).shape[-1]
        return {"name": runner.name, "img_size": img_size, "frame_range": tuple(runner.frame_range),
                "max_batch": runner.max_batch, "feature_dim": int(feature_dim),
                "identity": job_identity(settings, runner, img_size)}
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()


def decode_blocks(inputs: int, cpus: float, most_per_block: int = 16) -> int:
    """How many blocks (decode tasks) `inputs` inputs become: about 4 per CPU, at most `most_per_block` inputs
    each (a retried task redoes little)."""
    per_block = max(1, min(most_per_block, math.ceil(inputs / max(1.0, 4 * cpus))))
    return max(1, math.ceil(inputs / per_block))
