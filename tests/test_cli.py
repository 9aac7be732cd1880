"""What the three stage scripts share: exit codes, and leaving cleanly when interrupted."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# a stage whose worker thread is inside ONNX Runtime (a C++ call) when Ctrl-C reaches the main thread
INTERRUPTED_DURING_NATIVE_CALL = textwrap.dedent(f"""
    import sys, threading, time
    sys.path.insert(0, {str(ROOT)!r})
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from iv2trt.cli import exit_with

    def main(argv):
        n = 1024
        weight = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.ones((n, n), np.float32)

        def infer():
            while True:
                session.run(None, {{"x": x}})

        threading.Thread(target=infer, daemon=True).start()
        time.sleep(0.4)
        raise KeyboardInterrupt

    exit_with(main)
""")


def test_interrupt_while_a_thread_is_in_native_code_exits_130():
    """Before: interpreter shutdown under the running ONNX Runtime call aborted the process (exit 134,
    'terminate called without an active exception')."""
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", INTERRUPTED_DURING_NATIVE_CALL], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 130, result.stderr[-2000:]
        assert "interrupted" in result.stderr and "terminate called" not in result.stderr


def test_a_misspelt_or_stray_config_section_is_named(tmp_path, capfd):
    """Before: `inference:` (for `infer:`) was ignored, the run going on with defaults; a stray top-level key got a
    message that did not name it."""
    from iv2trt.cli import run_main
    from iv2trt.cli.infer import main

    cfg = tmp_path / "c.yaml"
    for text, named in (("inference:\n  batch_size: 4\n", "'inference'"),
                        ("variant: internvideo2_clip_b14\ninfer:\n  batch_size: 4\n", "'variant'")):
        cfg.write_text(text)
        assert run_main(main, ["--config", str(cfg), "--inputs", str(tmp_path)]) == 2
        err = capfd.readouterr().err
        assert named in err and str(cfg) in err and "model, export, build, infer" in err, err


def test_the_shipped_config_names_every_job_setting():
    """configs/internvideo2_clip_s14.yaml documents each key of trt_inference.py (commented out where it has no
    fixed default), so a new setting cannot ship without its line."""
    import dataclasses
    import re

    from iv2trt.job.settings import InferSettings

    text = (Path(__file__).resolve().parent.parent / "configs" / "internvideo2_clip_s14.yaml").read_text()
    not_settings = {"given", "make_samples"}  # what the flags gave (internal); a one-off action, not a setting
    missing = [f.name for f in dataclasses.fields(InferSettings)
               if f.name not in not_settings and not re.search(rf"^ +#? ?{f.name}:", text, re.M)]
    assert not missing
