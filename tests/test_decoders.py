"""The decode scheduler with a fake NVDEC (no GPU needed): one queue for both paths, fallbacks to the CPU,
failures with both reasons, timeouts, the --decoder choice, and the run's where-the-time-went summary."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fake_nvdec import RELEASE_HANG, FakeSession, patches

from iv2trt.cli import run_main
from iv2trt.cli.infer import main
from iv2trt.decode import nvdec
from iv2trt.decode.clips import Windowing
from iv2trt.decode.inputs import discover
from iv2trt.decode.plan import DecoderPlan
from iv2trt.decode.samples import pattern_frames, write_image, write_video
from iv2trt.errors import BackendUnavailable
from iv2trt.job.local import run_job
from iv2trt.job.pipeline import JobOptions
from iv2trt.output.writer import FeatureWriter, load_features
from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner


@pytest.fixture
def fake_nvdec(monkeypatch):
    for dotted, value in patches().items():
        monkeypatch.setattr(dotted, value)
    FakeSession.decoded = []
    RELEASE_HANG.clear()
    yield FakeSession
    RELEASE_HANG.set()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dec_inputs")
    for i in range(6):
        write_video(root / f"v{i}.mp4", pattern_frames(30 + 3 * i, 48, 64, seed=i), gop=10)
    write_video(root / "x_nvfail.mp4", pattern_frames(20, 48, 64, seed=11))
    write_video(root / "y_nvbreak.mp4", pattern_frames(40, 48, 64, seed=12), gop=5)
    write_image(root / "still.png", pattern_frames(1, 40, 60, seed=13)[0])
    return root


def _run(tmp_path, tiny_onnx, root, decoder, name, timeout=120.0, workers=2, extra=()):
    items = discover([str(root), *extra])
    runner = OnnxRuntimeRunner(tiny_onnx["fp32"])
    out = tmp_path / name
    writer = FeatureWriter(out, "float32", 1000)
    options = JobOptions(Windowing(frames=4, window_frames=12), 56, 4, workers, timeout, False, decoder, 3)
    summary = run_job(items, runner, out, writer, options)
    feats, rows = load_features(out)
    return summary, {(r["id"], r["clip"]): f for f, r in zip(feats, rows)}, out


@pytest.mark.parametrize("workers", [2, None])
def test_auto_uses_both_paths_and_matches_cpu_only(tmp_path, tiny_onnx, inputs, fake_nvdec, workers):
    """--decoder auto, CPU workers given or by default (they share NVDEC's videos: measured faster)."""
    cpu_summary, cpu_feats, _ = _run(tmp_path, tiny_onnx, inputs, "cpu", "cpu")
    summary, feats, out = _run(tmp_path, tiny_onnx, inputs, "auto", "auto", workers=workers)
    assert summary["failed"] == cpu_summary["failed"] == 0
    assert feats.keys() == cpu_feats.keys()
    for key in feats:
        np.testing.assert_allclose(feats[key], cpu_feats[key], atol=1e-6)
    d = summary["decoders"]
    assert d["nvdec"]["inputs"] >= 1 and d["cpu"]["inputs"] >= 1  # both pulled from the queue
    assert d["nvdec"]["fallbacks_to_cpu"] <= 2                      # nvfail, nvbreak: if the GPU took them
    assert d["nvdec"]["inputs"] + d["cpu"]["inputs"] == summary["ok"]
    assert "x_nvfail.mp4" not in fake_nvdec.decoded and "still.png" not in fake_nvdec.decoded
    assert 0 <= summary["encoder_busy_fraction"] <= 1 and summary["bound_by"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["decoders"]["nvdec"]["workers"] == 3 and saved["decoder"] == "auto"
    assert "cpu" in saved["decoders"] and "clips_per_s" in saved["decoders"]["cpu"]
    cpu = saved["pipelines"][0]["host_cpu_s"]  # where the host time went: every thread kind did work
    assert min(cpu["nvdec_threads"], cpu["pipeline_loop"], cpu["inference_thread"]) > 0, cpu
    assert cpu["process"] >= cpu["nvdec_threads"] + cpu["inference_thread"], cpu
    machine = saved["pipelines"][0]["machine_cpu"]  # the whole machine's CPUs over the run (Linux)
    assert abs(sum(machine.values()) - 1) <= 0.005 and machine["busy"] > 0, machine


@pytest.mark.parametrize("workers", [2, None])
def test_nvdec_mode_sends_only_what_the_gpu_cannot_take_to_the_cpu(tmp_path, tiny_onnx, inputs, fake_nvdec, workers):
    """--decoder nvdec, with CPU workers given or by default: they take only what the GPU cannot."""
    summary, feats, _ = _run(tmp_path, tiny_onnx, inputs, "nvdec", "nvdec", workers=workers)
    assert summary["failed"] == 0
    d = summary["decoders"]
    # every video the fake takes was decoded there; the CPU only did the image and the two fallbacks
    assert d["cpu"]["inputs"] == 3 and d["nvdec"]["inputs"] == 6
    assert d["nvdec"]["fallbacks_to_cpu"] == 2  # nvfail refused, nvbreak failed after its first clip
    assert d["nvdec"]["fallbacks_by_category"] == {"codec": 1, "stream_error": 1}  # summary.json: why, counted
    assert sorted(fake_nvdec.decoded) == [f"v{i}.mp4" for i in range(6)]


def test_a_file_failing_on_both_paths_is_listed_with_both_reasons(tmp_path, tiny_onnx, inputs, fake_nvdec):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "garbage_nvfail.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    (broken / "garbage2.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, np.uint8).tobytes())
    summary, _, out = _run(tmp_path, tiny_onnx, inputs, "nvdec", "both", extra=[str(broken)])
    assert summary["failed"] == 2
    lines = (out / "failures.jsonl").read_text().splitlines()
    failures = {json.loads(line)["id"]: json.loads(line)["reason"] for line in lines}
    assert failures["garbage_nvfail.mp4"].startswith("NVDEC: fake NVDEC does not take this codec; CPU: ")
    assert failures["garbage2.mp4"].startswith("NVDEC: ") and "; CPU: " in failures["garbage2.mp4"]


