"""GPTQ weight rounding (quantpipe.quantize.gptq): patch unfolding, the rounding itself, and its use by the Q/DQ writer."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.quantize import gptq as G
from quantpipe.quantize import weights as W
from tests.conftest import float_model

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _conv_model(wshape, x_shape, **attrs) -> tuple[onnx.ModelProto, np.ndarray]:
    w = RNG.normal(size=wshape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


@pytest.mark.parametrize("attrs", [
    {},
    {"pads": [1, 1, 1, 1]},
    {"pads": [1, 2, 0, 1], "strides": [2, 1], "dilations": [1, 2]},
    {"group": 4, "pads": [1, 1, 1, 1]},  # depthwise
    {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_conv_patches_reproduce_onnxruntime_conv(attrs):
    groups = attrs.get("group", 1)
    wshape = (4, 4 // groups, 3, 3)
    model, w = _conv_model(wshape, (2, 4, 7, 6), **attrs)
    x = RNG.normal(size=(2, 4, 7, 6)).astype(np.float32)
    ref = _run(model, {"x": x})
    p = G.conv_patches(x, model.graph.node[0], wshape)  # [G, N*positions, D]
    wg = w.reshape(groups, 4 // groups, -1)
    y = np.einsum("gpd,grd->gpr", p, wg)  # [G, N*oh*ow, O/G]
    n, o, oh, ow = ref.shape
    y = y.reshape(groups, n, oh, ow, o // groups).transpose(1, 0, 4, 2, 3).reshape(ref.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_gptq_is_round_to_nearest_when_inputs_are_uncorrelated():
    w = RNG.normal(size=(3, 5, 7))
    scale = np.abs(w).max(axis=2) / 127
    h = np.stack([np.diag(RNG.uniform(0.5, 2.0, size=7)) for _ in range(3)])
    codes = G.gptq_round(w, h, scale)
    np.testing.assert_array_equal(codes, np.clip(np.rint(w / scale[:, :, None]), -127, 127))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    # Inputs with a strong common component (like neighbouring pixels): nearest rounding ignores it.
    d, r, n = 24, 16, 4000
    x = RNG.normal(size=(n, 1)) * 3.0 + RNG.normal(size=(n, d)) * 0.3 + 2.0
    w = RNG.normal(size=(r, d)) * np.linspace(0.2, 2.0, d)
    scale = np.abs(w).max(axis=1) / 127
    h = (x.T @ x / n)[None]
    gq = G.gptq_round(w[None], h, scale[None])[0] * scale[:, None]
    nq = np.clip(np.rint(w / scale[:, None]), -127, 127) * scale[:, None]
    err_g = np.mean(((gq - w) @ x.T) ** 2)
    err_n = np.mean(((nq - w) @ x.T) ** 2)
    assert err_g < 0.5 * err_n
    assert np.all(np.abs(gq / scale[:, None]) <= 127 + 1e-9)  # the codes stay on the scale's int8 grid


def _cnn_with_gemm(rng: np.random.Generator = RNG) -> onnx.ModelProto:
    w1 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32) * 4
    w2 = rng.normal(size=(8 * 16, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc"),
    ]
    return float_model(nodes, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
                               numpy_helper.from_array(w2, "w2")], {"x": ["n", 8, 4, 4]}, {"y": ["n", 5]})


def _gptq_against_nearest(tmp_path, seed: int) -> tuple[float, float, onnx.ModelProto]:
    """Output MSE on the calibration data of the GPTQ-rounded and the nearest-rounded model, and the GPTQ one, for
    a model and data drawn from their own generator (the module's is drawn by whichever tests ran first)."""
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info

    rng = np.random.default_rng(seed)
    model = _cnn_with_gemm(rng)
    # Smooth, offset inputs: neighbouring pixels correlate, as in images.
    base = rng.normal(size=(640, 8, 1, 1)) + 2.0
    x = (base + 0.2 * rng.normal(size=(640, 8, 4, 4))).astype(np.float32)
    np.savez(tmp_path / f"d{seed}.npz", x=x)
    ds = open_dataset(tmp_path / f"d{seed}.npz", [tensor_info(i) for i in model.graph.input])
    amax = {"x": 6.0, "f": 60.0}
    opts = Q.with_calibration_data(model, Q.QuantizeOptions(weight_rounding="gptq", bias_correction=False, split_activations="off",
                                                                     smooth_alpha=None), ds,
                                   batch_size=128)
    assert set(opts.weight_codes or {}) == {"w1", "w2"}
    gq, rep = Q.build_qdq_model(model, amax, opts)
    assert set(rep.gptq_rounded) == {"w1", "w2"}
    written = {t.name: numpy_helper.to_array(t) for t in gq.graph.initializer if t.data_type == TensorProto.INT8}
    assert any(np.array_equal(v, opts.weight_codes["w1"].q) for v in written.values())
    nq, rep_n = Q.build_qdq_model(model, amax, dataclasses.replace(opts, weight_rounding="nearest"))
    assert rep_n.gptq_rounded == ()
    ref = _run(model, {"x": x})
    return float(np.mean((_run(gq, {"x": x}) - ref) ** 2)), float(np.mean((_run(nq, {"x": x}) - ref) ** 2)), gq


def test_writer_uses_gptq_codes_and_they_beat_nearest_on_the_calibration_data(tmp_path):
    # GPTQ minimises each layer's own output error, not the model's: it wins on the whole model's output as a rule,
    # not on every draw (on 1 of these 8 it loses by 2 %).
    runs = [_gptq_against_nearest(tmp_path, seed) for seed in range(8)]
    assert sum(g < n for g, n, _ in runs) >= 6, [(g, n) for g, n, _ in runs]
    gq = runs[0][2]
    onnx.checker.check_model(gq, full_check=True)


def test_codes_are_not_used_for_a_weight_that_changed():
    model = _cnn_with_gemm()
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    scale = np.abs(w1).reshape(8, -1).max(axis=1) / 127
    fake = W.WeightCodes("w1", "dw", 0, np.zeros(w1.shape, np.int8), scale.astype(np.float32),
                         W.weight_fingerprint(w1 + 1.0))
    _, rep = Q.build_qdq_model(model, {"x": 6.0, "f": 60.0},
                               Q.QuantizeOptions(weight_rounding="gptq", weight_codes={"w1": fake}))
    assert rep.gptq_rounded == ()
    assert W.codes_for({"w1": fake}, "w1", w1, 0) is None
    ok = dataclasses.replace(fake, fingerprint=W.weight_fingerprint(w1))
    assert W.codes_for({"w1": ok}, "w1", w1, 0) is ok
    assert W.codes_for({"w1": ok}, "w1", w1, None) is None  # computed per channel, asked per tensor


def test_unknown_weight_rounding_is_refused(tmp_path):
    from quantpipe.errors import BuildError

    with pytest.raises(BuildError, match="weight_rounding"):
        Q.with_calibration_data(_cnn_with_gemm(), Q.QuantizeOptions(weight_rounding="adaround"), None)


def test_gptq_fits_weights_held_in_constant_nodes(tmp_path):
    """Paddle exports keep every weight in a Constant node, no initializer: GPTQ silently did nothing there."""
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info

    model = _cnn_with_gemm()
    consts = []
    for t in list(model.graph.initializer):
        consts.append(helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    x = (RNG.normal(size=(640, 8, 1, 1)) + 2.0 + 0.2 * RNG.normal(size=(640, 8, 4, 4))).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = open_dataset(tmp_path / "d.npz", [tensor_info(i) for i in model.graph.input])
    opts = Q.with_calibration_data(model, Q.QuantizeOptions(weight_rounding="gptq", bias_correction=False,
                                                            split_activations="off", smooth_alpha=None), ds,
                                   batch_size=128)
    assert set(opts.weight_codes or {}) == {"w1", "w2"}
    _, rep = Q.build_qdq_model(model, {"x": 6.0, "f": 60.0}, opts)
    assert set(rep.gptq_rounded) == {"w1", "w2"}
