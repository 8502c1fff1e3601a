"""Q/DQ placement, weight quantization and model validity of quantpipe.quantize on graphs built in code."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe import onnxgraph, ortsession
from quantpipe import quantize as Q
from quantpipe.config import DEFAULT_FLOAT_OPS
from quantpipe.errors import ModelError
from quantpipe.onnxgraph import expose_outputs
from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG

RNG = np.random.default_rng(0)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], out: str | None = None) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def _amax_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Independent oracle for calibration: max |x| of every float tensor, from onnxruntime."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    exposed = expose_outputs(model, [o for n in model.graph.node for o in n.output if o in floats])
    vals = _run(exposed, feeds)
    vals.update(feeds)
    return {k: float(np.max(np.abs(v))) for k, v in vals.items() if np.asarray(v).dtype == np.float32}


def _qdq_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """node name -> the producer op types of its inputs (to see which inputs went through DequantizeLinear)."""
    prod = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name: [prod.get(i, "init") for i in n.input] for n in model.graph.node}


def _cnn() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Add(skip) -> Resize -> GAP -> Flatten -> Gemm -> Softmax, plus a LayerNorm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="residual"),
        helper.make_node("Resize", ["res", "", "scales"], ["up"], name="resize", mode="nearest"),
        helper.make_node("GlobalAveragePool", ["up"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("LayerNormalization", ["flat", "ln_g", "ln_b"], ["ln"], name="ln"),
        helper.make_node("Gemm", ["ln", "wf", "bf"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax"),
    ]
    inits = [
        _init("w1", RNG.normal(size=(8, 3, 3, 3))), _init("b1", RNG.normal(size=8)),
        _init("w2", RNG.normal(size=(8, 8, 3, 3)) * 0.2), _init("b2", RNG.normal(size=8)),
        _init("scales", [1, 1, 2, 2]), _init("ln_g", np.ones(8)), _init("ln_b", np.zeros(8)),
        _init("wf", RNG.normal(size=(5, 8))), _init("bf", RNG.normal(size=5)),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                  [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, 5])], inits)


def _attention() -> onnx.ModelProto:
    """A one-head attention block with a -3.4e38 padding mask added to the scores before Softmax."""
    d = 8
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="mm_k"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="mm_v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="bmm_qk"),
        helper.make_node("Cast", ["mask"], ["mask_b"], name="cast_mask", to=TensorProto.BOOL),
        helper.make_node("Where", ["mask_b", "zero", "neg"], ["mask_add"], name="where"),
        helper.make_node("Add", ["scores", "mask_add"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="bmm_pv"),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="mm_o"),
    ]
    inits = [_init("g", np.ones(d)), _init("b", np.zeros(d)), _init("wq", RNG.normal(size=(d, d))),
             _init("wk", RNG.normal(size=(d, d))), _init("wv", RNG.normal(size=(d, d))),
             _init("wo", RNG.normal(size=(d, d))), _init("zero", 0.0),
             _init("neg", np.float32(np.finfo(np.float32).min))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, d]),
                          helper.make_tensor_value_info("mask", TensorProto.INT64, [None, 1, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, d])], inits)


def _att_feeds(n: int = 3) -> dict[str, np.ndarray]:
    mask = np.ones((n, 1, 4), dtype=np.int64)
    mask[:, :, 3] = 0  # last position is padding
    return {"x": RNG.normal(size=(n, 4, 8)).astype(np.float32), "mask": mask}


def test_cnn_placement_quantizes_weighted_ops_and_residual_skip_only():
    model = _cnn()
    feeds = {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    q, rep = Q.build_qdq_model(model, _amax_of(model, feeds))
    inputs = _qdq_inputs(q)
    assert {n.name for n in rep.quantized_nodes} == {"conv1", "conv2", "fc", "residual"}
    assert inputs["conv1"][:2] == ["DequantizeLinear", "DequantizeLinear"]
    assert inputs["conv2"][:2] == ["DequantizeLinear", "DequantizeLinear"]
    assert inputs["fc"][:2] == ["DequantizeLinear", "DequantizeLinear"]
    assert inputs["conv1"][2] == "init"  # bias stays float
    # Residual Add: the skip input (r1) is quantized, the Conv branch (c2) is not, so TensorRT fuses Conv+Add.
    assert inputs["residual"] == ["Conv", "DequantizeLinear"]
    for name in ("resize", "softmax", "ln", "gap", "relu1"):
        assert "DequantizeLinear" not in inputs[name], name
    kept = {f.name: f.reason for f in rep.kept_float}
    assert "softmax" in kept and "ln" in kept and "resize" in kept
    out = _run(q, feeds)["prob"]
    ref = _run(model, feeds)["prob"]
    assert np.max(np.abs(out - ref)) < 0.05


def test_residual_add_not_quantized_when_disabled():
    model = _cnn()
    feeds = {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    q, rep = Q.build_qdq_model(model, _amax_of(model, feeds), Q.QuantizeOptions(quantize_residual_add=False))
    assert "residual" not in {n.name for n in rep.quantized_nodes}
    # the skip input comes straight from the activation (a Clip once shift_nonnegative moved it), no Q/DQ
    assert _qdq_inputs(q)["residual"] == ["Conv", "Clip"] and rep.shifted_tensors == ("r1",)


def test_attention_mask_never_quantized_and_no_sentinel_amax():
    model = _attention()
    feeds = _att_feeds()
    amax = _amax_of(model, feeds)
    assert amax["masked"] > 1e38  # the naive minmax range of the masked scores is garbage
    q, rep = Q.build_qdq_model(model, amax)
    names = {n.name for n in rep.quantized_nodes}
    assert names == {"mm_q", "mm_k", "mm_v", "bmm_qk", "bmm_pv", "mm_o"}
    inputs = _qdq_inputs(q)
    assert inputs["add_mask"] == ["MatMul", "Where"] and inputs["softmax"] == ["Add"]
    scales = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.FLOAT}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            assert float(scales[n.input[1]]) * 127 < 1e6, n.input[0]
    out, ref = _run(q, feeds)["y"], _run(model, feeds)["y"]
    assert np.allclose(out, ref, atol=0.15 * np.abs(ref).max())


def test_matmul_fed_by_mask_is_left_float_with_reason():
    model = _attention()
    for n in model.graph.node:  # wire the masked scores straight into the P.V MatMul (no Softmax on the way)
        if n.name == "bmm_pv":
            n.input[0] = "masked"
    amax = {k: 1.0 for k in ("x", "h", "q", "kt", "p", "ctx", "v")}
    amax["masked"] = 3.4e38
    _, rep = Q.build_qdq_model(model, amax)
    kept = {f.name: f.reason for f in rep.kept_float}
    assert "bmm_pv" in kept and "sentinel" in kept["bmm_pv"]
    assert any("sentinel" in w for w in rep.warnings)


def test_huge_amax_is_refused_even_without_a_mask_constant():
    model = _attention()
    amax = _amax_of(model, _att_feeds())
    amax["h"] = 3.4e38
    _, rep = Q.build_qdq_model(model, amax)
    kept = {f.name: f.reason for f in rep.kept_float}
    assert "sentinel" in kept["mm_q"] and "mm_q" not in {n.name for n in rep.quantized_nodes}


def _weights(q: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """original weight name -> (int8 values, scale, axis) from the int8 initializer + DequantizeLinear."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    out = {}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8:
            axis = next((a.i for a in n.attribute if a.name == "axis"), None)
            out[n.input[0].rsplit("_int8", 1)[0]] = (inits[n.input[0]], inits[n.input[1]], axis)
    return out


