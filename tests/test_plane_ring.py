"""CPU workers' planes through shared memory (decode/plane_ring.py): the same bytes as through the pipe, slots
reused only once given back, clips too big for a slot and machines without memfd on the pipe, and the job's
output unchanged (the GPU conversion run here on CPU tensors)."""
from __future__ import annotations

import functools
import logging

import numpy as np
import pytest

from iv2trt.decode import plane_ring
from iv2trt.decode.clips import Windowing
from iv2trt.decode.gpu_frames import YuvClip
from iv2trt.decode.inputs import InputItem, discover
from iv2trt.decode.samples import pattern_frames, write_video
from iv2trt.decode.source import iter_clips
from iv2trt.decode.workers import CpuWorker, worker_context
from iv2trt.job.local import run_job
from iv2trt.job.pipeline import JobOptions, Pipeline
from iv2trt.output.writer import FeatureWriter, load_features
from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

SIZE = 56
W = Windowing(4, window_frames=4)
PLANES = functools.partial(iter_clips, planes=True)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> InputItem:
    path = write_video(tmp_path_factory.mktemp("ring") / "v.mp4", pattern_frames(40, 90, 124, seed=4), gop=5)
    return InputItem(str(path), path.name, "video")


@pytest.fixture(scope="module")
def video_10bit(tmp_path_factory) -> InputItem:
    path = write_video(tmp_path_factory.mktemp("ring10") / "v10.mp4", pattern_frames(24, 90, 124, seed=5), "libx265",
                       pix_fmt="yuv420p10le", options={"x265-params": "log-level=0"})
    return InputItem(str(path), path.name, "video")


def _run_worker(item: InputItem) -> tuple[bool, list[tuple[tuple, int | None]]]:
    """A worker asked for a ring: whether it got one, and every message of `item` (_messages)."""
    wk = CpuWorker(worker_context(), W, SIZE, PLANES, ring=True)
    try:
        return wk.ring is not None, _messages(wk, item)
    finally:
        wk.stop()


def _messages(wk: CpuWorker, item: InputItem) -> list[tuple[tuple, int | None]]:
    """Every message of one input, each clip's planes copied out of the slot before the slot is given back."""
    wk.assign(0, item)
    out = []
    while True:
        assert wk.conn.poll(30), "the worker went silent"
        message, slot = wk.receive()
        if message[0] == "clip":
            clip = message[3]
            message = (*message[:3], YuvClip(np.array(clip.planes), *_fields(clip), clip.siting), message[4])
            if slot is not None:
                wk.give_back(slot)
        out.append((message, slot))
        if message[0] != "clip":
            return out


def _fields(clip: YuvClip) -> tuple:
    return clip.colorspace, clip.color_range, clip.pix_fmt, clip.height, clip.width, clip.rotation


@pytest.mark.parametrize("name", ["video", "video_10bit"])
def test_planes_through_the_ring_equal_the_pipes(request, name):
    video = request.getfixturevalue(name)
    want = list(PLANES(video, W, SIZE))
    assert len(want) >= 6 > plane_ring.SLOTS  # every slot is used several times
    has_ring, got = _run_worker(video)
    assert has_ring and got[-1][0] == ("done", 0, len(want))
    slots = [slot for _, slot in got[:-1]]
    assert sorted(set(slots)) == list(range(plane_ring.SLOTS))
    for (message, _), (info, clip) in zip(got, want):
        assert message[2] == info
        assert message[3].planes.dtype == clip.planes.dtype and message[3].siting == clip.siting
        assert np.array_equal(message[3].planes, clip.planes) and _fields(message[3]) == _fields(clip)


def test_a_slot_is_not_written_again_before_it_is_given_back(video):
    wk = CpuWorker(worker_context(), W, SIZE, PLANES, ring=True)
    try:
        wk.assign(0, video)
        held = []
        for _ in range(plane_ring.SLOTS):
            assert wk.conn.poll(30)
            message, slot = wk.receive()
            held.append((np.array(message[3].planes), message[3].planes, slot))
        assert not wk.conn.poll(1.0), "the worker wrote a clip with no slot free"
        for copy, view, _ in held:  # nothing overwrote the slots meanwhile
            assert np.array_equal(copy, view)
        wk.give_back(held[0][2])
        assert wk.conn.poll(30)
        message, slot = wk.receive()
        assert slot == held[0][2]
        want = list(PLANES(video, W, SIZE))
        assert np.array_equal(message[3].planes, want[plane_ring.SLOTS][1].planes)
    finally:
        wk.stop(kill=True)


