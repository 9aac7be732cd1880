"""Stage 3 as a new user meets it: settings refused by name, random weights said loudly, the CPU's fastest
graph, resumed runs' totals, the output read back, Ctrl-C at any moment (exit 130, committed work kept)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest

from iv2trt.cli import run_main
from iv2trt.cli.infer import main
from iv2trt.decode.samples import pattern_frames, write_video
from iv2trt.errors import PipelineError
from iv2trt.output.results import load_features

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for i in range(3):
        write_video(root / f"v{i}.mp4", pattern_frames(5 + i, 40, 48, seed=i))
    return root


@pytest.fixture(scope="module")
def random_onnx(tiny_onnx, tmp_path_factory) -> dict[str, Path]:
    """The tiny graphs labelled as export_onnx.py labels --random-init ones."""
    out = tmp_path_factory.mktemp("random_onnx")
    paths = {}
    for precision, path in tiny_onnx.items():
        model = onnx.load(str(path))
        model.metadata_props.add(key="random_init", value="true")
        paths[precision] = out / f"tiny_random_{precision}.onnx"
        onnx.save(model, str(paths[precision]))
    return paths


def _argv(onnx_path, inputs, out, *extra):
    return ["--backend", "onnxruntime", "--onnx", str(onnx_path), "--frames", "4", "--workers", "1",
            "--no-progress", "--inputs", *map(str, inputs), "--output", str(out), *map(str, extra)]


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers 0: must be positive"),
    (["--batch-size", "-2", "--decode-timeout-s", "0"], "--batch-size -2, --decode-timeout-s 0.0: must be positive"),
    (["--stride", "2"], "--stride 2 needs a window to step: add --window-seconds or --window-frames"),
    (["--window-seconds", "0"], "--window-seconds 0.0: must be positive (without a window each video is one clip)"),
    (["--window-frames", "4", "--stride", "0"], "--stride 0.0: must be positive"),
    (["--pipelines-per-gpu", "-1"], "--pipelines-per-gpu -1: must be positive (or 0: 2 where the GPU decodes"),
])
def test_settings_are_refused_by_name(tmp_path, clips, tiny_onnx, extra, message, capfd):
    out = tmp_path / "out"
    assert run_main(main, _argv(tiny_onnx["fp32"], [clips], out, *extra)) == 2
    assert message in capfd.readouterr().err and not out.exists()


def test_missing_default_onnx_names_the_working_directory_and_the_flag(tmp_path, clips, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    argv = ["--backend", "onnxruntime", "--inputs", str(clips), "--output", "out", "--no-progress"]
    assert run_main(main, argv) == 2
    err = capfd.readouterr().err
    assert f"build/internvideo2_clip_s14_fp16.onnx (relative to the working directory {tmp_path})" in err
    assert "--onnx PATH" in err


def test_random_weights_are_said_and_recorded(tmp_path, clips, random_onnx, capfd):
    out = tmp_path / "out"
    assert run_main(main, _argv(random_onnx["fp32"], [clips / "v0.mp4"], out)) == 0
    assert "WARNING iv2trt.job.identity: RANDOM WEIGHTS" in capfd.readouterr().err
    assert json.loads((out / "job.json").read_text())["random_init"] is True
    assert json.loads((out / "summary.json").read_text())["random_init"] is True


def test_cpu_runs_an_fp16_graph_as_fp32(tmp_path, clips, random_onnx, capfd):
    """fp16 arithmetic is emulated on CPUs: the job converts the graph and says so; fp16-level agreement."""
    fp16, fp32 = tmp_path / "fp16", tmp_path / "fp32"
    assert run_main(main, _argv(random_onnx["fp16"], [clips], fp16, "--dtype", "float32")) == 0
    assert "converted to fp32 for the CPU" in capfd.readouterr().err
    assert json.loads((fp16 / "job.json").read_text())["converted_to_fp32"] is True
    assert run_main(main, _argv(random_onnx["fp32"], [clips], fp32, "--dtype", "float32")) == 0
    assert json.loads((fp32 / "job.json").read_text())["converted_to_fp32"] is False
    a, rows_a = load_features(fp16)
    b, rows_b = load_features(fp32)
    # rows come in the order inputs finish (with NVDEC beside the CPU workers that order varies): pair by key
    order_a = sorted(range(len(rows_a)), key=lambda i: (rows_a[i]["id"], rows_a[i]["clip"]))
    order_b = sorted(range(len(rows_b)), key=lambda i: (rows_b[i]["id"], rows_b[i]["clip"]))
    assert [(rows_a[i]["id"], rows_a[i]["clip"]) for i in order_a] == [(rows_b[i]["id"], rows_b[i]["clip"])
                                                                       for i in order_b]
    assert float(np.min(np.sum(a[order_a] * b[order_b], axis=1))) >= 0.999  # unit vectors: cosine


def test_onnxruntime_runner_names_where_it_encodes(tiny_onnx, monkeypatch):
    """The job's logs and summary say where the encoder runs: the CPU, or the CUDA provider's GPU."""
    import onnxruntime as ort

    from iv2trt.job.pipeline import _device_name
    from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

    assert _device_name(OnnxRuntimeRunner(tiny_onnx["fp32"], providers=["CPUExecutionProvider"])) == "cpu"
    real = ort.InferenceSession

    class OnCuda:  # the real session, as onnxruntime-gpu reports a CUDA one
        def __init__(self, *args, **kwargs):
            self.real = real(*args, **{**kwargs, "providers": ["CPUExecutionProvider"]})

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(ort, "InferenceSession", OnCuda)
    runner = OnnxRuntimeRunner(tiny_onnx["fp32"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert _device_name(runner) == "cuda:0"


def test_cpu_conversion_matches_the_fp16_graph_and_keeps_its_thresholds(tiny_onnx):
    from iv2trt.compare import compare
    from iv2trt.runners.choice import cpu_fp32_runner, runner_precision
    from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

    runner = cpu_fp32_runner(tiny_onnx["fp16"])
    assert runner.input_dtype == np.float32 and runner_precision(runner) == "fp16"
    x = np.random.default_rng(5).standard_normal((2, 3, 3, 56, 56), dtype=np.float32)
    reference = OnnxRuntimeRunner(tiny_onnx["fp32"], providers=["CPUExecutionProvider"]).infer(x)
    half = OnnxRuntimeRunner(tiny_onnx["fp16"], providers=["CPUExecutionProvider"]).infer(x)
    widened = runner.infer(x)
    assert compare(reference, widened).passes("fp16")
    assert compare(reference, widened).max_abs_error <= compare(reference, half).max_abs_error * 1.5


def test_resumed_run_reports_the_outputs_totals_and_rows_are_numbered_globally(tmp_path, clips, tiny_onnx):
    out = tmp_path / "out"
    videos = sorted(clips.glob("*.mp4"))
    assert run_main(main, _argv(tiny_onnx["fp32"], videos[:2], out, "--shard-size", 1)) == 0
    assert run_main(main, _argv(tiny_onnx["fp32"], videos, out, "--shard-size", 1)) == 0  # resumes: v2 only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 1 and summary["skipped_already_done"] == 2  # this run
    assert summary["output_totals"] == {"inputs": 3, "clips": 3, "shards": 3}  # the output directory
    stored = [row for p in sorted((out / "shards").glob("*.parquet")) for row in pq.read_table(p).column("row")
              .to_pylist()]
    assert stored == [0, 1, 2]  # one numbering across shards and runs
    features, rows = load_features(out)
    assert [r["row"] for r in rows] == [0, 1, 2] and features.shape[0] == 3


def test_ctrl_c_exits_130_and_keeps_committed_work(tmp_path, tiny_onnx):
    """SIGINT to a running job (as `timeout -s INT` sends it): exit 130, shards committed so far stay readable,
    the same command resumes to the complete output."""
    inputs = tmp_path / "in"
    for i in range(16):
        write_video(inputs / f"v{i:02d}.mp4", pattern_frames(6 + i % 4, 24, 32, seed=i))
    command = [sys.executable, str(ROOT / "trt_inference.py"),
               *_argv(tiny_onnx["fp32"], [inputs], tmp_path / "out", "--batch-size", 2, "--shard-size", 2)]
    # as a shell starts a foreground command: SIGINT not ignored even where pytest was started with it ignored (from
    # a non-interactive shell's `&`, or nohup's wrappers), which Python would keep, and the job would finish
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while (len(list((tmp_path / "out" / "shards").glob("*.parquet"))) < 2 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be interrupted"
    signals = _signal_state(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"{signals}\n{err[-6000:]}"
    assert "terminate called" not in err and "Traceback" not in err
    _, rows = load_features(tmp_path / "out")
    assert 0 < len({r["id"] for r in rows}) < 16
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    _, rows = load_features(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == [f"v{i:02d}.mp4" for i in range(16)]


def _signal_state(pid: int) -> str:
    """A process's signal mask and dispositions (Linux), for the message of a test that sends it one."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"no /proc status: {exc}"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def _auto_settings(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"backend": "auto", "engine": "missing.engine", "checkpoint": None, "random_init": False,
                              **kw})