@pytest.mark.parametrize(
    "op, wshape, attrs, axis",
    [
        ("Conv", (6, 4, 3, 3), {}, 0),
        ("ConvTranspose", (4, 6, 3, 3), {}, 1),
        ("Gemm", (4, 6), {"transB": 0}, 1),
        ("Gemm", (6, 4), {"transB": 1}, 0),
        ("MatMul", (4, 6), {}, 1),
    ],
)
def test_per_channel_axis_and_half_step_error(op, wshape, attrs, axis):
    # Channels with very different ranges: a per-tensor scale (or a wrong axis) would break the bound.
    w = RNG.normal(size=wshape) * np.logspace(-2, 1, wshape[axis]).reshape([-1 if i == axis else 1 for i in range(len(wshape))])
    if op in ("Conv", "ConvTranspose"):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, None, None])
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    model = _model([helper.make_node(op, ["x", "w"], ["y"], name="op", **attrs)], [x], [y], [_init("w", w)])
    q, rep = Q.build_qdq_model(model, {"x": 3.0})
    assert rep.quantized_nodes[0].weight_axis == axis
    qi, scale, got_axis = _weights(q)["w"]
    assert got_axis == axis
    other = tuple(i for i in range(w.ndim) if i != axis)
    assert np.allclose(scale, np.abs(w).max(axis=other) / 127, rtol=1e-6)
    bshape = [-1 if i == axis else 1 for i in range(w.ndim)]
    deq = qi.astype(np.float64) * scale.reshape(bshape)
    assert np.all(np.abs(deq - w) <= scale.reshape(bshape) / 2 + 1e-7)
    onnx.checker.check_model(q, full_check=True)


