"""Output directory: shards + manifests, per-video files, job.json checks, crash leftovers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iv2trt.errors import PipelineError
from iv2trt.output.results import shard_name
from iv2trt.output.writer import FailureLog, FeatureWriter, finished_ids, load_features, prepare_output


def _clips(n):
    return [{"start_s": float(i), "end_s": i + 1.0, "indices": [2 * i, 2 * i + 1]} for i in range(n)]


def _feats(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


@pytest.mark.parametrize("per_video", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shards_hold_whole_videos_and_round_trip(tmp_path, per_video, dtype):
    writer = FeatureWriter(tmp_path, dtype, shard_size=3, per_video_npy=per_video)
    expected = {}
    for k, n in enumerate([2, 2, 1, 4]):
        expected[f"v{k}"] = _feats(n, k)
        writer.add_video(f"/in/v{k}.mp4", f"v{k}", "video", _clips(n), expected[f"v{k}"])
    writer.flush()
    feats, rows = load_features(tmp_path)
    assert feats.dtype == np.dtype(dtype) and feats.shape == (9, 8)
    # shards hold whole videos, named by index and the digest of their ids (results.shard_name)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.parquet")) == [
        Path(shard_name(0, ["v0", "v1"]) + ".parquet").name, Path(shard_name(1, ["v2", "v3"]) + ".parquet").name]
    for feature, row in zip(feats, rows):
        np.testing.assert_allclose(feature, expected[row["id"]][row["clip"]], rtol=1e-3, atol=1e-3)
        assert row["frame_indices"] == [2 * row["clip"], 2 * row["clip"] + 1]
        assert row["window_end_s"] == row["window_start_s"] + 1 and row["num_clips"] == len(expected[row["id"]])
    assert (tmp_path / "videos" / "v3.npy").exists() == per_video
    assert finished_ids(tmp_path) == set(expected)


def test_crash_leftovers_are_ignored_and_numbering_continues(tmp_path):
    prepare_output(tmp_path, {"model": "a"}, overwrite=False)
    writer = FeatureWriter(tmp_path, "float32", shard_size=1)
    writer.add_video("/in/a.mp4", "a", "video", _clips(1), _feats(1, 0))
    orphan = tmp_path / (shard_name(1, ["b"]) + ".npy")
    np.save(orphan, np.zeros((1, 8)))   # features whose manifest never landed
    (tmp_path / "shards" / f".{orphan.stem}.parquet.abc.tmp").write_bytes(b"partial")
    assert prepare_output(tmp_path, {"model": "a"}, overwrite=False) == {"a"}
    assert not list(tmp_path.rglob("*.tmp"))
    writer = FeatureWriter(tmp_path, "float32", shard_size=1)
    assert not orphan.exists() and writer.next_shard == 1


def test_numbering_continues_after_the_other_executors_shards(tmp_path):
    """One naming scheme: a local run after a Ray run (partition shards) numbers on after the highest index, and
    neither scheme's names can collide (the digest of the ids differs)."""
    writer = FeatureWriter(tmp_path, "float32", shard_size=10)
    writer.add_video("/in/a.mp4", "a", "video", _clips(1), _feats(1, 0))
    writer.flush(name=shard_name(4, ["a", "b"]))  # as the Ray driver commits partition 4
    writer = FeatureWriter(tmp_path, "float32", shard_size=10)
    assert writer.next_shard == 5
    writer.add_video("/in/b.mp4", "b", "video", _clips(1), _feats(1, 1))
    writer.flush()
    names = sorted(p.name for p in (tmp_path / "shards").glob("*.parquet"))
    assert names == [Path(shard_name(4, ["a", "b"])).name + ".parquet", Path(shard_name(5, ["b"])).name + ".parquet"]
    assert [r["id"] for r in load_features(tmp_path)[1]] == ["a", "b"]


def test_job_json_mismatch_is_refused_unless_overwrite(tmp_path):
    prepare_output(tmp_path, {"model_sha256": "aa", "frames": 8}, overwrite=False)
    FeatureWriter(tmp_path, "float32", 1).add_video("/a.mp4", "a", "video", _clips(1), _feats(1, 0))
    with pytest.raises(PipelineError, match=r"frames: 8 there, 4 now.*--overwrite"):
        prepare_output(tmp_path, {"model_sha256": "aa", "frames": 4}, overwrite=False)
    assert prepare_output(tmp_path, {"model_sha256": "aa", "frames": 4}, overwrite=True) == set()
    assert json.loads((tmp_path / "job.json").read_text())["frames"] == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    with pytest.raises(PipelineError, match="not empty"):
        prepare_output(tmp_path / "other", {}, overwrite=False)


def test_failure_log(tmp_path):
    log = FailureLog(tmp_path)
    log.add("/in/x.mp4", "x.mp4", "empty file")
    log.add("/in/y.mp4", "y.mp4", "no video stream")
    lines = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in lines] == ["empty file", "no video stream"]
    assert FailureLog(tmp_path).count == 0 and not (tmp_path / "failures.jsonl").exists()  # a new run starts anew


