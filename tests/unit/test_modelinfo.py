"""modelinfo: precision per op, Q/DQ counts and scales, casts and quantpipe metadata, on tiny graphs built here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.modelinfo import describe_precision


def _qdq_model() -> onnx.ModelProto:
    """x -Q/DQ (per tensor, zero point 3)-> MatMul (weight DQ per channel) -> residual Add of a DQ input; float Relu."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(3, np.int8), "x_zp"),
        numpy_helper.from_array(np.ones((4, 2), np.int8), "w_q"),
        numpy_helper.from_array(np.array([0.001, 0.02], np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["mm"]),           # int8: both inputs Q/DQ
        helper.make_node("Relu", ["mm"], ["r"]),                     # fp32: reads no DQ output
        helper.make_node("Add", ["mm", "xd2_full"], ["y"]),          # int8: one DQ input, one from an int8 node
        helper.make_node("Slice", ["x", "starts", "ends"], ["xs"]),  # fp32
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd2_full"]),
        helper.make_node("Slice", ["xd2_full", "s2", "e2"], ["xd2"]),  # int8 (data movement on a DQ output)
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("starts", "s2")]
    inits += [numpy_helper.from_array(np.array([2], np.int64), n) for n in ("ends", "e2")]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "r", "xs", "xd2")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="quantpipe.shifted_tensors", value=json.dumps({"mm": 1.5, "r": 0.5}))
    model.metadata_props.add(key="other.key", value="ignored")
    return onnx.shape_inference.infer_shapes(model)


def test_qdq_precision_counts() -> None:
    info = describe_precision(_qdq_model())
    assert info.kind == "int8 (Q/DQ)"
    assert info.by_op == {"Slice": {"fp32": 1, "int8": 1}, "Add": {"int8": 1}, "MatMul": {"int8": 1}, "Relu": {"fp32": 1}}
    assert info.totals == {"fp32": 2, "int8": 3}


def test_qdq_counts_scales_and_zero_points() -> None:
    q = describe_precision(_qdq_model()).qdq
    assert (q.quantize, q.dequantize, q.per_channel, q.per_tensor, q.weight_dequantize) == (1, 3, 1, 3, 1)
    assert q.weight_scales == (np.float32(0.001), np.float32(0.02))
    assert q.activation_scales == (np.float32(0.05), np.float32(0.05))
    assert q.zero_point_types == ("int8",)
    assert (q.nonzero_zero_points, q.zero_point_min, q.zero_point_max) == (3, 3, 3)


def test_quantpipe_metadata_only() -> None:
    assert describe_precision(_qdq_model()).quantpipe_metadata == {"quantpipe.shifted_tensors": "2 tensors"}


def test_fp16_model_with_casts() -> None:
    w = numpy_helper.from_array(np.ones((4, 4), np.float16), "w")
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["h2"]),
             helper.make_node("Cast", ["h2"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    info = describe_precision(model)
    assert info.kind == "fp16"
    assert info.totals == {"fp16": 2}
    assert (info.casts_to_fp16, info.casts_to_fp32, info.casts_other) == (1, 1, 0)
    assert info.qdq.quantize == info.qdq.dequantize == 0 and info.qdq.weight_scales is None
    assert info.quantpipe_metadata == {}


def test_mixed_model_and_integer_ops() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["x16"], ["a"]),
             helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Shape", ["x"], ["s"])]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in "abs"])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    info = describe_precision(model)
    assert info.by_op == {"Relu": {"fp32": 1, "fp16": 1}, "Shape": {"other": 1}}
    assert info.kind == "mixed fp16/fp32"


def test_an_onnxruntime_dynamic_quantization_is_not_called_q_dq(tmp_path) -> None:  # noqa: ANN001
    # quantize_dynamic writes DynamicQuantizeLinear + MatMulInteger: integer operators for onnxruntime, not Q/DQ, and
    # not a model for TensorRT's explicit quantization.
    from onnxruntime.quantization import quantize_dynamic

    from quantpipe.modelinfo import precision_lines

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w])
    src, dst = tmp_path / "m.onnx", tmp_path / "m.dyn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    quantize_dynamic(str(src), str(dst))
    info = describe_precision(onnx.load(dst))
    assert info.kind == "int8 (onnxruntime integer operators, not Q/DQ)"
    assert info.integer_ops == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1}
    lines = precision_lines(info)
    assert info.qdq.quantize == 0 and any("quantize_dynamic" in line for line in lines)
    assert not any("Made for TensorRT" in line for line in lines)


def test_weight_share_counts_stored_weights_by_how_they_are_read() -> None:
    # An int8 MatMul weight behind a DQ (8 values), a float one behind a Q -> DQ pair (ModelOpt's layout, 6), an LSTM's
    # float W and R (4 * 3 * 2 + 4 * 3 * 3 = 60), an embedding only Gather reads (left out), a 1-D bias (left out).
    from quantpipe.modelinfo import mostly_float_warning, weight_share, weight_share_line

    inits = [numpy_helper.from_array(np.ones((4, 2), np.int8), "w_q"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.ones((2, 3), np.float32), "w_f"),
             numpy_helper.from_array(np.ones((1, 12, 2), np.float32), "W"),
             numpy_helper.from_array(np.ones((1, 12, 3), np.float32), "R"),
             numpy_helper.from_array(np.ones((100, 4), np.float32), "emb"),
             numpy_helper.from_array(np.ones(3, np.float32), "b")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("DequantizeLinear", ["w_q", "s"], ["wd"]),
             helper.make_node("MatMul", ["e", "wd"], ["h"]),
             helper.make_node("QuantizeLinear", ["w_f", "s"], ["wfq"]),
             helper.make_node("DequantizeLinear", ["wfq", "s"], ["wfd"]),
             helper.make_node("MatMul", ["h", "wfd"], ["h2"]),
             helper.make_node("Add", ["h2", "b"], ["h3"]),
             helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h3", "y")], inits)
    share = weight_share(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert (share.quantized, share.in_float, dict(share.float_by_op)) == (14, 60, {"LSTM": 60})
    assert share.fraction == 14 / 74
    assert weight_share_line(share) == "weights stored quantized: 19 % of 74 values; in float: LSTM 60"
    said = mostly_float_warning(share, "m.int8.onnx")
    assert said is not None and "only 19 % of its 74 weight values" in said and "not recurrent layers" in said
    assert mostly_float_warning(dataclasses.replace(share, in_float=10, float_by_op={"LSTM": 10}), "m") is None
    assert "; the accuracy fallback kept 3 layer(s) in float." in str(mostly_float_warning(share, "m", kept=3))
