"""torch.compile of the PyTorch runner: mode choice, shape classes, background compiling with the eager model
meanwhile, failures, the kernel-group profile; and, on a GPU, the compiled fp16 path against fp32."""
from __future__ import annotations

import copy
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from iv2trt.bench.profile import GROUPS, group_times, idle_between_kernels, kernel_group, short_name
from iv2trt.compare import compare
from iv2trt.errors import PipelineError
from iv2trt.runners.compile import DEFAULT_MODE, CompiledForward, cache_dir, resolve_mode, shape_class
from iv2trt.runners.torch_runner import TorchRunner


class CountingBackend:
    """A torch.compile backend that runs dynamo's graph as is, counts graphs, and can hold or fail a compile."""

    def __init__(self, fail: bool = False):
        self.graphs = 0
        self.fail = fail
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set once a compile is running

    def __call__(self, gm, example_inputs):
        self.entered.set()
        self.release.wait(60)
        if self.fail:
            raise RuntimeError("planted compiler failure")
        self.graphs += 1
        return gm.forward


def frames(batch: int, t: int) -> torch.Tensor:
    return torch.randn(batch, t, 3, TINY.img_size, TINY.img_size)


def test_resolve_mode(monkeypatch):
    monkeypatch.delenv("IV2TRT_TORCH_COMPILE", raising=False)
    assert resolve_mode(None, "cuda", torch.float16) == DEFAULT_MODE
    assert resolve_mode(None, "cuda", torch.float32) is None      # the fp32 model is the reference: eager
    assert resolve_mode("default", "cuda", torch.float32) == "default"
    assert resolve_mode("off", "cuda", torch.float16) is None
    assert resolve_mode(None, "cpu", torch.float16) is None       # compiling is for GPUs only
    assert resolve_mode("max-autotune", "cpu", torch.float32) is None
    monkeypatch.setenv("IV2TRT_TORCH_COMPILE", "off")
    assert resolve_mode(None, "cuda", torch.float16) is None
    monkeypatch.setenv("IV2TRT_TORCH_COMPILE", "fastest")
    with pytest.raises(PipelineError, match="IV2TRT_TORCH_COMPILE"):
        resolve_mode(None, "cuda", torch.float16)


def test_cache_dir_is_persistent_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "iv2trt" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's /tmp default, set by torch
    assert cache_dir() == tmp_path / "iv2trt" / "torchinductor"


