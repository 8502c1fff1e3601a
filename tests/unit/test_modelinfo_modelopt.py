"""`inspect` on Q/DQ models laid out the way NVIDIA ModelOpt writes them (modelopt/onnx/quantization: int8.py
through ONNX Runtime's QDQ quantizer with AddQDQPairToWeight and DedicatedQDQPair, qdq_utils.qdq_to_dq, FP16
scales with high_precision_dtype=fp16, TensorRT custom Q/DQ ops in the `trt` domain), built here with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.modelinfo import describe_precision

RNG = np.random.default_rng(5)


def _save(tmp: Path, name: str, nodes: list, inits: list, x_type: int, y_type: int, opsets: list) -> Path:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", x_type, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", y_type, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    path = tmp / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _qdq(src: str, scale: str, zp: str, out: str, axis: int | None = None, domain: str = "", prefix: str = "") -> list:
    kw = {} if axis is None else {"axis": axis}
    ins = [src, scale] + ([zp] if zp else [])
    return [helper.make_node(f"{prefix}QuantizeLinear", ins, [out + "_q"], name=out + "_Q", domain=domain, **kw),
            helper.make_node(f"{prefix}DequantizeLinear", [out + "_q", *ins[1:]], [out], name=out + "_DQ",
                             domain=domain, **kw)]


def modelopt_int8(tmp: Path) -> Path:
    """ModelOpt's default INT8: FP32 weights behind Q -> DQ per output channel, a dedicated Q/DQ pair per consumer
    of `relu` (read by two Convs), FP32 scales, int8 zero points, no output quantization."""
    f32 = np.float32
    inits = [numpy_helper.from_array(v, n) for n, v in {
        "w1": RNG.standard_normal((4, 3, 3, 3)).astype(f32), "w2": RNG.standard_normal((4, 4, 1, 1)).astype(f32),
        "w3": RNG.standard_normal((4, 4, 1, 1)).astype(f32),
        "x_scale": np.array(0.02, f32), "r_scale": np.array(0.05, f32), "zp": np.array(0, np.int8),
        "w1_scale": np.full(4, 0.01, f32), "w2_scale": np.full(4, 0.03, f32), "w3_scale": np.full(4, 0.04, f32),
        "wzp": np.zeros(4, np.int8)}.items()]
    nodes = [
        *_qdq("x", "x_scale", "zp", "x_dq"),
        *_qdq("w1", "w1_scale", "wzp", "w1_dq", axis=0),
        helper.make_node("Conv", ["x_dq", "w1_dq"], ["c1"], name="/conv1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["relu"], name="/relu/Relu"),
        *_qdq("relu", "r_scale", "zp", "relu_dq_a"), *_qdq("relu", "r_scale", "zp", "relu_dq_b"),
        *_qdq("w2", "w2_scale", "wzp", "w2_dq", axis=0), *_qdq("w3", "w3_scale", "wzp", "w3_dq", axis=0),
        helper.make_node("Conv", ["relu_dq_a", "w2_dq"], ["c2"], name="/branch_a/Conv"),
        helper.make_node("Conv", ["relu_dq_b", "w3_dq"], ["c3"], name="/branch_b/Conv"),
        helper.make_node("Add", ["c2", "c3"], ["y"], name="/add/Add"),
    ]
    return _save(tmp, "modelopt_int8", nodes, inits, TensorProto.FLOAT, TensorProto.FLOAT,
                 [helper.make_opsetid("", 17)])


def modelopt_fp16_dq_only(tmp: Path) -> Path:
    """high_precision_dtype=fp16 then qdq_to_dq: an FP16 model, FP16 scales, int8 weights behind a lone DQ."""
    f16 = np.float16
    inits = [numpy_helper.from_array(v, n) for n, v in {
        "w_int8": RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w_scale": np.full(4, 0.01, f16),
        "wzp": np.zeros(4, np.int8), "x_scale": np.array(0.02, f16), "zp": np.array(0, np.int8)}.items()]
    nodes = [
        *_qdq("x", "x_scale", "zp", "x_dq"),
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "wzp"], ["w_dq"], name="w_DQ", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["y"], name="/act/Sigmoid"),
    ]
    return _save(tmp, "modelopt_fp16", nodes, inits, TensorProto.FLOAT16, TensorProto.FLOAT16,
                 [helper.make_opsetid("", 19)])


def modelopt_trt_fp8(tmp: Path) -> Path:
    """FP8 through TensorRT's custom ops (`trt::TRT_FP8QuantizeLinear` / `TRT_FP8DequantizeLinear`, no zero point),
    plus an INT4 weight-only Conv (`trt::TRT_INT4DequantizeLinear` on an int8 container)."""
    f32 = np.float32
    inits = [numpy_helper.from_array(v, n) for n, v in {
        "w": RNG.standard_normal((4, 3, 3, 3)).astype(f32), "w_scale": np.full(4, 0.01, f32),
        "x_scale": np.array(0.02, f32), "w4": RNG.integers(-7, 8, (4, 4, 1, 1)).astype(np.int8),
        "w4_scale": np.full(4, 0.1, f32)}.items()]
    nodes = [
        *_qdq("x", "x_scale", "", "x_dq", domain="trt", prefix="TRT_FP8"),
        *_qdq("w", "w_scale", "", "w_dq", axis=0, domain="trt", prefix="TRT_FP8"),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("TRT_INT4DequantizeLinear", ["w4", "w4_scale"], ["w4_dq"], name="w4_DQ", domain="trt", axis=0),
        helper.make_node("Relu", ["c"], ["r"], name="/act/Relu"),
        helper.make_node("Conv", ["r", "w4_dq"], ["y"], name="/conv2/Conv"),
    ]
    return _save(tmp, "modelopt_fp8", nodes, inits, TensorProto.FLOAT, TensorProto.FLOAT,
                 [helper.make_opsetid("", 19), helper.make_opsetid("trt", 1)])


def _describe(path: Path):
    return describe_precision(onnx.shape_inference.infer_shapes(onnx.load(path)))


def test_modelopt_int8_float_weights_behind_qdq_pairs(tmp_path: Path) -> None:
    info = _describe(modelopt_int8(tmp_path))
    q = info.qdq
    assert info.kind == "int8 (Q/DQ)"
    assert (q.quantize, q.dequantize, q.weight_quantize, q.weight_dequantize) == (6, 6, 3, 0)
    assert (q.per_channel, q.per_tensor) == (6, 6)
    assert q.weight_scales == (pytest.approx(0.01), pytest.approx(0.04))
    assert q.activation_scales == (pytest.approx(0.02), pytest.approx(0.05))
    assert (q.scale_types, q.quantized_types, q.zero_point_types) == (("float32",), ("int8",), ("int8",))
    assert info.quantized_layers == ("/conv1/Conv", "/branch_a/Conv", "/branch_b/Conv")
    assert info.by_op["Conv"] == {"int8": 3}
    assert info.custom_ops == {}


def test_modelopt_fp16_scales_and_stored_int8_weights(tmp_path: Path) -> None:
    info = _describe(modelopt_fp16_dq_only(tmp_path))
    q = info.qdq
    assert info.kind == "int8 (Q/DQ)"
    assert (q.quantize, q.dequantize, q.weight_quantize, q.weight_dequantize) == (1, 2, 0, 1)
    assert q.scale_types == ("float16",)
    assert info.by_op == {"Conv": {"int8": 1}, "Sigmoid": {"fp16": 1}}


def test_trt_custom_qdq_ops_count_as_qdq(tmp_path: Path) -> None:
    info = _describe(modelopt_trt_fp8(tmp_path))
    q = info.qdq
    assert info.kind == "fp8 (Q/DQ)"
    assert info.by_op["Conv"] == {"fp8": 1, "fp32": 1}  # the INT4 weight-only Conv computes in float
    assert info.quantized_layers == ("/conv/Conv",)
    assert (q.quantize, q.dequantize, q.weight_quantize, q.weight_dequantize) == (2, 3, 1, 1)
    assert q.quantized_types == ("float8e4m3fn", "int4")
    assert info.custom_ops == {"trt::TRT_FP8QuantizeLinear": 2, "trt::TRT_FP8DequantizeLinear": 2,
                               "trt::TRT_INT4DequantizeLinear": 1}


@pytest.mark.parametrize("build", [modelopt_int8, modelopt_fp16_dq_only, modelopt_trt_fp8])
def test_inspect_cli_describes_modelopt_models(tmp_path: Path, build, capsys: pytest.CaptureFixture) -> None:
    path = build(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(Q/DQ)" in out and "quantized layers (" in out
    if build is modelopt_int8:
        assert "3 quantize float weights (Q -> DQ pairs)) to int8 with float32 scales" in out
    if build is modelopt_fp16_dq_only:
        assert "with float16 scales" in out
    if build is modelopt_trt_fp8:
        assert "custom-domain ops: trt::TRT_FP8QuantizeLinear 2" in out


def test_standard_fp8_qdq_with_float8_zero_points(tmp_path: Path) -> None:
    """ModelOpt's FP8 mode in standard ONNX (opset 19): Q/DQ whose zero points are FLOAT8E4M3FN."""
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
             numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             helper.make_tensor("wzp", TensorProto.FLOAT8E4M3FN, [4], [0.0] * 4)]
    nodes = [*_qdq("x", "s", "zp", "x_dq"), *_qdq("w", "ws", "wzp", "w_dq", axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1])]
    info = _describe(_save(tmp_path, "fp8", nodes, inits, TensorProto.FLOAT, TensorProto.FLOAT,
                           [helper.make_opsetid("", 19)]))
    assert info.kind == "fp8 (Q/DQ)" and info.by_op == {"Conv": {"fp8": 1}}
    assert info.qdq.quantized_types == ("float8e4m3fn",) and info.qdq.weight_quantize == 1
    assert info.qdq.activation_scales == (pytest.approx(0.02), pytest.approx(0.02))
