"""The Ray executor: `trt_inference.py --ray [ADDRESS]` runs the extraction job as a Ray Data pipeline.

    driver (this process)                        cluster (ray_stages.py)
    discover inputs, cut them into partitions
    ray.data.from_items(inputs)  ------------->  pipeline actors: --pipelines-per-gpu per GPU (one per node
                                                 without GPUs),
                                                 each the local job's pipeline: its GPU's NVDEC sessions,
                                                 CPU decode workers, TensorRT / PyTorch / ONNX Runtime
    iter_batches(feature rows)  <--------------
    PartitionAssembler: one shard per partition (FeatureWriter), failures.jsonl, job.json, summary.json

Only input records go to the actors and feature rows come back: no pixels in the object store. Only the
driver writes, so the output directory needs to exist on this machine alone; inputs and model files must
be readable at the same paths on every node. The package's code travels with the job (Ray's py_modules);
each node needs the Python packages of requirements.txt (+ -gpu on GPU nodes) and Ray. Every input goes
through the same pipeline and writer code as in the local job, and the output is laid out the same way, so
`finished_ids`, resume and `load_features` cannot tell which executor ran. Exactly once: see
partitions.py. Ray restarts pipeline actors (also on other nodes when one dies) and retries their calls;
a rerun skips committed partitions and redoes the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..decode.inputs import InputItem
from ..errors import BackendUnavailable, PipelineError

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent  # iv2trt/
INSTALL_HINT = "pip install -r requirements-distributed.txt"


def import_ray():
    """The ray module (with Ray Data); BackendUnavailable (exit 4) with the install command when missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"--ray needs Ray, which is not installed here ({exc}): {INSTALL_HINT}, or run "
                                 "without --ray (the local job)") from None
    return ray


def runtime_env() -> dict[str, Any]:
    """This checkout's packages, shipped to every worker (the nodes need the dependencies, not the code), and
    the workers' setup hook (ray_stages.worker_setup: torch imported before any task)."""
    return {"py_modules": [str(PACKAGE)], "excludes": ["__pycache__", "*.pyc"],
            "worker_process_setup_hook": "iv2trt.distributed.ray_stages.worker_setup"}


@contextlib.contextmanager
def ray_session(address: str, **init_options) -> Iterator[Any]:
    """Ray connected to `address` ('local': a new Ray on this machine, shut down afterwards; 'auto': the cluster
    this machine joined with `ray start`; HOST:PORT or ray://HOST:PORT: that cluster). `init_options`: more
    ray.init options (over the defaults) for a Ray this call starts."""
    ray = import_ray()
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    owned = not ray.is_initialized()
    if owned:
        options: dict[str, Any] = {"address": address, "runtime_env": runtime_env(), "log_to_driver": verbose,
                                   "logging_level": logging.INFO if verbose else logging.WARNING}
        if address == "local":
            options["include_dashboard"] = False
        options.update(init_options)
        try:
            ray.init(**options)
        except ConnectionError as exc:
            raise PipelineError(f"--ray {address}: no Ray cluster there ({exc}); start one with `ray start --head` "
                                "(see README, 'Running on a Ray cluster'), or pass --ray with no address for a "
                                "local Ray") from None
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose  # our own bar counts videos; -v adds Ray Data's per-operator bars
    ctx.raise_original_map_exception = True  # a PipelineError of a stage reaches the driver as itself (exit code)
    # every pipeline actor up (its runner built, its decoders started) before any input is handed out, as the
    # local job waits for its pipelines: else the first ready actor takes a short job alone
    ctx.wait_for_min_actors_s = ACTORS_START_S
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


