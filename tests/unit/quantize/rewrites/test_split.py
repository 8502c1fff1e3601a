"""Activations quantized in pieces (QuantizeOptions.split_activations): same function, finer int8 grid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.data import open_dataset
from quantpipe.model import tensor_info
from quantpipe.onnxgraph import Graph, expose_outputs
from quantpipe.quantize.rewrites.split import split_activations
from tests.conftest import float_model

RNG = np.random.default_rng(3)


def _f32(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _model() -> onnx.ModelProto:
    """x -> conv1 -> Clip(0, 6) = a -> {depthwise edge filter dw, 3x3 conv pw} -> Add -> Relu = b -> conv3.

    `a` feeds a zero-sum (edge) depthwise filter: smooth inputs give it a small signal while its rounding
    noise passes at full strength, so `a` holds most of the model's activation noise; `b` is ordinary.
    """
    edge = np.array([[0, 1, 0], [-1, 0, 1], [0, -1, 0]], np.float32) * 8.0  # zero-sum; exact int8 codes
    codes = RNG.integers(-100, 101, size=(4, 4, 3, 3))
    codes[:, 0, 0, 0] = 127  # each output channel's max |w| is 127 steps of 2e-4: the pw weights quantize exactly
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["a"], name="act1"),
        helper.make_node("Conv", ["a", "wdw", "bdw"], ["d"], name="dw", group=4),
        helper.make_node("Conv", ["a", "wpw", "bpw"], ["p"], name="pw"),
        helper.make_node("Add", ["d", "p"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["b"], name="act2"),
        helper.make_node("Conv", ["b", "w3", "b3"], ["y"], name="conv3"),
    ]
    inits = [
        _f32("w1", RNG.normal(size=(4, 3, 3, 3)) * 0.05), _f32("b1", RNG.uniform(1.0, 3.0, size=4)),
        _f32("zero", 0.0), _f32("six", 6.0),
        _f32("wdw", np.stack([edge[None]] * 4)), _f32("bdw", np.zeros(4)),
        _f32("wpw", codes * 2e-4), _f32("bpw", RNG.normal(size=4) * 0.1),
        _f32("w3", RNG.normal(size=(2, 4, 1, 1))), _f32("b3", np.zeros(2)),
    ]
    return float_model(nodes, inits, {"x": ["n", 3, 8, 8]}, {"y": ["n", 2, 6, 6]})


def _x(n: int = 16) -> np.ndarray:
    """Smooth images: a random level and a gentle ramp per sample and channel, plus a little noise."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
    coef = RNG.normal(size=(n, 3, 3)) * np.array([1.0, 0.1, 0.1])
    img = coef[..., 0, None, None] + coef[..., 1, None, None] * xx + coef[..., 2, None, None] * yy
    return (img + 0.002 * RNG.normal(size=img.shape)).astype(np.float32)


