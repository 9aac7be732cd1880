"""FP32 -> FP16 ONNX conversion for builds from FP32 graphs (iv2trt/onnx_fp16.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from iv2trt.compare import compare
from iv2trt.errors import PipelineError
from iv2trt.export.fp16 import FP32_OPS, convert_file, convert_to_fp16, index_math_nodes, onnx_precision
from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def converted(tiny_onnx, tmp_path_factory):
    return convert_file(tiny_onnx["fp32"], tmp_path_factory.mktemp("fp16") / "tiny_converted.onnx")


def test_converted_graph_agrees_with_fp32_in_onnxruntime(tiny_onnx, converted):
    x = np.random.default_rng(3).standard_normal((3, 5, 3, 56, 56), dtype=np.float32)
    reference = OnnxRuntimeRunner(tiny_onnx["fp32"], providers=["CPUExecutionProvider"]).infer(x)
    runner = OnnxRuntimeRunner(converted, providers=["CPUExecutionProvider"])
    assert runner.input_dtype == np.float16
    result = compare(reference, runner.infer(x))
    assert result.min_cosine >= 0.999, result


def test_converted_graph_io_and_fp32_islands(converted):
    model = onnx.load(str(converted))
    assert onnx_precision(model) == "fp16"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "fp16"
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type in ("ReduceMean", "Softmax", "Pow", "Sqrt") and node.output[0] in types:
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    assert {"ReduceMean", "Softmax", "LayerNormalization", "Erf", "Reciprocal"} <= set(FP32_OPS)


def test_index_math_is_kept_out_of_fp16(tiny_onnx):
    graph = onnx.load(str(tiny_onnx["fp32"])).graph
    kept = set(index_math_nodes(graph))
    by_name = {n.name: n for n in graph.node}
    assert any(by_name[k].op_type == "Range" for k in kept)  # the frame index
    assert not any(by_name[k].op_type in ("Conv", "MatMul") for k in kept)  # the data path is converted


def test_fp16_input_is_refused(tiny_onnx):
    with pytest.raises(PipelineError, match="FP32 graph"):
        convert_to_fp16(onnx.load(str(tiny_onnx["fp16"])))