@pytest.mark.parametrize("weights, gpu, expected", [
    ({"random_init": True}, None, "torch"),
    ({"checkpoint": "ckpt.pth"}, None, "torch"),
    ({}, None, "onnxruntime"),                                            # no weights: the ONNX file's
    ({"random_init": True}, "no CUDA GPU visible to torch", "onnxruntime"),  # CPU: ONNX Runtime, as before
])
def test_auto_without_tensorrt_prefers_pytorch_on_a_gpu_when_weights_are_given(monkeypatch, weights, gpu, expected):
    from iv2trt.runners import choice

    monkeypatch.setattr(choice, "torch_gpu_missing", lambda: gpu)
    backend, why = choice.resolve_backend(_auto_settings(**weights))
    assert backend == expected and why.startswith("auto: TensorRT unavailable (")
    assert ("PyTorch fp16 on the GPU" in why) == (expected == "torch")
    assert choice.resolve_backend(_auto_settings(backend="onnxruntime", **weights)) == ("onnxruntime", "asked for")


def test_auto_falls_back_to_pytorch_when_tensorrt_cannot_start(monkeypatch):
    from iv2trt.errors import BackendUnavailable
    from iv2trt.runners import choice

    def cannot_start(s, why):
        raise BackendUnavailable("could not start CUDA")

    monkeypatch.setattr(choice, "tensorrt_missing", lambda engine: None)
    monkeypatch.setattr(choice, "tensorrt_runner", cannot_start)
    monkeypatch.setattr(choice, "torch_gpu_missing", lambda: None)
    monkeypatch.setattr(choice, "onnxruntime_runner", lambda path, why: pytest.fail("ONNX Runtime was chosen"))
    s = _auto_settings(random_init=True, variant="no-such-variant", seed=0, align_checkpoint=None, onnx=None)
    with pytest.raises(PipelineError, match="no-such-variant"):  # it went on to load the PyTorch model
        choice.create_runner(s)


