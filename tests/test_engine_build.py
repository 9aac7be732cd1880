"""Stage 2 with NVIDIA's real ONNX parser and builder (TensorRT-RTX runs on CPU): S/14 engines, profile
checks before building, broken inputs that must fail with a clear message and leave no engine file."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from iv2trt.cli import run_main
from iv2trt.cli.build import main
from iv2trt.engine.build import OnnxInfo, Profile, check_profile, read_onnx_info
from iv2trt.engine.tensorrt import TensorRT, import_tensorrt, network_flags
from iv2trt.errors import BackendUnavailable, PipelineError

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (pip install -r requirements.txt)")


def build(onnx_path, output, *extra, precision="fp16"):
    return run_main(main, ["--onnx", str(onnx_path), "--output", str(output), "--precision", precision,
                           "--timing-cache", "", *extra])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- real S/14 builds

@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_s14_engine_builds_with_metadata(s14_onnx, tmp_path, precision, capsys):
    engine = tmp_path / f"s14_{precision}.engine"
    cache = tmp_path / "timing.cache"
    assert run_main(main, ["--onnx", str(s14_onnx[precision]), "--output", str(engine), "--precision", precision,
                           "--min", "1x1", "--opt", "4x8", "--max", "16x16", "--timing-cache", str(cache),
                           "--backend", "tensorrt-rtx"]) == 0
    assert engine.stat().st_size > 20e6
    meta = json.loads(Path(str(engine) + ".json").read_text())
    import tensorrt_rtx

    assert meta["tensorrt"] == {"flavour": "tensorrt-rtx", "module": "tensorrt_rtx", "version": tensorrt_rtx.__version__}
    assert meta["gpu"] == {"name": "none", "compute_capability": "none"}  # CPU-only build machine
    assert meta["rtx_compute_capabilities"]
    assert meta["precision"] == precision
    assert meta["profile"] == {"input": "frames", "min": "1x1", "opt": "4x8", "max": "16x16"}
    dtype = "half" if precision == "fp16" else "float"
    assert meta["io"] == [{"name": "frames", "mode": "input", "dtype": dtype, "shape": [-1, -1, 3, 224, 224]},
                          {"name": "features", "mode": "output", "dtype": dtype, "shape": [-1, 512]}]
    from iv2trt.fileio import sha256_file

    assert meta["onnx"]["sha256"] == sha256_file(s14_onnx[precision])
    assert meta["onnx"]["variant"] == "internvideo2_clip_s14" and meta["onnx"]["random_init"] == "true"
    assert not meta["onnx"]["converted_to_fp16"]
    assert meta["build"]["seconds"] > 0 and meta["engine_bytes"] == engine.stat().st_size
    assert not cache.exists()  # timing caches are no-ops in TensorRT-RTX: skipped, not written
    assert meta["build"]["timing_cache"] is None  # and the .json says so
    assert leftovers(tmp_path) == sorted([engine.name, engine.name + ".json"])
    print(f"S/14 {precision} build: {meta['build']['seconds']:.1f}s, {meta['engine_bytes'] / 1e6:.1f} MB")


def test_s14_fp32_onnx_built_as_fp16_is_converted(s14_onnx, tmp_path):
    engine = tmp_path / "s14_converted.engine"
    assert build(s14_onnx["fp32"], engine, "--max", "8x8", "--opt", "2x8") == 0
    meta = json.loads(Path(str(engine) + ".json").read_text())
    assert meta["onnx"]["converted_to_fp16"] and meta["onnx"]["precision"] == "fp32"
    assert meta["io"][0]["dtype"] == "half" and meta["io"][1]["dtype"] == "half"


# ---------------------------------------------------------------- profile checks (before any build)

def info(dims=("batch", "frames", 3, 56, 56), max_batch="8", max_frames="16") -> OnnxInfo:
    return OnnxInfo(Path("x.onnx"), "fp16", "frames", dims, {"max_batch": max_batch, "max_frames": max_frames})


@pytest.mark.parametrize("shapes, message", [
    (("1x1", "4x8", "2x16"), "min <= opt <= max"),
    (("1x8", "2x4", "4x16"), "frames must satisfy min <= opt <= max"),
    (("0x1", "2x4", "4x8"), "must be positive"),
    (("1x1", "4x8", "16x16"), "exceeds the 8 the ONNX was exported for"),
    (("1x1", "4x8", "8x32"), "max_frames"),
])
def test_bad_profiles_are_refused(shapes, message):
    with pytest.raises(PipelineError, match=message):
        check_profile(Profile.parse(*shapes), info())


def test_fixed_axis_must_not_vary():
    with pytest.raises(PipelineError, match="FIXED frames axis of 8"):
        check_profile(Profile.parse("1x1", "2x8", "4x8"), info(("batch", 8, 3, 56, 56)))
    check_profile(Profile.parse("1x8", "2x8", "4x8"), info(("batch", 8, 3, 56, 56)))  # fine when pinned


@pytest.fixture(scope="module")
def fixed_frames_onnx(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny fp16 ONNX with its frames axis fixed to 4 in the proto."""
    model = onnx.load(str(tiny_onnx["fp16"]))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_param")
    dim.dim_value = 4
    path = tmp_path_factory.mktemp("fixed") / "tiny_fixed_frames.onnx"
    onnx.save(model, str(path))
    return path