def test_constant_node_weights_are_quantized_and_the_constant_removed():
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], name="const_w", value=numpy_helper.from_array(w)),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [])
    q, rep = Q.build_qdq_model(model, {"x": 2.0})
    assert [n.name for n in rep.quantized_nodes] == ["mm"]
    assert "Constant" not in {n.op_type for n in q.graph.node}
    qi, scale, axis = _weights(q)["w"]
    assert axis == 1 and qi.dtype == np.int8
    assert np.all(np.abs(qi * scale[None, :] - w) <= scale[None, :] / 2 + 1e-7)


def _opset11_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "wm"], ["y"], name="mm"),
    ]
    inits = [_init("w", RNG.normal(size=(4, 2, 3, 3))), _init("b", RNG.normal(size=4)),
             numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape"),
             _init("wm", RNG.normal(size=(64, 5)) * 0.1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits, opset=11)


def test_opset11_model_is_upgraded_valid_and_close_to_fp32(tmp_path):
    model = _opset11_model()
    src = tmp_path / "m11.onnx"
    onnx.save(model, src)
    feeds = {"x": RNG.normal(size=(1, 2, 4, 4)).astype(np.float32)}
    out_path = tmp_path / "m11.int8.onnx"
    rep = Q.write_qdq_model(src, _amax_of(model, feeds), out_path)
    assert rep.opset_before == 11 and rep.opset_after == 13 and rep.per_channel
    written = onnx.load(out_path)
    onnx.checker.check_model(written, full_check=True)
    assert {n.name for n in rep.quantized_nodes} == {"conv", "mm"}
    # The session config quantpipe recommends for its int8 models: onnxruntime's default rewrites them to
    # U8S8 kernels that saturate on x86 CPUs without VNNI (see quantize.ORT_INT8_SESSION_CONFIG).
    opts = ort.SessionOptions()
    for k, v in ORT_INT8_SESSION_CONFIG.items():
        opts.add_session_config_entry(k, v)
    got = ort.InferenceSession(str(out_path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref = _run(model, feeds)["y"]
    assert np.max(np.abs(got - ref)) < 0.05 * np.max(np.abs(ref)) + 1e-3


def test_opset11_falls_back_to_per_tensor_when_conversion_fails(tmp_path, monkeypatch):
    import onnx.version_converter

    def boom(model, version):
        raise RuntimeError("unsupported op in converter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", boom)
    model = _opset11_model()
    feeds = {"x": RNG.normal(size=(1, 2, 4, 4)).astype(np.float32)}
    q, rep = Q.build_qdq_model(model, _amax_of(model, feeds))
    assert rep.opset_after == 11 and not rep.per_channel
    assert any("per tensor" in w for w in rep.warnings)
    assert all(not any(a.name == "axis" for a in n.attribute) for n in q.graph.node if n.op_type == "DequantizeLinear")
    onnx.checker.check_model(q, full_check=True)
    got = _run(q, feeds)["y"]
    assert got.shape == (1, 5) and np.all(np.isfinite(got))


def test_missing_amax_leaves_node_float_with_reason():
    model = _cnn()
    feeds = {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    amax = _amax_of(model, feeds)
    del amax["r1"]
    _, rep = Q.build_qdq_model(model, amax)
    kept = {f.name: f.reason for f in rep.kept_float}
    assert "no calibration amax" in kept["conv2"] and "conv2" not in {n.name for n in rep.quantized_nodes}
    assert any("amax" in w for w in rep.warnings)


def test_keep_float_nodes_and_ops():
    model = _attention()
    amax = _amax_of(model, _att_feeds())
    _, rep = Q.build_qdq_model(model, amax, Q.QuantizeOptions(keep_float_nodes=frozenset({"mm_o"})))
    assert "mm_o" not in {n.name for n in rep.quantized_nodes} and rep.num_quantizable == 6
    _, rep = Q.build_qdq_model(model, amax, Q.QuantizeOptions(quantize_activation_matmul=False))
    assert {n.name for n in rep.quantized_nodes} == {"mm_q", "mm_k", "mm_v", "mm_o"}
    _, rep = Q.build_qdq_model(model, amax, Q.QuantizeOptions(keep_float_ops=DEFAULT_FLOAT_OPS | {"MatMul"}))
    assert rep.quantized_nodes == ()


def test_already_quantized_model_is_rejected_and_nothing_written(tmp_path):
    model = _cnn()
    feeds = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    q, _ = Q.build_qdq_model(model, _amax_of(model, feeds))
    src = tmp_path / "q.onnx"
    onnx.save(q, src)
    out = tmp_path / "again.onnx"
    with pytest.raises(ModelError, match="already contains quantized ops"):
        Q.write_qdq_model(src, {}, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_external_data_in_and_out(tmp_path, monkeypatch):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                   [_init("w", RNG.normal(size=(64, 64)) / 8), _init("w2", RNG.normal(size=(64, 64)) / 8)])
    feeds = {"x": RNG.normal(size=(2, 64)).astype(np.float32)}
    amax = _amax_of(model, feeds)
    src = tmp_path / "ext.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # save_model with external data rewrites the proto it is given
    onnx.save_model(on_disk, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    # Pretend the result is > 2 GB: saved with external data, and run by onnxruntime from a file.
    monkeypatch.setattr(onnxgraph, "LARGE_MODEL_BYTES", 100)
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 100)
    out = tmp_path / "out.int8.onnx"
    rep = Q.write_qdq_model(src, amax, out)
    assert {n.name for n in rep.quantized_nodes} == {"mm1", "mm2"}
    assert (tmp_path / "out.int8.onnx.data").stat().st_size >= 2 * 64 * 64  # the int8 weights live outside
    bare = onnx.load(out, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in bare.graph.initializer if t.data_type == TensorProto.INT8)
    got = _run(onnx.load(out), feeds)["y"]
    ref = _run(model, feeds)["y"]
    assert np.max(np.abs(got - ref)) < 0.05 * np.max(np.abs(ref))


def test_smoothing_is_exact_in_float_and_helps_outlier_channels():
    d = 16
    scale = np.ones(d)
    scale[3] = 40.0  # one outlier channel, as in BERT LayerNorm outputs
    nodes = [helper.make_node("Mul", ["x", "chan"], ["h"], name="outliers"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, d])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 8])],
                   [_init("chan", scale), _init("w", RNG.normal(size=(d, 8)))])
    feeds = {"x": RNG.normal(size=(64, d)).astype(np.float32)}
    h = _run(expose_outputs(model, ["h"]), feeds)["h"]
    stats = {"h": Q.ChannelStats("h", -1, np.abs(h).max(axis=0), h.mean(axis=0), 64)}
    amax = _amax_of(model, feeds)
    ref = _run(model, feeds)["y"]
    plain, _ = Q.build_qdq_model(model, amax)
    smooth, rep = Q.build_qdq_model(model, amax, Q.QuantizeOptions(channel_stats=stats, bias_correction=False))
    assert rep.smoothed_tensors == ("h",)
    err_plain = np.mean((_run(plain, feeds)["y"] - ref) ** 2)
    err_smooth = np.mean((_run(smooth, feeds)["y"] - ref) ** 2)
    assert err_smooth < 0.5 * err_plain
    # In float the smoothed graph computes the same function: quantize nothing and compare.
    fp, _ = Q.build_qdq_model(model, {}, Q.QuantizeOptions(channel_stats=stats, bias_correction=False))
    assert np.allclose(_run(fp, feeds)["y"], ref, rtol=1e-4, atol=1e-4)