def test_auto_falls_back_to_the_onnx_file_when_pytorch_cannot_load_the_model(monkeypatch, tiny_onnx, caplog):
    from iv2trt.runners import choice

    monkeypatch.setattr(choice, "torch_gpu_missing", lambda: None)
    s = _auto_settings(checkpoint="missing.pth", variant="internvideo2_clip_s14", seed=0, align_checkpoint=None,
                       random_init=False, onnx=str(tiny_onnx["fp32"]))
    with caplog.at_level("WARNING"):
        assert choice.create_runner(s).name == "onnxruntime"
    assert "PyTorch cannot load the model" in caplog.text and "missing.pth" in caplog.text
    with pytest.raises(PipelineError, match="missing.pth"):  # asked for by name: no fallback
        choice.create_runner(_auto_settings(**{**vars(s), "backend": "torch"}))


def test_auto_runs_pytorch_end_to_end_and_records_it(tmp_path, clips, monkeypatch, capfd):
    """The CLI with --backend auto and --random-init where TensorRT is missing and torch sees a GPU (faked: the
    runner then runs on the CPU) extracts with PyTorch and says why; the Ray factory ships the variant for it."""
    import dataclasses

    import yaml

    from iv2trt.distributed.ray_job import settings_runner
    from iv2trt.runners import choice
    from tests.conftest import TINY

    monkeypatch.setattr(choice, "torch_gpu_missing", lambda: None)
    variant = tmp_path / "tiny.yaml"
    variant.write_text(yaml.safe_dump(dataclasses.asdict(TINY)))
    out = tmp_path / "out"
    argv = ["--random-init", "--variant", str(variant), "--frames", "4", "--workers", "1", "--no-progress",
            "--inputs", str(clips), "--output", str(out)]
    from iv2trt.runners.compile import finish_compiles

    try:
        assert run_main(main, argv) == 0
    finally:
        finish_compiles()  # a GPU runner compiles in the background: its log lines land while capfd listens
    err = capfd.readouterr().err
    assert "backend torch (auto: TensorRT unavailable (" in err and "PyTorch fp16 on the GPU" in err
    assert json.loads((out / "job.json").read_text())["backend"] == "torch"
    assert load_features(out)[0].shape == (3, TINY.align_dim)

    from iv2trt.job.settings import InferSettings

    s = dataclasses.replace(InferSettings(), random_init=True, variant=str(variant))
    assert settings_runner(s).variant == dataclasses.asdict(TINY)                     # auto may pick torch there
    assert settings_runner(dataclasses.replace(s, random_init=False)).variant is None  # ONNX Runtime only


