"""Stage 3's TensorRT runner: pure logic everywhere; a real engine run on a GPU with TensorRT + pycuda."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from iv2trt.errors import EngineMismatch, PipelineError
from iv2trt.runners.tensorrt_runner import (
    Chunk,
    TensorRTRunner,
    check_engine_metadata,
    check_frames_shape,
    load_engine_metadata,
    numpy_dtype,
    plan_batches,
    rebuild_command,
)


def _gpu_stack_available() -> bool:
    if importlib.util.find_spec("pycuda") is None or importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # noqa: BLE001 - no driver, no GPU
        return False


GPU_REASON = "needs an NVIDIA GPU with TensorRT and pycuda (pip install -r requirements-gpu.txt)"
needs_gpu = pytest.mark.skipif(not _gpu_stack_available(), reason=GPU_REASON)

META = {"tensorrt": {"flavour": "tensorrt", "module": "tensorrt", "version": "10.13.0.35"},
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "precision": "fp16",
        "profile": {"input": "frames", "min": "1x1", "opt": "32x8", "max": "64x16"},
        "onnx": {"path": "build/internvideo2_clip_s14_fp16.onnx"}}


# ---------------------------------------------------------------- metadata checks

def test_matching_engine_is_accepted():
    check_engine_metadata(META, "x.engine", "tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize("runtime, problem", [
    (("tensorrt", "10.14.1.48", "NVIDIA H100 80GB HBM3", "9.0"), "built with tensorrt 10.13.0.35, this runtime is 10.14"),
    (("tensorrt-rtx", "1.7.1.116", "NVIDIA H100 80GB HBM3", "9.0"), "built with tensorrt, this runtime is tensorrt-rtx"),
    (("tensorrt", "10.13.0.35", "NVIDIA A100-SXM4-40GB", "8.0"), "compute capability 9.0), this GPU is NVIDIA A100"),
    (("tensorrt", "10.13.0.35", "NVIDIA H100 PCIe", "9.0"), "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H100 PCIe"),
])
def test_mismatched_engine_is_refused_with_the_rebuild_command(runtime, problem):
    with pytest.raises(EngineMismatch) as err:
        check_engine_metadata(META, "build/s14.engine", *runtime)
    message = str(err.value)
    assert problem in message
    assert ("python build_engine.py --onnx build/internvideo2_clip_s14_fp16.onnx --output build/s14.engine "
            "--precision fp16 --min 1x1 --opt 32x8 --max 64x16 --backend") in message
    assert err.value.exit_code == 5


def test_engine_built_without_gpu_is_refused_by_full_tensorrt():
    meta = {**META, "gpu": {"name": "none", "compute_capability": "none"}}
    with pytest.raises(EngineMismatch, match="built on none"):
        check_engine_metadata(meta, "x.engine", "tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def test_rtx_engine_checks_its_compute_capability_targets():
    meta = {**META, "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7.1.116"}}
    check_engine_metadata({**meta, "rtx_compute_capabilities": ["all supported by TensorRT-RTX"]}, "x.engine",
                          "tensorrt-rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(EngineMismatch, match="built for SM86, this GPU .* is SM89"):
        check_engine_metadata({**meta, "rtx_compute_capabilities": ["SM86"]}, "x.engine", "tensorrt-rtx",
                              "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")


def test_rebuild_command_quotes_paths():
    meta = {**META, "onnx": {"path": "my models/s14.onnx"}}
    assert "--onnx 'my models/s14.onnx'" in rebuild_command(meta, "out.engine")


def test_engine_or_metadata_missing(tmp_path):
    with pytest.raises(PipelineError, match="not found: build it with python build_engine.py"):
        load_engine_metadata(tmp_path / "none.engine")
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(PipelineError, match="metadata\\) is missing"):
        load_engine_metadata(engine)
    Path(str(engine) + ".json").write_text("{broken")
    with pytest.raises(PipelineError, match="not readable JSON"):
        load_engine_metadata(engine)


def test_runner_refuses_a_foreign_engine_before_deserialising(tmp_path, monkeypatch):
    """The metadata check runs before TensorRT ever sees the plan (here: garbage bytes)."""
    import iv2trt.runners.tensorrt_runner as rt
    from iv2trt.engine import tensorrt

    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not a plan")
    Path(str(engine) + ".json").write_text(json.dumps(META))

    class FakeDevice:
        def __init__(self, index): pass
        def compute_capability(self): return (8, 9)
        def name(self): return "NVIDIA GeForce RTX 4090"

    class FakeCuda:
        Device = FakeDevice

    monkeypatch.setattr(rt, "_import_pycuda", lambda: FakeCuda)
    monkeypatch.setattr(tensorrt, "import_tensorrt",
                        lambda backend="auto": tensorrt.TensorRT(type("M", (), {"__version__": "10.13.0.35"}),
                                                                 "tensorrt"))
    with pytest.raises(EngineMismatch, match="compute capability 9.0\\), this GPU is NVIDIA GeForce RTX 4090"):
        TensorRTRunner(engine)


# ---------------------------------------------------------------- batches, shapes, dtypes

def test_plan_batches_splits_above_profile_max():
    assert plan_batches(5, 1, 64) == [Chunk(0, 5, 5)]
    assert plan_batches(130, 1, 64) == [Chunk(0, 64, 64), Chunk(64, 128, 64), Chunk(128, 130, 2)]
    assert plan_batches(9, 4, 8) == [Chunk(0, 8, 8), Chunk(8, 9, 4)]  # padded up to the profile minimum
    with pytest.raises(PipelineError, match="empty batch"):
        plan_batches(0, 1, 8)


def test_frames_outside_profile_are_refused_with_the_range():
    check_frames_shape((2, 8, 3, 224, 224), (1, 16), (3, 224, 224))
    with pytest.raises(PipelineError, match="32 frames per clip is outside this engine's profile range 1..16"):
        check_frames_shape((2, 32, 3, 224, 224), (1, 16), (3, 224, 224))
    with pytest.raises(PipelineError, match="the engine takes \\(3, 224, 224\\)"):
        check_frames_shape((2, 8, 3, 256, 256), (1, 16), (3, 224, 224))
    with pytest.raises(PipelineError, match="must be \\[batch, frames"):
        check_frames_shape((8, 3, 224, 224), (1, 16), (3, 224, 224))


def test_numpy_dtype_from_tensorrt_types():
    trt = pytest.importorskip("tensorrt_rtx")
    assert numpy_dtype(trt.DataType.HALF) == np.float16
    assert numpy_dtype(trt.DataType.FLOAT) == np.float32
    with pytest.raises(PipelineError, match="fp32/fp16 engines only"):
        numpy_dtype(trt.DataType.BF16)


# ---------------------------------------------------------------- real GPU runs (skipped here)

@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_engine_matches_onnxruntime_on_gpu(s14_onnx, tmp_path, precision):
    from iv2trt.cli.build import main
    from iv2trt.compare import compare
    from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

    engine = tmp_path / f"s14_{precision}.engine"
    assert main(["--onnx", str(s14_onnx[precision]), "--output", str(engine), "--precision", precision,
                 "--min", "1x1", "--opt", "2x8", "--max", "4x16", "--timing-cache", str(tmp_path / "tc")]) == 0
    runner = TensorRTRunner(engine)
    assert runner.max_batch == 4 and runner.frame_range == (1, 16)
    reference = OnnxRuntimeRunner(s14_onnx["fp32"], providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, frames in ((1, 1), (3, 8), (6, 16)):  # 6 > max batch 4: split in two runs
        x = rng.standard_normal((batch, frames, 3, 224, 224), dtype=np.float32)
        out = runner.infer(x)
        assert out.dtype == np.float32 and out.shape == (batch, 512)
        result = compare(reference.infer(x), out)
        assert result.passes(precision) if precision == "fp16" else result.min_cosine > 0.99999, result
    with pytest.raises(PipelineError, match="outside this engine's profile range 1..16"):
        runner.infer(np.zeros((1, 17, 3, 224, 224), np.float32))
    runner.close()


@needs_gpu
def test_corrupt_engine_is_refused_on_gpu(tmp_path):
    import pycuda.driver as cuda
    import tensorrt

    cuda.init()
    dev = cuda.Device(0)
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"definitely not a plan" * 100)
    meta = {**META, "tensorrt": {"flavour": "tensorrt", "version": tensorrt.__version__},
            "gpu": {"name": dev.name(), "compute_capability": "{}.{}".format(*dev.compute_capability())}}
    Path(str(engine) + ".json").write_text(json.dumps(meta))
    with pytest.raises(EngineMismatch, match="could not deserialise"):
        TensorRTRunner(engine)


def test_metadata_of_another_engine_file_is_refused(tmp_path):
    import hashlib
    import json

    from iv2trt.errors import EngineMismatch
    from iv2trt.runners.tensorrt_runner import load_engine_metadata

    engine = tmp_path / "x.engine"
    engine.write_bytes(b"plan-v2")
    meta = {"engine_sha256": hashlib.sha256(b"plan-v1").hexdigest(), "precision": "fp16",
            "onnx": {"path": "x.onnx"}, "profile": {"min": "1x1", "opt": "4x8", "max": "8x16"}}
    (tmp_path / "x.engine.json").write_text(json.dumps(meta))
    with pytest.raises(EngineMismatch, match="sha256 differs.*build_engine.py --onnx x.onnx"):
        load_engine_metadata(engine)
    meta["engine_sha256"] = hashlib.sha256(b"plan-v2").hexdigest()
    (tmp_path / "x.engine.json").write_text(json.dumps(meta))
    assert load_engine_metadata(engine)["precision"] == "fp16"


# ---------------------------------------------------------------- the runner on fake TensorRT + pycuda (CPU)

from fake_tensorrt import CHW, FakeCuda, FakeEngine, expected_features, fake_tensorrt, install, write_engine  # noqa: E402


def _frames(batch, frames=4, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, frames, *CHW)).astype(np.float32)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """(cuda, trt module, engine path) with TensorRTRunner wired to them."""
    cuda = FakeCuda()
    module = fake_tensorrt(cuda)
    install(monkeypatch, cuda, module)
    return cuda, module, write_engine(tmp_path)


def test_fake_runner_computes_through_pinned_buffers(fake_gpu):
    cuda, module, engine = fake_gpu
    runner = TensorRTRunner(engine)
    x = _frames(6)  # 6 > max batch 4: two engine calls
    np.testing.assert_allclose(runner.infer(x), expected_features(x.astype(np.float16)), rtol=2e-3, atol=1e-3)
    runner.close()


def test_the_runner_names_its_gpu_for_the_job_s_logs_and_summary(fake_gpu):
    from iv2trt.job.pipeline import _device_name

    cuda, module, engine = fake_gpu
    runner = TensorRTRunner(engine)
    assert _device_name(runner) == "cuda:0"  # not "cpu", as it was before the runner named it
    runner.close()


def test_plugins_are_registered_before_deserialising(fake_gpu):
    cuda, module, engine = fake_gpu
    TensorRTRunner(engine).close()
    assert module.calls == ["Runtime", "init_libnvinfer_plugins('')", "deserialize_cuda_engine"]


def test_primary_context_is_retained_once_per_process_and_never_left_on_the_stack(fake_gpu):
    cuda, module, engine = fake_gpu
    for _ in range(3):
        runner = TensorRTRunner(engine)
        runner.infer(_frames(2))
        runner.close()
        assert cuda.stack() == []  # nothing left current on this thread
    assert cuda.retains == 1 and cuda.releases == 0


def test_close_waits_for_a_running_engine_call(fake_gpu):
    """Ctrl-C: the job's inference thread may be inside execute_async_v3 when the runner is closed."""
    import threading
    import time

    cuda, module, engine = fake_gpu
    runner = TensorRTRunner(engine)
    call = module.engine.contexts[0]
    call.release.clear()  # the engine call blocks until released
    results, errors = [], []
    x = _frames(3)

    def infer():
        try:
            results.append(runner.infer(x))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=infer)
    worker.start()
    assert call.started.wait(5)
    closer = threading.Thread(target=runner.close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive(), "close() returned while the engine was running"
    call.release.set()
    worker.join(5)
    closer.join(5)
    assert not cuda.use_after_free and not errors
    np.testing.assert_allclose(results[0], expected_features(x.astype(np.float16)), rtol=2e-3, atol=1e-3)
    assert cuda.allocations == set()  # freed once the call had returned
    with pytest.raises(PipelineError, match="closed"):
        runner.infer(x)


def test_close_gives_up_rather_than_freeing_under_a_stuck_call(fake_gpu, caplog):
    import threading

    cuda, module, engine = fake_gpu
    runner = TensorRTRunner(engine)
    call = module.engine.contexts[0]
    call.release.clear()
    worker = threading.Thread(target=runner.infer, args=(_frames(1),))
    worker.start()
    assert call.started.wait(5)
    runner.close(timeout=0.1)
    assert "left to the process exit" in caplog.text and not cuda.use_after_free
    call.release.set()
    worker.join(5)
    runner.close()
    assert cuda.allocations == set() and not cuda.use_after_free


@pytest.mark.parametrize("output_shape", [(-1, -1), (-1, 4, 6), (-1,)])
def test_engine_output_must_be_batch_by_fixed_features(monkeypatch, tmp_path, output_shape):
    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_tensorrt(cuda, FakeEngine(cuda, output_shape=output_shape)))
    with pytest.raises(PipelineError, match=r"needs \[batch, features\] with a fixed feature size"):
        TensorRTRunner(write_engine(tmp_path))
    assert cuda.stack() == []