def test_torchdynamo_is_imported_by_the_first_compile_not_by_the_runner(tmp_path):
    """A runner that never compiles (the eager encoder beside NVDEC) does not pay TorchDynamo's import (11 s of a
    pipeline's start on an H200 machine without bytecode caches); the twin and its cache dir come with the first
    compile. A fresh interpreter: this one has imported TorchDynamo already."""
    import subprocess
    import sys

    code = """
import os, sys, torch
from iv2trt.runners.compile import CompiledForward
compiled = CompiledForward(torch.nn.Linear(4, 4), "default")
assert "torch._dynamo" not in sys.modules and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
twin = compiled._twin()
assert "torch._dynamo" in sys.modules and compiled._twin() is twin
assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(os.path.join("iv2trt", "torchinductor"))
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_models_compile_variants_are_classes_of_their_own(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.compile_variant = lambda shape: "big batches" if shape[0] >= 4 else None
    compiled = CompiledForward(model, "default", background=False, backend="eager")
    shape = (3, 4, 3, TINY.img_size, TINY.img_size)
    small, big = compiled.key(shape), compiled.key((4, *shape[1:]))
    assert small == shape_class(shape) and big == (*shape_class((4, *shape[1:])), "big batches")
    # the batch-size probe stays on its side: it must not take the other path's graph for a specialisation
    assert compiled._probe_batch(small, shape) == 2 and compiled._probe_batch(big, (4, *shape[1:])) == 5
    model.compile_variant = lambda shape: "big batches" if shape[0] >= 3 else None
    assert compiled._probe_batch(compiled.key((2, *shape[1:])), (2, *shape[1:])) is None


def test_shape_classes():
    assert shape_class((32, 8, 3, 224, 224)) == shape_class((5, 8, 3, 224, 224))
    assert shape_class((1, 8, 3, 224, 224)) != shape_class((2, 8, 3, 224, 224))
    assert shape_class((32, 8, 3, 224, 224)) != shape_class((32, 1, 3, 224, 224))
    assert shape_class((32, 8, 3, 224, 224), dynamic_batch=False) != shape_class((5, 8, 3, 224, 224), False)


def test_background_compile_runs_eager_meanwhile_then_one_graph_per_class(tiny_model):
    backend = CountingBackend()
    backend.release.clear()  # hold the first compile
    compiled = CompiledForward(tiny_model, "default", backend=backend)
    try:
        x = frames(3, 4)
        with torch.inference_mode():
            expected = tiny_model(x)
            out = compiled(x)               # the compile starts and waits; this call ran the eager model
            assert compiled.busy and not compiled.ready(x.shape)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            backend.release.set()
            compiled.wait(60)
            assert not compiled.busy and compiled.ready(x.shape) and compiled.ready((7, 4, 3, 56, 56))
            assert compiled.select(x) is compiled.run_compiled
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
            # the batch is dynamic from 2 (probed with batch 4 while compiling): no new graph for batch 6
            assert backend.graphs == 1
            y = frames(6, 4)
            torch.testing.assert_close(compiled(y), tiny_model(y), rtol=1e-5, atol=1e-6)
            assert backend.graphs == 1
            # batch 1 and another frame count are classes of their own
            for z in (frames(1, 4), frames(2, 2)):
                compiled(z)
                compiled.wait(60)
                torch.testing.assert_close(compiled(z), tiny_model(z), rtol=1e-5, atol=1e-6)
            assert backend.graphs == 3
            assert set(compiled.seconds) == {("batch2+", 4, 3, 56, 56), ("batch1", 4, 3, 56, 56),
                                             ("batch2+", 2, 3, 56, 56)}
    finally:
        compiled.close()


def test_unfinished_compiles_are_named_and_close_drops_the_queued_ones(tiny_model):
    from iv2trt.runners.compile import compiles_in_flight

    backend = CountingBackend()
    backend.release.clear()  # the first compile hangs until released
    compiled = CompiledForward(tiny_model, "default", backend=backend)
    try:
        with torch.inference_mode():
            compiled(frames(3, 4))
            compiled(frames(1, 4))  # queued behind the first
        assert sorted(compiles_in_flight()) == ["InternVideo2CLIPVision [1, 4, 3, 56, 56]",
                                                "InternVideo2CLIPVision [B>=2, 4, 3, 56, 56]"]
        assert backend.entered.wait(30)  # the first is running, the second queued
        compiled.close()
        assert compiles_in_flight() == ["InternVideo2CLIPVision [B>=2, 4, 3, 56, 56]"]  # the running one stays
    finally:
        backend.release.set()
        compiled.wait(60)
    assert compiles_in_flight() == [] and backend.graphs == 1


def test_finish_compiles_waits_a_bounded_time(tiny_model, caplog):
    import time

    from iv2trt.runners.compile import compiles_in_flight, finish_compiles

    backend = CountingBackend()
    backend.release.clear()  # a compile that does not end by itself
    compiled = CompiledForward(tiny_model, "default", backend=backend)
    try:
        with torch.inference_mode():
            compiled(frames(3, 4))
        assert backend.entered.wait(30)
        started = time.perf_counter()
        with caplog.at_level(logging.INFO, logger="iv2trt.runners.compile"):
            finish_compiles(timeout=0.5)
        assert 0.4 < time.perf_counter() - started < 10
        assert "still running" in caplog.text and compiles_in_flight()
    finally:
        backend.release.set()
        compiled.wait(60)


_EXIT_SCRIPT = """
import atexit, logging, os, sys, time
import torch
sys.path.insert(0, {root!r})
from iv2trt.cli import exit_with
from iv2trt.runners.compile import CompiledForward

logging.basicConfig(level=logging.INFO, format="%(message)s")
marker = {marker!r}

def slow_backend(gm, example_inputs):  # a compile that may still be running when the program ends
    open(marker + ".started", "w").close()
    time.sleep({seconds})
    open(marker, "w").write("compiled")
    return gm.forward

compiled = CompiledForward(torch.nn.Flatten(), "default", backend=slow_backend)
atexit.register(lambda: print("ATEXIT RAN", flush=True))

def main(argv=None):
    with torch.inference_mode():
        compiled(torch.randn(2, 4, 3, 2, 2))
    if {finish}:
        compiled.wait(60)
    else:  # end while the compile runs (not merely queued)
        while not os.path.exists(marker + ".started"):
            time.sleep(0.05)
    return 0

if {through_exit_with}:
    exit_with(main)
