"""What runs on the Ray cluster: one pipeline actor per GPU (one per node on a cluster without GPUs); the driver is
ray_job.py.

The actor runs the job's own pipeline (job/pipeline.py), exactly as the local job does: its GPU's NVDEC sessions
and its share of the node's CPU decode workers, the batcher, the runner and the L2 normalisation. Only input
records go in and feature rows come out: no pixels travel through Ray's object store. One row per clip:

  number     position of the input in the job's input list (the driver maps it back to path and id)
  clip       clip index within the input
  count      the input's number of clips, on its last clip row (0 on the others)
  info       JSON of the clip's window: start_s, end_s, indices
  error      "" for a clip; else the input's failure reason (one row, clip -1, a zero feature)
  feature    float32 [D], L2-normalised
  pipeline   "node/actor" of the pipeline that made it; stats: JSON of that pipeline's summary so far
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, Callable

import numpy as np

from ..decode.inputs import InputItem
from ..decode.workers import start_worker_server
from ..errors import PipelineError
from ..job.factory import close_runner, describe_runner
from ..job.pipeline import JobOptions, Pipeline

log = logging.getLogger(__name__)


def worker_setup() -> None:
    """Ray's worker_process_setup_hook for the job (ray_job.runtime_env): every worker imports torch when it
    starts, before any task. Imported lazily inside a task instead, an import interrupted with its task
    (cancelled as a job stops) leaves a half-imported torch in a worker that Ray reuses, and every later import
    of it there fails ("Only a single TORCH_LIBRARY can be used to register the namespace triton": seen once in
    a CI run of tests/test_ray_job.py)."""
    import torch  # noqa: F401


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def node_where() -> str:
    """Where a runner is being built, for its errors (job.factory.SettingsRunner)."""
    return f"Ray node {_node()}"


def _info_json(info: dict[str, Any]) -> str:
    return json.dumps({"start_s": float(info["start_s"]), "end_s": float(info["end_s"]),
                       "indices": [int(i) for i in info["indices"]]})


class _Results:
    """The actor's sink: each input's outcome, kept until the call that fed it takes it."""

    def __init__(self):
        self.done: dict[int, tuple] = {}

    def finished(self, number: int, item: InputItem, infos: list[dict[str, Any]], features: np.ndarray) -> None:
        self.done[number] = (infos, features, "")

    def failed(self, number: int, item: InputItem, reason: str) -> None:
        self.done[number] = ([], None, reason)


class PipelineActor:
    """Ray Data UDF (an actor): input records (number, path, id, kind) -> feature rows, through one pipeline.

    Two calls may run at once (max_concurrent_calls_per_actor=2): each feeds its inputs and steps the shared
    pipeline under a lock until its own inputs are done, so the decoders never wait for a call to finish. A
    runner that cannot be built here (an engine for another GPU, say) fails the actor's first call with that
    PipelineError: raised in __init__, it would reach the driver as a bare ActorDiedError."""

    def __init__(self, make_runner: Callable[[], Any], options: JobOptions, feature_dim: int, cpus: float):
        import os
        import time

        import ray

        started = time.perf_counter()
        self.feature_dim, self.broken = feature_dim, None
        self.name = f"{_node()}/{ray.get_runtime_context().get_actor_id()[:12]}"
        self.results = _Results()
        self.lock = threading.Lock()
        self.pipeline = None
        # summaries sent, numbered within this incarnation: Ray restarts an actor that died under the same name, and
        # the driver keeps the summary with the highest [incarnation, snapshots]
        self.snapshots, self.incarnation = 0, time.time()
        try:
            start_worker_server()  # comes up while the runner is built
            runner = make_runner()
            options = dataclasses.replace(options, cpu_share=min(1.0, cpus / (os.cpu_count() or 1)))
            self.pipeline = Pipeline(runner, options, self.results, name=self.name).start()
        except PipelineError as exc:
            self.broken = exc
        self.start_s = round(time.perf_counter() - started, 3)  # runner built, decoders started

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.broken is not None:
            raise self.broken
        numbers = [int(n) for n in batch["number"]]
        with self.lock:
            for number, path, item_id, kind in zip(numbers, batch["path"], batch["id"], batch["kind"]):
                self.pipeline.feed(number, InputItem(str(path), str(item_id), str(kind)))
        while True:
            with self.lock:
                if all(n in self.results.done for n in numbers):
                    outcomes = [self.results.done.pop(n) for n in numbers]
                    self.snapshots += 1  # (the driver keeps the summary numbered last)
                    stats = json.dumps({**self.pipeline.summary(), "actor_start_s": self.start_s,
                                        "snapshot": [self.incarnation, self.snapshots]})
                    break
                self.pipeline.step()
        return feature_rows(numbers, outcomes, self.feature_dim, self.name, stats)

    def __del__(self):
        """Ray Data's graceful end of an actor (its last call done, before the process exits): close the pipeline,
        its NVDEC sessions, inference thread and CPU workers stopped and waited for, and its runner. (Ray also kills
        an exiting worker's child processes; workers found dead here are simply joined.)"""
        pipeline, self.pipeline = getattr(self, "pipeline", None), None
        if pipeline is None:
            return
        try:
            pipeline.close()
        except Exception as exc:  # noqa: BLE001 - the actor is going; the job's results are already back
            log.warning("pipeline %s did not close cleanly: %s", self.name, exc)
        finally:
            runner = pipeline.runner
            del pipeline
            close_runner(runner)


def feature_rows(numbers: list[int], outcomes: list[tuple], feature_dim: int, pipeline: str, stats: str
                 ) -> dict[str, np.ndarray]:
    """The rows (columns) of a call: each input's clips in order, its count on the last; a failed input as one
    row with its reason and a zero feature."""
    rows: dict[str, list] = {k: [] for k in ("number", "clip", "count", "info", "error", "feature")}
    for number, (infos, features, error) in zip(numbers, outcomes):
        if error:
            infos, features = [None], np.zeros((1, feature_dim), np.float32)
        for clip, (info, feature) in enumerate(zip(infos, features)):
            rows["number"].append(number)
            rows["clip"].append(-1 if error else clip)
            rows["count"].append(len(infos) if not error and clip == len(infos) - 1 else 0)
            rows["info"].append("" if error else _info_json(info))
            rows["error"].append(error)
            rows["feature"].append(np.asarray(feature, np.float32))
    n = len(rows["number"])
    out = {k: np.array(v) for k, v in rows.items() if k != "feature"}
    out.update(feature=np.stack(rows["feature"]) if n else np.zeros((0, feature_dim), np.float32),
               pipeline=np.full(n, pipeline), stats=np.full(n, stats))
    return out


def probe_runner(make_runner: Callable[[], Any], frames: int, settings) -> dict[str, Any]:
    """describe_runner on a node like the actors' (the driver needs the runner's facts before the job)."""
    runner = make_runner()
    try:
        return describe_runner(runner, settings, frames)
    finally:
        close_runner(runner)
