"""The local executor's pipelines on CPU: --gpus, two pipeline processes give what one gives, a pipeline that dies
mid-job loses nothing, and the summary says where each pipeline's time went."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from iv2trt.decode.clips import Windowing
from iv2trt.decode.inputs import discover
from iv2trt.decode.samples import pattern_frames, write_video
from iv2trt.errors import PipelineError
from iv2trt.job.local import run_local_job
from iv2trt.job.placement import PipelineSpec, select_gpus
from iv2trt.job.settings import InferSettings
from iv2trt.output.writer import load_features

TWO_CPU_PIPELINES = [PipelineSpec(None, 0.5), PipelineSpec(None, 0.5)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_inputs")
    for i in range(24):
        write_video(root / f"v{i:02d}.mp4", pattern_frames(6 + i % 5, 24, 32, seed=i))
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


def _settings(tiny_onnx, inputs: Path, out: Path, **kw) -> InferSettings:
    values = dict(inputs=[str(inputs)], output=str(out), backend="onnxruntime", onnx=str(tiny_onnx["fp32"]), frames=4,
                  workers=2, progress=False, dtype="float32", shard_size=1, decoder="cpu", batch_size=2,
                  window_frames=4)
    values.update(kw)
    return InferSettings(**values)


def _run(s: InferSettings, specs=None):
    items = discover(s.inputs)
    return run_local_job(s, items, Windowing(s.frames, window_frames=s.window_frames), specs=specs)


def _by_key(out: Path) -> dict:
    features, rows = load_features(out)
    assert len({(r["id"], r["clip"]) for r in rows}) == len(rows)  # no duplicates
    return {(r["id"], r["clip"]): f for f, r in zip(features, rows)}


def test_gpus_setting():
    names = ["NVIDIA H200", "NVIDIA H200"]
    assert select_gpus("all", 2, names) == [0, 1]
    assert select_gpus("none", 2, names) == [] and select_gpus("0", 2, names) == []
    assert select_gpus("1", 2, names) == [0] and select_gpus("2", 2, names) == [0, 1]
    assert select_gpus("1,", 2, names) == [1] and select_gpus("0,0", 2, names) == [0, 0]
    assert select_gpus("all", 0) == []
    for bad, says in (("3", "this machine has 2 GPU"), ("0,5", "no GPU 5 here"), ("fast", "give all, none"),
                      ("-1", "this machine has 2 GPU")):
        with pytest.raises(PipelineError, match=says) as info:
            select_gpus(bad, 2, names)
        assert "0: NVIDIA H200, 1: NVIDIA H200" in str(info.value) and info.value.exit_code == 2


def test_pipelines_per_gpu():
    from iv2trt.job.placement import pipeline_specs

    names = ["NVIDIA H200", "NVIDIA H200"]
    specs = pipeline_specs("all", 2, 2, names)
    assert [(p.gpu, p.slot, p.name) for p in specs] == [(0, 0, "gpu0"), (0, 1, "gpu0.1"), (1, 0, "gpu1"),
                                                         (1, 1, "gpu1.1")]
    assert all(p.share == 0.25 for p in specs)
    # an index given twice: that many there, whatever the per-GPU count; once: the per-GPU count
    assert [p.name for p in pipeline_specs("0,0,1", 3, 2, names)] == ["gpu0", "gpu0.1", "gpu1", "gpu1.1", "gpu1.2"]
    assert [p.name for p in pipeline_specs("1,", 1, 2, names)] == ["gpu1"]
    assert pipeline_specs("none", 2, 2, names) == [PipelineSpec(None)]
    assert pipeline_specs("all", 2, 0) == [PipelineSpec(None)]


def test_default_pipelines_per_gpu_follow_nvdec(monkeypatch):
    import importlib.util

    from iv2trt.decode.plan import NVDEC_PIPELINES_PER_GPU, pipelines_per_gpu

    real = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, there=installed: (
            (object() if there else None) if name == "PyNvVideoCodec" else real(name, *a)))
        for decoder in ("auto", "nvdec", "cpu"):
            want = NVDEC_PIPELINES_PER_GPU if installed and decoder != "cpu" else 1
            assert pipelines_per_gpu(0, decoder) == want, (installed, decoder)
            assert pipelines_per_gpu(3, decoder) == 3  # as asked
            # an encoder on the CPU (ONNX Runtime without a GPU provider) takes every core in each process: one
            assert pipelines_per_gpu(0, decoder, encoder_on_cpu=True) == 1
            assert pipelines_per_gpu(2, decoder, encoder_on_cpu=True) == 2


def test_encoder_on_cpu_is_onnxruntime_without_a_gpu_provider(monkeypatch, tmp_path):
    import onnxruntime as ort

    from iv2trt.runners import choice
    from iv2trt.runners.choice import encoder_on_cpu

    def settings(**kw):
        return InferSettings(**{"inputs": ["x"], "output": str(tmp_path), **kw})

    monkeypatch.setattr(choice, "tensorrt_missing", lambda engine: "not here")
    monkeypatch.setattr(choice, "torch_gpu_missing", lambda: None)  # a GPU for PyTorch
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert encoder_on_cpu(settings(backend="onnxruntime"))
    assert encoder_on_cpu(settings(backend="auto"))  # no weights for PyTorch: ONNX Runtime
    assert not encoder_on_cpu(settings(backend="auto", random_init=True))  # PyTorch on the GPU
    assert not encoder_on_cpu(settings(backend="torch", random_init=True))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not encoder_on_cpu(settings(backend="onnxruntime"))


def test_a_pipeline_process_is_fed_only_a_few_inputs_ahead_of_its_decoders():
    """The executor's count of what a pipeline process has not started: its last report, plus feeds sent after
    the feeds that report had seen (reports arrive late: feeds are in flight meanwhile)."""
    from iv2trt.job.pipeline_process import QueuedAhead

    q = QueuedAhead(most=2)
    q.fed(), q.fed()
    assert q.count == 2 and not q.wants()
    q.report(0, 1)  # it had seen one feed and started it; the second is on its way
    assert q.count == 1 and q.wants()
    q.fed()
    q.report(1, 2)  # the second waits in its queue; the third not seen yet
    assert q.count == 2 and not q.wants()
    q.report(0, 3)
    assert q.count == 0 and q.wants()


def test_two_pipeline_processes_give_what_one_gives(tmp_path, tiny_onnx, inputs):
    one = _run(_settings(tiny_onnx, inputs, tmp_path / "one"))
    two = _run(_settings(tiny_onnx, inputs, tmp_path / "two"), TWO_CPU_PIPELINES)
    for key in ("inputs", "ok", "failed", "clips"):
        assert one[key] == two[key], key
    assert one["ok"] == 24 and one["failed"] == 1
    expected, got = _by_key(tmp_path / "one"), _by_key(tmp_path / "two")
    assert sorted(expected) == sorted(got)
    for key in expected:  # same pixels and runner; only the batches' make-up differs (float rounding of the GEMMs)
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6)
    assert len(one["pipelines"]) == 1 and len(two["pipelines"]) == 2
    for p in two["pipelines"]:  # each pipeline says where its time went
        assert p["decoders"]["cpu"]["workers"] == 1 and p["ok"] + p["failed"] > 0
        assert 0 <= p["encoder_busy_fraction"] <= 1 and p["bound_by"]
    assert sum(p["ok"] for p in two["pipelines"]) == 24 and two["decoders"]["cpu"]["workers"] == 2
    # and the second run resumes the first's output like its own
    again = _run(_settings(tiny_onnx, inputs, tmp_path / "one"), TWO_CPU_PIPELINES)
    assert again["skipped_already_done"] == 24 and again["inputs"] == 1


def test_a_pipeline_that_dies_loses_nothing(tmp_path, tiny_onnx, inputs, caplog):
    _run(_settings(tiny_onnx, inputs, tmp_path / "reference"))
    reference = _by_key(tmp_path / "reference")
    out = tmp_path / "killed"
    s = _settings(tiny_onnx, inputs, out, workers=2)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=_run(s, TWO_CPU_PIPELINES)))
    with caplog.at_level(logging.WARNING, logger="iv2trt.job.local"):
        job.start()
        deadline = time.monotonic() + 120
        while len(list((out / "shards").glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = next(p for p in mp.active_children() if p.name == "iv2trt-cpu")
        os.kill(victim.pid, signal.SIGKILL)
        job.join(180)
    assert not job.is_alive() and "summary" in result
    summary = result["summary"]
    assert summary["ok"] == 24 and summary["failed"] == 1  # the broken input only
    assert "pipeline cpu died (exit code -9)" in caplog.text
    assert len(summary["pipelines"]) == 1  # the survivor's
    got = _by_key(out)
    assert sorted(got) == sorted(reference)
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], rtol=0, atol=1e-6)


class _FakePipeline:
    """A pipeline process as the executor sees it, keeping the child's protocol: it finishes what it holds at
    each poll, and once told `no_more` and idle it sends its summary and exits (its later inputs are lost)."""

    def __init__(self, name: str, stuck: bool = False, dies_at_poll: int | None = None):
        self.name, self.stuck, self.dies_at_poll = name, stuck, dies_at_poll
        self.assigned: set[int] = set()
        self.pending: list[int] = []
        self.gone = self.result = None
        self.told_no_more = self.exited = False
        self.polls = 0

    def wants(self) -> bool:
        return self.gone is None and len(self.assigned) < 4

    def feed(self, number, item) -> None:
        self.assigned.add(number)
        if not self.exited:
            self.pending.append(number)

    def fed_all(self, backlog: int = 0) -> None:
        pass

    def no_more(self) -> None:
        self.told_no_more = True

    def poll(self) -> list[tuple]:
        self.polls += 1
        if self.polls == self.dies_at_poll:
            self.gone = "exit code -9"
            return []
        if self.exited or self.stuck:
            return []
        if not self.pending and self.told_no_more:
            self.exited, self.gone = True, "exit code 0"
            return []
        done, self.pending = self.pending, []
        return [("finished", n, [{"clip": 0}], np.zeros((1, 4), np.float32)) for n in done]

    def close(self, interrupted: bool) -> None:
        pass


def test_a_pipeline_that_dies_while_starting_leaves_the_job_to_the_others(tmp_path, tiny_onnx, inputs, caplog):
    """(e.g. the second pipeline of a GPU out of memory): the job goes on with the one that started, and says so."""
    out = tmp_path / "out"
    s = _settings(tiny_onnx, inputs, out, workers=2)
    specs = [PipelineSpec(None, 0.5), PipelineSpec(None, 0.5, 1)]
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=_run(s, specs)))
    with caplog.at_level(logging.WARNING, logger="iv2trt.job"):
        job.start()
        deadline, victim = time.monotonic() + 60, None
        while victim is None and time.monotonic() < deadline:
            victim = next((p for p in mp.active_children() if p.name == "iv2trt-cpu.1"), None)
        os.kill(victim.pid, signal.SIGKILL)  # well before it has imported torch and built its runner
        job.join(180)
    assert not job.is_alive() and "summary" in result, result
    summary = result["summary"]
    assert summary["ok"] == 24 and summary["failed"] == 1  # the broken input only
    assert "pipeline cpu.1 died while starting (exit code -9); the job goes on without it" in caplog.text
    assert [p["name"] for p in summary["pipelines"]] == ["cpu"]


def test_the_summary_takes_each_devices_pipelines_together(tmp_path, tiny_onnx, inputs, caplog, capfd):
    s = _settings(tiny_onnx, inputs, tmp_path / "out", workers=2)
    with caplog.at_level(logging.INFO, logger="iv2trt.job"):
        summary = _run(s, [PipelineSpec(None, 0.5), PipelineSpec(None, 0.5, 1)])
    err = capfd.readouterr().err  # the pipeline processes' lines: a device's second one does not repeat its start
    assert "[cpu] iv2trt.job.pipeline: 1 CPU decoding process" in err and "[cpu.1] iv2trt.job.pipeline" not in err
    device = summary["per_gpu"]["cpu"]
    assert device["pipelines"] == ["cpu", "cpu.1"]
    by_pipeline = [p["decoders"]["cpu"]["clips"] for p in summary["pipelines"]]
    assert device["clips"] == sum(by_pipeline) == summary["clips"] and all(by_pipeline)
    assert device["decoders"]["cpu"]["workers"] == 2 and device["bound_by"] == summary["bound_by"]
    assert device["encoder_busy_fraction"] == summary["encoder_busy_fraction"]
    assert "cpu, 2 pipelines together: cpu " in caplog.text


def test_a_model_file_onnx_runtime_cannot_load_is_refused_by_name(tmp_path, inputs):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04half")
    for specs in (None, TWO_CPU_PIPELINES):  # in this process, and in pipeline processes
        s = InferSettings(inputs=[str(inputs)], output=str(tmp_path / "out"), backend="onnxruntime", onnx=str(bad),
                          frames=4, workers=1, progress=False, decoder="cpu")
        with pytest.raises(PipelineError, match="ONNX Runtime cannot load .*truncated.onnx.*Export it again") as info:
            _run(s, specs)
        assert info.value.exit_code == 2
    assert not (tmp_path / "out" / "shards").exists()


def test_inputs_of_a_pipeline_that_dies_late_go_to_one_that_has_run_dry():
    """All inputs handed out; one pipeline finishes its share and idles, then the other dies: its inputs must
    reach the idle one, which has not been told to finish yet (before: told early, it had exited, and they failed
    as 'died twice')."""
    from types import SimpleNamespace

    from iv2trt.job.local import execute

    items = [SimpleNamespace(path=f"v{i}.mp4", id=f"v{i}", kind="video") for i in range(6)]
    written, failed = [], []
    writer = SimpleNamespace(add_video=lambda path, *a: written.append(path), flush=lambda: None)
    failures = SimpleNamespace(add=lambda path, vid, reason: failed.append((path, reason)))
    slow, quick = _FakePipeline("gpu0", stuck=True, dies_at_poll=3), _FakePipeline("gpu1")
    out, _ = execute([slow, quick], items, range(6), writer, failures, progress=False)
    assert not failed, failed
    assert sorted(written) == sorted(i.path for i in items) and out.ok == 6
    assert quick.told_no_more and quick.gone is None  # told to finish only at the end


def test_ray_plans_the_local_jobs_pipelines_per_gpu():
    from types import SimpleNamespace

    from iv2trt.distributed.ray_job import pipeline_plan

    def plan(gpus, cpus_per_gpu=16.0, nodes=1, encoder_on_cpu=False, **settings):
        s = SimpleNamespace(**{"pipelines_per_gpu": 0, "decoder": "auto", "ray_pipelines": 0,
                               "ray_pipeline_cpus": 0.0, **settings})
        resources = {"gpus": float(gpus), "cpu_nodes": nodes, "cpus": cpus_per_gpu * max(gpus, nodes),
                     "cpus_per_pipeline": cpus_per_gpu}
        return pipeline_plan(s, resources, encoder_on_cpu)

    assert plan(2) == (4, {"num_gpus": 0.5, "num_cpus": 8.0})        # two per GPU where NVDEC may decode
    assert plan(2, decoder="cpu") == (2, {"num_gpus": 1, "num_cpus": 16.0})
    assert plan(2, pipelines_per_gpu=1) == (2, {"num_gpus": 1, "num_cpus": 16.0})
    assert plan(1, ray_pipelines=1) == (1, {"num_gpus": 1, "num_cpus": 16.0})  # one actor: the whole GPU
    assert plan(0, cpus_per_gpu=8.0, nodes=3) == (3, {"num_cpus": 8.0})  # no GPUs: one per node
    # the runner probed on a node encodes on the CPU (ONNX Runtime without a GPU provider): one per GPU, as locally,
    # unless asked for
    assert plan(2, encoder_on_cpu=True) == (2, {"num_gpus": 1, "num_cpus": 16.0})
    assert plan(2, encoder_on_cpu=True, pipelines_per_gpu=2) == (4, {"num_gpus": 0.5, "num_cpus": 8.0})
    assert plan(2, encoder_on_cpu=True, ray_pipelines=3) == (3, {"num_gpus": 0.5, "num_cpus": 10.0})
    with pytest.raises(PipelineError, match="2 GPU\\(s\\), 2 pipeline\\(s\\) each"):
        plan(2, ray_pipelines=5)
