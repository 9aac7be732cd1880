"""ONNX precision conversions: FP32 -> FP16 for TensorRT strongly typed networks (norms, softmax,
reductions stay fp32), and FP16 -> FP32 for CPU runtimes.

FP32 -> FP16 is used by build_engine.py when it is given an FP32 ONNX file and asked for --precision
fp16. The FP16 export of export_onnx.py is usually better (the model itself chooses where to cast);
this is the fallback for FP32 files from elsewhere. FP16 -> FP32 is used by stage 3 when ONNX Runtime
runs on the CPU, where fp16 arithmetic is mostly emulated (the fp16 graph was measured at half the
fp32 speed): the fp16 weights are widened exactly and every op computes in fp32.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import BackendUnavailable, PipelineError

log = logging.getLogger(__name__)

# ops whose range or accumulation needs fp32: mean/variance, RMS, softmax, GELU's erf
FP32_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax",
            "LayerNormalization", "Erf", "Exp", "Log")


def onnx_precision(model) -> str:
    """'fp16' or 'fp32': the element type of the graph's first input."""
    import onnx

    elem_type = model.graph.input[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}.get(elem_type, "other")


def convert_to_fp16(model):
    """An FP16 copy of an FP32 ONNX ModelProto: fp16 inputs/outputs and weights, FP32_OPS computed in fp32."""
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - onnxruntime is in requirements.txt
        raise BackendUnavailable("onnxruntime (its transformers.float16 module) is needed to convert an FP32 "
                                 "ONNX to FP16: pip install -r requirements.txt, or export with "
                                 "export_onnx.py --precision fp16") from exc
    if onnx_precision(model) != "fp32":
        raise PipelineError(f"can only convert an FP32 graph to FP16, this one is {onnx_precision(model)}")
    block_list = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    index_nodes = index_math_nodes(model.graph)
    converter_log = logging.getLogger("onnxruntime.transformers.float16")
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)  # it logs whole NodeProtos at INFO
    try:
        converted = convert_float_to_float16(model, keep_io_types=False, op_block_list=block_list,
                                             node_block_list=index_nodes, disable_shape_infer=False)
    finally:
        converter_log.setLevel(level)
    _sort_topologically(converted.graph)
    _skip_fp16_round_trips(converted.graph)
    for prop in converted.metadata_props:
        if prop.key == "precision":
            prop.value = "fp16"
    return converted


def index_math_nodes(graph) -> list[str]:
    """Names of nodes that do not depend on the input's values: shape/frame-index arithmetic and the
    position-embedding interpolation built on it. They stay fp32 (exact indices; TensorRT rejects the
    half/float mixes the converter would make of Shape -> Cast -> Mul chains)."""
    data = {i.name for i in graph.input}
    keep = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type != "Shape" and any(name in data for name in node.input):
            data.update(node.output)
        elif node.name:
            keep.append(node.name)
    return keep


def _skip_fp16_round_trips(graph) -> None:
    """Cast(fp32 -> fp16) then Cast(-> fp32) between two fp32 nodes: read the fp32 value directly.

    The converter puts such pairs between neighbouring blocked nodes; they lose precision in index
    arithmetic and make TensorRT's shape inference mix half and float.
    """
    import onnx

    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    for node in graph.node:
        src = producer.get(node.input[0]) if cast_to(node) == FLOAT else None
        if src is not None and cast_to(src) == FLOAT16:
            origin = src.input[0]
            origin_node = producer.get(origin)
            if types.get(origin) == FLOAT or (origin_node is not None and cast_to(origin_node) == FLOAT):
                node.input[0] = origin


def _sort_topologically(graph) -> None:
    """Reorder graph.node so every node follows the producers of its inputs (the converter appends Casts)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise PipelineError("the FP16 conversion produced a graph with a cycle or a dangling input "
                                f"(node {pending[0].name!r}); export with export_onnx.py --precision fp16 instead")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def convert_file(src: str | Path, dst: str | Path) -> Path:
    """Read an FP32 ONNX file, write its FP16 conversion to `dst` (checked with onnx.checker)."""
    import onnx

    converted = convert_to_fp16(onnx.load(str(src)))
    onnx.save(converted, str(dst))
    onnx.checker.check_model(str(dst))
    log.info("converted %s to FP16 (%s kept in fp32) -> %s", src, ", ".join(FP32_OPS), dst)
    return Path(dst)


def convert_to_fp32(model):
    """An FP16 ONNX ModelProto made FP32, in place (and returned): weights widened exactly, casts to fp16 become
    casts to fp32, inputs/outputs fp32 (subgraphs included); metadata precision "fp32", converted_from "fp16"."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if onnx_precision(model) != "fp16":
        raise PipelineError(f"can only convert an FP16 graph to FP32, this one is {onnx_precision(model)}")
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    def widen(tensor) -> None:
        if tensor.data_type == FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    def convert(graph) -> None:
        for tensor in graph.initializer:
            widen(tensor)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.tensor_type.elem_type == FLOAT16:
                value.type.tensor_type.elem_type = FLOAT
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == FLOAT16:
                    attr.i = FLOAT
                elif attr.type == onnx.AttributeProto.TENSOR:
                    widen(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    convert(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        convert(sub)

    convert(model.graph)
    props = {p.key: p.value for p in model.metadata_props}
    props.update(precision="fp32", converted_from="fp16")
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model
