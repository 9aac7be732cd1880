"""End-to-end extraction on the tiny model: CLI, failures, resume, backend agreement, timeouts, SIGKILL."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from iv2trt.cli import run_main
from iv2trt.cli.infer import main
from iv2trt.decode.clips import Windowing
from iv2trt.decode.inputs import discover
from iv2trt.decode.pyav import read_clips
from iv2trt.decode.samples import pattern_frames, write_image, write_video
from iv2trt.job.local import run_job
from iv2trt.job.pipeline import JobOptions
from iv2trt.output.writer import FeatureWriter, load_features
from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner
from iv2trt.runners.torch_runner import TorchRunner
from iv2trt.transforms import preprocess_frames

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a.mp4", pattern_frames(40, 48, 64, seed=1), gop=8)
    write_video(root / "b.webm" if _vp9() else root / "b.avi", pattern_frames(23, 60, 40, seed=2),
                codec="libvpx-vp9" if _vp9() else "mpeg4")
    write_video(root / "sub" / "rot.mp4", pattern_frames(9, 32, 64, seed=3), rotation=90)
    write_video(root / "sub" / "one.mp4", pattern_frames(1, 50, 50, seed=4))
    write_image(root / "still.png", pattern_frames(1, 70, 90, seed=5)[0])
    np.save(root / "pre.npy", np.random.default_rng(0).standard_normal((2, 4, 3, 56, 56)).astype(np.float32))
    return root


def _vp9() -> bool:
    import av

    try:
        av.codec.Codec("libvpx-vp9", "w")
        return True
    except Exception:
        return False


def _broken(folder: Path) -> list[str]:
    folder.mkdir(exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.mkv").write_bytes(os.urandom(3000))
    return ["empty.mp4", "garbage.mkv"]


def _cli(tiny_onnx, *args, precision="fp32"):
    return ["--backend", "onnxruntime", "--onnx", str(tiny_onnx[precision]), "--frames", "4", "--workers", "2",
            "--no-progress", *map(str, args)]


def _by_key(out_dir):
    feats, rows = load_features(out_dir)
    return {(r["id"], r["clip"]): f for f, r in zip(feats, rows)}, rows


def test_cli_extracts_reports_failures_and_resumes(tmp_path, videos, tiny_onnx):
    broken = tmp_path / "broken"
    names = _broken(broken)
    out = tmp_path / "out"
    argv = _cli(tiny_onnx, "--inputs", videos, broken, "--output", out, "--batch-size", 3, "--shard-size", 3,
                "--dtype", "float32", "--window-frames", 16, "--stride", 8)
    assert run_main(main, argv) == 6
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == names and all(f["reason"] for f in failures)
    feats, rows = _by_key(out)
    ids = {r["id"] for r in rows}
    assert ids == {"a.mp4", "b.webm" if _vp9() else "b.avi", "sub/rot.mp4", "sub/one.mp4", "still.png", "pre.npy"}
    assert len(feats) == len(rows)  # no duplicates
    assert [r["clip"] for r in rows if r["id"] == "a.mp4"] == [0, 1, 2, 3]  # windows 0,8,16,24 (24+16 = 40)
    np.testing.assert_allclose(np.linalg.norm(np.stack(list(feats.values())), axis=1), 1, atol=1e-5)
    # features equal the runner on the same clips, normalised
    runner = OnnxRuntimeRunner(tiny_onnx["fp32"])
    clips = list(read_clips(str(videos / "a.mp4"), Windowing(4, window_frames=16, stride=8)))
    raw = runner.infer(np.stack([preprocess_frames(c.frames, 56).numpy() for c in clips]))
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([feats[("a.mp4", i)] for i in range(4)]), expected, atol=1e-5)
    row = next(r for r in rows if r["id"] == "a.mp4" and r["clip"] == 1)
    assert row["frame_indices"] == [8 + i for i in (1, 5, 9, 13)] and row["window_start_s"] == pytest.approx(8 / 25)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 6 and summary["failed"] == 2 and summary["clips"] == len(rows)

    # rerun: nothing new is extracted, the broken inputs are tried (and fail) again
    manifests = sorted((out / "shards").iterdir())
    assert run_main(main, argv) == 6
    assert sorted((out / "shards").iterdir()) == manifests
    assert json.loads((out / "summary.json").read_text())["skipped_already_done"] == 6
    # other settings into the same folder: refused with the fix in the message
    assert run_main(main, argv + ["--frames", "2"]) == 2
    assert run_main(main, argv + ["--frames", "2", "--overwrite", "--inputs", str(videos / "a.mp4")]) == 0


def test_per_video_npy_and_float16(tmp_path, videos, tiny_onnx):
    out = tmp_path / "out"
    assert run_main(main, _cli(tiny_onnx, "--inputs", videos / "sub", "--output", out, "--per-video-npy")) == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["one.mp4.npy", "rot.mp4.npy"]
    feats, _ = load_features(out)
    assert feats.dtype == np.float16 and feats.shape == (2, 32)


def _extract(items, runner, out_dir, batch_size=4):
    writer = FeatureWriter(out_dir, "float32", shard_size=100)
    run_job(items, runner, out_dir, writer, JobOptions(Windowing(4), 56, batch_size, 2, 60.0, False))
    return _by_key(out_dir)[0]


def test_backends_agree(tmp_path, videos, tiny_model, tiny_onnx):
    from iv2trt.compare import compare

    items = discover([str(videos)])
    reference = _extract(items, TorchRunner(tiny_model, device="cpu", precision="fp32"), tmp_path / "torch")
    keys = sorted(reference)
    ref = np.stack([reference[k] for k in keys])
    fp32 = _extract(items, OnnxRuntimeRunner(tiny_onnx["fp32"]), tmp_path / "ort32", batch_size=3)
    fp16 = _extract(items, OnnxRuntimeRunner(tiny_onnx["fp16"]), tmp_path / "ort16")
    assert sorted(fp32) == keys == sorted(fp16)
    assert compare(ref, np.stack([fp32[k] for k in keys])).max_abs_error < 1e-4
    assert compare(ref, np.stack([fp16[k] for k in keys])).min_cosine >= 0.999


def test_compare_pytorch_flag(tmp_path, tiny_cfg, videos):
    from iv2trt.export.onnx_export import export_onnx
    from iv2trt.models import create_model

    variant = tmp_path / "tiny.yaml"
    variant.write_text(yaml.safe_dump(dataclasses.asdict(tiny_cfg)))
    onnx = export_onnx(create_model(str(variant), random_init=True, seed=0), tmp_path / "t.onnx", "fp32",
                       max_batch=8, max_frames=16)
    argv = ["--backend", "onnxruntime", "--onnx", str(onnx), "--variant", str(variant), "--frames", "4",
            "--workers", "1", "--no-progress", "--inputs", str(videos / "sub"), "--compare-pytorch", "random"]
    assert run_main(main, argv + ["--output", str(tmp_path / "o1")]) == 0
    assert json.loads((tmp_path / "o1" / "summary.json").read_text())["compare_pytorch"]["min_cosine"] > 0.9999
    # the reference built from other weights disagrees: exit 3
    assert run_main(main, argv + ["--output", str(tmp_path / "o2"), "--seed", "1"]) == 3


def test_a_tensorrt_engine_s_variant_is_checked_and_recorded(tmp_path, caplog):
    """The engine's <engine>.json carries its ONNX's metadata: the job takes its variant when --variant is not
    given, refuses one that disagrees (exit 2), and records it in job.json (the identity)."""
    from types import SimpleNamespace

    from iv2trt.errors import PipelineError
    from iv2trt.job.identity import complete_identity, job_identity
    from iv2trt.job.settings import InferSettings

    engine = tmp_path / "b14.engine"
    engine.write_bytes(b"engine")
    runner = SimpleNamespace(name="tensorrt", precision="fp16",
                             metadata={"onnx": {"variant": "internvideo2_clip_b14", "random_init": "false"}})
    s = InferSettings(engine=str(engine))  # as the default config file gives it: internvideo2_clip_s14, not given
    with caplog.at_level("INFO"):
        assert complete_identity(job_identity(s, runner, 224), s)["variant"] == "internvideo2_clip_b14"
    assert "model variant internvideo2_clip_b14, the model file's (no --variant given)" in caplog.text
    for variant in ("b14", "internvideo2_clip_b14"):  # a short name is the same variant
        given = dataclasses.replace(s, variant=variant, given=frozenset({"variant"}))
        assert complete_identity(job_identity(given, runner, 224), given)["variant"] == "internvideo2_clip_b14"
    wrong = dataclasses.replace(s, given=frozenset({"variant"}))
    with pytest.raises(PipelineError, match="--variant internvideo2_clip_s14 disagrees with b14.engine, made for "
                                            "internvideo2_clip_b14: pass --variant internvideo2_clip_b14"):
        complete_identity(job_identity(wrong, runner, 224), wrong)


def test_hanging_decoder_is_timed_out(tmp_path, videos, tiny_onnx):
    inputs = tmp_path / "in"
    inputs.mkdir()
    os.mkfifo(inputs / "hangs.mp4")  # opening a FIFO nobody writes to blocks forever
    (inputs / "a.mp4").symlink_to(videos / "a.mp4")
    out = tmp_path / "out"
    started = time.monotonic()
    argv = _cli(tiny_onnx, "--inputs", inputs, "--output", out, "--decode-timeout-s", 3)
    assert run_main(main, argv) == 6
    assert time.monotonic() - started < 60
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["id"] == "hangs.mp4" and "timed out" in failure["reason"]
    assert {r["id"] for r in _by_key(out)[1]} == {"a.mp4"}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_onnx):
    inputs = tmp_path / "in"
    for i in range(40):
        write_video(inputs / f"v{i:02d}.mp4", pattern_frames(6 + i % 5, 24, 32, seed=i))
    args = _cli(tiny_onnx, "--inputs", inputs, "--batch-size", 2, "--shard-size", 2, "--dtype", "float32",
                "--workers", 1)
    command = [sys.executable, str(ROOT / "trt_inference.py"), *args]
    subprocess.run(command + ["--output", str(tmp_path / "full")], check=True, cwd=ROOT, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command + ["--output", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "shards").glob("*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _by_key(killed)[1]
    assert 0 < len({r["id"] for r in partial}) < 40
    subprocess.run(command + ["--output", str(killed)], check=True, cwd=ROOT, capture_output=True)

    full, full_rows = _by_key(tmp_path / "full")
    resumed, resumed_rows = _by_key(killed)
    assert len(resumed_rows) == len(full_rows) == len(resumed)  # no duplicates, no gaps
    assert sorted(full) == sorted(resumed)
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key])


def test_exit_codes_for_bad_settings_and_missing_backend(tmp_path, videos, tiny_onnx):
    out = ["--output", str(tmp_path / "out"), "--inputs", str(videos / "a.mp4")]
    assert run_main(main, ["--backend", "tensorrt", "--engine", str(tmp_path / "none.engine"), *out]) == 4
    assert run_main(main, _cli(tiny_onnx, "--window-seconds", 2, "--window-frames", 8, *out)) == 2
    assert run_main(main, _cli(tiny_onnx, "--inputs", tmp_path / "missing", "--output", tmp_path / "o")) == 2
    assert run_main(main, _cli(tiny_onnx, "--frames", 17, *out)) == 2  # the graph takes 1..16 frames
    assert not (tmp_path / "out" / "shards").exists()
