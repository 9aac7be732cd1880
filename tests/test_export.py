"""Stage 1: the ONNX graph computes what PyTorch computes for every batch and frame count in range."""
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, TINY
from reference_impl import reference_encode_vision

from iv2trt.cli import export as export_cmd
from iv2trt.compare import compare
from iv2trt.errors import PipelineError
from iv2trt.export.onnx_export import parse_shape
from iv2trt.export.validate import ShapeCheck


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = np.float16 if "float16" in sess.get_inputs()[0].type else np.float32
    return sess.run(None, {"frames": x.astype(dtype)})[0].astype(np.float32)


@pytest.mark.parametrize("batch, frames", [(1, 1), (2, 1), (1, 2), (3, 3), (2, 4), (5, 4), (1, 7), (8, 16), (4, 9)])
def test_tiny_onnx_is_dynamic_in_batch_and_frames(tiny_model, tiny_onnx, batch, frames):
    x = np.random.default_rng(batch * 31 + frames).standard_normal((batch, frames, 3, 56, 56), dtype=np.float32)
    ref = reference_encode_vision(tiny_model.state_dict(), TINY, torch.from_numpy(x)).numpy()
    fp32 = compare(ref, run_onnx(tiny_onnx["fp32"], x))
    fp16 = compare(ref, run_onnx(tiny_onnx["fp16"], x))
    assert fp32.max_rel_error < 1e-5, fp32
    assert fp16.min_cosine > 0.999, fp16


def test_fp16_graph_is_half_with_fp32_islands(tiny_onnx):
    model = onnx.load(str(tiny_onnx["fp16"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[1] == "frames" and dims[2:] == [3, 56, 56]
    casts_to = [a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.FLOAT in casts_to and onnx.TensorProto.FLOAT16 in casts_to
    # every Softmax and ReduceMean consumes float32: check with shape inference
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for node in inferred.graph.node:
        if node.op_type in ("Softmax", "ReduceMean", "LayerNormalization"):
            assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name


def test_metadata_labels_weights_and_ranges(tiny_onnx):
    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx["fp16"]), load_external_data=False).metadata_props}
    assert meta["precision"] == "fp16" and meta["max_batch"] == "8" and meta["max_frames"] == "16"
    assert meta["trained_frames"] == "4" and meta["variant"] == "tiny_test"


def test_parse_shape():
    assert parse_shape("4x8") == (4, 8)
    for bad in ("4", "0x8", "ax2", "4x-1"):
        with pytest.raises(PipelineError):
            parse_shape(bad)


def test_s14_export_cli_validates_and_labels_random_weights(s14_onnx):
    for precision, path in s14_onnx.items():
        model = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["random_init"] == "true" and meta["precision"] == precision
        assert meta["variant"] == "internvideo2_clip_s14" and meta["trained_frames"] == "8"
        out = model.graph.output[0].type.tensor_type.shape.dim
        assert out[1].dim_value == 512


def test_failed_validation_exits_3_and_writes_nothing(tmp_path, monkeypatch, tiny_cfg):
    import dataclasses

    import yaml

    variant = tmp_path / "tiny.yaml"
    variant.write_text(yaml.safe_dump(dataclasses.asdict(tiny_cfg)))
    bad = ShapeCheck(1, 1, compare(np.ones((1, 4)), np.array([[1, 1, 1, -1.0]])), False)
    monkeypatch.setattr(export_cmd, "validate_onnx", lambda *a, **k: [bad])
    from iv2trt.cli import run_main

    out = tmp_path / "x.onnx"
    assert run_main(export_cmd.main, ["--random-init", "--variant", str(variant), "--output", str(out)]) == 3
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  random_init: true\nexport:\n  precision: fp32\n  max_frames: 12\n")
    s = export_cmd.ExportSettings
    from iv2trt.settings import read_config, settings_from

    merged = settings_from(s, read_config(cfg), ("model", "export"), {"max_frames": 9})
    assert merged.random_init and merged.precision == "fp32" and merged.max_frames == 9
    cfg.write_text("export:\n  precison: fp32\n")
    with pytest.raises(PipelineError, match=r"unknown key\(s\) \['precison'\]"):
        settings_from(s, read_config(cfg), ("model", "export"))
    with pytest.raises(PipelineError, match="must be one of"):
        settings_from(s, {}, ("export",), {"precision": "int8"})


def test_help_explains_every_setting():
    out = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--config", "--checkpoint", "--align-checkpoint", "--output", "--precision", "--opset",
                 "--max-batch", "--max-frames", "--random-init", "--validate", "--validation-shapes"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "1"], "at least 2"),
    (["--max-frames", "1"], "at least 2"),
    (["--max-frames", "4", "--validation-shapes", "1x8", "2x16"], "no --validation-shapes fit"),
])
def test_export_refuses_ranges_it_cannot_serve_or_validate(tmp_path, args, message, capfd):
    from iv2trt.cli import run_main

    out = tmp_path / "x.onnx"
    assert run_main(export_cmd.main, ["--random-init", "--output", str(out), *args]) == 2
    assert message in capfd.readouterr().err and not out.exists()


# ---------------------------------------------------------------- bad input is exit 2 with a message, never a traceback

@pytest.mark.parametrize("args, message", [
    (["--opset", "5"], "--opset 5: the exporter writes opsets 18.."),
    (["--opset", "17"], "--opset 17: the exporter writes opsets 18.."),
    (["--variant", "s15"], "unknown model variant 's15': pass --variant with one of ['internvideo2_clip_b14'"),
])
def test_values_the_exporter_would_ignore_or_crash_on_are_refused(tmp_path, args, message, capfd):
    from iv2trt.cli import run_main

    out = tmp_path / "x.onnx"
    assert run_main(export_cmd.main, ["--random-init", "--output", str(out), *args]) == 2
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("name, codec, what", [("clip.avi", "mpeg4", "an AVI/WAV file"),
                                               ("clip.mp4", "libx264", "an MP4/MOV video")])
def test_a_video_given_as_checkpoint_is_bad_input(tmp_path, name, codec, what, capfd):
    from iv2trt.cli import run_main
    from iv2trt.decode.samples import pattern_frames, write_video

    video = write_video(tmp_path / name, pattern_frames(3, 32, 32, seed=0), codec=codec)
    assert run_main(export_cmd.main, ["--checkpoint", str(video), "--output", str(tmp_path / "x.onnx")]) == 2
    err = capfd.readouterr().err
    assert f"{video} is not a checkpoint but {what}" in err and "Traceback" not in err


def test_random_init_with_a_checkpoint_is_refused_without_contradiction(tmp_path, capfd):
    from iv2trt.cli import run_main

    argv = ["--random-init", "--checkpoint", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x.onnx")]
    assert run_main(export_cmd.main, argv) == 2
    err = capfd.readouterr().err
    assert "--random-init and --checkpoint" in err and "exclude each other" in err
    assert "pass --random-init" not in err  # the old message told a user who had passed it to pass it


def test_missing_checkpoint_names_the_working_directory(tmp_path, capfd, monkeypatch):
    from iv2trt.cli import run_main

    monkeypatch.chdir(tmp_path)
    assert run_main(export_cmd.main, ["--checkpoint", "weights/s14.pth", "--output", "x.onnx"]) == 2
    assert f"weights/s14.pth (relative to the working directory {tmp_path})" in capfd.readouterr().err