main()
"""


@pytest.mark.parametrize("through_exit_with, finish", [(True, False), (True, True), (False, False)])
def test_program_end_after_a_compile_neither_aborts_nor_hangs(tmp_path, through_exit_with, finish):
    """The stages' entry point leaves without the interpreter's shutdown once a compile has run (under a
    running compile that shutdown aborted with exit 134 on a GPU; after a finished one TorchInductor's exit
    hook waits for its worker processes); any other program waits for a running compile at exit."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    marker = tmp_path / "marker"
    seconds = 30 if through_exit_with and not finish else 2
    script = _EXIT_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]), marker=str(marker),
                                 seconds=seconds, through_exit_with=through_exit_with, finish=finish)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    if through_exit_with:
        unfinished = "leaving with the background torch.compile of Flatten [B>=2, 4, 3, 2, 2] unfinished"
        assert (unfinished in done.stderr) == (not finish) and "ATEXIT RAN" not in done.stdout
        assert marker.exists() == finish and elapsed < 30
    else:
        assert "s for the background torch.compile of Flatten [B>=2, 4, 3, 2, 2] to finish" in done.stderr
        assert marker.read_text() == "compiled" and "ATEXIT RAN" in done.stdout


def test_compile_failure_leaves_the_class_eager(tiny_model, caplog):
    compiled = CompiledForward(tiny_model, "default", backend=CountingBackend(fail=True))
    x = frames(2, 4)
    with caplog.at_level(logging.WARNING, logger="iv2trt.runners.compile"), torch.inference_mode():
        compiled(x)
        compiled.wait(60)
        assert "planted compiler failure" in caplog.text
        assert compiled.key(x.shape) in compiled.failed and not compiled.ready(x.shape)
        assert compiled.select(x) is tiny_model and not compiled.busy  # not tried again
        torch.testing.assert_close(compiled(x), tiny_model(x), rtol=0, atol=0)


def test_runner_on_cpu_stays_eager_and_uses_a_given_compiled_forward(tiny_model):
    runner = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="max-autotune")
    assert runner.compiled is None and runner.compile_mode is None
    backend = CountingBackend()
    runner.compiled = CompiledForward(runner.model, "default", backend=backend, background=False)
    runner.prepare([(2, 4)])
    assert backend.graphs == 1 and runner.compiled.ready((2, 4, 3, 56, 56))
    u8 = np.random.default_rng(0).integers(0, 256, (3, 4, TINY.img_size, TINY.img_size, 3), dtype=np.uint8)
    ref = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="off")
    assert compare(ref.infer_uint8(u8), runner.infer_uint8(u8)).max_rel_error < 1e-5
    assert backend.graphs == 1
    runner.close()



def test_serve_eager_drops_the_compile_and_the_graphs(tiny_model):
    """What a pipeline with in-process GPU decoding asks of its runner: the eager model from now on (no further
    compile requests reach the backend), same features."""
    runner = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="off")
    backend = CountingBackend()
    runner.compiled = CompiledForward(runner.model, "default", backend=backend, background=False)
    runner.cuda_graphs = True  # as on a GPU
    assert runner.serve_eager() is True
    assert runner.compiled is None and runner.compile_mode is None and runner.cuda_graphs is False
    runner.prepare([(2, 4)])
    assert backend.graphs == 0
    u8 = np.random.default_rng(1).integers(0, 256, (2, 4, TINY.img_size, TINY.img_size, 3), dtype=np.uint8)
    ref = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="off")
    assert compare(ref.infer_uint8(u8), runner.infer_uint8(u8)).max_rel_error < 1e-5
    assert runner.serve_eager() is False  # nothing left to drop
    runner.close()

def test_serve_eager_with_a_graph_captures_it_now_and_never_later(tiny_model):
    """serve_eager((batch, frames)): the compile dropped, that shape's graph of the eager model captured at once;
    later batches replay it (smaller ones too) or, larger, run eager: no capture once decoding may run."""
    runner = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="off")
    backend = CountingBackend()
    runner.compiled = CompiledForward(runner.model, "default", backend=backend, background=False)
    runner.cuda_graphs = True  # as on a GPU; the capture stood in for (no CUDA here)
    captured, replays = [], []

    class Graph:
        def __init__(self, forward, static_in, static_out):
            self.forward, self.static_in, self.static_out = forward, static_in, static_out

        def replay(self):
            replays.append(tuple(self.static_in.shape))
            self.static_out.copy_(self.forward(self.static_in))

    def capture(forward, x):
        captured.append(tuple(x.shape))
        static_in = x.clone()
        static_out = forward(static_in).clone()
        return Graph(forward, static_in, static_out), static_in, static_out, forward

    runner._capture = capture
    assert runner.serve_eager((2, 4)) is True
    assert runner.compiled is None and runner.cuda_graphs and runner.captures_closed
    assert captured == [(2, 4, 3, TINY.img_size, TINY.img_size)]
    ref = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="off")
    rng = np.random.default_rng(2)
    for batch, replayed in ((2, True), (1, True), (3, False)):
        u8 = rng.integers(0, 256, (batch, 4, TINY.img_size, TINY.img_size, 3), dtype=np.uint8)
        before = len(replays)
        assert compare(ref.infer_uint8(u8), runner.infer_uint8(u8)).max_rel_error < 1e-5
        assert (len(replays) > before) == replayed
    assert len(captured) == 1 and backend.graphs == 0  # nothing captured or compiled after
    assert runner.serve_eager((2, 4)) is False  # already so
    runner.close()