def test_output_shape_is_checked_after_setting_the_input_shape(monkeypatch, tmp_path):
    cuda = FakeCuda()
    engine = FakeEngine(cuda, context_output_shape=lambda shape: (shape[0], 7))  # not what the buffer holds
    install(monkeypatch, cuda, fake_tensorrt(cuda, engine))
    runner = TensorRTRunner(write_engine(tmp_path))
    with pytest.raises(PipelineError, match=r"output 'features' is \[2, 7\], not \[2, 6\]"):
        runner.infer(_frames(2))
    assert not cuda.use_after_free
    runner.close()


def test_runtime_that_cannot_start_cuda_is_exit_4(monkeypatch, tmp_path):
    from iv2trt.errors import BackendUnavailable

    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_tensorrt(cuda, runtime_starts=False))
    with pytest.raises(BackendUnavailable, match="could not start CUDA .*factory function returned nullptr") as err:
        TensorRTRunner(write_engine(tmp_path))
    assert err.value.exit_code == 4 and cuda.stack() == []


def test_driver_older_than_the_wheels_cuda_is_refused_with_the_fix(monkeypatch, tmp_path):
    from iv2trt.engine import cuda_env
    from iv2trt.errors import BackendUnavailable

    cuda = FakeCuda()
    module = fake_tensorrt(cuda)
    install(monkeypatch, cuda, module)
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: (12, 8))
    monkeypatch.setattr(cuda_env, "wheel_cuda", lambda flavour: ("tensorrt-cu13", 13))
    with pytest.raises(BackendUnavailable, match=r"CUDA up to 12.8, but tensorrt-cu13 is built for CUDA 13 \(driver "
                                                 r"r580 or newer\).*pip install tensorrt-cu12"):
        TensorRTRunner(write_engine(tmp_path))
    assert module.calls == []  # refused before TensorRT was asked to start


