"""Per-layer sensitivity of a Q/DQ model judged as written (`quantpipe.qdq_sensitivity`, what ModelOpt's INT8
variants get), on the tiny MLP whose fc2 input has a badly clipped range (`damaged_mlp`). The oracle for each
one-layer model is a whole run of it in a session of its own, and plain numpy for the dequantized weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.ortsession import ort_session
from quantpipe.qdq_sensitivity import keep_only_pairs, qdq_layer_sensitivity, quantized_nodes


@pytest.fixture(scope="module")
def mlp_int8(damaged_mlp, tmp_path_factory):
    _, model_path, ds, amax = damaged_mlp
    out = tmp_path_factory.mktemp("qdqsens") / "mlp.int8.onnx"
    Q.write_qdq_model(model_path, amax, out, Q.QuantizeOptions(shift_nonnegative=False))
    return model_path, out, ds


def _float_weights(model: onnx.ModelProto, fp32_path) -> onnx.ModelProto:
    """The same Q/DQ model in the other weight layout (ModelOpt's with fp32 weights): each int8 weight behind a lone
    DequantizeLinear becomes a Quantize -> Dequantize pair on the FP32 model's float weight."""
    fp32 = {t.name: t for t in onnx.load(fp32_path).graph.initializer}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for dq in [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8")]:
        w = dq.input[0][: -len("_int8")]
        m.graph.initializer.append(fp32[w])
        axis = [a for a in dq.attribute if a.name == "axis"]
        q = helper.make_node("QuantizeLinear", [w, dq.input[1], dq.input[2]], [f"{w}_q"], name=f"{w}_Q")
        q.attribute.extend(axis)
        m.graph.node.insert(list(m.graph.node).index(dq), q)
        dq.input[0] = f"{w}_q"
    return m


def _whole(model: onnx.ModelProto, ds, output: str = "logits") -> np.ndarray:
    sess = ort_session(model, int8=True)
    return np.concatenate([sess.run([output], dict(b.feeds))[0] for b in ds.batches(16)])


def test_no_pair_kept_is_the_fp32_model_and_all_kept_is_the_model(mlp_int8):
    model_path, int8, ds = mlp_int8
    qdq = _float_weights(onnx.load(int8), model_path)
    nodes = quantized_nodes(qdq)
    assert set(nodes) == {"fc1", "fc2", "fc3"}
    bare = keep_only_pairs(qdq, ())
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in bare.graph.node)
    np.testing.assert_array_equal(_whole(bare, ds), _whole(onnx.load(model_path), ds))
    np.testing.assert_array_equal(_whole(keep_only_pairs(qdq, nodes), ds), _whole(qdq, ds))


def test_a_lone_dequantize_on_int8_weights_reads_the_dequantized_weight(mlp_int8):
    _, int8, _ = mlp_int8
    stored = onnx.load(int8)  # quantpipe stores int8 weights behind a lone DequantizeLinear
    assert sum(n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8") for n in stored.graph.node) == 3
    bare = keep_only_pairs(stored, ())
    inits = {t.name: numpy_helper.to_array(t) for t in stored.graph.initializer}
    for dq in (n for n in stored.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits):
        got = next(numpy_helper.to_array(t) for t in bare.graph.initializer if t.name == f"{dq.output[0]}__qp_float")
        q, s, z = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
        expect = (q.astype(np.float32) - z.astype(np.float32)) * s  # MatMul weights: per output column (axis 1)
        np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("layout", ["int8_weights", "float_weights"])
def test_the_damaged_layer_ranks_first_and_each_value_is_its_one_layer_model(mlp_int8, tmp_path, layout):
    model_path, int8, ds = mlp_int8
    qdq = onnx.load(int8)
    if layout == "float_weights":
        qdq = _float_weights(qdq, model_path)
    path = tmp_path / "foreign.onnx"
    onnx.save(qdq, path)
    rows = qdq_layer_sensitivity(model_path, path, ds, output="logits", batch_size=16)
    assert [r.node for r in rows][0] == "fc2" and {r.node for r in rows} == {"fc1", "fc2", "fc3"}
    assert [r.output_metric for r in rows] == sorted(r.output_metric for r in rows)
    ref = _whole(onnx.load(model_path), ds)
    for r in rows:
        out = _whole(keep_only_pairs(qdq, {r.node}), ds)
        assert r.output_metric == pytest.approx(10 * np.log10(np.sum(ref.astype(np.float64) ** 2)
                                                               / np.sum((out.astype(np.float64) - ref) ** 2)), rel=1e-6)
    assert rows[0].tensor == "h2" and rows[0].sqnr_db is not None and rows[0].sqnr_db < 20


def test_cap_measures_the_lowest_accumulated_sqnr(mlp_int8):
    model_path, int8, ds = mlp_int8
    rows = qdq_layer_sensitivity(model_path, int8, ds, output="logits", one_at_a_time=1, metric="cosine")
    measured = [r for r in rows if r.output_metric is not None]
    assert len(measured) == 1 and rows[0] is measured[0] and rows[0].metric_name == "cosine"
    lowest = min((r for r in rows if r.sqnr_db is not None), key=lambda r: r.sqnr_db)
    assert measured[0].node == lowest.node
    assert [r.sqnr_db for r in rows[1:]] == sorted(r.sqnr_db for r in rows[1:])


def test_a_pair_shared_by_two_consumers_is_rewired_per_consumer():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("Relu", ["xd"], ["a"], name="a"), helper.make_node("Neg", ["xd"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])
    assert quantized_nodes(m) == ["a", "b"]
    kept = keep_only_pairs(m, {"a"})
    reads = {n.name: list(n.input) for n in kept.graph.node}
    assert reads["a"] == ["xd"] and reads["b"] == ["x"] and "dq" in reads and "q" in reads