def test_bias_correction_removes_the_mean_shift_of_quantized_weights():
    # Post-ReLU inputs with a large mean: weight rounding shifts each output channel by (Wq - W) . mean(x).
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=4)]
    w = RNG.normal(size=(4, 1, 3, 3)) * np.array([20.0, 1.0, 1.0, 5.0]).reshape(4, 1, 1, 1)
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4, 6, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4, 4, 4])],
                   [_init("w", w), _init("b", np.zeros(4))])
    x = (3.0 + 0.3 * RNG.normal(size=(8, 4, 6, 6))).astype(np.float32)
    stats = {"x": Q.ChannelStats("x", 1, np.abs(x).max(axis=(0, 2, 3)), x.mean(axis=(0, 2, 3)), 8)}
    ref = _run(model, {"x": x})["y"]
    plain, _ = Q.build_qdq_model(model, {"x": 6.0})
    corr, rep = Q.build_qdq_model(model, {"x": 6.0}, Q.QuantizeOptions(channel_stats=stats))
    assert rep.bias_corrected == ("dw",)
    bias_plain = np.abs((_run(plain, {"x": x})["y"] - ref).mean(axis=(0, 2, 3)))
    bias_corr = np.abs((_run(corr, {"x": x})["y"] - ref).mean(axis=(0, 2, 3)))
    assert bias_corr.sum() < 0.3 * bias_plain.sum()


