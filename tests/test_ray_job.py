"""The Ray executor (`trt_inference.py --ray`) against the local job: same output, node and driver killed mid-job.

Needs Ray (requirements-distributed.txt, installed by README's install command and by CI): these tests fail
rather than skip without it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

try:
    import ray  # noqa: F401
    from ray.cluster_utils import Cluster
except ImportError as exc:  # no silent skip: the feature is untested without Ray
    raise ImportError("tests/test_ray_job.py needs Ray: pip install -r requirements-distributed.txt") from exc

from iv2trt.cli import run_main
from iv2trt.cli.infer import main
from iv2trt.decode.samples import pattern_frames, write_image, write_video
from iv2trt.output.writer import load_features

ROOT = Path(__file__).resolve().parent.parent
VIDEOS = 40
# a dead node is noticed after about 1.5 s instead of Ray's default 30 s
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                   "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray_inputs")
    for i in range(VIDEOS):
        write_video(root / f"v{i:02d}.mp4", pattern_frames(6 + i % 5, 24, 32, seed=i), gop=4)
    write_image(root / "still.png", pattern_frames(1, 70, 90, seed=5)[0])
    np.save(root / "pre.npy", np.random.default_rng(0).standard_normal((2, 4, 3, 56, 56)).astype(np.float32))
    (root / "garbage.mp4").write_bytes(os.urandom(3000))
    return root


def _args(tiny_onnx, inputs, out, *extra):
    return ["--backend", "onnxruntime", "--onnx", str(tiny_onnx["fp32"]), "--frames", "4", "--no-progress",
            "--dtype", "float32", "--batch-size", "3", "--window-frames", "4", "--stride", "2", "--inputs", str(inputs),
            "--output", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_onnx, inputs) -> Path:
    """The local job's output on the same inputs, uninterrupted."""
    out = tmp_path_factory.mktemp("ray_reference") / "out"
    assert run_main(main, _args(tiny_onnx, inputs, out, "--workers", 2)) == 6  # garbage.mp4 fails
    return out


def _rows(out: Path) -> dict[tuple[str, int], tuple[np.ndarray, dict]]:
    feats, rows = load_features(out)
    table = {(r["id"], r["clip"]): (f, {k: v for k, v in r.items() if k not in ("row", "file", "file_row")})
             for f, r in zip(feats, rows)}
    assert len(table) == len(rows), "duplicate (id, clip) rows"
    return table


def assert_same_output(out: Path, reference: Path) -> None:
    """Same rows (every manifest column but the file it points into), features within 1e-5, same failures."""
    got, want = _rows(out), _rows(reference)
    assert sorted(got) == sorted(want)
    for key, (feature, row) in want.items():
        np.testing.assert_allclose(got[key][0], feature, rtol=0, atol=1e-5, err_msg=str(key))
        assert json.dumps(got[key][1], sort_keys=True) == json.dumps(row, sort_keys=True)  # NaN-safe equality
    def failures(folder: Path) -> list[dict]:  # in the order the inputs failed in: not the same in a parallel job
        return sorted((json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()),
                      key=lambda f: f["id"])

    assert failures(out) == failures(reference)
    assert (out / "job.json").read_text() == (reference / "job.json").read_text()


