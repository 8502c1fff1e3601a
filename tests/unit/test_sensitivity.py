"""Per-layer sensitivity and the accuracy-driven fallback on a tiny MLP built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.artifacts import FallbackReport
from quantpipe.data import open_dataset
from quantpipe.errors import ConfigError
from quantpipe.fallback import accuracy_fallback
from quantpipe.model import tensor_info
from quantpipe.onnxgraph import expose_outputs
from quantpipe.sensitivity import layer_sensitivity

RNG = np.random.default_rng(2)
N = 48


def _mlp(path: Path) -> Path:
    """x[N,16] -> MatMul fc1 -> Relu -> MatMul fc2 -> Relu -> MatMul fc3 -> logits[N,10]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="a1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"], name="a2"),
        helper.make_node("MatMul", ["r2", "w3"], ["logits"], name="fc3"),
    ]
    inits = [numpy_helper.from_array((RNG.normal(size=s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 32)), ("w3", (32, 10)))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sens")
    model_path = _mlp(d / "mlp.onnx")
    x = RNG.normal(size=(N, 16)).astype(np.float32)
    np.savez(d / "eval.npz", x=x, label=np.zeros(N, dtype=np.int64))
    model = onnx.load(model_path)
    ds = open_dataset(d / "eval.npz", [tensor_info(i) for i in model.graph.input], role="evaluation")
    sess = ort.InferenceSession(expose_outputs(model, ["r1", "r2"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    r1, r2 = sess.run(["r1", "r2"], {"x": x})
    # fc2's input gets a badly clipped range (as from a bad calibration): it must come out as the worst layer.
    amax = {"x": float(np.abs(x).max()), "r1": 0.1 * float(r1.max()), "r2": float(r2.max())}
    return d, model_path, ds, amax


def test_sensitivity_ranks_the_damaged_layer_first(setup):
    _, model_path, ds, amax = setup
    rows = layer_sensitivity(model_path, None, amax, ds, output="logits", batch_size=16)
    assert [r.node for r in rows][0] == "fc2"
    assert {r.node for r in rows} == {"fc1", "fc2", "fc3"}
    assert all(r.output_metric is not None and r.metric_name == "sqnr_db" for r in rows)
    assert [r.output_metric for r in rows] == sorted(r.output_metric for r in rows)
    assert rows[0].tensor == "h2" and rows[0].sqnr_db is not None and rows[0].sqnr_db < 20


def test_sensitivity_cap_and_written_model(setup, tmp_path):
    _, model_path, ds, amax = setup
    int8 = tmp_path / "mlp.int8.onnx"
    Q.write_qdq_model(model_path, amax, int8)
    rows = layer_sensitivity(model_path, int8, amax, ds, output="logits", one_at_a_time=1, max_samples=16)
    measured = [r for r in rows if r.output_metric is not None]
    # The cap measures the layer that adds the most noise on top of its input's: the damaged one.
    assert len(measured) == 1 and rows[0] is measured[0] and rows[0].node == "fc2"
    assert {r.node for r in rows[1:]} == {"fc1", "fc3"} and all(r.output_metric is None for r in rows[1:])


def test_fallback_meets_budget_and_reports_steps(setup, tmp_path):
    _, model_path, ds, amax = setup
    out = tmp_path / "fb.onnx"
    rep, fb = accuracy_fallback(model_path, amax, ds, metric="cosine", target=0.999, output="logits", out_path=out,
                                batch_size=16, keep_in="fp16")
    assert isinstance(fb, FallbackReport)
    assert fb.met and fb.final >= 0.999 > fb.initial
    assert fb.num_quantizable == 3
    assert [s.node for s in fb.steps][0] == "fc2" and fb.steps[0].kept_in == "fp16"
    assert fb.steps[-1].metric_after == pytest.approx(fb.final)
    assert fb.steps[0].metric_before == pytest.approx(fb.initial)
    assert "fc2" not in rep.quantized_names and "fc2" in {f.name for f in rep.kept_float}
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_impossible_budget_is_reported_not_hidden(setup):
    _, model_path, ds, amax = setup
    rep, fb = accuracy_fallback(model_path, amax, ds, metric="cosine", target=0.99999999, output="logits",
                                max_layers=1, batch_size=16)
    assert not fb.met and len(fb.steps) == 1
    assert any("NOT met" in w for w in rep.warnings)


def test_already_met_budget_keeps_everything_quantized(setup):
    _, model_path, ds, amax = setup
    _, fb = accuracy_fallback(model_path, amax, ds, metric="top1_agreement", target=0.0, output="logits")
    assert fb.met and fb.steps == () and fb.final == fb.initial


def test_top1_drop_uses_labels_and_needs_them(setup, tmp_path):
    d, model_path, unlabeled, amax = setup
    model = onnx.load(model_path)
    labeled = open_dataset(d / "eval.npz", [tensor_info(i) for i in model.graph.input], labels_key="label",
                           role="evaluation")
    _, fb = accuracy_fallback(model_path, amax, labeled, metric="top1_drop", target=1.0, output="logits")
    assert fb.met and -1.0 <= fb.initial <= 1.0  # a drop of at most 100% always holds
    with pytest.raises(ConfigError, match="labels"):
        accuracy_fallback(model_path, amax, unlabeled, metric="top1_drop", target=0.01, output="logits")


def test_bad_metric_name(setup):
    _, model_path, ds, amax = setup
    with pytest.raises(ConfigError):
        accuracy_fallback(model_path, amax, ds, metric="accuracy", target=0.9)  # type: ignore[arg-type]


def test_sensitivity_of_a_fallback_model_lists_only_its_quantized_layers(setup, tmp_path):
    _, model_path, ds, amax = setup
    int8 = tmp_path / "partial.int8.onnx"
    Q.write_qdq_model(model_path, amax, int8, Q.QuantizeOptions(keep_float_nodes=frozenset({"fc2"})))
    rows = layer_sensitivity(model_path, int8, amax, ds, output="logits", one_at_a_time=False)
    assert {r.node for r in rows} == {"fc1", "fc3"} and all(r.output_metric is None for r in rows)


def test_sensitivity_with_smoothed_inputs(setup):
    _, model_path, ds, amax = setup
    # Statistics with one outlier channel make the quantizer smooth fc2's input (a Mul the FP32 model lacks).
    absmax = np.ones(32)
    absmax[0] = 50.0
    stats = {"r1": Q.ChannelStats("r1", -1, absmax, np.zeros(32), N)}
    rows = layer_sensitivity(model_path, None, amax, ds, output="logits", one_at_a_time=1,
                              options=Q.QuantizeOptions(channel_stats=stats))
    assert {r.node for r in rows} == {"fc1", "fc2", "fc3"}
    assert all(r.sqnr_db is not None for r in rows)


def test_fallback_looks_past_the_ranked_candidates_when_none_moves_the_metric(setup):
    from quantpipe.artifacts import LayerSensitivity

    _, model_path, ds, amax = setup
    # A misleading ranking: the damaged layer last, and only one candidate tried per step.
    ranking = [LayerSensitivity(node=n, op_type="MatMul", tensor="", sqnr_db=None, output_metric=None,
                                metric_name="sqnr_db") for n in ("fc1", "fc3", "fc2")]
    chosen: list[str] = []
    _, fb = accuracy_fallback(model_path, amax, ds, metric="top1_agreement", target=0.99, output="logits",
                              batch_size=16, sensitivity=ranking, candidates_per_step=1,
                              on_step=lambda name, value: chosen.append(name))
    assert fb.initial < 0.99  # the damaged fc2 flips some samples
    assert chosen[0] == "fc2"  # fc1 alone moved nothing, so every layer was tried before keeping one
    assert fb.met and [s.node for s in fb.steps] == ["fc2"]
