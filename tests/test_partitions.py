"""The Ray executor's pure parts: partitions, the driver's assembler, decode rows, deadlines, engine maps, flags."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from iv2trt.decode.clips import DecodeError, Windowing
from iv2trt.decode.inputs import InputItem
from iv2trt.distributed.partitions import PartitionAssembler, plan_partitions
from iv2trt.distributed.ray_stages import DecodeSpec, clip_frames, decode_rows
from iv2trt.engine.engine_map import engine_for_gpu, parse_engine_map
from iv2trt.errors import PipelineError
from iv2trt.job.stages import DecodeStalled, clips_with_deadline
from iv2trt.output.writer import FailureLog, FeatureWriter, finished_ids, load_features


def _items(n: int) -> list[InputItem]:
    return [InputItem(f"/in/v{i:02d}.mp4", f"v{i:02d}.mp4", "video") for i in range(n)]


def test_partitions_are_deterministic_and_skip_committed_ones():
    items = _items(10)
    parts, committed = plan_partitions(items, 4, set())
    assert [p.numbers for p in parts] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)] and committed == 0
    assert [p.shard for p in parts] == [p.shard for p in plan_partitions(items, 4, set())[0]]
    assert parts[0].shard.startswith("shards/shard-00000-")
    # inputs 0..3 committed, 5 committed: partition 0 skipped, partition 1 redone without input 5 (another name)
    again, committed = plan_partitions(items, 4, {"v00.mp4", "v01.mp4", "v02.mp4", "v03.mp4", "v05.mp4"})
    assert committed == 1 and [p.numbers for p in again] == [(4, 6, 7), (8, 9)]
    assert again[0].shard != parts[1].shard and again[1].shard == parts[2].shard


def _clip(i: int) -> dict:
    return {"start_s": float(i), "end_s": i + 1.0, "indices": [i, i + 1]}


def test_assembler_commits_each_partition_once_whatever_the_row_order(tmp_path):
    items = _items(5)
    parts, _ = plan_partitions(items, 2, set())
    writer = FeatureWriter(tmp_path, "float32", shard_size=sys.maxsize)
    finished = []
    a = PartitionAssembler(items, parts, writer, FailureLog(tmp_path), finished.append)
    rng = np.random.default_rng(0)
    feats = {(n, c): rng.standard_normal(4).astype(np.float32) for n in range(5) for c in range(3)}
    counts = {0: 3, 1: 2, 2: 1, 3: 1, 4: 2}
    rows = [(n, c) for n in range(5) for c in range(counts[n]) if n != 3]
    order = rng.permutation(len(rows))
    for k in [*order, *order[:4]]:  # every row once, then some again (a retried task)
        n, c = rows[k]
        a.add_clip(n, c, _clip(c), feats[n, c], counts[n] if c == counts[n] - 1 else 0)
        if k == order[2]:
            a.add_clip(3, 0, _clip(0), feats[3, 0], 0)  # input 3 sends a clip, then fails
            a.add_failure(3, "broken")
            a.add_clip(3, 1, _clip(1), feats[3, 1], 2)   # rows after its outcome are ignored
    assert a.complete and sorted(finished) == [False, True, True, True, True]
    assert a.stats == {"ok": 4, "failed": 1, "clips": 8, "shards": 3}
    features, manifest = load_features(tmp_path)
    assert len(manifest) == 8 and {r["file"] for r in manifest} == {f"{p.shard}.npy" for p in parts}
    for f, r in zip(features, manifest):
        n = int(r["id"][1:3])
        assert r["num_clips"] == counts[n] and r["frame_indices"] == [r["clip"], r["clip"] + 1]
        np.testing.assert_array_equal(f, feats[n, r["clip"]])
    assert json.loads((tmp_path / "failures.jsonl").read_text()) == {"path": "/in/v03.mp4", "id": "v03.mp4",
                                                                      "reason": "broken"}
    # the local writer resumes there without touching the partition shards
    local = FeatureWriter(tmp_path, "float32", shard_size=10)
    local.add_video("/in/v03.mp4", "v03.mp4", "video", [_clip(0)], feats[3, 0][None])
    local.flush()
    assert finished_ids(tmp_path) == {item.id for item in items} and len(load_features(tmp_path)[1]) == 9


def _spec(source, frame_range=(1, 16), timeout_s=30.0) -> DecodeSpec:
    return DecodeSpec(source, Windowing(4), 8, frame_range, "onnxruntime", timeout_s)


def test_decode_rows_hold_the_count_on_the_last_clip_and_report_failures():
    item = InputItem("/in/x.mp4", "x.mp4", "video")

    def three(item, w, size):
        for i in range(3):
            yield _clip(i), np.full((4, size, size, 3), i, np.uint8)

    rows = list(decode_rows(item, 7, _spec(three), "node"))
    assert [(r["number"], r["clip"], r["count"], r["error"]) for r in rows] == [(7, 0, 0, ""), (7, 1, 0, ""),
                                                                                 (7, 2, 3, "")]
    assert json.loads(rows[1]["info"]) == _clip(1) and rows[2]["frames"][0, 0, 0, 0] == 2

    def breaks(item, w, size):
        yield _clip(0), np.zeros((4, size, size, 3), np.uint8)
        raise DecodeError("truncated")

    rows = list(decode_rows(item, 1, _spec(breaks), "node"))
    assert [r["error"] for r in rows] == ["truncated"] and rows[0]["frames"].ndim == 4
    assert list(decode_rows(item, 1, _spec(lambda *a: iter(())), "node"))[0]["error"] == "no clips"
    too_long = list(decode_rows(item, 1, _spec(three, frame_range=(1, 2)), "node"))
    assert too_long[0]["error"] == "clips of 4 frames; the onnxruntime model takes 1..2"

    floats = np.random.default_rng(1).standard_normal((2, 4, 3, 8, 8)).astype(np.float32)

    def npy(item, w, size):
        for clip in floats:
            yield {"start_s": np.nan, "end_s": np.nan, "indices": []}, clip

    rows = list(decode_rows(item, 2, _spec(npy), "node"))
    assert all(r["is_float"] and r["frames"].dtype == np.uint8 for r in rows)
    np.testing.assert_array_equal(np.stack([clip_frames(r["frames"], True) for r in rows]), floats)


def test_deadline_interrupts_a_stalled_source():
    def stalls():
        yield 1
        time.sleep(30)
        yield 2

    got = []
    started = time.monotonic()
    with pytest.raises(DecodeStalled):
        for x in clips_with_deadline(stalls(), 0.3):
            got.append(x)
    assert got == [1] and time.monotonic() - started < 5

    def hides_the_interrupt():  # a decoder that turns the interruption into an error of its own
        try:
            time.sleep(30)
        except BaseException:
            raise OSError("interrupted system call") from None
        yield 1

    with pytest.raises(DecodeStalled):
        list(clips_with_deadline(hides_the_interrupt(), 0.3))
    assert list(clips_with_deadline(iter([1, 2]), 0.3)) == [1, 2]


def test_deadline_never_interrupts_an_import(tmp_path, monkeypatch):
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(1.0)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def imports_then_stalls():
        import slow_to_import  # takes longer than the deadline: must complete, not be cut in half

        yield slow_to_import.DONE
        time.sleep(30)
        yield 2

    got = []
    with pytest.raises(DecodeStalled):
        for x in clips_with_deadline(imports_then_stalls(), 0.3):
            got.append(x)
    assert got == [True] and sys.modules["slow_to_import"].DONE


def test_engine_map_picks_the_longest_matching_key():
    mapping = parse_engine_map(["H100=h100.engine", "NVIDIA H100 NVL=nvl.engine", "L4=l4.engine"])
    assert engine_for_gpu(mapping, "NVIDIA H100 80GB HBM3", "default.engine") == "h100.engine"
    assert engine_for_gpu(mapping, "NVIDIA H100 NVL", "default.engine") == "nvl.engine"
    assert engine_for_gpu(mapping, "NVIDIA A10G", "default.engine") == "default.engine"
    assert engine_for_gpu(mapping, None, "default.engine") == "default.engine"
    with pytest.raises(PipelineError, match="GPU_MODEL=PATH"):
        parse_engine_map(["h100.engine"])


def test_local_gpu_name_is_the_name_engines_record(monkeypatch):
    """The engine map looks a node's GPU up by the name build_engine.py writes into the engine's metadata."""
    from iv2trt.engine import cuda_env, engine_map

    monkeypatch.setattr(cuda_env, "GPU_PROBES", (lambda device: None,
                                                 lambda device: {"name": "NVIDIA L4", "compute_capability": "8.9"}))
    assert engine_map.local_gpu_name() == "NVIDIA L4"
    monkeypatch.setattr(cuda_env, "GPU_PROBES", (lambda device: None,))
    assert engine_map.local_gpu_name() is None


def test_ray_flag_takes_an_optional_address_and_missing_ray_exits_4(tmp_path, monkeypatch):
    from iv2trt.cli import run_main
    from iv2trt.cli.infer import main
    from iv2trt.job.settings import InferSettings
    from iv2trt.settings import build_parser

    parser = build_parser(InferSettings, "")
    assert vars(parser.parse_args(["--ray"]))["ray"] == "local"
    assert vars(parser.parse_args(["--ray", "auto", "--frames", "4"]))["ray"] == "auto"
    assert "ray" not in vars(parser.parse_args([]))
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert run_main(main, ["--inputs", str(tmp_path), "--output", str(tmp_path / "o"), "--ray"]) == 4
    assert not (tmp_path / "o").exists()
