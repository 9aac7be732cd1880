"""The Ray executor: `trt_inference.py --ray [ADDRESS]` runs the extraction job as a Ray Data pipeline.

    driver (this process)                        cluster (ray_stages.py)
    discover inputs, cut them into partitions
    ray.data.from_items(inputs)  ------------->  decode tasks: CPU, any node (spread); iter_clips
                                                 encoder actors: one per GPU (or CPU actors without
                                                 GPUs), TensorRT / PyTorch / ONNX Runtime as locally
    iter_batches(feature rows)  <--------------
    PartitionAssembler: one shard per partition (FeatureWriter), failures.jsonl, job.json, summary.json

Only the driver writes, so the output directory needs to exist on this machine alone; inputs and
model files must be readable at the same paths on every node. The package's code travels with the
job (Ray's py_modules); each node needs the Python packages of requirements.txt (+ -gpu on GPU nodes)
and Ray. Every input goes through the same source, runner and writer code as in the local job, and
the output is laid out the same way, so `finished_ids`, resume and `load_features` cannot tell which
executor ran. Exactly once: see partitions.py. Ray retries decode tasks and restarts encoder actors
(also on other nodes when one dies); a rerun skips committed partitions and redoes the others.
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
DECODE_MEMORY = 512 * 2**20  # bytes of memory each decode task reserves with Ray


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
    """The runner factory the nodes call for settings `s` (ray_stages.SettingsRunner); the PyTorch backend (asked
    for, or one `auto` may choose on a GPU node) gets the model variant's config along (the YAML files under
    configs/ stay here)."""
    from ..runners.choice import has_weights
    from .ray_stages import SettingsRunner

    torch_possible = s.backend == "torch" or (s.backend == "auto" and has_weights(s))
    if not torch_possible or not isinstance(s.variant, (str, Path)):
        return SettingsRunner(node_settings(s))
    from ..model import vision_config

    variant = dataclasses.asdict(vision_config(s.variant))
    return SettingsRunner(node_settings(s), variant)


def cluster_resources(ray) -> dict[str, Any]:
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"nodes": len(nodes), "cpus": float(total.get("CPU", 0)), "gpus": float(total.get("GPU", 0))}


def encoder_plan(s, resources: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(number of encoder actors, Ray resources of each): one per GPU, or CPU actors on a cluster without GPUs."""
    gpus, cpus = int(resources["gpus"]), resources["cpus"]
    if gpus:
        count = s.ray_encoders or gpus
        if count > gpus:
            raise PipelineError(f"--ray-encoders {count}: the cluster has {gpus} GPU(s), one per encoder")
        need = {"num_gpus": 1, "num_cpus": s.ray_encoder_cpus}
    else:
        count = s.ray_encoders or 1
        need = {"num_cpus": s.ray_encoder_cpus}
    if count * s.ray_encoder_cpus + s.ray_decode_cpus > cpus:
        raise PipelineError(f"{count} encoder(s) x {s.ray_encoder_cpus:g} CPUs + one decode task "
                            f"({s.ray_decode_cpus:g} CPUs) do not fit the cluster's {cpus:g} CPUs: lower "
                            "--ray-encoders / --ray-encoder-cpus / --ray-decode-cpus, or add nodes")
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