def test_a_gemm_without_bias_and_beta_0_is_left_uncorrected_and_never_gets_an_infinite_bias() -> None:
    # tf2onnx writes projections as Gemm with beta=0 and no C: the correction was -shift / 0, six biases of +-inf in
    # a BERT, counted as corrected (found probing). Given beta=1 instead, the correction lowered that BERT on its
    # evaluation words, so such a node is left alone, and said so by not being counted.
    rng = np.random.default_rng(7)  # its own: the shared RNG's state depends on which tests ran before
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="proj", beta=0.0)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 4])], [_init("w", rng.normal(size=(32, 4)))])
    x = (3.0 + 0.3 * rng.normal(size=(64, 32))).astype(np.float32)
    stats = {"x": Q.ChannelStats("x", -1, np.abs(x).max(axis=0), x.mean(axis=0), 64)}
    plain, _ = Q.build_qdq_model(model, {"x": 4.5}, Q.QuantizeOptions(bias_correction=False))
    corr, rep = Q.build_qdq_model(model, {"x": 4.5}, Q.QuantizeOptions(channel_stats=stats))
    assert rep.bias_corrected == ()
    assert all(np.all(np.isfinite(numpy_helper.to_array(t))) for t in corr.graph.initializer)
    np.testing.assert_array_equal(_run(corr, {"x": x})["y"], _run(plain, {"x": x})["y"])


def test_collect_channel_stats_matches_numpy(tmp_path):
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info

    model = _cnn()
    x = RNG.normal(size=(5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = open_dataset(tmp_path / "d.npz", [tensor_info(i) for i in model.graph.input])
    stats = Q.collect_channel_stats(model, ds, batch_size=2)
    r1 = _run(expose_outputs(model, ["r1"]), {"x": x})["r1"]
    assert np.allclose(stats["r1"].mean, r1.mean(axis=(0, 2, 3)), atol=1e-5)
    assert np.allclose(stats["r1"].absmax, np.abs(r1).max(axis=(0, 2, 3)))
    assert stats["ln"].axis == -1 and stats["ln"].mean.shape == (8,)


def test_write_is_checked_and_report_paths(tmp_path):
    model = _attention()
    src = tmp_path / "att.onnx"
    onnx.save(model, src)
    out = tmp_path / "sub" / "att.int8.onnx"
    rep = Q.write_qdq_model(src, _amax_of(model, _att_feeds()), out)
    assert rep.output_path == str(out) and rep.model_path == str(src)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert [p.name for p in out.parent.iterdir()] == ["att.int8.onnx"]  # no temp files left behind


def test_collect_channel_stats_in_pieces_is_bit_identical_to_one_run_per_batch(tmp_path):
    """The statistics pass runs a batch in pieces under `max_run_bytes` (memory); each batch's sum must still be
    the row-by-row sum of the whole batch, so the bits do not depend on the pieces."""
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info

    model = _cnn()
    # Samples of magnitudes 1e-6 .. 1e6: their float64 sum rounds, so the order of the additions shows in the bits.
    x = (RNG.normal(size=(37, 3, 8, 8)) * 10.0 ** RNG.uniform(-6, 6, size=(37, 1, 1, 1))).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = open_dataset(tmp_path / "d.npz", [tensor_info(i) for i in model.graph.input])
    pieces = Q.collect_channel_stats(model, ds, batch_size=16, max_run_bytes=1)  # one sample per run
    whole = Q.collect_channel_stats(model, ds, batch_size=16, max_run_bytes=1 << 40)
    assert set(pieces) == set(whole)
    for name, st in whole.items():
        assert np.array_equal(pieces[name].mean, st.mean) and np.array_equal(pieces[name].absmax, st.absmax), name
        assert pieces[name].num_samples == st.num_samples == 37


def test_subnormal_weights_get_a_positive_normal_scale_and_zero_codes() -> None:
    # PP-OCRv3 det ships dead channels holding ~2e-40 (found probing): amax / 127 underflowed to a scale of exactly
    # 0 (TensorRT refuses a non-positive scale) and 0 / 0 codes, with a numpy RuntimeWarning.
    import warnings

    from quantpipe.quantize.weights import quantize_weight

    w = np.random.default_rng(0).normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)
    w[2] = np.float32(2e-40)
    w[3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide / cast warning
        q, scale = quantize_weight(w, 0, None)
    assert np.all(scale >= np.finfo(np.float32).tiny) and scale[2] == scale[3] == 1.0
    assert not q[2].any() and not q[3].any()
    np.testing.assert_allclose(scale[:2], np.abs(w[:2]).max(axis=(1, 2, 3)) / 127, rtol=1e-6)
