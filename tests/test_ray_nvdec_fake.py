"""The Ray executor's pipeline actors decode on the GPU path, with the fake NVDEC of tests/fake_nvdec.py put in
every Ray worker (no GPU needed): what NVDEC refuses, breaks on mid-file or hangs on goes to the actor's CPU
workers, nothing is lost, and the summary counts the fallbacks by reason, as in the local job."""
from __future__ import annotations

import numpy as np
import pytest

try:
    import ray
except ImportError as exc:  # no silent skip: the feature is untested without Ray
    raise ImportError("tests/test_ray_nvdec_fake.py needs Ray: pip install -r requirements-distributed.txt") from exc

import fake_nvdec

from iv2trt.decode.clips import Windowing
from iv2trt.decode.inputs import discover
from iv2trt.decode.samples import pattern_frames, write_image, write_video
from iv2trt.job.settings import InferSettings
from iv2trt.output.writer import load_features

HANG_S = 10.0  # the fake hangs this long on *nvhang*; the job gives a decode up to DECODE_TIMEOUT_S (with 2 s,
# the fallback test counted 4 timeouts instead of 1 in 3 of about 8 runs on a 2-core machine)
DECODE_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def ray_with_fake_nvdec():
    from iv2trt.distributed.ray_job import runtime_env

    env = runtime_env()
    env.update(py_modules=[*env["py_modules"], fake_nvdec.__file__],  # the fake travels as a module of its own
               worker_process_setup_hook="fake_nvdec.ray_worker_setup", env_vars={"FAKE_NVDEC_HANG_S": str(HANG_S)})
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env=env, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_nvdec_inputs")
    for i in range(5):
        write_video(root / f"v{i}.mp4", pattern_frames(24 + 3 * i, 48, 64, seed=i), gop=8)
    write_video(root / "x_nvfail.mp4", pattern_frames(20, 48, 64, seed=11))
    write_video(root / "y_nvbreak.mp4", pattern_frames(40, 48, 64, seed=12), gop=5)
    write_video(root / "z_nvhang.mp4", pattern_frames(16, 48, 64, seed=13))
    write_image(root / "still.png", pattern_frames(1, 40, 60, seed=14)[0])
    return root


def _settings(tiny_onnx, inputs, out, **kw) -> InferSettings:
    return InferSettings(inputs=[str(inputs)], output=str(out), backend="onnxruntime", onnx=str(tiny_onnx["fp32"]),
                         frames=4, window_frames=12, batch_size=4, progress=False, dtype="float32",
                         decode_timeout_s=DECODE_TIMEOUT_S, **kw)


def _features(out) -> dict:
    feats, rows = load_features(out)
    return {(r["id"], r["clip"]): f for f, r in zip(feats, rows)}


def test_ray_actors_fall_back_from_the_gpu_path_and_lose_nothing(tmp_path, tiny_onnx, inputs, ray_with_fake_nvdec):
    from iv2trt.distributed.ray_job import run_ray_job
    from iv2trt.job.local import run_local_job

    cpu = _settings(tiny_onnx, inputs, tmp_path / "cpu", decoder="cpu", workers=2)
    reference = run_local_job(cpu, discover(cpu.inputs), Windowing(4, window_frames=12))
    s = _settings(tiny_onnx, inputs, tmp_path / "ray", decoder="nvdec", ray="local", ray_pipelines=1)
    summary = run_ray_job(s, discover(s.inputs), Windowing(4, window_frames=12))

    assert summary["failed"] == reference["failed"] == 0 and summary["ok"] == reference["ok"] == 9
    want, got = _features(tmp_path / "cpu"), _features(tmp_path / "ray")
    assert sorted(got) == sorted(want)
    for key in want:  # the fake decodes with the CPU path's code: the same pixels
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=str(key))
    nvdec = summary["decoders"]["nvdec"]
    assert nvdec["fallbacks_by_category"] == {"codec": 1, "stream_error": 1, "timeout": 1}, nvdec
    assert nvdec["inputs"] == 5 and summary["decoders"]["cpu"]["inputs"] == 4  # the image and the three fallbacks
    assert summary["executor"] == "ray" and len(summary["pipelines"]) == 1