def test_inputs_that_hold_nothing_to_extract_exit_2_but_a_finished_job_resumes_with_0(tmp_path, clips, tiny_onnx,
                                                                                      capfd):
    """Before: an empty input folder exited 0 with "0 inputs found"."""
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.md").write_text("no videos here")
    assert run_main(main, _argv(tiny_onnx["fp32"], [empty], tmp_path / "none")) == 2
    err = capfd.readouterr().err
    assert f"--inputs {empty}: no inputs found" in err and ".mp4" in err and ".jpg" in err, err
    out = tmp_path / "out"
    assert run_main(main, _argv(tiny_onnx["fp32"], [clips / "v0.mp4"], out)) == 0
    assert run_main(main, _argv(tiny_onnx["fp32"], [clips / "v0.mp4"], out)) == 0  # all done already: a resume
    assert "1 inputs found, 0 to do, 1 already done" in capfd.readouterr().err


def test_ctrl_c_says_what_is_kept_and_how_to_resume(tmp_path, clips, tiny_onnx, monkeypatch, capfd):
    """Before: only "interrupted". The job is stopped after committing one input of this run, with another one
    committed by an earlier run; the writer commits by time as well as by size (--commit-seconds, 60 s default)."""
    from iv2trt.job import local

    out = tmp_path / "out"
    assert run_main(main, _argv(tiny_onnx["fp32"], [clips / "v0.mp4"], out)) == 0
    real_execute = local.execute

    def interrupted_execute(handles, items, todo, writer, *args, **kwargs):
        assert writer.commit_seconds == 60 and writer.shard_size == 4096
        real_execute(handles, items, todo[:1], writer, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "execute", interrupted_execute)
    capfd.readouterr()
    assert run_main(main, _argv(tiny_onnx["fp32"], [clips], out)) == 130
    err = capfd.readouterr().err
    assert (f"interrupted: 2 inputs (2 clips) are committed in {out} (1 of them in this run); rerun the same "
            "command to resume") in err, err


def test_variant_must_match_the_model_file_and_is_recorded(tmp_path, clips, tiny_onnx, capfd):
    """Before: --variant was ignored on the ONNX Runtime and TensorRT paths (any variant, even a misspelt one, ran
    the model file's) and job.json did not record it. The tiny graphs' metadata names the variant tiny_test."""
    video = clips / "v0.mp4"
    for given, message in (
            (["--variant", "internvideo2_clip_b14"], "--variant internvideo2_clip_b14 disagrees with tiny_fp32.onnx, "
                                                     "made for tiny_test: pass --variant tiny_test"),
            (["--variant", "internvideo2_clip_b15"], "unknown model variant 'internvideo2_clip_b15'")):
        out = tmp_path / given[1]
        assert run_main(main, _argv(tiny_onnx["fp32"], [video], out, *given)) == 2
        err = capfd.readouterr().err
        assert message in err and not out.exists(), err
    config = tmp_path / "b14.yaml"  # a config file the user names gives the variant as much as a flag does
    config.write_text("model:\n  variant: internvideo2_clip_b14\n")
    assert run_main(main, _argv(tiny_onnx["fp32"], [video], tmp_path / "c", "--config", config)) == 2
    assert "--variant internvideo2_clip_b14 disagrees with tiny_fp32.onnx" in capfd.readouterr().err
    out = tmp_path / "out"  # not given: the model file's, said in the log
    assert run_main(main, _argv(tiny_onnx["fp32"], [video], out)) == 0
    assert "model variant tiny_test, the model file's (no --variant given)" in capfd.readouterr().err
    assert json.loads((out / "job.json").read_text())["variant"] == "tiny_test"