def test_kernel_groups():
    assert kernel_group("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64") == "attention"
    assert kernel_group("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_group("triton_tem_fused_addmm_gelu_3") == "matmul+epilogue (Triton)"
    assert kernel_group("_cls_merge_kernel") == "attention"
    assert kernel_group("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT") == "matmul (cuBLAS)"
    assert kernel_group("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "matmul (cuBLAS)"
    assert kernel_group("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2") == "norm/reduction"
    assert kernel_group("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_split_7") \
        == "norm/reduction"
    assert kernel_group("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>") \
        == "norm/reduction"
    assert kernel_group("triton_poi_fused_add_mul_4") == "elementwise/copies"
    assert kernel_group("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") \
        == "elementwise/copies"
    profile = group_times([("nvjet_a", 300.0), ("fmha_b", 500.0), ("triton_poi_c", 100.0), ("nvjet_a", 100.0)],
                          calls=2)
    assert profile["total_ms"] == pytest.approx(0.5)
    assert profile["groups"]["attention"] == {"ms": pytest.approx(0.25), "share": pytest.approx(0.5)}
    assert set(profile["groups"]) == set(GROUPS)
    assert profile["kernels"][0] == {"name": "fmha_b", "group": "attention", "ms": 0.25, "launches": 0}
    assert profile["kernels"][1]["ms"] == pytest.approx(0.2) and profile["kernels"][1]["launches"] == 1


def test_idle_between_a_graph_replays_kernels():
    quack = "kernel_cutlass_kernel_quackepiloguefrontendGemmMod__residual_rms_1a2c4ba8f2233c39__c_row_row_sm9_object"
    fa4 = "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensor0000o111"
    row_scaled = "kernel_cutlass_kernel_modelsflash_attn4_row_scaledRowScaledForwardSm90_object_at__tensor0000o1"
    assert [short_name(n) for n in (quack, fa4, row_scaled, "_qk_norm_rows_kernel", "triton_poi_fused_add_6")] == \
        ["residual_rms", "FlashAttentionForwardSm90", "RowScaledForwardSm90", "_qk_norm_rows_kernel",
         "triton_poi_fused_add"]
    # two calls of three kernels: idle 2 + 0 and 3 + 1 µs; one overlap of 1 µs; the 70 µs between calls uncounted
    spans = [("a", 0.0, 10.0), ("b", 12.0, 20.0), ("c", 19.0, 30.0),
             ("a", 100.0, 110.0), ("b", 113.0, 120.0), ("c", 121.0, 130.0)]
    idle = idle_between_kernels(spans, calls=2)
    assert idle["kernels"] == 3 and idle["idle_us"] == pytest.approx(3.0) and idle["overlap_us"] == pytest.approx(0.5)
    assert idle["transitions"] == [{"before": "a", "after": "b", "idle_us": pytest.approx(2.5)},
                                   {"before": "b", "after": "c", "idle_us": pytest.approx(0.5)}]
    # a profile that did not see every call's kernels (a count not divisible by the calls) gives no figure
    assert idle_between_kernels(spans[:5], calls=2)["idle_us"] is None


# --- GPU -----------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA GPU: the compiled fp16 path (TorchInductor, Triton) runs only there")


@pytest.fixture(scope="module")
def s14_fp32_gpu():
    from iv2trt.models import create_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return create_model("s14", random_init=True, device="cuda")


# every shape class of the default mode (T=8 batch >= 2, T=8 batch 1, T=1); the other mode's T=8 batch >= 2
# class only (each class is a compile of its own: a minute or more when the cache is cold); the eager model
GPU_SHAPES = {mode: [(32, 8), (5, 8), (1, 8), (4, 1)] if mode in (DEFAULT_MODE, "off") else [(32, 8), (5, 8)]
              for mode in ("max-autotune", "default", "off")}


@needs_gpu
@pytest.mark.parametrize("mode", list(GPU_SHAPES), ids=lambda mode: mode.replace("-", "_"))
def test_gpu_fused_fp16_matches_fp32(s14_fp32_gpu, mode):
    runner = TorchRunner(copy.deepcopy(s14_fp32_gpu).cpu(), precision="fp16", compile_mode=mode)
    runner.replay_larger_graphs = False  # each shape its own graph (a job's last batch replays a larger one)
    runner.prepare(GPU_SHAPES[mode])
    worst = 1.0
    try:
        for b, t in GPU_SHAPES[mode]:  # 5x8: the batch-dynamic specialisation of 32x8 (same compile)
            x = torch.randn(b, t, 3, 224, 224, device="cuda")
            with torch.inference_mode():
                ref = s14_fp32_gpu(x).double().cpu().numpy()
                out = runner.forward_device(x.half()).double().cpu().numpy()
            compiled = runner.compiled
            if compiled is not None:
                assert compiled.ready(x.shape) and not compiled.failed
            # the graph replayed is the compiled model's (the eager model's with compiling off)
            assert runner._graphs[tuple(x.shape)][3] is (compiled.run_compiled if compiled else runner.model)
            c = compare(ref, out)
            worst = min(worst, c.min_cosine)
            seconds = compiled.compile_seconds(x.shape) if compiled else None
            print(f"{mode:<13} {b}x{t:<2} min cos {c.min_cosine:.7f} max abs {c.max_abs_error:.2e} "
                  f"compile {'-' if seconds is None else f'{seconds:.1f} s'}")
    finally:
        runner.close()
    assert worst >= 0.9999


@needs_gpu
def test_gpu_new_shape_runs_eager_while_compiling(s14_fp32_gpu):
    runner = TorchRunner(copy.deepcopy(s14_fp32_gpu).cpu(), precision="fp16")  # the default mode
    try:
        x = torch.randn(3, 8, 3, 224, 224, device="cuda")
        with torch.inference_mode():
            ref = s14_fp32_gpu(x).double().cpu().numpy()
            first = runner.forward_device(x.half()).double().cpu().numpy()  # starts the compile
            assert runner.compiled.busy or runner.compiled.ready(x.shape)
            runner.compiled.wait(600)
            second = runner.forward_device(x.half()).double().cpu().numpy()
            assert runner._graphs[tuple(x.shape)][3] is runner.compiled.run_compiled
        for out in (first, second):
            assert compare(ref, out).min_cosine >= 0.9999
    finally:
        runner.close()


def test_a_failed_graph_capture_falls_back_and_the_job_goes_on(tiny_model, monkeypatch, caplog):
    """A capture that fails (on a GPU: another thread's CUDA work invalidating it) never ends the job: that call
    runs without a graph, and after MAX_CAPTURE_FAILURES tries the shape stops asking for one."""
    runner = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32", compile_mode="off")
    runner.cuda_graphs = True  # as on a GPU; the capture itself is planted to fail
    tried = []

    def fails(forward, x):
        tried.append(tuple(x.shape))
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(runner, "_capture", fails)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    x = frames(2, 4)
    with torch.inference_mode():
        want = tiny_model(x)
        with caplog.at_level(logging.WARNING, logger="iv2trt.runners.torch_runner"):
            for _ in range(TorchRunner.MAX_CAPTURE_FAILURES + 2):
                torch.testing.assert_close(runner.forward_device(x), want)
    assert tried == [tuple(x.shape)] * TorchRunner.MAX_CAPTURE_FAILURES
    assert f"CUDA graph capture of input {tuple(x.shape)} failed (CUDA error" in caplog.text
    assert "running without a graph from now on" in caplog.text and not runner._graphs


def test_background_compiles_run_below_the_decoders(tiny_model):
    """A compile in the background (and the compile workers it starts) yields the cores to the CPU decoders."""
    from iv2trt.runners.compile import COMPILE_NICENESS

    seen = []

    def backend(gm, example_inputs):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return gm.forward

    torch._dynamo.reset()  # (an earlier test's compile of the same forward would be reused: no backend call)
    compiled = CompiledForward(copy.deepcopy(tiny_model).eval(), DEFAULT_MODE, backend=backend)
    with torch.inference_mode():
        compiled(frames(2, 4))  # runs eager here and asks for the compile
    compiled.wait(120)
    assert not compiled.failed and seen and min(seen) >= COMPILE_NICENESS
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < COMPILE_NICENESS  # the caller's own
    compiled.close()