def test_a_hung_gpu_session_is_abandoned_and_the_input_decoded_on_the_cpu(tmp_path, tiny_onnx, inputs, fake_nvdec):
    root = tmp_path / "hang"
    root.mkdir()
    write_video(root / "z_nvhang.mp4", pattern_frames(20, 48, 64, seed=3))
    write_video(root / "w.mp4", pattern_frames(20, 48, 64, seed=4))
    summary, feats, _ = _run(tmp_path, tiny_onnx, root, "nvdec", "hang", timeout=3.0)
    assert summary["failed"] == 0 and summary["ok"] == 2
    assert summary["decoders"]["nvdec"]["fallbacks_to_cpu"] == 1
    assert summary["decoders"]["nvdec"]["fallbacks_by_category"] == {"timeout": 1}
    assert {k[0] for k in feats} == {"z_nvhang.mp4", "w.mp4"}


def test_decoder_nvdec_without_nvdec_exits_4_and_auto_falls_back_quietly(tmp_path, tiny_onnx, inputs, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(nvdec, "nvdec_unavailable", lambda gpu=0: "no CUDA GPU is visible to PyTorch")
    argv = ["--backend", "onnxruntime", "--onnx", str(tiny_onnx["fp32"]), "--frames", "4", "--workers", "2",
            "--no-progress", "--inputs", str(inputs / "v0.mp4")]
    out = tmp_path / "n"
    assert run_main(main, [*argv, "--output", str(out), "--decoder", "nvdec"]) == 4
    assert not (out / "shards").exists()
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        DecoderPlan("nvdec", 2, 4)
    assert "--decoder nvdec cannot run here: no CUDA GPU" in capsys.readouterr().err
    assert run_main(main, [*argv, "--output", str(tmp_path / "a"), "--decoder", "auto"]) == 0
    assert "NVDEC not used (no CUDA GPU is visible to PyTorch)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert list(summary["decoders"]) == ["cpu"]


def test_gpu_takes_videos_and_jpegs_only():
    assert nvdec.gpu_takes("video", "a.mp4", jpeg=False)
    assert not nvdec.gpu_takes("image", "a.jpg", jpeg=False) and nvdec.gpu_takes("image", "a.JPG", jpeg=True)
    assert not nvdec.gpu_takes("image", "a.png", jpeg=True) and not nvdec.gpu_takes("npy", "a.npy", jpeg=True)
    assert nvdec.gpu_takes("frames", "dir", jpeg=True) and not nvdec.gpu_takes("frames", "dir", jpeg=False)


def test_h264_non_reference_detection():
    sei, sps = b"\x00\x00\x00\x01\x06\x05\x10", b"\x00\x00\x00\x01\x67\x64\x00\x1f"
    assert nvdec.h264_droppable(sei + b"\x00\x00\x01\x01\x9e")         # nal_ref_idc 0, non-IDR slice
    assert not nvdec.h264_droppable(sei + b"\x00\x00\x01\x21\x9a")     # nal_ref_idc 1
    assert not nvdec.h264_droppable(sps + b"\x00\x00\x01\x65\x88")     # IDR
    assert not nvdec.h264_droppable(b"\x00\x00\x01\x06\x05")           # no slice in the bytes seen: keep it


def test_nvdec_is_probed_once_per_process():
    """The stage's early check, the job's decoder plan and the benchmark all ask; the GPU is probed once."""
    from iv2trt.decode import nvdec

    nvdec.nvdec_unavailable.cache_clear()
    first = nvdec.nvdec_unavailable(0)
    assert nvdec.nvdec_unavailable(0) == first and nvdec.nvdec_unavailable.cache_info().misses == 1


def test_the_encoder_runs_eager_where_the_gpu_decodes_in_the_process(tmp_path, tiny_onnx, inputs, fake_nvdec,
                                                                     caplog):
    """A pipeline whose NVDEC sessions share its process serves the eager model (no torch.compile, no CUDA graphs:
    on an H200 a background compile cut the NVDEC threads to a third, and a capture beside them killed the job);
    a CPU-decoding pipeline keeps its runner as it is."""
    class CompilingRunner(OnnxRuntimeRunner):
        compiled = True

        def serve_eager(self, graph_for=None):
            assert graph_for == (4, 4)  # (batch, frames): the full batch's graph, captured before decoding
            changed, self.compiled = self.compiled, False
            return changed

    def run(decoder):
        runner = CompilingRunner(tiny_onnx["fp32"])
        options = JobOptions(Windowing(frames=4, window_frames=12), 56, 4, 2, 120.0, False, decoder, 3)
        items = [i for i in discover([str(inputs)]) if i.path.endswith("v0.mp4")]
        out = tmp_path / decoder
        summary = run_job(items, runner, out, FeatureWriter(out, "float32", 1000), options)
        assert summary["ok"] == 1
        return runner

    with caplog.at_level(logging.INFO, logger="iv2trt.job.pipeline"):
        assert run("auto").compiled is False
    assert "the encoder runs eager" in caplog.text
    assert run("cpu").compiled is True


def test_a_missing_file_fails_once_not_as_an_nvdec_fallback(tmp_path, tiny_onnx, inputs, fake_nvdec):
    """A list file naming a file that is not there: failed with 'file not found', and the GPU path never saw it."""
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{inputs / 'v0.mp4'}\n{tmp_path / 'gone.mp4'}\n")
    summary, feats, out = _run(tmp_path, tiny_onnx, listing, "auto", "missing", workers=None)
    assert summary["ok"] == 1 and summary["failed"] == 1
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["reason"] == "file not found" and failure["path"].endswith("gone.mp4")
    assert summary["decoders"]["nvdec"]["fallbacks_to_cpu"] == 0 and "gone.mp4" not in fake_nvdec.decoded


def _tail(backlog, queue, gpu=(8, 0, 0.0), cpu=(4, 0, 0.0)):
    """A pipeline's state as `_cpu_may_share` reads it: the executor's backlog for it (None: not said; True: 0),
    the inputs in hand, paths as (workers, inputs done, busy seconds)."""
    from types import SimpleNamespace

    from iv2trt.job.pipeline import _PathStats

    paths = {}
    for name, (workers, done, busy) in (("nvdec", gpu), ("cpu", cpu)):
        paths[name] = _PathStats(workers)
        paths[name].inputs, paths[name].busy_s = done, busy
    backlog = {True: 0, False: None}.get(backlog, backlog)
    return SimpleNamespace(backlog=backlog, gpu_queue=[None] * queue, paths=paths)


def test_cpu_workers_leave_the_jobs_tail_to_the_gpu_when_it_finishes_sooner():
    from iv2trt.job.pipeline import CPU_SLOWER_THAN_NVDEC, Pipeline

    share = Pipeline._cpu_may_share
    assert share(_tail(False, 0, gpu=(8, 10, 10.0), cpu=(4, 10, 30.0)))  # more to come: always
    assert share(_tail(True, 1))                                        # nothing measured yet
    assert share(_tail(True, 1, gpu=(0, 0, 0.0)))                       # no GPU workers: the CPU takes all
    # 1 s per input on each of 8 NVDEC sessions, 3 s on a CPU worker: the GPU drains 24 queued inputs in 3 s
    assert share(_tail(True, 24, gpu=(8, 10, 10.0), cpu=(4, 10, 30.0)))
    assert not share(_tail(True, 23, gpu=(8, 10, 10.0), cpu=(4, 10, 30.0)))
    # no CPU input done yet: a CPU worker is taken to be CPU_SLOWER_THAN_NVDEC times slower
    n = int(8 * CPU_SLOWER_THAN_NVDEC)
    assert share(_tail(True, n, gpu=(8, 10, 10.0))) and not share(_tail(True, n - 1, gpu=(8, 10, 10.0)))
    # inputs the executor still holds for this pipeline count as queue: 10 in hand + 14 to come = 24
    assert share(_tail(14, 10, gpu=(8, 10, 10.0), cpu=(4, 10, 30.0)))
    assert not share(_tail(13, 10, gpu=(8, 10, 10.0), cpu=(4, 10, 30.0)))


def test_the_executor_tells_a_pipeline_it_holds_the_jobs_tail(tmp_path, tiny_onnx, inputs, fake_nvdec, monkeypatch):
    from iv2trt.job.pipeline import Pipeline

    told = []
    fed_all = Pipeline.fed_all
    monkeypatch.setattr(Pipeline, "fed_all",
                        lambda self, backlog=0: (told.append((len(self.videos), backlog)), fed_all(self, backlog)))
    summary, _, _ = _run(tmp_path, tiny_onnx, inputs, "auto", "tail", workers=2)
    assert summary["ok"] == 9 and told and told[0] == (9, 0)  # first told with every input in hand, none to come


def test_default_decode_threads_give_each_worker_half_a_core(monkeypatch):
    from iv2trt.decode.plan import default_decode_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert [default_decode_threads(n) for n in (1, 2, 4, 8, 16, 32)] == [8, 4, 2, 1, 1, 1]
    assert default_decode_threads(4, share=0.5) == 1  # one of two pipelines: half the cores


def test_a_cpu_workers_start_does_not_count_against_the_decode_timeout():
    """On a loaded machine a worker's process takes seconds to come up (imports); a task given to it meanwhile
    times out only WORKER_START_S later, and once it is up its clock starts again."""
    import time
    from types import SimpleNamespace

    from iv2trt.decode.workers import WORKER_START_S, CpuWorker, worker_context

    wk = object.__new__(CpuWorker)  # the timeout rule alone, on a worker without a process
    wk._up, wk._seen_up, wk.conn = SimpleNamespace(value=0), False, SimpleNamespace(poll=lambda: False)
    wk.task, wk.last_heard = 7, 100.0
    assert not wk.silent_too_long(100.0 + 3.0, 2.0)  # not up yet: its start is allowed for
    assert wk.silent_too_long(100.0 + 2.0 + WORKER_START_S + 0.1, 2.0)  # it never came up
    wk._up.value = 1
    seen = time.monotonic()
    assert not wk.silent_too_long(seen + 1.0, 2.0)  # up now: the clock started again when it was seen up
    assert wk.silent_too_long(wk.last_heard + 2.1, 2.0)
    wk.conn = SimpleNamespace(poll=lambda: True)
    assert not wk.silent_too_long(wk.last_heard + 2.1, 2.0)  # a message waits: that is progress
    wk.task = None
    assert not wk.silent_too_long(wk.last_heard + 1e6, 2.0)  # idle workers never time out

    real = CpuWorker(worker_context(), Windowing(frames=4), 56)  # a real process says it is up
    try:
        deadline = time.monotonic() + 60
        while not real.up() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert real.up()
    finally:
        real.stop()


def test_the_workers_server_comes_up_in_the_background_before_any_worker():
    """Before: the CPU workers' forkserver (its torch import, 3.4 s on an H200 host) started with the first worker,
    after the runner's build. start_worker_server() starts it at once in a thread; in a fresh interpreter no
    forkserver runs before it, and one runs after it (the jobs in the other tests start their workers through it)."""
    import subprocess
    import sys

    code = r"""
import os, sys
from pathlib import Path

def servers():
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me and \
                    b"forkserver" in (stat.parent / "cmdline").read_bytes():
                found.append(stat.parent.name)
        except (OSError, IndexError):
            pass
    return found

if __name__ == "__main__":
    from iv2trt.decode.workers import start_worker_server
    before = servers()
    thread = start_worker_server()
    thread.join(120)
    print(len(before), len(servers()), thread.is_alive())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["0", "1", "False"], out.stdout + out.stderr


def test_a_cpu_worker_leaves_multiprocessing_s_resource_tracker_alone():
    """Before: each CPU worker's start signal was an Event, five named semaphores registered with multiprocessing's
    resource tracker. In a Ray pipeline actor on an H200 the tracker was killed as the actor ended (SIGKILL, its
    exit status said: Ray kills an exiting worker's child processes), and each semaphore's release then printed
    "resource_tracker: process died unexpectedly" and a KeyError traceback (25 for one actor). A worker now starts,
    decodes and stops without registering any."""
    import subprocess
    import sys

    code = r"""
import sys
from multiprocessing import resource_tracker
registered = []
real = resource_tracker.register
resource_tracker.register = lambda name, rtype: (registered.append(rtype), real(name, rtype))

if __name__ == "__main__":
    from iv2trt.decode.clips import Windowing
    from iv2trt.decode.inputs import InputItem
    from iv2trt.decode.samples import pattern_frames, write_video
    from iv2trt.decode.workers import CpuWorker, worker_context
    write_video(sys.argv[1], pattern_frames(8, 40, 48, seed=3))
    wk = CpuWorker(worker_context(), Windowing(frames=4), 56, ring=True)
    wk.assign(0, InputItem(sys.argv[1], "v", "video"))
    kinds = []
    while True:
        message, slot = wk.receive()
        kinds.append(message[0])
        if slot is not None:
            wk.give_back(slot)
        if message[0] in ("done", "failed"):
            break
    wk.stop()
    print(kinds[-1], registered)
"""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code, f"{tmp}/v.mp4"], capture_output=True, text=True,
                             timeout=180, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["done", "[]"], out.stdout + out.stderr