def _absolute(path: str | None) -> str | None:
    """An existing file's path as the nodes need it (a worker's working directory is not the driver's)."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def node_settings(s):
    """Settings `s` with the file paths the nodes open made absolute."""
    from ..engine.engine_map import parse_engine_map

    return dataclasses.replace(s, onnx=_absolute(s.onnx), engine=_absolute(s.engine),
                               checkpoint=_absolute(s.checkpoint), align_checkpoint=_absolute(s.align_checkpoint),
                               engines=[f"{k}={_absolute(v)}" for k, v in parse_engine_map(s.engines).items()])


def settings_runner(s):
    """The runner factory the actors call for settings `s` (job.factory.SettingsRunner, naming the node in its
    errors); the PyTorch backend (asked for, or one `auto` may choose on a GPU node) gets the model variant's
    config along (the YAML files under configs/ stay here)."""
    from ..job.factory import SettingsRunner
    from ..model import vision_config
    from ..runners.choice import has_weights
    from .ray_stages import node_where

    torch_possible = s.backend == "torch" or (s.backend == "auto" and has_weights(s))
    variant = None
    if torch_possible and isinstance(s.variant, (str, Path)):
        variant = dataclasses.asdict(vision_config(s.variant))
    return SettingsRunner(node_settings(s), variant, where=node_where)


def cluster_resources(ray) -> dict[str, Any]:
    """The cluster's nodes, CPUs and GPUs, and the fewest CPUs a node has per GPU (per node without GPUs)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    workers = [n for n in nodes if n.get("CPU")]  # (a head node without CPUs only hosts the driver's connection)
    gpu_nodes = [n for n in workers if n.get("GPU")]
    per = [n["CPU"] / n["GPU"] for n in gpu_nodes] if gpu_nodes else [n["CPU"] for n in workers]
    return {"nodes": len(nodes), "cpu_nodes": len(workers), "cpus": float(sum(n.get("CPU", 0) for n in nodes)),
            "gpus": float(sum(n.get("GPU", 0) for n in nodes)), "cpus_per_pipeline": float(min(per, default=0))}


def pipeline_plan(s, resources: dict[str, Any], encoder_on_cpu: bool = False) -> tuple[int, dict[str, Any]]:
    """(number of pipeline actors, Ray resources of each): --pipelines-per-gpu per GPU (each a fraction of its GPU;
    by default two where the GPUs decode with NVDEC, as locally, and one where the runner probed on a node
    encodes on the CPU: `encoder_on_cpu`), or one per node on a cluster without GPUs, each with its share of the
    node's CPUs per GPU (`--ray-pipeline-cpus` to choose)."""
    from ..decode.plan import pipelines_per_gpu

    gpus, nodes = int(resources["gpus"]), resources["cpu_nodes"]
    # (the driver cannot see the workers' PyNvVideoCodec: the decoder setting decides)
    per_gpu = pipelines_per_gpu(s.pipelines_per_gpu, s.decoder, nvdec_installed=True,
                                encoder_on_cpu=encoder_on_cpu and not s.ray_pipelines)
    most = gpus * per_gpu or nodes
    count = s.ray_pipelines or most
    # (more pipelines than nodes on a cluster without GPUs share the nodes' CPUs)
    cpus = s.ray_pipeline_cpus or max(1.0, float(int(resources["cpus_per_pipeline"] * (gpus or nodes)
                                                     / max(count, gpus or nodes))))
    if gpus and count > most:
        raise PipelineError(f"--ray-pipelines {count}: the cluster has {gpus} GPU(s), {per_gpu} pipeline(s) each "
                            "(--pipelines-per-gpu)")
    if count * cpus > resources["cpus"]:
        raise PipelineError(f"{count} pipeline(s) x {cpus:g} CPUs do not fit the cluster's {resources['cpus']:g} "
                            "CPUs: lower --ray-pipelines / --ray-pipeline-cpus, or add nodes")
    need = {"num_gpus": 1 / per_gpu if count > gpus else 1, "num_cpus": cpus} if gpus else {"num_cpus": cpus}
    return count, need


