"""Pipelines on a GPU: two pipelines (processes) on one GPU give what one gives, a killed GPU pipeline loses
nothing, a CUDA graph captured while NVDEC sessions decode is not spoilt, and the Ray executor's pipeline actor
decodes with NVDEC. Needs an NVIDIA GPU with NVDEC and PyNvVideoCodec (Ray for the last); skips with the reason
elsewhere (CI has no GPU)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_nvdec_gpu import encode, natural_frames

from iv2trt.compare import cosine_rows
from iv2trt.decode.clips import Windowing
from iv2trt.decode.inputs import discover
from iv2trt.decode.nvdec import nvdec_unavailable
from iv2trt.decode.plan import NVDEC_PIPELINES_PER_GPU
from iv2trt.job.local import run_local_job
from iv2trt.job.placement import PipelineSpec
from iv2trt.job.settings import InferSettings
from iv2trt.output.writer import load_features

REASON = nvdec_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs NVDEC: {REASON}")
TWO_ON_GPU0 = [PipelineSpec(0, 0.5), PipelineSpec(0, 0.5)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_pipeline_videos")
    for i in range(16):
        encode(root / f"v{i:02d}.mp4", natural_frames(60, 144, 192, seed=i), "libx264")
    return root


@pytest.fixture(scope="module")
def variant(tmp_path_factory, tiny_cfg) -> str:
    path = tmp_path_factory.mktemp("variant") / "tiny.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(tiny_cfg)))
    return str(path)


def _settings(videos: Path, out: Path, variant: str, **kw) -> InferSettings:
    values = dict(inputs=[str(videos)], output=str(out), backend="torch", variant=variant, random_init=True,
                  frames=4, batch_size=4, window_frames=12, progress=False, decoder="nvdec", dtype="float32",
                  shard_size=4, workers=2, nvdec_sessions=2)
    values.update(kw)
    return InferSettings(**values)


def _run(s: InferSettings, specs=None) -> dict:
    return run_local_job(s, discover(s.inputs), Windowing(s.frames, window_frames=s.window_frames), specs=specs)


def _features(out: Path) -> dict:
    features, rows = load_features(out)
    assert len({(r["id"], r["clip"]) for r in rows}) == len(rows)
    return {(r["id"], r["clip"]): f for f, r in zip(features, rows)}


def _assert_same(got: dict, want: dict, min_cos: float = 0.9999) -> float:
    assert sorted(got) == sorted(want)
    keys = sorted(want)
    cos = float(cosine_rows(np.stack([got[k] for k in keys]), np.stack([want[k] for k in keys])).min())
    print(f"min cos {cos:.7f} over {len(keys)} clips")
    assert cos >= min_cos
    return cos


def test_two_pipelines_on_one_gpu_give_what_one_gives(tmp_path, videos, variant):
    one = _run(_settings(videos, tmp_path / "one", variant))
    two = _run(_settings(videos, tmp_path / "two", variant), TWO_ON_GPU0)
    assert one["ok"] == two["ok"] == 16 and one["clips"] == two["clips"]
    assert len(two["pipelines"]) == 2 and all(p["decoders"]["nvdec"]["inputs"] for p in two["pipelines"])
    assert two["decoders"]["nvdec"]["inputs"] == 16  # NVDEC took every input in both pipelines
    _assert_same(_features(tmp_path / "two"), _features(tmp_path / "one"))


def test_cpu_workers_planes_reach_the_gpu_through_shared_memory_as_through_the_pipe(tmp_path, videos, variant,
                                                                                    caplog):
    """--decoder cpu on a GPU, 8 and 10-bit videos: the GPU converts the workers' planes; through the ring and
    through the pipe the features are the same, and close to the workers' own resize."""
    root = tmp_path / "mixed"
    root.mkdir()
    for v in sorted(videos.glob("*.mp4"))[:4]:
        os.link(v, root / v.name)
    for i in range(3):
        encode(root / f"hevc10_{i}.mp4", natural_frames(40, 144, 192, seed=50 + i), "libx265",
               pix_fmt="yuv420p10le", options={"x265-params": "log-level=0"})
    runs = {}
    for name, kw in (("ring", {}), ("pipe", dict(shared_memory=False)), ("resized", dict(gpu_convert=False))):
        with caplog.at_level(logging.INFO, logger="iv2trt.job.pipeline"):
            caplog.clear()
            summary = _run(_settings(root, tmp_path / name, variant, decoder="cpu", workers=3, **kw))
        assert summary["ok"] == 7 and summary["decoders"]["cpu"]["inputs"] == 7, summary
        runs[name] = _features(tmp_path / name)
        served = {"ring": "pass through shared memory", "pipe": "the workers' pipes (--no-shared-memory)"}
        if name in served:
            assert served[name] in caplog.text
    assert sorted(runs["ring"]) == sorted(runs["pipe"])
    for key in runs["ring"]:
        np.testing.assert_array_equal(runs["ring"][key], runs["pipe"][key])
    _assert_same(runs["ring"], runs["resized"])


