"""Stage 3's TensorRT runner: pure logic everywhere; a real engine run on a GPU with TensorRT + pycuda."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from iv2trt.errors import EngineMismatch, PipelineError
from iv2trt.trt_runtime import (Chunk, TensorRTRunner, check_engine_metadata, check_frames_shape,
                                load_engine_metadata, numpy_dtype, plan_batches, rebuild_command)


def _gpu_stack_available() -> bool:
    if importlib.util.find_spec("pycuda") is None or importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # noqa: BLE001 - no driver, no GPU
        return False


GPU_REASON = "needs an NVIDIA GPU with TensorRT (pip install tensorrt) and pycuda"
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
    import iv2trt.trt_runtime as rt
    from iv2trt import engine_build

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
    monkeypatch.setattr(engine_build, "import_tensorrt",
                        lambda backend="auto": engine_build.TensorRT(type("M", (), {"__version__": "10.13.0.35"}),
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
    from iv2trt.build_cmd import main
    from iv2trt.compare import compare
    from iv2trt.runners import OnnxRuntimeRunner

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
    import tensorrt
    import pycuda.driver as cuda

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
    from iv2trt.trt_runtime import load_engine_metadata

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