def pipeline_error(exc: BaseException) -> PipelineError | None:
    """The PipelineError (raised by our code on a node) inside what Ray raised, or None."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError) and type(e).__module__.startswith("iv2trt"):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


ACTORS_START_S = 600      # the longest wait for the pipeline actors to start (a model to load, maybe compile)
MOST_INPUTS_PER_CALL = 48  # inputs per call of a pipeline actor; two calls run at once, so up to 96 are in hand: a
                           # call returns when its last input is done, and a pipeline of 8 NVDEC sessions and 8 CPU
                           # workers fed 16 per call had its decoders busy about 60% of the time (H200, 9ff2adf)


def build_pipeline(ray, records: list[dict[str, Any]], make_runner, options, feature_dim: int, actors: int,
                   need: dict[str, Any]):
    """inputs -> pipeline actors, as a lazy Ray Dataset of feature rows (ray_stages.py). Each actor runs two
    calls at once, so its decoders have the next inputs while a call's last input finishes; a small job is cut
    into calls of fewer inputs, so that every actor gets some and results come back as they finish."""
    from .ray_stages import PipelineActor

    per_call = max(1, min(MOST_INPUTS_PER_CALL, -(-len(records) // (4 * actors))))
    ds = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // per_call)))
    pool = ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, max_tasks_in_flight_per_actor=2,
                                      enable_true_multi_threading=True)  # (more calls queued at one actor: idle others)
    args = {"make_runner": make_runner, "options": options, "feature_dim": feature_dim, "cpus": need["num_cpus"]}
    return ds.map_batches(PipelineActor, fn_constructor_kwargs=args, batch_size=per_call, compute=pool,
                          **need)


class Collector:
    """Driver: feature rows -> PartitionAssembler; keeps each pipeline's latest summary and the clips per node."""

    def __init__(self, assembler, bar):
        from ..job.stages import ResultClock

        self.assembler, self.bar = assembler, bar
        self.pipelines: dict[str, dict] = {}  # "node/actor" -> its summary so far (the one taken last)
        self.encoded: Counter = Counter()               # clips per node
        self.clock = ResultClock()  # the first result batch comes after the actors' start-up

    def _keep_newest(self, name: str, stats: dict) -> None:
        """An actor's two calls can end close together and reach the driver in either order (on an H200 a summary
        two inputs short was kept): the summary numbered last wins, a restarted actor's over its dead
        incarnation's (snapshot: [incarnation's start time, number])."""
        kept = self.pipelines.get(name)
        if kept is None or stats["snapshot"] > kept["snapshot"]:
            self.pipelines[name] = stats

    def add(self, batch: dict[str, np.ndarray]) -> None:
        clips = sum(self.encoded.values())
        a = self.assembler
        for name, stats in dict(zip(map(str, batch["pipeline"]), map(str, batch["stats"]))).items():
            self._keep_newest(name, json.loads(stats))
        for i in range(len(batch["number"])):
            number, error, pipeline = int(batch["number"][i]), str(batch["error"][i]), str(batch["pipeline"][i])
            if error:  # the actor saw the absolute path: name the input as it was given, like the local job
                path = a.items[number].path
                a.add_failure(number, error.replace(_absolute(path), path))
                continue
            self.encoded[pipeline.split("/")[0]] += 1
            a.add_clip(number, int(batch["clip"][i]), json.loads(str(batch["info"][i])),
                       np.array(batch["feature"][i]), int(batch["count"][i]))
        self.clock.add(sum(self.encoded.values()) - clips)
        elapsed = self.clock.last_s
        self.bar.set_postfix_str(f"{a.stats['clips'] / max(elapsed, 1e-9):.1f} clips/s, {a.stats['failed']} failed",
                                 refresh=False)


