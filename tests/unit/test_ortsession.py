"""ortsession: the analysis sessions' options."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from quantpipe.ortsession import ort_session


def _relu() -> object:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sessions_run_without_the_cpu_arena_and_compute_the_same():
    """The arena would keep the largest run's memory for the session's life (the range search's peak)."""
    x = np.array([[-1.0, 0.5, -0.0, 3.0]], np.float32)
    for optimize in (True, False):
        sess = ort_session(_relu(), optimize=optimize)
        assert sess.get_session_options().enable_cpu_mem_arena is False
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x, 0))


def _qdq_gemm(per_axis: bool, rng: np.random.Generator, *, weight_out: bool = False) -> object:
    """x [b, 1280] @ DQ(int8 weight [1280, 1000]) + bias: EfficientNet-Lite0's classifier's shape, where onnxruntime's
    float GEMM on a dequantized (not prepacked) weight changes its K blocking at 16 threads."""
    from onnx import numpy_helper

    k, n = 1280, 1000
    q = rng.integers(-127, 128, (k, n), dtype=np.int8)
    scale = (rng.random(n if per_axis else ()) * 0.01 + 1e-3).astype(np.float32)
    zp = rng.integers(-3, 4, scale.shape, dtype=np.int8)
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_s"),
             numpy_helper.from_array(zp, "w_zp"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], axis=1),
             helper.make_node("Gemm", ["x", "w", "b"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])]
    if weight_out:
        outs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])], outs,
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_sessions_compute_the_same_bits_at_any_thread_count():
    """Without the folded weights this model's output differs at 16 intra-op threads (1.9e-6 on EfficientNet-Lite0's
    head): the searches' numbers would depend on how many workers share a machine's cores."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1280)).astype(np.float32)
    for per_axis in (False, True):
        model = _qdq_gemm(per_axis, rng)
        outs = [ort_session(model, int8=True, optimize=False, threads=t).run(["y"], {"x": x})[0] for t in (1, 16)]
        np.testing.assert_array_equal(outs[0], outs[1])


def test_folded_weights_are_the_bits_dequantize_linear_computes():
    """A DequantizeLinear that is a graph output is not folded: onnxruntime computes it, and the folded constant of
    the same node in the same model (the Gemm's input in the folded copy) must hold exactly those bits."""
    from onnx import numpy_helper

    from quantpipe.ortsession import fold_weight_dequantize

    rng = np.random.default_rng(1)
    for per_axis in (False, True):
        model = _qdq_gemm(per_axis, rng, weight_out=True)
        x = rng.standard_normal((2, 1280)).astype(np.float32)
        computed = ort_session(model, optimize=False).run(["w"], {"x": x})[0]
        assert fold_weight_dequantize(model) is model  # its only DequantizeLinear is an output: kept
        del model.graph.output[1:]
        folded = fold_weight_dequantize(model)
        assert [n.op_type for n in folded.graph.node] == ["Gemm"]
        assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Gemm"]  # the input is left alone
        w = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.name == "w")
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, computed)


def test_exposed_integer_tensors_keep_their_type():
    """A search may expose a cut part's integer feed (PP-OCRv4 rec: a Cast to int64 feeding a Reshape's shape; the
    split search failed there with an onnxruntime type error when every exposed tensor was declared float)."""
    from quantpipe.onnxgraph import expose_outputs

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["sf"], ["si"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "si"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    exposed = expose_outputs(model, ["si", "sf", "s"])
    types = {o.name: o.type.tensor_type.elem_type for o in exposed.graph.output}
    assert types == {"y": TensorProto.FLOAT, "si": TensorProto.INT64, "sf": TensorProto.FLOAT, "s": TensorProto.INT64}
    got = ort_session(exposed, optimize=False).run(["si"], {"x": np.zeros((2, 3), np.float32)})[0]
    np.testing.assert_array_equal(got, [2, 3])


def test_weights_past_the_cap_stay_dequantize_nodes(monkeypatch):
    """Memory first: a model whose float weights would pass FOLD_MAX_BYTES is given to onnxruntime as it is."""
    from quantpipe import ortsession

    model = _qdq_gemm(True, np.random.default_rng(2))
    assert [n.op_type for n in ortsession.fold_weight_dequantize(model).graph.node] == ["Gemm"]
    monkeypatch.setattr(ortsession, "FOLD_MAX_BYTES", 4 * 1280 * 1000 - 1)
    assert ortsession.fold_weight_dequantize(model) is model
