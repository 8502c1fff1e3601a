"""Non-negative activations quantized around the middle of their range (QuantizeOptions.shift_nonnegative)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.onnxgraph import Graph, expose_outputs
from quantpipe.quantize.placement import Plan
from quantpipe.quantize.rewrites.shift import shift_nonnegative
from tests.conftest import float_model

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([output] if output else None, feeds)[0]


def _block(act: str = "relu6", consumer_pads: tuple[int, ...] = (1, 1, 1, 1), second_reader: bool = False,
           gemm: bool = False) -> onnx.ModelProto:
    """Conv -> Relu / Clip(0, 6) -> depthwise Conv (padded) [-> Gemm], the MobileNet / EfficientNet-Lite pattern."""
    act_node = (helper.make_node("Clip", ["c1", "zero", "six"], ["a"], name="act") if act == "relu6"
                else helper.make_node("Relu", ["c1"], ["a"], name="act"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), act_node]
    inits = [numpy_helper.from_array(RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(RNG.normal(size=4).astype(np.float32) + 1.0, "b1"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    out = "y"
    if gemm:
        nodes += [helper.make_node("Flatten", ["c1"], ["f0"], name="flat0"),
                  helper.make_node("Relu", ["f0"], ["fr"], name="relu_f"),
                  helper.make_node("Gemm", ["fr", "wg", "bg"], ["y"], name="fc", transB=1)]
        nodes = [nodes[0]] + nodes[2:]
        inits += [numpy_helper.from_array(RNG.normal(size=(5, 4 * 6 * 6)).astype(np.float32), "wg"),
                  numpy_helper.from_array(RNG.normal(size=5).astype(np.float32), "bg")]
        # the Gemm reads Relu(Flatten(conv)): its producer is not a Conv/Gemm, so nothing may be shifted
    else:
        nodes.append(helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="dw", group=4, pads=list(consumer_pads)))
        inits += [numpy_helper.from_array(RNG.normal(size=(4, 1, 3, 3)).astype(np.float32) * 3, "w2"),
                  numpy_helper.from_array(RNG.normal(size=4).astype(np.float32), "b2")]
        if second_reader:
            nodes.append(helper.make_node("Identity", ["a"], ["a_copy"], name="copy"))
    outputs: dict[str, list | None] = {out: ["n", 5] if gemm else ["n", 4, "h", "w"]}
    if second_reader:
        outputs["a_copy"] = ["n", 4, 6, 6]
    return float_model(nodes, inits, {"x": ["n", 3, 6, 6]}, outputs)


def _x(n: int = 16) -> np.ndarray:
    return RNG.normal(size=(n, 3, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("act", ["relu6", "relu"])
@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 1, 2, 1), (0, 0, 0, 0)])
def test_shift_rewrite_computes_the_same_function_in_float(act: str, pads: tuple[int, ...]) -> None:
    model = _block(act, pads)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m.graph)
    plan = Plan(acts={("dw", 0): 5.0})
    assert shift_nonnegative(m, g, plan, {}) == ["a"]
    assert plan.acts[("dw", 0)] == pytest.approx(2.5)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Pad") == (1 if any(pads) else 0)
    x = _x()
    np.testing.assert_allclose(_run(m, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-4)


def _stats(model: onnx.ModelProto, x: np.ndarray) -> Q.ChannelStats:
    a = _run(expose_outputs(model, ["a"]), {"x": x}, "a")
    return Q.ChannelStats("a", 1, np.abs(a).max(axis=(0, 2, 3)), a.mean(axis=(0, 2, 3)), len(x))


def test_shift_halves_the_quantization_error_of_a_relu6_input() -> None:
    model = _block("relu6")
    x = _x(64)
    ref = _run(model, {"x": x})
    amax = {"x": float(np.abs(x).max()), "a": 6.0}
    # the depthwise conv alone, its weights' mean error corrected (as the default does): what is left is mostly
    # the ReLU6 activation's rounding
    opts = Q.QuantizeOptions(only_nodes=frozenset({"dw"}), channel_stats={"a": _stats(model, x)})
    on, rep = Q.build_qdq_model(model, amax, opts)
    off, rep_off = Q.build_qdq_model(model, amax, dataclasses.replace(opts, shift_nonnegative=False))
    assert rep.shifted_tensors == ("a",) and rep_off.shifted_tensors == ()
    onnx.checker.check_model(on, full_check=True)
    # the Pad feeds the activation's Q/DQ, so the depthwise conv still reads DQ(Q(.)) directly (TensorRT / ORT fusion)
    by_out = {o: n for n in on.graph.node for o in n.output}
    dw = next(n for n in on.graph.node if n.name == "dw")
    dq = by_out[dw.input[0]]
    assert dq.op_type == "DequantizeLinear" and by_out[by_out[dq.input[0]].input[0]].op_type == "Pad"
    assert list(next(a for a in dw.attribute if a.name == "pads").ints) == [0, 0, 0, 0]
    err_on = np.mean((_run(on, {"x": x}) - ref) ** 2)
    err_off = np.mean((_run(off, {"x": x}) - ref) ** 2)
    # half the step: a quarter of the activation's rounding noise; the weights' rounding noise stays in both
    assert err_on < 0.75 * err_off


@pytest.mark.parametrize("stats", [False, True])
def test_shift_with_a_range_16x_too_wide_beats_no_shift(stats: bool) -> None:
    """The readers take the shift c back through the int8 weights they compute with: with the float weights'
    sum instead, c * sum(Wq - W) reached every output (a 16x too wide range: c is 8x the largest value)
    whenever bias correction did not run."""
    model = _block("relu6")
    x = _x(64)
    ref = _run(model, {"x": x})
    amax = {"x": float(np.abs(x).max()), "a": 96.0}
    opts = Q.QuantizeOptions(only_nodes=frozenset({"dw"}), channel_stats={"a": _stats(model, x)} if stats else None)
    on, rep = Q.build_qdq_model(model, amax, opts)
    off, _ = Q.build_qdq_model(model, amax, dataclasses.replace(opts, shift_nonnegative=False))
    assert rep.shifted_tensors == ("a",)
    err_on = np.mean((_run(on, {"x": x}) - ref) ** 2)
    err_off = np.mean((_run(off, {"x": x}) - ref) ** 2)
    assert err_on < 0.5 * err_off


def test_no_shift_where_another_node_reads_the_activation_or_the_producer_is_not_a_conv() -> None:
    for model in (_block("relu6", second_reader=True), _block("relu", gemm=True)):
        names = {n.output[0] for n in model.graph.node}
        amax = {t: 4.0 for t in names | {"x"}}
        q, rep = Q.build_qdq_model(model, amax)
        assert rep.shifted_tensors == ()
        assert "Pad" not in {n.op_type for n in q.graph.node}


def test_shift_keeps_bias_correction_exact_about_the_shifted_mean() -> None:
    model = _block("relu6")
    x = _x(64)
    a = _run(expose_outputs(model, ["a"]), {"x": x}, "a")
    assert a.min() >= 0 and a.max() <= 6
    stats = {"a": Q.ChannelStats("a", 1, np.abs(a).max(axis=(0, 2, 3)), a.mean(axis=(0, 2, 3)), 64)}
    opts = Q.QuantizeOptions(channel_stats=stats)
    q, rep = Q.build_qdq_model(model, {"x": float(np.abs(x).max()), "a": 6.0}, opts)
    assert rep.shifted_tensors == ("a",) and "dw" in rep.bias_corrected
    ref = _run(model, {"x": x})
    mean_err = np.abs((_run(q, {"x": x}) - ref).mean(axis=(0, 2, 3)))
    q0, _ = Q.build_qdq_model(model, {"x": float(np.abs(x).max()), "a": 6.0},
                              dataclasses.replace(opts, bias_correction=False))
    mean_err0 = np.abs((_run(q0, {"x": x}) - ref).mean(axis=(0, 2, 3)))
    assert mean_err.sum() < mean_err0.sum()


@pytest.mark.parametrize("trans_b", [0, 1])
def test_shift_between_two_gemms_is_exact_in_float(trans_b: int) -> None:
    w1 = RNG.normal(size=(6, 8)).astype(np.float32)
    w2 = RNG.normal(size=(5, 8) if trans_b else (8, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", beta=0.5),  # no bias: one gets added
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=trans_b, alpha=0.7, beta=2.0)]
    model = float_model(nodes, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                                numpy_helper.from_array(RNG.normal(size=5).astype(np.float32), "b2")],
                        {"x": ["n", 6]}, {"y": ["n", 5]})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assert shift_nonnegative(m, Graph(m.graph), Plan(acts={("fc2", 0): 3.0}), {}) == ["r"]
    onnx.checker.check_model(m, full_check=True)
    x = RNG.normal(size=(32, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(m, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-4)


def test_shifted_tensors_are_recorded_and_sensitivity_adds_the_offset_back(tmp_path) -> None:
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info
    from quantpipe.sensitivity import layer_sensitivity

    model = _block("relu6")
    x = _x(32)
    amax = {"x": float(np.abs(x).max()), "a": 6.0}
    q, rep = Q.build_qdq_model(model, amax)
    assert Q.tensor_offsets(q) == {"c1": 3.0, "a": 3.0}  # conv1's output and the Clip's hold (value - 3)
    assert Q.tensor_offsets(model) == {}
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(q, tmp_path / "m.int8.onnx")
    np.savez(tmp_path / "e.npz", x=x)
    ds = open_dataset(tmp_path / "e.npz", [tensor_info(i) for i in model.graph.input], role="evaluation")
    rows = {r.node: r for r in layer_sensitivity(tmp_path / "m.onnx", str(tmp_path / "m.int8.onnx"), amax, ds)}
    # conv1's int8 output holds c1 - 3: compared without the offset its SQNR would be about 0 dB
    assert rows["conv1"].sqnr_db > 25 and rows["dw"].sqnr_db > 20
    off = {r.node: r for r in layer_sensitivity(
        tmp_path / "m.onnx", "", amax, ds, options=Q.QuantizeOptions(shift_nonnegative=False))}
    assert abs(rows["conv1"].sqnr_db - off["conv1"].sqnr_db) < 3  # same layer, same input grid: same error


def _residual(same_conv: bool) -> onnx.ModelProto:
    """ResNet-style: t = Relu(conv0(x)) read by a padded conv and by the block's residual Add."""
    w = lambda *shape: numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32) * 0.5, f"w{len(inits)}")  # noqa: E731
    inits: list[onnx.TensorProto] = []
    inits.append(w(4, 3, 3, 3))
    inits.append(numpy_helper.from_array(np.full(4, 0.5, np.float32), "b0"))
    nodes = [helper.make_node("Conv", ["x", inits[0].name, "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["t"], name="relu0")]
    inits.append(w(4, 4, 3, 3))
    nodes.append(helper.make_node("Conv", ["t", inits[-1].name], ["ya"], name="convA", pads=[1, 1, 1, 1]))
    if same_conv:  # the conv that reads t also feeds the Add: its bias takes both corrections
        last = "ya"
    else:
        nodes.append(helper.make_node("Relu", ["ya"], ["ra"], name="reluA"))
        inits.append(w(4, 4, 1, 1))
        nodes.append(helper.make_node("Conv", ["ra", inits[-1].name], ["yb"], name="convB"))
        last = "yb"
    nodes += [helper.make_node("Add", [last, "t"], ["s"], name="residual"),
              helper.make_node("Relu", ["s"], ["y"], name="relu_out")]
    return float_model(nodes, inits, {"x": ["n", 3, 6, 6]}, {"y": ["n", 4, 6, 6]})


@pytest.mark.parametrize("same_conv", [False, True])
def test_shift_through_a_residual_add_is_exact_in_float(same_conv: bool) -> None:
    model = _residual(same_conv)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    plan = Plan(acts={("convA", 0): 4.0, ("residual", 1): 4.0})
    assert shift_nonnegative(m, Graph(m.graph), plan, {}) == ["t"]
    assert plan.acts == {("convA", 0): 2.0, ("residual", 1): 2.0}
    last = "ya" if same_conv else "yb"
    assert Q.tensor_offsets(m) == {"c0": 2.0, "t": 2.0, last: -2.0}  # the Add's conv branch carries +2
    onnx.checker.check_model(m, full_check=True)
    x = _x()
    np.testing.assert_allclose(_run(m, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-4)


def test_residual_block_int8_error_falls_with_the_shift() -> None:
    model = _residual(False)
    x = _x(64)
    ref = _run(model, {"x": x})
    acts = {n: float(np.abs(_run(expose_outputs(model, [n]), {"x": x}, n)).max()) for n in ("t", "ra")}
    amax = {"x": float(np.abs(x).max()), **acts}
    on, rep = Q.build_qdq_model(model, amax)
    off, _ = Q.build_qdq_model(model, amax, Q.QuantizeOptions(shift_nonnegative=False))
    assert set(rep.shifted_tensors) == {"t", "ra"}
    assert "residual" in rep.quantized_names
    err_on = np.mean((_run(on, {"x": x}) - ref) ** 2)
    err_off = np.mean((_run(off, {"x": x}) - ref) ** 2)
    assert err_on < err_off
