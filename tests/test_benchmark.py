"""Benchmark: FLOP count against torch's counter, statistics, report writers, a tiny run end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from iv2trt.bench.encoder import TimingPlan, make_input, percentiles, run_encoder_grid, throughput
from iv2trt.bench.main import markdown_report, targets, write_results
from iv2trt.models import InternVideo2CLIPVision, load_vision_config


def counted_flops(model: InternVideo2CLIPVision, frames: int) -> int:
    """torch's own count (explicit attention: FlopCounterMode has no formula for CPU SDPA kernels)."""
    cfg = model.cfg
    model.set_fused_kernels(False)
    x = torch.zeros(1, frames, cfg.in_chans, cfg.img_size, cfg.img_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.set_fused_kernels(True)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def s14_meta():
    with torch.device("meta"):
        return InternVideo2CLIPVision(load_vision_config("s14")).eval()


@pytest.mark.parametrize("frames", [1, 2, 8, 16])
def test_flops_per_clip_equals_torch_count(tiny_model, s14_meta, frames):
    for model in (tiny_model, s14_meta):
        assert model.cfg.flops_per_clip(frames) == counted_flops(model, frames)


def test_percentiles_and_throughput():
    stats = percentiles([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p95_ms"] == pytest.approx(95.05)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5) and stats["iters"] == 100
    assert throughput(32, {"mean_ms": 40.0}) == pytest.approx(800.0)
    with pytest.raises(ValueError):
        percentiles([])


def test_timing_plan_bounds():
    assert TimingPlan(iters=7).count(100.0) == 7
    plan = TimingPlan(target_s=2.0, min_iters=5, max_iters=200)
    assert plan.count(10.0) == 5 and plan.count(1e-5) == 200 and plan.count(0.1) == 20


def test_inputs_are_seeded_per_cell():
    a, b = make_input(2, 3, 8, seed=1), make_input(2, 3, 8, seed=1)
    assert a.shape == (2, 3, 3, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, make_input(2, 3, 8, seed=2))


def _fake_results() -> dict:
    row = {"backend": "torch-fp16", "timing": "device", "batch": 32, "frames": 8, "p50_ms": 30.0, "p95_ms": 31.0,
           "p99_ms": 32.0, "mean_ms": 30.0, "min_ms": 29.0, "max_ms": 33.0, "iters": 10, "clips_per_s": 1066.7,
           "tflops": 178.3, "peak_gpu_mib": 5000.0, "min_cosine": 0.9999}
    machine = {"date_utc": "2026-01-01T00:00:00+00:00", "command": "python benchmark.py", "cpu_model": "cpu",
               "cpus_usable": 2, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2", "cuda": "13", "onnxruntime": "1",
               "tensorrt": None, "av": "1", "hostname": "h"}
    return {"machine": machine, "variant": "s14", "encoder": {"rows": [row], "flops_per_clip": {"8": 1.67e11},
                                                            "unavailable": {"tensorrt": "no engine"}}}


def test_writers_and_targets(tmp_path):
    results = _fake_results()
    results["targets"] = targets(results)
    assert results["targets"][0]["status"] == "met"
    assert results["targets"][1]["status"] == "MISSED" and "1066.7 clips/s" in results["targets"][1]["detail"]
    paths = write_results(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["encoder"]["rows"][0]["clips_per_s"] == 1066.7
    md = paths["md"].read_text()
    assert "| torch-fp16 | device | 32 | 8 | 30.00 |" in md and "tensorrt: not available: no engine" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
    assert "n/a" in markdown_report({**results, "encoder": {**results["encoder"], "rows": [
        {**results["encoder"]["rows"][0], "peak_gpu_mib": None}]}})


def test_tiny_run_end_to_end_on_cpu(tmp_path, tiny_model, tiny_onnx):
    plan = TimingPlan(warmup=1, iters=2)
    enc = run_encoder_grid(tiny_model, ["torch-fp32", "torch-fp16", "onnxruntime-cpu", "tensorrt"], [(1, 1), (2, 4)],
                           plan, onnx_path=str(tiny_onnx["fp32"]))
    rows = enc["rows"]
    assert {(r["backend"], r["batch"], r["frames"]) for r in rows} >= {
        ("torch-fp32", 1, 1), ("torch-fp32", 2, 4), ("onnxruntime-cpu", 1, 1), ("onnxruntime-cpu", 2, 4)}
    assert all(r["min_cosine"] > 0.99999 for r in rows)
    assert all(r["clips_per_s"] > 0 and r["iters"] == 2 and r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert "tensorrt" in enc["unavailable"]
    if not torch.cuda.is_available():
        assert "torch-fp16" in enc["unavailable"]
    results = {"machine": _fake_results()["machine"] | {"gpu": None}, "variant": "tiny", "encoder": enc}
    results["targets"] = targets(results)
    paths = write_results(results, tmp_path)
    assert all(p.is_file() and p.stat().st_size for p in paths.values()) and len(paths) == 3


def test_pipeline_benchmark_on_cpu(tmp_path, tiny_onnx):
    """The pipeline part end to end on tiny videos: decode ceilings and end-to-end runs per decoder (CPU only
    here), targets, and the stage-throughput chart."""
    from iv2trt.bench.pipeline import run_pipeline, write_test_video
    from iv2trt.decode.clips import Windowing
    from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

    spec = {"width": 64, "height": 48, "fps": 10, "seconds": 2, "codec": "libx264", "gop": None, "preset": "medium",
            "crf": 23}
    paths = [write_test_video(tmp_path / f"v{i}.mp4", i, spec) for i in range(3)]
    runner = OnnxRuntimeRunner(tiny_onnx["fp32"])
    pipe = run_pipeline(runner, "onnxruntime-cpu", 100.0, 0.02, paths, Windowing(4, 1.0), 56, 2, [1, 2], 2, 2,
                        decode_threads=[1], pipe=True, probe=True, sessions=[4], graphs=True)
    runs = pipe["decoder_runs"]
    (threads,) = runs["decode_threads"]  # the CPU row only here; --pipe-rows needs a GPU to hand planes to
    assert threads["decode_threads"] == 1 and threads["end_to_end"]["clips"] == 6 and runs["pipe"] == []
    assert runs["probe"] == runs["sessions"] == runs["graphs"] == []  # NVDEC rows: none without NVDEC
    assert runs["decoders"] == ["cpu"] and runs["nvdec_unavailable"]
    assert runs["end_to_end"]["cpu"]["clips"] == runs["decode_ceiling"]["cpu"]["clips"] == 6  # 3 videos x 2 windows
    assert runs["end_to_end"]["cpu"]["decoders"]["cpu"]["workers"] == 2
    pipe["encoder_only_timing"] = "host"  # set by benchmark.py around run_pipeline
    results = {"machine": _fake_results()["machine"], "variant": "tiny", "pipeline": pipe}
    results["targets"] = targets(results)
    assert any(t["name"] == "GPU decode targets" and t["status"] == "not measured" for t in results["targets"])
    out = write_results(results, tmp_path / "res")
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cpu |" in out["md"].read_text() and "| cpu, 2 CPU workers, --decode-threads 1 |" in out["md"].read_text()


def test_decode_and_executor_targets():
    """Issue 21's targets from a GPU run's numbers: auto against the sum of the nvdec-alone and cpu-alone
    ceilings, the clips/s floor, two pipelines on one GPU against one, Ray's one actor against the local job."""
    from iv2trt.bench.main import decode_targets, executor_targets

    def run(cps):
        return {"clips_per_s": cps, "videos_per_s": cps / 5, "seconds": 6.0, "clips": 720}

    pipe = {"windowing": {"window_seconds": 2.0, "window_frames": None}, "frames": 8,
            "decoder_runs": {"decode_ceiling": {"cpu": run(40.0), "nvdec": run(80.0), "auto": run(100.0)},
                             "end_to_end": {"cpu": run(39.0), "nvdec": run(79.0), "auto": run(111.0)}}}
    by_name = {t["name"]: t for t in decode_targets(pipe)}
    share = next(t for n, t in by_name.items() if "nvdec-alone + cpu-alone" in n)
    assert share["status"] == "met" and "80.0 + 40.0 = 120.0" in share["detail"]  # 111 / 120 = 92.5%
    assert next(t for n, t in by_name.items() if ">= 110 clips/s" in n)["status"] == "met"
    pipe["decoder_runs"]["end_to_end"]["auto"] = run(100.0)
    assert {t["status"] for t in decode_targets(pipe)} == {"MISSED"}  # 83% of the ceilings, below 110
    # judged from each run's first result to its last where every run compared has it; the whole run in the detail
    for kind, name, steady in (("decode_ceiling", "cpu", 45.0), ("decode_ceiling", "nvdec", 90.0),
                               ("end_to_end", "auto", 125.0)):
        pipe["decoder_runs"][kind][name]["steady_clips_per_s"] = steady
    share, floor = decode_targets(pipe)
    assert share["status"] == floor["status"] == "met"  # 125 of 135 = 93%
    assert share["detail"] == ("first result to last: 125.0 of 90.0 + 45.0 = 135.0 clips/s (93%); whole run: 100.0 "
                               "of 80.0 + 40.0 = 120.0 clips/s (83%)")
    pipe["decoder_runs"]["decode_ceiling"]["cpu"]["steady_clips_per_s"] = None  # not in every run: the whole run
    assert {t["status"] for t in decode_targets(pipe)} == {"MISSED"}

    rows = [{"executor": "local", "gpus": "1", "clips_per_s": 100.0}, {"executor": "local", "gpus": "0,0",
            "clips_per_s": 99.0}, {"executor": "ray", "gpus": "1", "clips_per_s": 96.0}]
    two, ray = executor_targets(rows)
    assert two["status"] == "MISSED" and "0.99x" in two["detail"]
    assert ray["status"] == "met" and "96%" in ray["detail"]
    assert executor_targets(rows[1:]) == []  # nothing to compare with
    # judged from the first result to the last where both runs have it; the whole call is in the detail
    rows[0].update(steady_clips_per_s=110.0, call_clips_per_s=80.0)
    rows[2].update(steady_clips_per_s=106.0, call_clips_per_s=40.0)
    _, ray = executor_targets(rows)
    assert ray["status"] == "met" and "first result to last: 106.0 vs 110.0 clips/s (96%)" in ray["detail"]
    assert "start-up included: 40.0 vs 80.0 clips/s (50%)" in ray["detail"]
    rows[2]["steady_clips_per_s"] = 100.0
    assert executor_targets(rows)[1]["status"] == "MISSED"

    # with --executor-decoders cpu nvdec auto: the combined-decoding target from the job as the CLI runs it
    side = [{"executor": "local", "gpus": "1", "decoder": d, "clips_per_s": c, "steady_clips_per_s": st}
            for d, c, st in (("cpu", 100.0, 102.0), ("nvdec", 160.0, 168.0), ("auto", 199.5, 211.0))]
    (combined,) = executor_targets(side)
    assert combined["status"] == "MISSED" and combined["detail"] == (
        "first result to last: 211.0 of 168.0 + 102.0 = 270.0 clips/s (78%); "
        "over the executor's run: 199.5 of 160.0 + 100.0 = 260.0 clips/s (77%)")
    side[2].update(clips_per_s=240.0, steady_clips_per_s=250.0)
    assert executor_targets(side)[0]["status"] == "met"
    assert executor_targets(side[1:]) == []  # no cpu-alone run: nothing to judge


def test_targets_are_not_judged_on_runs_too_short_and_the_floor_on_the_job_as_the_cli_runs_it():
    """Decoder runs of a few batches (the videos once over: 80 clips in 1.6 s on an H200) are start-up, not
    decoding: their targets say "not judged" and why, the figures kept; with the executors' cpu/nvdec/auto rows
    the clips/s floor is judged on the job's `auto` run."""
    from iv2trt.bench.main import MIN_JUDGED_SECONDS, decode_targets, executor_targets

    def run(cps, seconds):
        return {"clips_per_s": cps, "steady_clips_per_s": cps * 2, "videos_per_s": cps / 5, "seconds": seconds,
                "clips": round(cps * seconds)}

    short = MIN_JUDGED_SECONDS - 3.4
    pipe = {"windowing": {"window_seconds": 2.0, "window_frames": None}, "frames": 8,
            "decoder_runs": {"decode_ceiling": {"cpu": run(51.6, 8.0), "nvdec": run(45.0, short)},
                             "end_to_end": {"auto": run(43.1, short)}}}
    share, floor = decode_targets(pipe)
    assert share["status"] == floor["status"] == "not judged"
    assert share["detail"].startswith("runs of 1.6 s (69 clips) are start-up more than decoding")
    assert "measured: first result to last: 86.2 of 90.0 + 103.2" in share["detail"]  # the figures stay
    assert "--executor-repeat" in floor["detail"]
    for r in (pipe["decoder_runs"]["decode_ceiling"]["nvdec"], pipe["decoder_runs"]["end_to_end"]["auto"]):
        r["seconds"] = MIN_JUDGED_SECONDS
    assert [t["status"] for t in decode_targets(pipe)] == ["MISSED", "MISSED"]  # 86.2 of 193.2; 86.2 < 110

    rows = [{"executor": "local", "gpus": "1", "decoder": d, "clips_per_s": c, "steady_clips_per_s": c + 10,
             "seconds": 40.0, "clips": 7200} for d, c in (("cpu", 95.9), ("nvdec", 160.5), ("auto", 206.5))]
    rows.append({**rows[2], "per_gpu": 1, "clips_per_s": 100.0, "steady_clips_per_s": 105.0})  # not the default
    pipe["executors"] = rows
    floor = decode_targets(pipe)[1]
    assert floor["status"] == "met" and floor["name"].endswith("the job as trt_inference.py runs it")
    assert floor["detail"] == ("first result to last: 216.5 clips/s; over the executor's run: 206.5 clips/s "
                               "(7200 clips)")
    (combined, *_) = executor_targets(rows)
    assert combined["status"] == "MISSED" and "216.5 of 170.5 + 105.9" in combined["detail"]
    rows[0]["seconds"] = 2.0
    assert executor_targets(rows)[0]["status"] == "not judged"


def test_source_digest_names_the_code_not_the_git_history(tmp_path):
    """A result's source_digest is the same for the same files wherever they are, and changes with any of them."""
    from iv2trt.bench.main import source_digest

    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "iv2trt" / "sub").mkdir(parents=True)
        (root / "configs").mkdir()
        (root / "iv2trt" / "sub" / "m.py").write_text("x = 1\n")
        (root / "trt_inference.py").write_text("print()\n")
        (root / "configs" / "c.yaml").write_text("a: 1\n")
        (root / "notes.txt").write_text("not code\n")
    a, b = tmp_path / "a", tmp_path / "b"
    assert source_digest(a) == source_digest(b)
    (b / "notes.txt").write_text("other\n")
    assert source_digest(a) == source_digest(b)
    (b / "configs" / "c.yaml").write_text("a: 2\n")
    assert source_digest(a) != source_digest(b)


def test_variant_rows_name_what_differs_from_the_defaults():
    from iv2trt.bench.pipeline import _variant, variant_label

    assert variant_label(_variant("auto", None)) == "auto, default CPU workers"
    assert variant_label(_variant("nvdec", 8, probe_processes=0)) == "nvdec, 8 CPU workers, --nvdec-probe-processes 0"
    assert variant_label(_variant("auto", 4, nvdec_sessions=16, decode_threads=2)) == \
        "auto, 4 CPU workers, --decode-threads 2, --nvdec-sessions 16"
    assert variant_label(_variant("auto", None, encoder_graphs=False)) == \
        "auto, default CPU workers, --no-encoder-graphs"


def test_executor_targets_compare_like_with_like():
    """Rows of several decoders and pipelines per GPU: only --decoder auto counts; Ray with two actors on the GPU is
    held against the local job with two pipelines there."""
    from iv2trt.bench.main import executor_targets

    rows = [{"executor": "local", "decoder": "cpu", "gpus": "1", "pipelines": 1, "clips_per_s": 50.0},
            {"executor": "local", "decoder": "auto", "gpus": "1", "pipelines": 1, "clips_per_s": 100.0},
            {"executor": "local", "decoder": "auto", "gpus": "1", "pipelines": 2, "clips_per_s": 150.0},
            {"executor": "ray", "decoder": "auto", "gpus": "1", "pipelines": 2, "clips_per_s": 145.0}]
    two, ray = executor_targets(rows)
    assert two["status"] == "met" and "150.0 vs 100.0" in two["detail"]
    assert ray["status"] == "met" and "145.0 vs 150.0" in ray["detail"]
