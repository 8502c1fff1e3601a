"""Per-layer sensitivity on a tiny MLP built in code (`damaged_mlp`: fc2 is the damaged layer)."""

from __future__ import annotations

import numpy as np

from quantpipe import quantize as Q
from quantpipe.sensitivity import layer_sensitivity


def test_sensitivity_ranks_the_damaged_layer_first(damaged_mlp):
    _, model_path, ds, amax = damaged_mlp
    rows = layer_sensitivity(model_path, None, amax, ds, output="logits", batch_size=16)
    assert [r.node for r in rows][0] == "fc2"
    assert {r.node for r in rows} == {"fc1", "fc2", "fc3"}
    assert all(r.output_metric is not None and r.metric_name == "sqnr_db" for r in rows)
    assert [r.output_metric for r in rows] == sorted(r.output_metric for r in rows)
    assert rows[0].tensor == "h2" and rows[0].sqnr_db is not None and rows[0].sqnr_db < 20
    # the samples it measured on; no tie-break kept where the metric orders alone; Gemms are not depthwise
    assert {(r.num_samples, r.output_sqnr_db, r.depthwise) for r in rows} == {(48, None, False)}
    # An agreement count ties layers; each row keeps the output SQNR that orders them: the same number the
    # sqnr_db metric measures for that layer alone.
    counted = layer_sensitivity(model_path, None, amax, ds, output="logits", batch_size=16, metric="top1_agreement")
    by_sqnr = {r.node: r.output_metric for r in rows}
    assert {r.node: r.output_sqnr_db for r in counted} == by_sqnr
    ties = [(a, b) for a, b in zip(counted, counted[1:], strict=False) if a.output_metric == b.output_metric]
    assert ties and all(a.output_sqnr_db <= b.output_sqnr_db for a, b in ties)


def test_sensitivity_cap_and_written_model(damaged_mlp, tmp_path):
    _, model_path, ds, amax = damaged_mlp
    int8 = tmp_path / "mlp.int8.onnx"
    Q.write_qdq_model(model_path, amax, int8)
    rows = layer_sensitivity(model_path, int8, amax, ds, output="logits", one_at_a_time=1, max_samples=16)
    measured = [r for r in rows if r.output_metric is not None]
    # The cap measures the layer that adds the most noise on top of its input's: the damaged one.
    assert len(measured) == 1 and rows[0] is measured[0] and rows[0].node == "fc2"
    assert {r.node for r in rows[1:]} == {"fc1", "fc3"} and all(r.output_metric is None for r in rows[1:])


def test_sensitivity_of_a_fallback_model_lists_only_its_quantized_layers(damaged_mlp, tmp_path):
    _, model_path, ds, amax = damaged_mlp
    int8 = tmp_path / "partial.int8.onnx"
    Q.write_qdq_model(model_path, amax, int8, Q.QuantizeOptions(keep_float_nodes=frozenset({"fc2"})))
    rows = layer_sensitivity(model_path, int8, amax, ds, output="logits", one_at_a_time=False)
    assert {r.node for r in rows} == {"fc1", "fc3"} and all(r.output_metric is None for r in rows)


def test_sensitivity_with_smoothed_inputs(damaged_mlp):
    _, model_path, ds, amax = damaged_mlp
    # Statistics with one outlier channel make the quantizer smooth fc2's input (a Mul the FP32 model lacks).
    absmax = np.ones(32)
    absmax[0] = 50.0
    stats = {"r1": Q.ChannelStats("r1", -1, absmax, np.zeros(32), ds.num_samples)}
    rows = layer_sensitivity(model_path, None, amax, ds, output="logits", one_at_a_time=1,
                              options=Q.QuantizeOptions(channel_stats=stats))
    assert {r.node for r in rows} == {"fc1", "fc2", "fc3"}
    assert all(r.sqnr_db is not None for r in rows)




def test_sensitivity_of_an_opset11_model(damaged_mlp, tmp_path):
    # The quantizer upgrades opset < 13 (DequantizeLinear's `axis`); the instrumented reference graph must too.
    import onnx

    _, model_path, ds, amax = damaged_mlp
    old = onnx.load(model_path)  # MatMul and Relu read the same at opset 11: only the declared opset changes
    old.opset_import[0].version = 11
    onnx.checker.check_model(old, full_check=True)
    onnx.save(old, tmp_path / "mlp11.onnx")
    rows = layer_sensitivity(tmp_path / "mlp11.onnx", None, amax, ds, output="logits", batch_size=16)
    assert [r.node for r in rows][0] == "fc2" and all(r.sqnr_db is not None for r in rows)


def test_accumulated_sqnr_is_the_two_models_run_apart(damaged_mlp):
    """The accumulated SQNR takes its FP32 side from the instrumented local-SQNR run: the same numbers, to the
    bit, as the FP32 model and the Q/DQ model each run on its own (the definition, computed here directly)."""
    import onnx

    from quantpipe.onnxgraph import expose_outputs
    from quantpipe.ortsession import ort_session

    _, model_path, ds, amax = damaged_mlp
    rows = layer_sensitivity(model_path, None, amax, ds, output="logits", one_at_a_time=False, batch_size=16)
    fp32 = onnx.load(str(model_path))
    qdq, _ = Q.build_qdq_model(fp32, amax)
    tensors = sorted(r.tensor for r in rows)
    a = ort_session(expose_outputs(fp32, tensors), optimize=False)
    b = ort_session(expose_outputs(qdq, tensors), optimize=False)
    sig, noise = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)
    for batch in ds.batches(16):
        for t, x, y in zip(tensors, a.run(tensors, dict(batch.feeds)), b.run(tensors, dict(batch.feeds)), strict=True):
            x64 = np.asarray(x, dtype=np.float64)
            sig[t] += float(np.sum(x64**2))
            noise[t] += float(np.sum((np.asarray(y, dtype=np.float64) - x64) ** 2))
    assert {r.tensor: r.sqnr_db for r in rows} == {t: 10.0 * np.log10(sig[t] / noise[t]) for t in tensors}


def test_a_layer_off_the_judged_outputs_path_is_said_not_measured(tmp_path):
    """MTCNN's O-Net (found probing): the other two heads' layers ranked last at "136 dB" when quantized alone, as if
    harmless, where nothing the run judged could see them. They are said off model.output's path, not measured one
    at a time, and never kept in float by the fallback (they cannot move its budget)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from quantpipe.data import open_dataset
    from quantpipe.fallback import accuracy_fallback
    from quantpipe.model import tensor_info

    rng = np.random.default_rng(3)
    w = {k: numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k)
         for k, s in (("w1", (8, 16)), ("wa", (16, 4)), ("wb", (16, 3)))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "wa"], ["a"], name="head_a"),
             helper.make_node("MatMul", ["r", "wb"], ["b"], name="head_b")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])], list(w.values()))
    model = onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "two_heads.onnx"
    onnx.save(model, path)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = open_dataset(tmp_path / "d.npz", [tensor_info(i) for i in model.graph.input])
    amax = {"x": float(np.abs(x).max()), "r": 0.2}  # a clipped range on the heads' shared input
    rows = {r.node: r for r in layer_sensitivity(path, None, amax, ds, output="a", batch_size=16)}
    assert rows["head_b"].reaches_output is False and rows["head_b"].output_metric is None
    assert rows["head_a"].reaches_output and rows["head_a"].output_metric is not None
    _, fb = accuracy_fallback(path, amax, ds, metric="cosine", target=0.999999, output="a", batch_size=16)
    assert "head_b" not in {s.node for s in fb.steps}