def test_clips_too_big_for_a_slot_and_machines_without_memfd_use_the_pipe(video, monkeypatch, caplog):
    want = [clip.planes for _, clip in PLANES(video, W, SIZE)]
    monkeypatch.setattr(plane_ring, "SLOT_PIXELS", 90 * 124 // 2)  # half a frame: no clip fits
    has_ring, got = _run_worker(video)
    assert has_ring and [slot for _, slot in got] == [None] * len(got)
    assert all(np.array_equal(m[3].planes, p) for (m, _), p in zip(got, want))

    def no_memfd(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(plane_ring.os, "memfd_create", no_memfd)
    with caplog.at_level(logging.DEBUG, "iv2trt.decode.plane_ring"):
        has_ring, got = _run_worker(video)
    assert not has_ring and "through the pipe" in caplog.text
    assert all(np.array_equal(m[3].planes, p) for (m, _), p in zip(got, want))


@pytest.fixture
def gpu_convert_on_cpu(monkeypatch):
    """The pipeline as on a GPU (CPU workers hand planes over), its conversion run on CPU tensors."""
    monkeypatch.setattr(Pipeline, "_gpu_converts", lambda self: self.o.gpu_convert)
    monkeypatch.setattr(Pipeline, "_convert",
                        lambda self, clip: (clip.to_model_frames("cpu", self.o.img_size).numpy(), None))


@pytest.mark.parametrize("shared_memory", [True, False])
def test_the_job_gives_the_cpu_paths_features_through_either_transport(tmp_path, tiny_onnx, gpu_convert_on_cpu,
                                                                       shared_memory, caplog):
    root = tmp_path / "in"
    for i in range(4):
        write_video(root / f"v{i}.mp4", pattern_frames(30 + 5 * i, 48, 64, seed=i), gop=6)
    write_video(root / "v10.mp4", pattern_frames(24, 48, 64, seed=9), "libx265", pix_fmt="yuv420p10le",
                options={"x265-params": "log-level=0:chromaloc=2"})
    parts = [write_video(tmp_path / f"part{i}.ts", pattern_frames(20, h, w, seed=20 + i), "mpeg2video")
             for i, (h, w) in enumerate([(48, 64), (32, 48)])]  # a resolution switch mid-stream: planes, then RGB
    (root / "switch.ts").write_bytes(b"".join(p.read_bytes() for p in parts))
    runner = OnnxRuntimeRunner(tiny_onnx["fp32"])

    def run(name, **kw):
        out = tmp_path / name
        options = JobOptions(Windowing(frames=4, window_frames=8), SIZE, 4, 2, 120.0, False, "cpu", **kw)
        summary = run_job(discover([str(root)]), runner, out, FeatureWriter(out, "float32", 1000), options)
        assert summary["failed"] == 0
        feats, rows = load_features(out)
        return {(r["id"], r["clip"]): f for f, r in zip(feats, rows)}

    with caplog.at_level(logging.INFO, "iv2trt.job.pipeline"):
        got = run("handed", shared_memory=shared_memory)
    assert ("pass through shared memory" if shared_memory else "pipes (--no-shared-memory)") in caplog.text
    want = run("resized_by_workers", gpu_convert=False)
    assert sorted(got) == sorted(want) and len(want) > 8
    for key, feature in want.items():
        np.testing.assert_array_equal(got[key], feature)  # the same pixels, so the same features



def test_the_transport_benchmark_times_both_ways(tmp_path, tiny_cfg):
    import dataclasses
    import json

    import yaml

    from iv2trt.bench.main import main as benchmark_main

    variant = tmp_path / "tiny.yaml"
    variant.write_text(yaml.safe_dump(dataclasses.asdict(tiny_cfg)))
    out = tmp_path / "bench"
    assert benchmark_main(["--variant", str(variant), "--skip-encoder", "--plane-transport", "--transport-sizes",
                           "64x48", "--transport-workers", "2", "--transport-clips", "5", "--output-dir",
                           str(out)]) == 0
    rows = json.loads((out / "benchmark.json").read_text())["plane_transport"]["rows"]
    assert [(r["transport"], r["clips"], r["clip_mb"]) for r in rows] == [("pipe", 10, 0.04),
                                                                         ("shared memory", 10, 0.04)]
    assert all(r["clips_per_s"] > 0 and r["receiver_cpu_ms_per_clip"] >= 0 for r in rows)
    assert "| 64x48 x 8 (0.04 MB) | 2 | shared memory |" in (out / "benchmark.md").read_text()
