"""The accuracy-driven fallback on a tiny MLP built in code (`damaged_mlp`: fc2 is the damaged layer).

The fixture's samples are opened here as calibration data: the fallback chooses, so it refuses evaluation data."""

from __future__ import annotations

import onnx
import pytest

from quantpipe.artifacts import FallbackReport
from quantpipe.data import open_dataset
from quantpipe.errors import ConfigError
from quantpipe.fallback import accuracy_fallback
from quantpipe.model import tensor_info


def _open(d, model_path, *, role: str = "calibration", labels: str | None = None):
    model = onnx.load(model_path)
    return open_dataset(d / "eval.npz", [tensor_info(i) for i in model.graph.input], labels_key=labels, role=role)


@pytest.fixture(scope="module")
def calib_mlp(damaged_mlp):
    """`damaged_mlp` with its samples opened as calibration data."""
    d, model_path, _, amax = damaged_mlp
    return d, model_path, _open(d, model_path), amax


def test_fallback_meets_budget_and_reports_steps(calib_mlp, tmp_path):
    _, model_path, ds, amax = calib_mlp
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


def test_impossible_budget_is_reported_not_hidden(calib_mlp, caplog):
    _, model_path, ds, amax = calib_mlp
    with caplog.at_level("WARNING", logger="quantpipe"):
        rep, fb = accuracy_fallback(model_path, amax, ds, metric="cosine", target=0.99999999, output="logits",
                                    max_layers=1, batch_size=16)
    assert not fb.met and len(fb.steps) == 1
    assert any("NOT met" in w for w in rep.warnings)
    # Said at WARNING level too, so the CLI and the report's warnings carry it (it was in report.md's fallback
    # section alone, under a passing gate: found probing).
    assert "the accuracy fallback did not meet its budget on the calibration data" in caplog.text
    assert "max_layers=1 reached" in caplog.text and "Raise build.fallback.max_layers" in caplog.text


def test_already_met_budget_keeps_everything_quantized(calib_mlp):
    _, model_path, ds, amax = calib_mlp
    _, fb = accuracy_fallback(model_path, amax, ds, metric="top1_agreement", target=0.0, output="logits")
    assert fb.met and fb.steps == () and fb.final == fb.initial


def test_top1_drop_uses_labels_and_needs_them(calib_mlp):
    d, model_path, unlabeled, amax = calib_mlp
    labeled = _open(d, model_path, role="validation", labels="label")
    _, fb = accuracy_fallback(model_path, amax, labeled, metric="top1_drop", target=1.0, output="logits")
    assert fb.met and -1.0 <= fb.initial <= 1.0  # a drop of at most 100% always holds
    with pytest.raises(ConfigError, match=r"labels.*data\.validation"):
        accuracy_fallback(model_path, amax, unlabeled, metric="top1_drop", target=0.01, output="logits")


def test_fallback_records_the_data_it_chose_on(calib_mlp):
    d, model_path, ds, amax = calib_mlp
    _, fb = accuracy_fallback(model_path, amax, ds, metric="cosine", target=0.999, output="logits", batch_size=16)
    assert (fb.chosen_on, fb.chosen_samples) == ("calibration", ds.num_samples)
    _, fb = accuracy_fallback(model_path, amax, _open(d, model_path, role="validation"), metric="cosine",
                              target=0.999, output="logits", batch_size=16, max_samples=20)
    assert (fb.chosen_on, fb.chosen_samples) == ("validation", 20)


def test_fallback_refuses_the_evaluation_data(damaged_mlp):
    """The gate judges the evaluation data; the fallback must never choose on it."""
    _, model_path, evaluation, amax = damaged_mlp
    assert evaluation.role == "evaluation"
    with pytest.raises(ConfigError, match="evaluation data.*data\\.validation"):
        accuracy_fallback(model_path, amax, evaluation, metric="cosine", target=0.999, output="logits")


def test_bad_metric_name(calib_mlp):
    _, model_path, ds, amax = calib_mlp
    with pytest.raises(ConfigError):
        accuracy_fallback(model_path, amax, ds, metric="accuracy", target=0.9)  # type: ignore[arg-type]