def test_local_ray_equals_local_job_and_resumes(tmp_path, tiny_onnx, inputs, reference):
    out = tmp_path / "out"
    args = _args(tiny_onnx, inputs, out, "--ray", "--ray-partition-size", 8)
    assert run_main(main, args) == 6
    assert_same_output(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    for key in ("inputs", "ok", "failed", "clips", "backend", "batch_size", "skipped_already_done"):
        assert summary[key] == want[key], key
    assert summary["executor"] == "ray" and summary["ray"]["partitions"]["written"] == 6
    assert sum(n["clips"] for n in summary["ray"]["per_node"].values()) == summary["clips"]
    for p in summary["pipelines"]:  # where each pipeline actor's time went, as in the local job's summary
        assert p["decoders"]["cpu"]["workers"] >= 1 and 0 <= p["encoder_busy_fraction"] <= 1 and p["bound_by"]
    for both in (summary, want):  # both executors time their first result and the rate after it alike
        assert 0 < both["first_result_s"] <= both["seconds"] and both["steady_clips_per_s"] > 0
        # and their whole run: start-up (runners built; Ray up, the runner probed), then the run
        assert 0 < both["start_s"] and both["start_s"] + both["seconds"] <= both["wall_s"] + 0.002

    # a rerun skips every committed partition (their files untouched) and retries the failed input only
    shards = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert run_main(main, args) == 6
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == shards
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 1 and summary["skipped_already_done"] == want["ok"]
    # a local run resumes the Ray run's output like its own
    assert run_main(main, _args(tiny_onnx, inputs, out)) == 6
    assert json.loads((out / "summary.json").read_text())["skipped_already_done"] == want["ok"]


@pytest.fixture(scope="module")
def local_ray():
    """One Ray of this machine for the in-process tests after the first (which starts its own, as `--ray` does):
    the job finds Ray running and uses it."""
    from iv2trt.distributed.ray_job import runtime_env

    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


def test_workers_import_torch_before_any_task(local_ray):
    """ray_job.runtime_env's setup hook: a task can no longer be interrupted inside torch's first import."""
    @ray.remote
    def torch_already_imported():
        return "torch" in sys.modules

    assert all(ray.get([torch_already_imported.remote() for _ in range(4)]))


def test_hanging_decoder_is_timed_out(tmp_path, tiny_onnx, inputs, local_ray):
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)  # opening a FIFO nobody writes to blocks forever
    args = _args(tiny_onnx, inputs / "v00.mp4", tmp_path / "out", "--ray", "--decode-timeout-s", 2)
    args.insert(args.index("--output"), str(fifo))  # a second input
    assert run_main(main, args) == 6
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert failure == {"path": str(fifo), "id": "hangs.mp4", "reason": "decoding timed out (no progress for 2s)"}
    assert {key[0] for key in _rows(tmp_path / "out")} == {"v00.mp4"}


class FailsInActors:
    """A runner factory that works in the driver's probe task but not in the pipeline actors (like an engine
    that fits the first GPU model and not another one)."""

    def __init__(self, onnx: str):
        self.onnx = onnx

    def __call__(self):
        from iv2trt.errors import EngineMismatch
        from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

        if ray.get_runtime_context().get_actor_id() is not None:
            raise EngineMismatch("engine built for another GPU: rebuild it here")
        return OnnxRuntimeRunner(self.onnx)


def test_runner_errors_on_the_nodes_stop_the_job_with_their_exit_code(tmp_path, tiny_onnx, inputs, local_ray):
    from iv2trt.decode.clips import Windowing
    from iv2trt.decode.inputs import discover
    from iv2trt.distributed.ray_job import run_ray_job
    from iv2trt.errors import EngineMismatch
    from iv2trt.job.settings import InferSettings

    out = tmp_path / "out"
    args = _args(tiny_onnx, inputs, out, "--ray", "--backend", "tensorrt", "--engine", tmp_path / "none.engine")
    assert run_main(main, args) == 4  # the probe task cannot build the runner: nothing is written
    assert not out.exists()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FailsInActors, for the workers
    s = InferSettings(inputs=[str(inputs)], output=str(out), backend="onnxruntime", onnx=str(tiny_onnx["fp32"]),
                      frames=4, progress=False, ray="local")
    with pytest.raises(EngineMismatch, match="rebuild it here"):
        run_ray_job(s, discover(s.inputs), Windowing(4), make_runner=FailsInActors(s.onnx))
    assert not list((out / "shards").glob("*.parquet"))