def test_fixed_axis_refused_by_the_command(fixed_frames_onnx, tmp_path, capsys):
    rc = build(fixed_frames_onnx, tmp_path / "x.engine", "--min", "1x1", "--opt", "2x4", "--max", "4x8")
    assert rc == 2
    assert "FIXED frames axis of 4" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
    assert build(fixed_frames_onnx, tmp_path / "ok.engine", "--min", "1x4", "--opt", "2x4", "--max", "4x4") == 0


def test_profile_beyond_onnx_max_exits_2(tiny_onnx, tmp_path, capsys):
    assert build(tiny_onnx["fp16"], tmp_path / "x.engine", "--max", "64x16", "--opt", "4x8") == 2
    assert "exceeds the 8 the ONNX was exported for" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- broken inputs

def unsupported_op_onnx(path: Path) -> Path:
    """frames -> an op no TensorRT knows -> features."""
    frames = helper.make_tensor_value_info("frames", TensorProto.FLOAT16, ["batch", "frames", 3, 56, 56])
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT16, ["batch", 32])
    node = helper.make_node("Frobnicate", ["frames"], ["features"], name="frobnicate_0", domain="com.example")
    graph = helper.make_graph([node], "broken", [frames], [features])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    model.metadata_props.add(key="max_batch", value="8")
    model.metadata_props.add(key="max_frames", value="16")
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage", "unsupported_op", "missing"])
def test_broken_onnx_fails_cleanly(kind, tiny_onnx, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    bad = src / f"{kind}.onnx"
    if kind == "truncated":
        data = Path(tiny_onnx["fp16"]).read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        bad.write_bytes(b"\x00\xffnot an onnx model at all" * 100)
    elif kind == "unsupported_op":
        unsupported_op_onnx(bad)
    out = tmp_path / "out"
    out.mkdir()
    rc = build(bad, out / "x.engine", "--min", "1x1", "--opt", "2x4", "--max", "4x8")
    err = capsys.readouterr().err
    assert rc == 2, err
    expected = {"truncated": "not a readable ONNX file", "garbage": "not a readable ONNX file",
                "unsupported_op": "node 0 'frobnicate_0' (op Frobnicate)", "missing": "not found"}[kind]
    assert expected in err
    assert leftovers(out) == []


def test_cli_exit_codes_and_help(tmp_path):
    help_run = subprocess.run([sys.executable, "build_engine.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_run.returncode == 0 and "--opt" in help_run.stdout and "Exit codes" in help_run.stdout
    bad = subprocess.run([sys.executable, "build_engine.py", "--onnx", str(tmp_path / "none.onnx"), "--output",
                          str(tmp_path / "x.engine")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr
    assert not (tmp_path / "x.engine").exists()


# ---------------------------------------------------------------- flavours

def test_missing_backend_names_the_pip_package(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(BackendUnavailable, match="pip install tensorrt-cu12 or pip install tensorrt-rtx-cu13"):
        import_tensorrt("auto")
    with pytest.raises(BackendUnavailable, match="pip install tensorrt-cu12$"):
        import_tensorrt("tensorrt")


def fake_trt(version: str, flags: dict[str, int]) -> TensorRT:
    module = types.SimpleNamespace(__version__=version,
                                   NetworkDefinitionCreationFlag=types.SimpleNamespace(**flags))
    return TensorRT(module, "tensorrt")


def test_network_flags_for_each_flavour():
    assert network_flags(fake_trt("10.13.0", {"STRONGLY_TYPED": 1, "EXPLICIT_BATCH": 0})) == 1 << 1
    assert network_flags(fake_trt("11.0.0", {})) == 0  # 11.x: strongly typed always, no flags
    with pytest.raises(BackendUnavailable, match="strongly typed"):
        network_flags(fake_trt("8.6.1", {"EXPLICIT_BATCH": 0}))
    rtx = import_tensorrt("tensorrt-rtx")
    assert network_flags(rtx) == 1 << int(rtx.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def test_read_onnx_info(tiny_onnx):
    got = read_onnx_info(tiny_onnx["fp32"])
    assert got.input_dims == ("batch", "frames", 3, 56, 56) and got.precision == "fp32"
    assert (got.max_batch, got.max_frames) == (8, 16)


# ---------------------------------------------------------------- a GPU host's first build (fakes on CPU)

def _unstartable_tensorrt() -> TensorRT:
    """Full TensorRT whose Builder cannot start CUDA, as pybind11 reports it."""
    def builder(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    module = types.SimpleNamespace(__version__="10.13.0.35", Builder=builder,
                                   Logger=type("Logger", (), {"WARNING": 2, "INFO": 3, "__init__": lambda s, v: None}))
    return TensorRT(module, "tensorrt")


@pytest.fixture
def tensorrt_cannot_start(monkeypatch):
    from iv2trt.engine import cuda_env, tensorrt

    real = tensorrt.import_tensorrt
    monkeypatch.setattr(tensorrt, "import_tensorrt",
                        lambda backend="auto": _unstartable_tensorrt() if backend == "tensorrt" else real(backend))
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: None)


def test_tensorrt_that_cannot_start_is_exit_4(tensorrt_cannot_start, tiny_onnx, tmp_path, capsys):
    assert build(tiny_onnx["fp16"], tmp_path / "x.engine", "--backend", "tensorrt", "--max", "4x8", "--opt",
                 "2x4") == 4
    err = capsys.readouterr().err
    assert "tensorrt 10.13.0.35 could not start CUDA" in err and "Traceback" not in err
    assert leftovers(tmp_path) == []


def test_auto_build_falls_back_to_rtx_when_tensorrt_cannot_start(tensorrt_cannot_start, caplog):
    from iv2trt.engine.tensorrt import start_builder

    trt, _logger, builder = start_builder("auto")
    assert trt.flavour == "tensorrt-rtx" and builder is not None
    assert "could not start CUDA" in caplog.text and "building with tensorrt-rtx" in caplog.text


@pytest.fixture
def cpu_only_without(monkeypatch):
    """A machine without a GPU where the named TensorRT modules are missing."""
    import importlib

    from iv2trt.engine import tensorrt

    monkeypatch.setattr(tensorrt, "gpu_info", lambda device=0: None)
    real, missing = importlib.import_module, set()

    def fake(name, *args):
        if name in missing:
            raise ImportError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    return missing


def test_cpu_only_machine_is_pointed_at_tensorrt_rtx_not_tensorrt_cu12(cpu_only_without, tiny_onnx, tmp_path,
                                                                        caplog, capsys):
    """Before: without full TensorRT, the build said `pip install tensorrt-cu12`, which cannot build without a GPU."""
    from iv2trt.engine.tensorrt import start_builder

    cpu_only_without.add("tensorrt")
    with caplog.at_level("INFO"):
        assert start_builder("auto")[0].flavour == "tensorrt-rtx"
    assert "tensorrt-cu12" not in caplog.text and "builds engines without a GPU" in caplog.text
    assert "full TensorRT" in caplog.text and "GPU host" in caplog.text
    with pytest.raises(BackendUnavailable, match="GPU host.*--backend tensorrt-rtx") as asked:
        start_builder("tensorrt")
    assert "tensorrt-cu12" not in str(asked.value)
    cpu_only_without.add("tensorrt_rtx")
    assert build(tiny_onnx["fp16"], tmp_path / "x.engine", "--max", "4x8", "--opt", "2x4") == 4
    err = capsys.readouterr().err
    assert "pip install tensorrt-rtx-cu13" in err and "GPU host" in err and "tensorrt-cu12" not in err, err


def test_builder_is_not_started_on_a_driver_too_old_for_the_wheel(monkeypatch):
    from iv2trt.engine import cuda_env
    from iv2trt.engine.tensorrt import create_builder

    started = []
    module = types.SimpleNamespace(__version__="11.4.0.106", Builder=lambda logger: started.append(1))
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(cuda_env, "wheel_cuda", lambda flavour: ("tensorrt-cu13", 13))
    with pytest.raises(BackendUnavailable, match=r"driver supports CUDA up to 12.4, but tensorrt-cu13 .*r580 or "
                                                 r"newer.*pip install tensorrt-cu12"):
        create_builder(TensorRT(module, "tensorrt"), None)
    assert started == []
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: (13, 0))
    create_builder(TensorRT(module, "tensorrt"), None)
    assert started == [1]


def test_wheel_cuda_reads_the_installed_distributions(monkeypatch):
    import importlib.metadata

    from iv2trt.engine.cuda_env import wheel_cuda

    dists = [types.SimpleNamespace(metadata={"Name": n}) for n in
             ("numpy", "tensorrt", "tensorrt_cu13", "tensorrt_cu13_libs", "tensorrt-rtx-cu12")]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists)
    assert wheel_cuda("tensorrt") == ("tensorrt-cu13", 13)
    assert wheel_cuda("tensorrt-rtx") == ("tensorrt-rtx-cu12", 12)


def test_requirements_pick_the_tensorrt_wheel_for_current_drivers():
    """The bare `tensorrt` package is the CUDA 13 build (driver r580+); the file must name its CUDA."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-gpu.txt").read_text().splitlines()]
    tensorrt = [line for line in lines if line.startswith("tensorrt")]
    assert tensorrt and all(line.startswith("tensorrt-cu12") for line in tensorrt), tensorrt
    assert "r580" in (ROOT / "requirements-gpu.txt").read_text()


def test_build_gpu_is_named_through_pycuda_when_torch_knows_none(monkeypatch):
    """A CPU-only torch knows no GPU; pycuda (or libcuda) does. Full TensorRT never records "none"."""
    import sys

    from fake_tensorrt import FakeCuda

    from iv2trt.engine import cuda_env
    from iv2trt.engine.build import build_gpu

    monkeypatch.setattr(cuda_env, "_libcuda", lambda: None)  # no driver library reachable here
    monkeypatch.setitem(sys.modules, "pycuda", None)  # nor pycuda (even on a GPU machine)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    full, rtx = TensorRT(types.SimpleNamespace(), "tensorrt"), TensorRT(types.SimpleNamespace(), "tensorrt-rtx")
    with pytest.raises(BackendUnavailable, match="could name the GPU"):
        build_gpu(full)
    assert build_gpu(rtx) == {"name": "none", "compute_capability": "none"}  # RTX builds on CPUs
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = FakeCuda()
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda.driver)
    assert build_gpu(full) == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


class FakeTimingConfig:
    """IBuilderConfig's timing cache calls; caches made on "another GPU" are refused by set_timing_cache."""

    def __init__(self):
        self.attached = None

    def create_timing_cache(self, data):
        return types.SimpleNamespace(data=bytes(data), serialize=lambda: bytes(data) + b"+timings of this build")

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data.startswith(b"other gpu") and not ignore_mismatch:
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        return self.attached


def test_foreign_timing_cache_is_replaced_not_kept_forever(tmp_path, caplog):
    from iv2trt.engine.build import load_timing_cache, save_timing_cache

    trt = TensorRT(types.SimpleNamespace(__version__="10.13.0.35"), "tensorrt")
    path = tmp_path / "timing.cache"
    path.write_bytes(b"other gpu's timings")
    config = FakeTimingConfig()
    assert load_timing_cache(trt, config, path) == path
    assert config.attached.data == b"" and "starting a fresh one" in caplog.text
    save_timing_cache(config, path)
    assert path.read_bytes() == b"+timings of this build"
    config = FakeTimingConfig()  # the next build reads it back
    assert load_timing_cache(trt, config, path) == path and config.attached.data == b"+timings of this build"


def test_negative_workspace_is_refused(tiny_onnx, tmp_path, capsys):
    assert build(tiny_onnx["fp16"], tmp_path / "x.engine", "--workspace-gb", "-1") == 2
    assert "--workspace-gb must be 0 (no limit) or a positive size in GiB, got -1" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
