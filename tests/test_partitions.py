"""The Ray executor's pure parts: partitions, the driver's assembler, decode rows, deadlines, engine maps, flags."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from iv2trt.decode.inputs import InputItem
from iv2trt.distributed.partitions import PartitionAssembler, plan_partitions
from iv2trt.distributed.ray_stages import feature_rows
from iv2trt.engine.engine_map import engine_for_gpu, parse_engine_map
from iv2trt.errors import PipelineError
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


def test_feature_rows_hold_the_count_on_the_last_clip_and_report_failures():
    """A pipeline actor's rows: each input's clips in order with its count on the last, a failed input as one
    row with its reason (the driver's assembler relies on both)."""
    feats = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    outcomes = [([_clip(i) for i in range(3)], feats, ""), ([], None, "truncated"), ([_clip(0)], feats[:1], "")]
    rows = feature_rows([7, 1, 2], outcomes, 8, "node/actor", "{}")
    assert [(n, c, k, e) for n, c, k, e in zip(rows["number"], rows["clip"], rows["count"], rows["error"])] == [
        (7, 0, 0, ""), (7, 1, 0, ""), (7, 2, 3, ""), (1, -1, 0, "truncated"), (2, 0, 1, "")]
    assert json.loads(rows["info"][1]) == _clip(1) and rows["info"][3] == ""
    np.testing.assert_array_equal(rows["feature"][:3], feats)
    assert rows["feature"].shape == (5, 8) and not rows["feature"][3].any()
    assert set(rows["pipeline"]) == {"node/actor"} and len(rows["stats"]) == 5
    empty = feature_rows([], [], 8, "node/actor", "{}")
    assert empty["feature"].shape == (0, 8)


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