def test_a_killed_gpu_pipeline_loses_nothing(tmp_path, videos, variant, caplog):
    _run(_settings(videos, tmp_path / "reference", variant))
    out = tmp_path / "killed"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=_run(_settings(videos, out, variant, shard_size=1),
                                                                      TWO_ON_GPU0)))
    with caplog.at_level(logging.WARNING, logger="iv2trt.job.local"):
        job.start()
        deadline = time.monotonic() + 300
        while len(list((out / "shards").glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(next(p for p in mp.active_children() if p.name == "iv2trt-gpu0").pid, signal.SIGKILL)
        job.join(300)
    assert result["summary"]["ok"] == 16 and "pipeline gpu0 died (exit code -9)" in caplog.text
    _assert_same(_features(out), _features(tmp_path / "reference"))


def test_graph_captures_while_nvdec_sessions_decode(videos, tiny_model):
    """Captures of new shapes while NVDEC sessions decode in other threads: none fails (thread-local capture),
    and the replays give the eager model's numbers."""
    from iv2trt.decode.nvdec import NvdecSession
    from iv2trt.runners.torch_runner import TorchRunner

    stop = threading.Event()
    decoded = []

    def decode_forever():
        session = NvdecSession(0, Windowing(4, window_frames=12), 56)
        while not stop.is_set():
            for path in sorted(videos.iterdir()):
                for _, frames, ready in session.clips("video", str(path)):
                    ready.synchronize()
                    decoded.append(frames.shape)
                if stop.is_set():
                    return

    threads = [threading.Thread(target=decode_forever, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    runner = TorchRunner(copy.deepcopy(tiny_model), device="cuda", precision="fp16", compile_mode="off")
    runner.replay_larger_graphs = False  # every batch size its own capture
    try:
        while len(decoded) < 8:
            time.sleep(0.05)
        for batch in (2, 3, 5, 6, 7, 8, 4):
            x = torch.randn(batch, 4, 3, 56, 56, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                got = runner.forward_device(x).float().clone()
                want = runner.model(x).float()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not runner._capture_failures and len(runner._graphs) == 7
    print(f"7 captures while 4 NVDEC sessions decoded {len(decoded)} clips")


def test_ray_pipeline_actor_decodes_with_nvdec(tmp_path, videos, variant):
    ray = pytest.importorskip("ray", reason="needs Ray (requirements-distributed.txt)")
    from iv2trt.distributed.ray_job import run_ray_job

    _run(_settings(videos, tmp_path / "local", variant))
    s = _settings(videos, tmp_path / "ray", variant, ray="local", ray_partition_size=4)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env=__import__("iv2trt.distributed.ray_job", fromlist=["runtime_env"]).runtime_env())
    try:
        summary = run_ray_job(s, discover(s.inputs), Windowing(s.frames, window_frames=s.window_frames))
    finally:
        ray.shutdown()
    # no pixels through Ray (on a failure: which fallbacks sent inputs to the CPU workers)
    assert summary["ok"] == 16 and summary["decoders"]["nvdec"]["inputs"] == 16, summary["decoders"]
    # the default beside NVDEC: NVDEC_PIPELINES_PER_GPU actors on the one GPU, each decoding and encoding there
    # (an actor that got no input makes no rows, so no summary: the planned count is the ray section's)
    assert summary["ray"]["pipelines"] == NVDEC_PIPELINES_PER_GPU
    assert 1 <= len(summary["pipelines"]) <= NVDEC_PIPELINES_PER_GPU
    assert all("cuda" in p["device"] for p in summary["pipelines"])
    assert summary["ray"]["startup"]["runner_probe_s"] > 0 and summary["ray"]["startup"]["actors_s"] > 0
    _assert_same(_features(tmp_path / "ray"), _features(tmp_path / "local"))