def run_ray_job(s, items: Sequence[InputItem], windowing, source=None, make_runner=None) -> dict[str, Any]:
    """Run the job described by settings `s` (InferSettings) over `items` on Ray; returns the summary.

    `source(item, windowing, img_size)` yields an input's clips in the actors' CPU decode workers (default:
    decode.source.iter_clips); `make_runner()` builds the runner on a node (default: the one `s` names, with the
    engine map applied). Benchmarks replace them."""
    from tqdm import tqdm

    from ..decode.source import iter_clips
    from ..job.factory import SettingsRunner
    from ..job.host import describe, warn_if_stolen
    from ..job.identity import complete_identity, finish_summary
    from ..job.summary import merge_summaries
    from ..job.pipeline import JobOptions
    from ..job.stages import log_done, whole_run
    from ..output.writer import FailureLog, FeatureWriter, prepare_output
    from .partitions import PartitionAssembler, plan_partitions
    from .ray_stages import probe_runner

    if s.compare_pytorch:
        raise PipelineError("--compare-pytorch runs in the local job only: drop --ray for that check")
    called = time.perf_counter()
    with ray_session(s.ray) as ray:
        try:
            startup = {"ray_s": round(time.perf_counter() - called, 3)}
            resources = cluster_resources(ray)
            actors, need = pipeline_plan(s, resources)
            make_runner = make_runner or settings_runner(s)
            probe = ray.remote(max_calls=1, **need)(probe_runner)
            probing = time.perf_counter()
            info = ray.get(probe.remote(make_runner, s.frames, node_settings(s)))
            startup["runner_probe_s"] = round(time.perf_counter() - probing, 3)
            log.info("Ray up in %.1f s; the runner probed on a node in %.1f s", startup["ray_s"],
                     startup["runner_probe_s"])
            if isinstance(make_runner, SettingsRunner):  # every pipeline runs the backend the probe chose
                s = dataclasses.replace(s, backend=info["name"])
                make_runner = make_runner.with_backend(info["name"])
            if info["device"] == "cpu" and resources["gpus"]:  # as locally: its sessions each take every core
                plan = pipeline_plan(s, resources, encoder_on_cpu=True)
                if plan[0] != actors:
                    log.info("the runner encodes on the CPU on the nodes (%s): %d pipeline(s), not %d",
                             info["name"], plan[0], actors)
                    actors, need = plan
            identity = complete_identity(info["identity"], s)
            done = prepare_output(s.output, identity, s.overwrite)
            partitions, committed = plan_partitions(items, s.ray_partition_size, done)
            numbers = [n for p in partitions for n in p.numbers]
            log.info("%d inputs found, %d to do, %d already done in %s; %d partitions of <= %d inputs (%d committed "
                     "before); Ray: %d node(s), %g CPUs, %g GPUs; %d %s pipeline(s) of %g CPUs (%s)", len(items),
                     len(numbers), len(items) - len(numbers), s.output, len(partitions) + committed,
                     s.ray_partition_size, committed, resources["nodes"], resources["cpus"], resources["gpus"],
                     actors, "GPU" if "num_gpus" in need else "CPU", need["num_cpus"], info["name"])
            options = JobOptions(windowing, info["img_size"], s.batch_size, s.workers, s.decode_timeout_s, False,
                                 s.decoder, s.nvdec_sessions, source=source or iter_clips, gpu_convert=s.gpu_convert,
                                 shared_memory=s.shared_memory, decode_threads=s.decode_threads,
                                 probe_processes=s.nvdec_probe_processes, encoder_graphs=s.encoder_graphs)
            writer = FeatureWriter(s.output, s.dtype, shard_size=sys.maxsize, per_video_npy=s.per_video_npy)
            failures = FailureLog(s.output)
            bar = tqdm(total=len(numbers), unit="video", disable=not s.progress, mininterval=1.0, dynamic_ncols=True,
                       file=sys.stderr)
            collector = Collector(PartitionAssembler(items, partitions, writer, failures,
                                                     lambda ok: bar.update(1)), bar)
            started = time.perf_counter()
            try:
                if numbers:
                    records = [{"number": n, "path": _absolute(items[n].path), "id": items[n].id,
                                "kind": items[n].kind} for n in numbers]
                    ds = build_pipeline(ray, records, make_runner, options, info["feature_dim"], actors, need)
                    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                        collector.add(batch)
            finally:
                bar.close()
        except Exception as exc:
            cause = pipeline_error(exc)
            if cause is not None:
                raise cause from None
            raise
        elapsed = time.perf_counter() - started
    a = collector.assembler
    if not a.complete:  # every input yields a clip with its count or a failure: a gap here is a bug
        missing = sorted(n for p in a.open.values() for n in p.left)
        raise RuntimeError(f"the pipeline ended without results for {len(missing)} inputs, e.g. "
                           f"{[items[n].path for n in missing[:3]]}; rerun to redo them")
    pipelines = [dict({k: v for k, v in stats.items() if k != "snapshot"}, name=name, node=name.split("/")[0])
                 for name, stats in sorted(collector.pipelines.items())]
    summary = merge_summaries(pipelines, a.stats, len(numbers), elapsed, info["name"], s.decoder)
    steady = collector.clock.steady()
    summary.update(skipped_already_done=len(items) - len(numbers), executor="ray", **steady,
                   **whole_run(started - called, time.perf_counter() - called))
    summary["ray"] = {
        "address": s.ray, **resources, "pipelines": actors, "pipeline_resources": need,
        "startup_s": steady["first_result_s"],
        "startup": {**startup, "first_result_s": steady["first_result_s"],
                    "actors_s": max((p.get("actor_start_s", 0.0) for p in pipelines), default=None)},
        "partitions": {"size": s.ray_partition_size, "total": len(partitions) + committed,
                       "committed_before": committed, "written": a.stats["shards"]},
        "per_node": {node: {"clips": clips, "pipelines": sum(p["node"] == node for p in pipelines)}
                     for node, clips in sorted(collector.encoded.items())}}
    a.said.close()
    log_done(summary, failures.path)
    finish_summary(s.output, summary, identity["random_init"])
    for p in pipelines:
        log.info("ray pipeline %s (%s): %d inputs, %.1f clips/s, encoder busy %.0f%%, bound by %s; started in %.1f s%s",
                 p["name"], p["device"], p["inputs"], p["clips_per_s"], 100 * p["encoder_busy_fraction"],
                 p["bound_by"], p.get("actor_start_s", 0.0), describe(p.get("machine_cpu")))
    warn_if_stolen(pipelines)
    return summary