def test_ray_scaling_benchmark_runs_the_job_with_one_and_two_pipelines(tmp_path, tiny_cfg, local_ray):
    """benchmark.py --ray-scaling on CPU actors with the tiny model: the table, the target line and the files."""
    import dataclasses

    import yaml

    from iv2trt.bench.main import main as benchmark_main

    variant = tmp_path / "tiny.yaml"
    variant.write_text(yaml.safe_dump(dataclasses.asdict(tiny_cfg)))
    out = tmp_path / "bench"
    assert benchmark_main(["--variant", str(variant), "--skip-encoder", "--ray-scaling",
                           "--ray-shape", "4x4", "--ray-seconds", "0.5", "--target-seconds", "0.3",
                           "--ray-clips-per-video", "8", "--output-dir", str(out)]) == 0
    results = json.loads((out / "benchmark.json").read_text())
    rows = results["ray_scaling"]["rows"]
    assert [(r["backend"], r["pipelines"], r["pipelines_seen"]) for r in rows] == [("torch-fp32", 1, 1),
                                                                                    ("torch-fp32", 2, 2)]
    assert all(r["clips"] == r["videos"] * 8 and r["steady_clips_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_steady"] == 1.0
    assert "| torch-fp32 | 2 |" in (out / "benchmark.md").read_text()
    assert results["targets"][-1]["status"] == "not measured"  # no GPUs here


@pytest.fixture(scope="module")
def cluster():
    """A simulated cluster on this machine: a head without CPUs (it only hosts the driver's connection, as on
    many real clusters), so all work runs on the worker nodes the tests add and remove."""
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
    yield c
    c.shutdown()


def _driver(tiny_onnx, inputs, out, address, *extra) -> subprocess.Popen:
    args = _args(tiny_onnx, inputs, out, "--ray", address, "--ray-partition-size", 4, *extra)
    return subprocess.Popen([sys.executable, str(ROOT / "trt_inference.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(proc: subprocess.Popen, out: Path, count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list((out / "shards").glob("*.parquet"))) < count and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard was committed in time"
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be interrupted: {proc.stderr.read()[-3000:]}"


HOLD_S = 5  # how long the last input of the node-kill job blocks its decoder (a FIFO nobody writes to)


@pytest.fixture(scope="module")
def inputs_thrice(tmp_path_factory, inputs) -> Path:
    """A list file naming the inputs three times over under other ids, then a FIFO that blocks its decoder until
    --decode-timeout-s: the job cannot end sooner than HOLD_S after the first shard, so a node killed once that
    shard is committed dies mid-job however loaded the machine is."""
    root = tmp_path_factory.mktemp("ray_thrice")
    fifo = root / "holds.mp4"
    os.mkfifo(fifo)
    listing = root / "inputs.csv"
    listing.write_text("path,id\n" + "".join(f"{p},{r}/{p.name}\n" for r in range(3) for p in sorted(inputs.iterdir()))
                       + f"{fifo},holds.mp4\n")
    return listing


@pytest.fixture(scope="module")
def reference_thrice(tmp_path_factory, tiny_onnx, inputs_thrice) -> Path:
    out = tmp_path_factory.mktemp("ray_reference_thrice") / "out"
    args = _args(tiny_onnx, inputs_thrice, out, "--workers", 2, "--decode-timeout-s", HOLD_S)
    assert run_main(main, args) == 6  # garbage.mp4 and the FIFO fail
    return out


def test_node_killed_mid_job_output_equals_uninterrupted_run(tmp_path, tiny_onnx, inputs_thrice, reference_thrice,
                                                             cluster):
    inputs, reference = inputs_thrice, reference_thrice
    doomed = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    proc = _driver(tiny_onnx, inputs, out, cluster.address, "--decode-timeout-s", HOLD_S)
    _wait_for_shards(proc, out, 1)
    cluster.remove_node(doomed, allow_graceful=False)  # the pipeline actor dies with it
    cluster.add_node(num_cpus=2)                         # the replacement the autoscaler would bring
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 6, stderr[-3000:]
    assert_same_output(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["ray"]["per_node"]) == 2, "the killed node's pipeline should have sent rows before it died"
    assert summary["ray"]["partitions"]["written"] == summary["ray"]["partitions"]["total"]


def test_driver_killed_then_rerun_has_no_duplicates_and_no_gaps(tmp_path, tiny_onnx, inputs, reference, cluster):
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
    out = tmp_path / "out"
    proc = _driver(tiny_onnx, inputs, out, cluster.address)
    _wait_for_shards(proc, out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    committed = {p.name: p.read_bytes() for p in (out / "shards").iterdir() if p.suffix == ".parquet"}
    assert 0 < len(committed) < 11  # 43 inputs -> 11 partitions
    done = {key[0] for key in _rows(out)}

    rerun = _driver(tiny_onnx, inputs, out, cluster.address)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 6, stderr[-3000:]
    assert_same_output(out, reference)
    for name, data in committed.items():  # committed partitions were skipped, not rewritten
        assert (out / "shards" / name).read_bytes() == data
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] == len(done) and summary["inputs"] == 43 - len(done)


def test_a_gpu_node_whose_runner_encodes_on_the_cpu_runs_one_pipeline_per_gpu(tmp_path, tiny_onnx, inputs, reference,
                                                                              cluster):
    """As the local job does: ONNX Runtime without a GPU provider takes every core in each session, so where the
    runner probed on a node encodes on the CPU, a GPU (here a node that declares one to Ray) gets one pipeline,
    not the two of NVDEC decoding."""
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    proc = _driver(tiny_onnx, inputs, out, cluster.address)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 6, stderr[-3000:]
    assert_same_output(out, reference)
    ray_summary = json.loads((out / "summary.json").read_text())["ray"]
    assert ray_summary["gpus"] == 1 and ray_summary["pipelines"] == 1
    assert ray_summary["pipeline_resources"] == {"num_gpus": 1, "num_cpus": 2.0}
    assert "the runner encodes on the CPU on the nodes (onnxruntime): 1 pipeline(s), not 2" in stderr
