"""The FP16 model writer: runs in onnxruntime, stays close to FP32, reports what FP16 cannot hold."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.config import DEFAULT_FP16_BLOCKLIST, Fp16Config
from tests.conftest import float_model

RNG = np.random.default_rng(1)


def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model() -> onnx.ModelProto:
    """Conv -> Clip -> Resize -> Flatten -> LayerNorm -> MatMul -> masked Add -> Softmax, + a decomposed LayerNorm."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("Resize", ["r", "", "scales"], ["up"], name="resize", mode="linear"),
        helper.make_node("Flatten", ["up"], ["flat"], name="flatten"),
        helper.make_node("LayerNormalization", ["flat", "g", "beta"], ["ln"], name="ln"),
        helper.make_node("MatMul", ["ln", "wm"], ["s"], name="mm"),
        helper.make_node("Constant", [], ["neg"], name="neg_const", value_float=float(np.finfo(np.float32).min)),
        helper.make_node("Where", ["keep", "zero", "neg"], ["maskadd"], name="where"),
        helper.make_node("Add", ["s", "maskadd"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax"),
        # decomposed LayerNorm on s: (s - mean) / sqrt(mean((s - mean)^2) + eps)
        helper.make_node("ReduceMean", ["s"], ["mu"], name="rm1", axes=[-1]),
        helper.make_node("Sub", ["s", "mu"], ["d"], name="sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="rm2", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["d", "std"], ["norm"], name="div"),
    ]
    inits = [
        _init("w", RNG.normal(size=(4, 3, 3, 3))), _init("b", RNG.normal(size=4)), _init("lo", 0.0), _init("hi", 6.0),
        _init("scales", [1, 1, 2, 2]), _init("g", np.ones(4 * 8 * 8)), _init("beta", np.zeros(4 * 8 * 8)),
        _init("wm", RNG.normal(size=(256, 6)) * 0.1), _init("zero", 0.0), _init("two", 2.0), _init("eps", 1e-5),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 4]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, [None, 6])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 6]),
         helper.make_tensor_value_info("norm", TensorProto.FLOAT, [None, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(n: int = 3) -> dict[str, np.ndarray]:
    keep = np.ones((n, 6), dtype=bool)
    keep[:, -1] = False
    return {"x": RNG.normal(size=(n, 3, 4, 4)).astype(np.float32), "keep": keep}


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_fp16_model_runs_and_is_close_to_fp32(tmp_path):
    model = _model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out = tmp_path / "m.fp16.onnx"
    rep = Q.write_fp16_model(src, out)
    m16 = onnx.load(out)
    onnx.checker.check_model(m16, full_check=True)
    # I/O stays FP32; the weights are FP16.
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in m16.graph.output)
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {t.name: t.data_type for t in m16.graph.initializer}
    assert inits["w"] == TensorProto.FLOAT16 and inits["wm"] == TensorProto.FLOAT16
    assert rep.num_fp16_nodes == 9 and rep.num_casts >= 3  # 17 nodes - Resize - 7 of the decomposed LayerNorm
    feeds = _feeds()
    ref = _run(model, feeds)
    got = _run(m16, feeds)
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32
        assert np.allclose(g, r, atol=2e-2, rtol=2e-2)
    assert np.all(got[0][:, -1] == 0.0)  # the clamped mask still masks


def test_out_of_range_constant_is_reported_and_clamped():
    model = _model()
    m16, rep = Q.build_fp16_model(model)
    hit = {o.tensor: o for o in rep.out_of_range}
    assert "neg" in hit and hit["neg"].max_abs > 3e38 and "clamped" in hit["neg"].action
    const = next(n for n in m16.graph.node if n.name == "neg_const")
    val = numpy_helper.to_array(const.attribute[0].t)
    assert val.dtype == np.float16 and float(val) == -65504.0
    assert any("beyond FP16" in w for w in rep.warnings)


def test_kept_ops_and_decomposed_layernorm_stay_fp32():
    model = _model()
    m16, rep = Q.build_fp16_model(model, Fp16Config(keep_fp32_ops=sorted(DEFAULT_FP16_BLOCKLIST | {"Softmax"})))
    kept = {k.name: k.reason for k in rep.kept_fp32}
    assert {"resize", "softmax", "pow", "rm2", "sqrt", "div"} <= set(kept)
    assert "decomposed LayerNorm" in kept["rm2"] and "conv" not in kept
    producers = {o: n for n in m16.graph.node for o in n.output}
    # Every float input of a kept node arrives as FP32: through a Cast to FLOAT, or from an FP32 producer.
    softmax = next(n for n in m16.graph.node if n.name == "softmax")
    cast = producers[softmax.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    resize = next(n for n in m16.graph.node if n.name == "resize")
    assert {t.name: t.data_type for t in m16.graph.initializer}[resize.input[2]] == TensorProto.FLOAT
    _run(m16, _feeds())


def test_io_types_converted_when_asked():
    model = _model()
    m16, rep = Q.build_fp16_model(model, Fp16Config(keep_io_types=False))
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in m16.graph.output)
    feeds = _feeds()
    feeds["x"] = feeds["x"].astype(np.float16)
    got = _run(m16, feeds)
    assert got[0].dtype == np.float16 and not rep.io_kept_fp32


def test_activation_overflow_reported_from_amax():
    _, rep = Q.build_fp16_model(_model(), amax={"s": 1e6, "c": 3.0, "masked": float("inf")})
    assert rep.activation_overflow == (("s", 1e6),)
    assert any("overflow" in w for w in rep.warnings)


def test_keep_fp32_nodes_by_name():
    _, rep = Q.build_fp16_model(_model(), Fp16Config(keep_fp32_nodes=["mm"]))
    assert "mm" in {k.name for k in rep.kept_fp32}


def test_constant_of_shape_without_value_becomes_fp16():
    """ConstantOfShape with no `value` makes float32 zeros (the spec's default); in an FP16 graph it must make FP16
    zeros, or a reader that needs matching types (ScatterND, as Swin's shifted-window mask exports) is invalid."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("ConstantOfShape", ["shp"], ["zeros"], name="cos"),
        helper.make_node("ScatterND", ["zeros", "idx", "upd"], ["scattered"], name="scatter"),
        helper.make_node("Add", ["x", "scattered"], ["y"], name="add"),
    ]
    model = float_model(nodes, [numpy_helper.from_array(np.array([[0, 1], [1, 2]], np.int64), "idx"),
                                _init("upd", [5.0, -7.0])], {"x": [2, 3]}, {"y": [2, 3]})
    m16, _ = Q.build_fp16_model(model)
    onnx.checker.check_model(m16, full_check=True)
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    (got,) = _run(m16, {"x": x})
    (ref,) = _run(model, {"x": x})
    assert np.allclose(got, ref, atol=1e-2)


def test_batchnorm_with_a_variance_beyond_fp16_stays_fp32():
    """A running variance of ~1e8 (PP-OCR's exported detector has one) clamped to 65504 rescales the channel: the
    BatchNormalization stays FP32 instead, and the model stays close to FP32."""
    var = np.array([9.8e7, 1.0, 2.0], np.float32)
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    model = float_model(nodes, [_init("s", [1.0, 1.0, 1.0]), _init("b", [0.5, 0.0, 0.0]), _init("mu", [0.0, 0.0, 0.0]),
                                _init("var", var)], {"x": [2, 3, 4, 4]}, {"y": [2, 3, 4, 4]})
    m16, rep = Q.build_fp16_model(model)
    assert any(k.name == "bn" and "beyond FP16" in k.reason for k in rep.kept_fp32)
    x = (RNG.normal(size=(2, 3, 4, 4)) * 1e4).astype(np.float32)
    (got,) = _run(m16, {"x": x})
    (ref,) = _run(model, {"x": x})
    assert np.allclose(got, ref, rtol=1e-2, atol=1e-2)


def test_an_epsilon_fp16_rounds_to_zero_keeps_what_it_guards_in_fp32():
    """log(|x| + 1e-10): in FP16 the epsilon is 0, the log of a zero -inf, and what follows NaN (basic-pitch's whole
    output, found probing). The Add holding it and the Log it guards stay FP32; the rest converts."""
    nodes = [helper.make_node("Abs", ["x"], ["a"], name="abs"),
             helper.make_node("Add", ["a", "eps"], ["b"], name="add_eps"),
             helper.make_node("Log", ["b"], ["c"], name="log"),
             helper.make_node("Mul", ["c", "half"], ["y"], name="scale")]
    model = float_model(nodes, [_init("eps", np.array(1e-10, np.float32)), _init("half", np.array(0.5, np.float32))],
                        {"x": [2, 8]}, {"y": [2, 8]})
    m16, rep = Q.build_fp16_model(model)
    kept = {k.name: k.reason for k in rep.kept_fp32}
    assert set(kept) == {"add_eps", "log"} and "is 0 in FP16" in kept["add_eps"]
    x = RNG.normal(size=(2, 8)).astype(np.float32)
    x[0, :3] = 0.0
    (got,) = _run(m16, {"x": x})
    (ref,) = _run(model, {"x": x})
    assert np.all(np.isfinite(got)) and np.allclose(got, ref, rtol=1e-2, atol=1e-2)
    # a weight with a few tiny values is no epsilon: the Conv-like reader converts as before
    w = np.full((16, 8), 0.1, np.float32)
    w[0, 0] = 1e-12
    mm = float_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_init("w", w)], {"x": [2, 16]},
                     {"y": [2, 8]})
    assert not Q.build_fp16_model(mm)[1].kept_fp32


def test_a_tensor_an_if_branch_reads_stays_fp32_and_the_model_checks() -> None:
    # silero-vad: an If branch reads an outer activation by name. The If stays FP32 whole, so that activation's
    # producer does too (FP16 would hand the branch another type than it was written for: the checker refused it).
    w4 = np.full((4, 4), 0.5, np.float32)
    w = numpy_helper.from_array(w4, "W")
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["b"])], "then", [], [branch_out])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["b"])], "else", [], [branch_out])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
         helper.make_node("MatMul", ["y", "W"], ["z"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fp16, report = Q.build_fp16_model(model, Fp16Config(keep_io_types=False))
    onnx.checker.check_model(fp16, full_check=True)
    reasons = {k.name: k.reason for k in report.kept_fp32}
    assert reasons == {"mm": "its output is read inside a subgraph, which stays FP32", "if": "has a subgraph"}
    assert any("stay FP32 with everything inside them" in w for w in report.warnings)
    sess = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(8, dtype=np.float16).reshape(2, 4)
    (z,) = sess.run(None, {"x": x, "c": np.array(True)})
    assert np.allclose(z.astype(np.float32), np.maximum(x.astype(np.float32) @ w4, 0) @ w4, rtol=1e-2)


def test_nodes_on_a_tensor_beyond_fp16_stay_fp32_when_the_calibrated_range_says_so():
    # An L2 normalisation: the sum of squares reaches 1e8 on real data (magika's ReduceSumSquare: 6.9e12). In FP16 it
    # is inf and the output collapses; with the calibrated amax the nodes that write or read it stay FP32.
    scale = numpy_helper.from_array(np.array(100.0, np.float32), "k")
    nodes = [helper.make_node("Mul", ["x", "k"], ["big"], name="mul"),
             helper.make_node("ReduceSumSquare", ["big"], ["ss"], name="rss", axes=[1], keepdims=1),
             helper.make_node("Sqrt", ["ss"], ["norm"], name="sqrt"),
             helper.make_node("Div", ["big", "norm"], ["y"], name="div")]
    g = helper.make_graph(nodes, "l2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [scale])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).uniform(10, 40, (4, 8)).astype(np.float32)
    ref = _run(model, {"x": x})[0]
    amax = {"x": 40.0, "big": 4000.0, "ss": 1.2e8, "norm": 1.1e4, "y": 1.0}
    plain, _ = Q.build_fp16_model(model)
    fitted, rep = Q.build_fp16_model(model, amax=amax)
    # Without the range, the sum of squares is cast to FP16 for Sqrt: inf there (onnxruntime's CPU provider may
    # run that Sqrt in FP32 behind the Cast's back; a GPU does not). With it, nothing casts it to FP16.
    def casts_of(m, t):
        return [n for n in m.graph.node if n.op_type == "Cast" and t in n.input
                and helper.get_attribute_value(next(a for a in n.attribute if a.name == "to")) == TensorProto.FLOAT16]
    assert casts_of(plain, "ss") and not casts_of(fitted, "ss")
    np.testing.assert_allclose(_run(fitted, {"x": x})[0], ref, atol=2e-3)
    assert {k.name for k in rep.kept_fp32} >= {"rss", "sqrt"}
    assert rep.activation_overflow == (("ss", 1.2e8),)