def _amax(model: onnx.ModelProto, x: np.ndarray) -> dict[str, float]:
    sess = ort.InferenceSession(expose_outputs(model, ["a", "b"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    a, b = sess.run(["a", "b"], {"x": x})
    return {"x": float(np.abs(x).max()), "a": 6.0, "b": float(b.max())}


@pytest.mark.parametrize("pieces", [2, 3, 4])
def test_split_computes_the_same_function_in_float(pieces: int) -> None:
    model = _model()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    amax = {"a": 6.0}
    done = split_activations(m, Graph(m.graph), Q.QuantizeOptions(), {"a": pieces}, amax, {})
    assert set(done) == {"a"} and amax[done["a"]] == pytest.approx(6.0 / pieces)
    onnx.checker.check_model(m, full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    conv1, dw, pw = (next(n for n in m.graph.node if n.name == k) for k in ("conv1", "dw", "pw"))
    assert w[conv1.input[1]].shape == (4 * pieces, 3, 3, 3)
    assert w[dw.input[1]].shape == (4, pieces, 3, 3)  # still 4 groups, `pieces` inputs each
    assert w[pw.input[1]].shape == (4, 4 * pieces, 3, 3)
    x = _x() * 3  # large enough that a saturates at 6 somewhere
    np.testing.assert_allclose(_run(m, x), _run(model, x), rtol=1e-5, atol=1e-4)


def test_split_lowers_the_int8_error_of_the_dominant_tensor() -> None:
    model, x = _model(), _x(32)
    amax = _amax(model, x)
    ref = _run(model, x)

    def err(split) -> float:
        q, rep = Q.build_qdq_model(model, amax, Q.QuantizeOptions(split_activations=split, only_nodes=frozenset(
            {"dw", "pw"})))
        assert rep.split_tensors == (tuple((t, k) for t, k in split.items()) if split != "off" else ())
        return float(np.mean((_run(q, x) - ref) ** 2))

    plain, split = err("off"), err({"a": 4})
    # Only a's rounding is left (the weights quantize exactly): 4 pieces, 4x finer steps, ~16x less noise.
    assert split < plain / 8


def test_choose_splits_picks_only_the_dominant_activation(tmp_path) -> None:
    model, x = _model(), _x(32)
    np.savez(tmp_path / "c.npz", x=x)
    ds = open_dataset(tmp_path / "c.npz", [tensor_info(i) for i in model.graph.input], role="calibration")
    chosen = Q.choose_splits(model, _amax(model, x), Q.QuantizeOptions(), ds, batch_size=8)
    assert chosen == {"a": 4}  # a alone makes almost all of the INT8 model's output noise
    # Noise that is small in absolute terms is left alone, however lopsided.
    assert Q.choose_splits(model, _amax(model, x), Q.QuantizeOptions(), ds, batch_size=8, max_sqnr_db=10.0) == {}


def test_choose_splits_judges_each_channel_against_its_own_signal(tmp_path, caplog) -> None:
    """An output whose channels differ in scale by 1000x: the search weighs each channel by its own signal, as
    `auto`'s ranges and the closing SQNR do (the weights were computed after the first batch was stored, so never)."""
    model, x = _model(), _x(32)
    w3 = next(t for t in model.graph.initializer if t.name == "w3")
    w = numpy_helper.to_array(w3).copy()
    w[1] *= 1e-3
    w3.CopyFrom(_f32("w3", w))
    np.savez(tmp_path / "c.npz", x=x)
    ds = open_dataset(tmp_path / "c.npz", [tensor_info(i) for i in model.graph.input], role="calibration")
    with caplog.at_level("INFO", logger="quantpipe"):
        Q.choose_splits(model, _amax(model, x), Q.QuantizeOptions(), ds, batch_size=8)
    assert "each channel of y against its own signal" in caplog.text


def test_split_is_skipped_where_a_reader_stays_float() -> None:
    model, x = _model(), _x(8)
    q, rep = Q.build_qdq_model(model, _amax(model, x), Q.QuantizeOptions(
        split_activations={"a": 4}, keep_float_nodes=frozenset({"pw"})))
    assert rep.split_tensors == ()
    onnx.checker.check_model(q, full_check=True)
    assert all(t.dims[0] == 4 for t in q.graph.initializer if t.name.startswith("w1"))


def test_with_calibration_data_resolves_auto(tmp_path) -> None:
    model, x = _model(), _x(32)
    np.savez(tmp_path / "c.npz", x=x)
    ds = open_dataset(tmp_path / "c.npz", [tensor_info(i) for i in model.graph.input], role="calibration")
    amax = _amax(model, x)
    opts = Q.with_calibration_data(model, Q.QuantizeOptions(split_activations="auto", weight_rounding="gptq"), ds,
                                   batch_size=8, amax=amax)
    assert opts.split_activations == {"a": 4}
    q, rep = Q.build_qdq_model(model, amax, opts)
    assert rep.split_tensors == (("a", 4),)
    # The split weights carry the unsplit weights' GPTQ codes, repeated: the copies of one weight share a code.
    assert any("split" in w for w in rep.gptq_rounded)
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    dw = next(n for n in q.graph.node if n.name == "dw")
    codes = inits[dq[dw.input[1]].input[0]]
    assert codes.dtype == np.int8 and codes.shape == (4, 4, 3, 3)
    assert all(np.array_equal(codes[:, 0], codes[:, k]) for k in range(1, 4))


def test_sensitivity_runs_on_a_split_model(tmp_path) -> None:
    from quantpipe.sensitivity import layer_sensitivity

    model, x = _model(), _x(16)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "e.npz", x=x)
    ds = open_dataset(tmp_path / "e.npz", [tensor_info(i) for i in model.graph.input], role="evaluation")
    rows = layer_sensitivity(tmp_path / "m.onnx", None, _amax(model, x), ds, output="y", batch_size=8,
                             options=Q.QuantizeOptions(split_activations={"a": 4}))
    by_node = {r.node: r for r in rows}
    assert {"dw", "pw", "conv3"} <= set(by_node)
    assert by_node["dw"].sqnr_db is not None and by_node["dw"].sqnr_db > 10


def test_chained_splits_compose() -> None:
    """conv1 -> Clip -> a -> conv2 -> Relu -> b -> conv3: conv2 both reads a split tensor and produces one, so
    its weights are repeated along both axes; in float the model is unchanged (b's amax covers its values)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["a"], name="act1"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["b"], name="act2"),
        helper.make_node("Conv", ["b", "w3", "b3"], ["y"], name="conv3", group=5, pads=[1, 1, 1, 1]),
    ]
    inits = [_f32("w1", RNG.normal(size=(4, 3, 3, 3))), _f32("b1", RNG.normal(size=4)), _f32("zero", 0.0),
             _f32("six", 6.0), _f32("w2", RNG.normal(size=(5, 4, 3, 3)) * 0.3), _f32("b2", RNG.normal(size=5)),
             _f32("w3", RNG.normal(size=(5, 1, 3, 3))), _f32("b3", RNG.normal(size=5))]
    model = float_model(nodes, inits, {"x": ["n", 3, 8, 8]}, {"y": ["n", 5, 8, 8]})
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(expose_outputs(model, ["b"]).SerializeToString(), providers=["CPUExecutionProvider"])
    amax = {"a": 6.0, "b": float(sess.run(["b"], {"x": x})[0].max()) * 1.01}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    done = split_activations(m, Graph(m.graph), Q.QuantizeOptions(), {"a": 2, "b": 3}, amax, {})
    assert set(done) == {"a", "b"}
    onnx.checker.check_model(m, full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    assert w[conv2.input[1]].shape == (5 * 3, 4 * 2, 3, 3)
    np.testing.assert_allclose(_run(m, x), _run(model, x), rtol=1e-5, atol=1e-4)