def test_an_actor_let_go_by_ray_data_closes_its_pipeline(tmp_path, tiny_onnx, monkeypatch):
    """Before: a pipeline actor never closed its pipeline: its NVDEC sessions, inference thread and CPU workers
    were left to the process's exit. Ray Data calls the UDF's __del__ on an actor's graceful end: the pipeline
    closes there, its workers stopped and waited for."""
    from types import SimpleNamespace

    from iv2trt.distributed import ray_stages
    from iv2trt.job.pipeline import JobOptions
    from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

    context = SimpleNamespace(get_actor_id=lambda: "a" * 32, get_node_id=lambda: "n" * 32)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    write_video(tmp_path / "v.mp4", pattern_frames(12, 48, 64, seed=1))
    options = JobOptions(Windowing(frames=4), 56, 2, workers=2, progress=False)
    actor = ray_stages.PipelineActor(lambda: OnnxRuntimeRunner(str(tiny_onnx["fp32"])), options, 512, cpus=1)
    rows = actor({"number": np.array([0]), "path": np.array([str(tmp_path / "v.mp4")]), "id": np.array(["v"]),
                  "kind": np.array(["video"])})
    assert rows["error"].tolist() == [""] and rows["feature"].shape[0] == 1
    pipeline = actor.pipeline
    processes = [wk.process for wk in pipeline.workers]
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    actor.__del__()
    assert actor.pipeline is None and pipeline._closed
    assert not any(p.is_alive() for p in processes)
    actor.__del__()  # again (Python may call it once more as the object goes): nothing


def test_the_driver_keeps_each_actor_s_last_summary_whatever_order_its_calls_arrive_in(tmp_path, tiny_onnx,
                                                                                        monkeypatch):
    """Before: the driver kept the summary of the call that reached it last. An actor's two concurrent calls can
    end close together and arrive in either order: on an H200 the summary kept was two inputs short (the Ray NVDEC
    test counted 14 of 16 inputs). Each call's summary is numbered; the driver keeps the one numbered last, and a
    restarted actor's (Ray keeps its id) over those of the incarnation that died."""
    from types import SimpleNamespace

    from iv2trt.distributed import ray_stages
    from iv2trt.distributed.ray_job import Collector
    from iv2trt.job.pipeline import JobOptions
    from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

    context = SimpleNamespace(get_actor_id=lambda: "a" * 32, get_node_id=lambda: "n" * 32)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    write_video(tmp_path / "v.mp4", pattern_frames(12, 48, 64, seed=1))
    options = JobOptions(Windowing(frames=4), 56, 2, workers=1, progress=False)

    def calls(count: int) -> list[dict]:
        """`count` calls of one input each to a new actor (named by its node and actor id, as Ray restarts it)."""
        actor = ray_stages.PipelineActor(lambda: OnnxRuntimeRunner(str(tiny_onnx["fp32"])), options, 512, cpus=1)
        try:
            return [actor({"number": np.array([n]), "path": np.array([str(tmp_path / "v.mp4")]),
                           "id": np.array([f"v{n}"]), "kind": np.array(["video"])}) for n in range(count)]
        finally:
            actor.__del__()

    assembler = SimpleNamespace(items=None, stats={"clips": 0, "failed": 0}, add_clip=lambda *a: None,
                                add_failure=lambda *a: None)
    collector = Collector(assembler, SimpleNamespace(set_postfix_str=lambda *a, **k: None))
    first = calls(3)
    for rows in reversed(first):  # the last call's rows reach the driver first
        collector.add(rows)
    (kept,) = collector.pipelines.values()
    assert kept["inputs"] == 3 and kept["snapshot"][1] == 3
    # the actor dies and Ray restarts it under the same id: its first summary replaces the dead one's third
    collector.add(calls(1)[0])
    (kept,) = collector.pipelines.values()
    assert kept["inputs"] == 1 and kept["snapshot"][1] == 1