def test_many_failures_cost_time_in_proportion_and_the_log_counts_them_by_reason(tmp_path, caplog):
    """Once rewritten on every failure (20,000 failures: 406 s), failures.jsonl is appended to; the log names the
    first FAILURES_SAID failures, then counts the rest by reason when the job ends."""
    import logging

    from iv2trt.job.stages import FAILURES_SAID, FailureLines

    log, said = FailureLog(tmp_path), FailureLines(logging.getLogger("iv2trt.test"))
    reasons = ["empty file (0 bytes)", "not a readable video or image (InvalidDataError: x)", "truncated: frame 3"]
    with caplog.at_level(logging.WARNING, "iv2trt.test"):
        for i in range(3 * FAILURES_SAID):
            log.add(f"/in/{i}.mp4", f"{i}.mp4", reasons[i % 3])
            said.add(f"/in/{i}.mp4", reasons[i % 3])
        said.close()
    lines = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert len(lines) == log.count == 3 * FAILURES_SAID
    assert [json.loads(line)["id"] for line in lines] == [f"{i}.mp4" for i in range(3 * FAILURES_SAID)]
    said_lines = [r.getMessage() for r in caplog.records]
    assert len(said_lines) == FAILURES_SAID + 2 and said_lines[0] == "failed /in/0.mp4: empty file (0 bytes)"
    assert said_lines[-1] == (f"{3 * FAILURES_SAID} inputs failed; by reason: {FAILURES_SAID} empty file; "
                              f"{FAILURES_SAID} not a readable video or image; {FAILURES_SAID} truncated")


def test_another_backends_output_names_the_backend_to_go_on_with(tmp_path):
    """A folder that --backend auto filled with one backend, resumed where auto picks another."""
    prepare_output(tmp_path, {"backend": "onnxruntime", "frames": 8}, overwrite=False)
    with pytest.raises(PipelineError, match=r"backend: 'onnxruntime' there, 'torch' now.*--backend onnxruntime to "
                                            r"go on with that job"):
        prepare_output(tmp_path, {"backend": "torch", "frames": 8}, overwrite=False)
    with pytest.raises(PipelineError) as refused:  # the backend agrees: nothing to add about it
        prepare_output(tmp_path, {"backend": "onnxruntime", "frames": 4}, overwrite=False)
    assert "--backend" not in str(refused.value)


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_a_file_is_refused_by_name(tmp_path, overwrite):
    """Before: NotADirectoryError, exit 1 ("internal error") with a traceback."""
    target = tmp_path / "features.npy"
    target.write_bytes(b"not a directory")
    for out in (target, target / "sub"):  # the output, or a folder above it, is a file
        with pytest.raises(PipelineError, match=f"--output {out}: {target} is a file.*pass a directory"):
            prepare_output(out, {"backend": "onnxruntime"}, overwrite)
    assert target.read_bytes() == b"not a directory"


def test_load_features_refuses_a_path_that_is_no_output_directory(tmp_path):
    """Before: a missing path (a typo, or outputs/ for outputs/features) read back as empty arrays."""
    for path in (tmp_path / "missing", tmp_path):  # nothing there; a folder that no job wrote to
        with pytest.raises(FileNotFoundError, match=f"{path}.*--output of trt_inference.py"):
            load_features(path)
    out = tmp_path / "features"
    prepare_output(out, {"backend": "onnxruntime"}, False)
    FeatureWriter(out)  # a job that has committed nothing yet: empty, not an error
    feats, rows = load_features(out)
    assert feats.shape == (0, 0) and rows == []


def test_shards_also_commit_after_commit_seconds_of_work(tmp_path, monkeypatch):
    """Before: only --shard-size rows committed a shard (4096 by default: minutes of CPU work lost to a kill)."""
    from iv2trt.output import writer as writer_module

    clock = [100.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    writer = FeatureWriter(tmp_path, "float32", shard_size=4096, commit_seconds=60)
    shards = lambda: sorted(p.name for p in (tmp_path / "shards").glob("*.parquet"))  # noqa: E731
    writer.add_video("/in/a.mp4", "a", "video", _clips(2), _feats(2, 0))
    clock[0] += 59
    writer.add_video("/in/b.mp4", "b", "video", _clips(1), _feats(1, 1))
    assert shards() == []  # the oldest finished video has waited 59 s
    clock[0] += 1
    writer.add_video("/in/c.mp4", "c", "video", _clips(3), _feats(3, 2))
    first = Path(shard_name(0, ["a", "b", "c"])).name + ".parquet"
    assert shards() == [first] and finished_ids(tmp_path) == {"a", "b", "c"}  # whole videos
    clock[0] += 30
    writer.add_video("/in/d.mp4", "d", "video", _clips(1), _feats(1, 3))
    clock[0] += 59
    writer.add_video("/in/e.mp4", "e", "video", _clips(1), _feats(1, 4))
    assert shards() == [first]  # d's clock started when d finished, 59 s ago
    untimed = FeatureWriter(tmp_path / "untimed", "float32", shard_size=4096)  # the Ray executor's: by size only
    untimed.add_video("/in/a.mp4", "a", "video", _clips(1), _feats(1, 0))
    clock[0] += 1e6
    untimed.add_video("/in/b.mp4", "b", "video", _clips(1), _feats(1, 1))
    assert not list((tmp_path / "untimed" / "shards").glob("*.parquet"))