def test_rtx_engine_on_a_gpu_rtx_does_not_support_asks_for_full_tensorrt(monkeypatch, tmp_path):
    """H100 (9.0) is not an RTX target: refused up front, with the --backend tensorrt rebuild command."""
    cuda = FakeCuda()
    module = fake_tensorrt(cuda, version="1.7.1.116", flavour_module="tensorrt_rtx",
                           compute_capabilities=["7.5", "8.0", "8.6", "8.9", "12.0", "12.1"])
    install(monkeypatch, cuda, module, flavour="tensorrt-rtx")
    engine = write_engine(tmp_path, flavour="tensorrt-rtx", version="1.7.1.116")
    with pytest.raises(EngineMismatch) as err:
        TensorRTRunner(engine)
    message = str(err.value)
    assert "TensorRT-RTX does not run on this GPU (NVIDIA H100 80GB HBM3, compute capability 9.0" in message
    assert "needs full TensorRT" in message and "--backend tensorrt" in message and "tensorrt-rtx" not in \
        message.split("rebuild the engine:")[1]
    assert module.calls == []  # nothing deserialised
    cuda.gpu = ("NVIDIA GeForce RTX 4090", (8, 9))  # a supported GPU gets past the check
    TensorRTRunner(engine).close()


def test_rtx_engine_check_is_pure_logic():
    from iv2trt.errors import BackendUnavailable

    rtx = {**META, "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7.1.116"}}
    with pytest.raises(EngineMismatch, match="needs full TensorRT.*--backend tensorrt$"):
        check_engine_metadata(rtx, "x.engine", "tensorrt-rtx", "1.7.1.116", "NVIDIA B200", "10.0", ["8.9", "12.0"])
    with pytest.raises(BackendUnavailable, match="built with tensorrt, which is not installed"):
        check_engine_metadata(META, "x.engine", "tensorrt-rtx", "1.7.1.116", "NVIDIA H100", "9.0", ["8.9"])


def test_auto_backend_falls_back_to_onnxruntime_when_tensorrt_cannot_start(monkeypatch, tmp_path, tiny_onnx):
    from types import SimpleNamespace

    from iv2trt.runners import choice

    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_tensorrt(cuda, runtime_starts=False))
    monkeypatch.setattr(choice, "tensorrt_missing", lambda engine: None)  # installed, a GPU, an engine file
    s = SimpleNamespace(backend="auto", engine=str(write_engine(tmp_path)), onnx=str(tiny_onnx["fp32"]))
    assert choice.create_runner(s).name == "onnxruntime"
    from iv2trt.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="could not start CUDA"):
        choice.create_runner(SimpleNamespace(**{**vars(s), "backend": "tensorrt"}))