def test_fallback_looks_past_the_ranked_candidates_when_none_moves_the_metric(calib_mlp):
    from quantpipe.artifacts import LayerSensitivity

    _, model_path, ds, amax = calib_mlp
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


def test_fallback_stops_at_max_evaluations(calib_mlp):
    """The candidates of a step are judged together, but never more than max_evaluations of them."""
    _, model_path, ds, amax = calib_mlp
    rep, fb = accuracy_fallback(model_path, amax, ds, metric="cosine", target=0.999999999, output="logits",
                                batch_size=16, max_evaluations=3)
    assert not fb.met and fb.steps == ()
    assert any("max_evaluations ran out" in w for w in rep.warnings)
    rep, fb = accuracy_fallback(model_path, amax, ds, metric="cosine", target=0.999999999, output="logits",
                                batch_size=16, max_evaluations=4)
    assert [s.node for s in fb.steps][:1] == ["fc2"]  # a budget that covers the first step keeps its best layer


def test_box_agreement_is_a_fallback_budget(calib_mlp, tmp_path):
    """A detector is judged by its boxes: the damaged MLP's logits read as a one-row map (Reshape to [N, 1, C]),
    thresholded, its connected runs the boxes; keeping the damaged layer in float brings them back."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from quantpipe.taskmetrics import TaskSpec

    _, model_path, ds, amax = calib_mlp
    m = onnx.load(model_path)
    m.graph.initializer.append(numpy_helper.from_array(np.array([0, 1, -1], dtype=np.int64), "map_shape"))
    m.graph.node.append(helper.make_node("Reshape", ["logits", "map_shape"], ["map"], name="to_map"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, "C"]))
    path = tmp_path / "map.onnx"
    onnx.save(m, path)
    task = TaskSpec(task="dense", threshold=0.0, min_box_side=1)  # a one-row map: every box is 1 pixel high
    _, fb = accuracy_fallback(path, amax, ds, metric="box_agreement", target=0.99, output="map",
                              out_path=tmp_path / "fb.onnx", batch_size=16, task=task)
    assert fb.metric == "box_agreement"
    assert fb.initial < 0.99 <= fb.final and fb.met
    assert "fc2" in [s.node for s in fb.steps]


def test_a_budget_not_met_keeps_the_layers_up_to_its_best_step():
    # PP-OCRv3 rec (found probing): 0.875 -> 0.891 -> 0.922 -> 0.9375 -> 0.922 ... 0.922 after ten steps kept for
    # their margin; the model written had all ten layers in float and less than the fourth step had reached.
    from quantpipe.fallback import best_prefix

    walk = [0.875, 0.891, 0.922, 0.9375, 0.922, 0.922, 0.906, 0.922, 0.922, 0.922, 0.922]
    assert best_prefix({k: (v, 0.0) for k, v in enumerate(walk)}) == 3
    assert best_prefix({0: (0.9, -2.0), 1: (0.9, -1.0), 2: (0.9, -1.0)}) == 1  # the margin, then the fewest layers
    assert best_prefix({0: (0.5, 0.0)}) == 0


def test_a_top1_budget_on_one_value_per_sample_is_refused(tmp_path):
    # An argmax over one column is always 0: "met, 0 of 26 layers kept" on a per-character sigmoid (found probing).
    import numpy as np
    from onnx import helper, numpy_helper

    from quantpipe.data import open_dataset
    from quantpipe.errors import ConfigError
    from quantpipe.model import tensor_info
    from tests.conftest import float_model

    rng = np.random.default_rng(0)
    model = float_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                        [numpy_helper.from_array(rng.normal(size=(4, 1)).astype(np.float32), "w")],
                        {"x": ["n", 4]}, {"y": ["n", 1]})
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 4)).astype(np.float32))
    ds = open_dataset(tmp_path / "c.npz", [tensor_info(i) for i in model.graph.input], role="calibration")
    with pytest.raises(ConfigError, match=r"top1_agreement needs class scores of 2 classes or more.*\[16, 1\]"):
        accuracy_fallback(path, {"x": 3.0, "y": 3.0}, ds, metric="top1_agreement", target=0.99, output="y")


@pytest.mark.parametrize(("fallback", "rules", "said"), [
    ("{metric: top1_agreement, min: 0.99}", "[]", "build.fallback.metric is top1_agreement, which needs class scores"),
    # A gate rule could never be measured, and said so only after the whole run (found probing, a speech-quality score).
    ("null", "[{variant: ort-int8, metric: top1_agreement, min: 0.9}, {variant: ort-int8, metric: sqnr_db, min: 20}]",
     "gate rule(s) ort-int8 top1_agreement read class scores, but model.output 'y' has shape [1, 1]"),
])
def test_top1_on_one_value_per_sample_is_refused_at_load(tmp_path, capsys, fallback, rules, said):
    import numpy as np
    from onnx import helper, numpy_helper

    from quantpipe.cli import main
    from tests.conftest import float_model, task_pipeline

    rng = np.random.default_rng(0)
    model = float_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                        [numpy_helper.from_array(rng.normal(size=(4, 1)).astype(np.float32), "w")],
                        {"x": ["n", 4]}, {"y": ["n", 1]})
    (tmp_path / "one.onnx").write_bytes(model.SerializeToString())
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(size=(16, 4)).astype(np.float32))
    path = task_pipeline(tmp_path, "one", "metrics: [sqnr_db, top1_agreement]", fallback, rules)
    assert main(["run", str(path), "-q", "--workers", "1"]) == 2
    assert said in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "reports" / ".work").exists() or not list((tmp_path / "reports" / ".work").rglob("*.cache"))


def _front_model(tmp_path):
    """x -> fa -> fb (linear: the front end) -> Relu -> fc; the front end's two inputs get badly clipped ranges, so
    INT8 breaks it unless both stay in float (basic-pitch's CQT Convs, in small)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from quantpipe.onnxgraph import expose_outputs
    from tests.conftest import float_model

    rng = np.random.default_rng(5)
    w = {k: numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k)
         for k, s in (("wa", (8, 8)), ("wb", (8, 8)), ("wc", (8, 4)))}
    model = float_model([helper.make_node("MatMul", ["x", "wa"], ["a"], name="fa"),
                         helper.make_node("MatMul", ["a", "wb"], ["b"], name="fb"),
                         helper.make_node("Relu", ["b"], ["r"], name="relu"),
                         helper.make_node("MatMul", ["r", "wc"], ["y"], name="fc")],
                        list(w.values()), {"x": ["n", 8]}, {"y": ["n", 4]})
    path = tmp_path / "front.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.normal(size=(32, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    a, r = ort.InferenceSession(expose_outputs(model, ["a", "r"]).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(["a", "r"], {"x": x})
    amax = {"x": 0.05 * float(np.abs(x).max()), "a": 0.05 * float(np.abs(a).max()), "r": float(r.max())}
    ds = open_dataset(tmp_path / "c.npz", [tensor_info(i) for i in model.graph.input], role="calibration")
    return path, ds, amax


def test_a_linear_front_end_broken_only_together_is_kept_in_one_step(tmp_path, caplog):
    from quantpipe.onnxgraph import linear_front_end

    path, ds, amax = _front_model(tmp_path)
    assert linear_front_end(onnx.load(path)) == {"fa", "fb"}
    with caplog.at_level("INFO", logger="quantpipe"):
        _, fb = accuracy_fallback(path, amax, ds, metric="cosine", target=0.999, output="y", batch_size=16)
    assert fb.met and sorted(s.node for s in fb.steps) == ["fa", "fb"]
    assert [s.same_step for s in fb.steps] == [False, True]
    assert fb.steps[1].metric_before == fb.steps[1].metric_after == fb.steps[0].metric_after == fb.final
    assert "keeping the linear front end in float (2 layers" in caplog.text
    # Where it does not fit max_layers, the layers are tried one at a time, as before.
    _, fb = accuracy_fallback(path, amax, ds, metric="cosine", target=0.999, output="y", batch_size=16, max_layers=1)
    assert not fb.met and len(fb.steps) == 1 and not fb.steps[0].same_step