def build_pipeline(ray, records: list[dict[str, Any]], spec, make_runner, feature_dim: int, batch_size: int,
                   encoders: int, encoder_resources: dict[str, Any], decode_cpus: float, cpus: float):
    """inputs -> decode tasks -> encoder actors, as a lazy Ray Dataset of feature rows (ray_stages.py).

    Decode tasks reserve DECODE_MEMORY each (a 720p decode holds a few hundred MB), which also keeps Ray Data
    from fusing them into the encoder actors (operators with other resources never fuse). Each encoder runs
    two calls at once: one batch's upload overlaps the other's compute (see ray_stages.Encoder)."""
    from .ray_stages import Encoder, decode_batch, decode_blocks

    ds = ray.data.from_items(records, override_num_blocks=decode_blocks(len(records), cpus))
    ds = ds.map_batches(decode_batch, fn_kwargs={"spec": spec}, batch_size=None, num_cpus=decode_cpus,
                        memory=DECODE_MEMORY)
    pool = ray.data.ActorPoolStrategy(size=encoders, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    args = {"make_runner": make_runner, "feature_dim": feature_dim, "batch_size": batch_size,
            "frames": spec.windowing.frames, "img_size": spec.img_size}
    return ds.map_batches(Encoder, fn_constructor_kwargs=args,
                          batch_size=batch_size, compute=pool, **encoder_resources)


class Collector:
    """Driver: feature rows -> PartitionAssembler, with per-stage and per-node counts for the summary."""

    def __init__(self, assembler, bar):
        self.assembler, self.bar = assembler, bar
        self.decode_s = self.encode_s = self.write_s = 0.0
        self.decoded: Counter = Counter()   # rows per node that decoded them
        self.encoded: Counter = Counter()   # clips per node that encoded them
        self.per_encoder: Counter = Counter()
        self.batches: set[tuple[str, int]] = set()
        self.started = time.perf_counter()
        self.first_row_s: float | None = None  # seconds from the start to the first result (actors starting up)
        self.last_row_s = 0.0
        self.clips_in_first_batch = 0

    def steady_rate(self) -> float | None:
        """Clips encoded per second between the first result batch and the last (actor startup left out)."""
        span = self.last_row_s - (self.first_row_s or 0.0)
        clips = sum(self.encoded.values()) - self.clips_in_first_batch
        return round(clips / span, 3) if span > 0 and clips > 0 else None

    def add(self, batch: dict[str, np.ndarray]) -> None:
        t0 = time.perf_counter()
        first = self.first_row_s is None
        if first:
            self.first_row_s = t0 - self.started
        a = self.assembler
        for i in range(len(batch["number"])):
            number, error = int(batch["number"][i]), str(batch["error"][i])
            self.decode_s += float(batch["decode_s"][i])
            self.decoded[str(batch["decode_node"][i])] += 1
            if error:  # the decode task saw the absolute path: name the input as it was given, like the local job
                path = a.items[number].path
                a.add_failure(number, error.replace(_absolute(path), path))
                continue
            encoder = str(batch["encoder"][i])
            self.encode_s += float(batch["encode_s"][i])
            self.encoded[encoder.split("/")[0]] += 1
            self.per_encoder[encoder] += 1
            self.batches.add((encoder, int(batch["batch_id"][i])))
            a.add_clip(number, int(batch["clip"][i]), json.loads(str(batch["info"][i])),
                       np.array(batch["feature"][i]), int(batch["count"][i]))
        if first:
            self.clips_in_first_batch = sum(self.encoded.values())
        self.write_s += time.perf_counter() - t0
        elapsed = self.last_row_s = time.perf_counter() - self.started
        self.bar.set_postfix_str(f"{a.stats['clips'] / max(elapsed, 1e-9):.1f} clips/s, {a.stats['failed']} failed",
                                 refresh=False)


def _stage(busy_s: float, count: int, unit: str) -> dict[str, Any]:
    return {unit: count, "busy_s": round(busy_s, 3), f"{unit}_per_busy_s": round(count / busy_s, 3) if busy_s else None}


def run_ray_job(s, items: Sequence[InputItem], windowing, source=None, make_runner=None) -> dict[str, Any]:
    """Run the job described by settings `s` (InferSettings) over `items` on Ray; returns the summary.

    `source(item, windowing, img_size)` yields an input's clips (default: decode.source.iter_clips); `make_runner()`
    builds the runner on a node (default: the one `s` names, with the engine map applied). Benchmarks replace them."""
    from tqdm import tqdm

    from ..decode.source import iter_clips
    from ..job.identity import complete_identity, finish_summary
    from ..job.stages import batch_size_for, log_done, summarize
    from ..output.writer import FailureLog, FeatureWriter, prepare_output
    from .partitions import PartitionAssembler, plan_partitions
    from .ray_stages import DecodeSpec, SettingsRunner, probe_runner

    if s.compare_pytorch:
        raise PipelineError("--compare-pytorch runs in the local job only: drop --ray for that check")
    if s.decoder == "nvdec":
        raise PipelineError("--decoder nvdec runs in the local job only: with --ray, inputs are decoded on CPUs "
                            "(PyAV) in Ray tasks; pass --decoder cpu or auto")
    if s.ray_partition_size < 1 or s.ray_encoders < 0 or s.ray_encoder_cpus <= 0 or s.ray_decode_cpus <= 0:
        raise PipelineError("ray_partition_size and ray_encoder_cpus/ray_decode_cpus must be positive, "
                            "ray_encoders >= 0 (0: one per GPU)")
    with ray_session(s.ray) as ray:
        try:
            resources = cluster_resources(ray)
            encoders, need = encoder_plan(s, resources)
            make_runner = make_runner or settings_runner(s)
            probe = ray.remote(max_calls=1, **need)(probe_runner)
            info = ray.get(probe.remote(make_runner, s.frames, node_settings(s)))
            if isinstance(make_runner, SettingsRunner):  # every encoder runs the backend the probe chose
                s = dataclasses.replace(s, backend=info["name"])
                make_runner = dataclasses.replace(
                    make_runner, settings=dataclasses.replace(make_runner.settings, backend=info["name"]))
            identity = complete_identity(info["identity"], s)
            done = prepare_output(s.output, identity, s.overwrite)
            partitions, committed = plan_partitions(items, s.ray_partition_size, done)
            numbers = [n for p in partitions for n in p.numbers]
            log.info("%d inputs found, %d to do, %d already done in %s; %d partitions of <= %d inputs (%d committed "
                     "before); Ray: %d node(s), %g CPUs, %g GPUs, %d %s encoder(s) (%s)", len(items), len(numbers),
                     len(items) - len(numbers), s.output, len(partitions) + committed, s.ray_partition_size, committed,
                     resources["nodes"], resources["cpus"], resources["gpus"], encoders,
                     "GPU" if "num_gpus" in need else "CPU", info["name"])
            batch_size = batch_size_for(s.batch_size, info["max_batch"])
            writer = FeatureWriter(s.output, s.dtype, shard_size=sys.maxsize, per_video_npy=s.per_video_npy)
            failures = FailureLog(s.output)
            bar = tqdm(total=len(numbers), unit="video", disable=not s.progress, mininterval=1.0, dynamic_ncols=True,
                       file=sys.stderr)
            collector = Collector(PartitionAssembler(items, partitions, writer, failures,
                                                     lambda ok: bar.update(1)), bar)
            started = time.perf_counter()
            try:
                if numbers:
                    spec = DecodeSpec(source or iter_clips, windowing, info["img_size"], info["frame_range"],
                                      info["name"], s.decode_timeout_s)
                    records = [{"number": n, "path": _absolute(items[n].path), "id": items[n].id,
                                "kind": items[n].kind} for n in numbers]
                    ds = build_pipeline(ray, records, spec, make_runner, info["feature_dim"], batch_size,
                                        encoders, need, s.ray_decode_cpus, resources["cpus"])
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
    stats = {"ok": a.stats["ok"], "failed": a.stats["failed"], "clips": a.stats["clips"],
             "batches": len(collector.batches), "infer_s": collector.encode_s}
    summary = summarize(stats, len(numbers), elapsed, info["name"], batch_size)
    summary["skipped_already_done"] = len(items) - len(numbers)
    summary["executor"] = "ray"
    summary["ray"] = {
        "address": s.ray, **resources, "encoders": encoders, "encoder_resources": need,
        "startup_s": round(collector.first_row_s, 3) if collector.first_row_s is not None else None,
        "steady_clips_per_s": collector.steady_rate(),
        "encoder_busy_fraction": round(collector.encode_s / max(elapsed * encoders, 1e-9), 3),
        "partitions": {"size": s.ray_partition_size, "total": len(partitions) + committed,
                       "committed_before": committed, "written": a.stats["shards"]},
        "stages": {"decode": _stage(collector.decode_s, sum(collector.decoded.values()), "rows"),
                   "encode": {**_stage(collector.encode_s, sum(collector.encoded.values()), "clips"),
                              "encoders_seen": len(collector.per_encoder)},
                   "write": _stage(collector.write_s, a.stats["ok"] + a.stats["failed"], "videos")},
        "per_node": {node: {"decoded_rows": collector.decoded[node], "encoded_clips": collector.encoded[node]}
                  for node in sorted(set(collector.decoded) | set(collector.encoded))}}
    log_done(summary, failures.path)
    finish_summary(s.output, summary, identity["random_init"])
    st = summary["ray"]["stages"]
    log.info("ray: %d node(s) took part; decode %.1f rows per task-second, encode %.1f clips per encoder-second "
             "(%d encoders seen), driver writing %.1f s", len(summary["ray"]["per_node"]),
             st["decode"]["rows_per_busy_s"] or 0, st["encode"]["clips_per_busy_s"] or 0,
             st["encode"]["encoders_seen"], st["write"]["busy_s"])
    return summary
