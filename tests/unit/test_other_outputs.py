"""The outputs besides model.output: kept from the evaluation pass and compared with FP32's, so a head the run does
not judge cannot break unseen (a pose model's presence flags flipped on 15 of 120 samples while its landmarks were
the judged output; found probing)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quantpipe import metrics as M
from quantpipe import other_outputs as oo
from quantpipe.artifacts import EvalResult, RuleOutcome
from quantpipe.cli import main
from quantpipe.collapse import find_collapse
from quantpipe.config import CollapseConfig, GateRule
from quantpipe.gate import evaluate_gate
from tests.conftest import float_model, task_pipeline
from tests.report_data import synthetic_results


def _batches(rng: np.random.Generator, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Runner outputs of batches of `sizes`: the judged [N, 3], a state [2, N, 4] (batch on axis 1), an integer class
    [N], a per-model constant [5] (no batch axis) and a sequence (a list)."""
    return [{"y": rng.standard_normal((n, 3)).astype(np.float32),
             "state": rng.standard_normal((2, n, 4)).astype(np.float32),
             "cls": rng.integers(0, 3, n), "const": np.arange(5.0), "seq": [{"a": 1.0}] * n} for n in sizes]


def test_the_collector_keeps_each_other_output_batch_axis_first() -> None:
    rng = np.random.default_rng(0)
    outs = _batches(rng, [4, 4, 3])
    c = oo.OtherCollector("y")
    for o in outs:
        c.add(o, len(o["y"]))
    got = c.result()
    assert set(got.arrays) == {"state", "cls"}  # not the judged one
    np.testing.assert_array_equal(got.arrays["state"], np.concatenate([np.moveaxis(o["state"], 1, 0) for o in outs]))
    np.testing.assert_array_equal(got.arrays["cls"], np.concatenate([o["cls"] for o in outs]))
    assert "no axis of the batch's size" in got.skipped["const"]
    assert "not a numeric tensor" in got.skipped["seq"]


def test_shards_joined_equal_one_pass() -> None:
    outs = _batches(np.random.default_rng(1), [4, 4, 4, 2])
    whole = oo.OtherCollector("y")
    parts = [oo.OtherCollector("y"), oo.OtherCollector("y")]
    for k, o in enumerate(outs):
        whole.add(o, len(o["y"]))
        parts[k // 2].add(o, len(o["y"]))
    joined = oo.OtherArrays.concat([p.result() for p in parts])
    one = whole.result()
    assert joined.skipped == one.skipped and list(joined.arrays) == list(one.arrays)
    for name in one.arrays:
        np.testing.assert_array_equal(joined.arrays[name], one.arrays[name])


def test_outputs_beyond_the_size_limit_are_left_out_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oo, "MAX_MB", 1)
    c = oo.OtherCollector("y")
    for _ in range(3):  # 3 x 800 KB of "big": over 1 MB alone
        c.add({"y": np.zeros((2, 1)), "small": np.zeros((2, 1)), "big": np.zeros((2, 50_000))}, 2)
    got = c.result()
    assert list(got.arrays) == ["small"] and "MB over the evaluation samples" in got.skipped["big"]


def test_a_shape_that_varies_between_batches_is_not_compared() -> None:
    c = oo.OtherCollector("y")
    c.add({"y": np.zeros((2, 1)), "boxes": np.zeros((2, 7))}, 2)
    c.add({"y": np.zeros((2, 1)), "boxes": np.zeros((2, 9))}, 2)
    assert "differs between batches" in c.result().skipped["boxes"]


def test_each_output_against_fp32_and_the_worst() -> None:
    rng = np.random.default_rng(2)
    flag = 50 + rng.standard_normal((40, 1))  # a presence logit around an offset
    state = rng.standard_normal((40, 8))
    ref = oo.OtherArrays({"flag": flag, "state": state, "cls": np.arange(40) % 3})
    err = 0.3 * rng.standard_normal((40, 1))
    cls = np.arange(40) % 3
    cls[:4] = 9
    out = oo.OtherArrays({"flag": flag + err, "state": state, "cls": cls})
    found = oo.compare_others(out, ref)
    assert found["flag"]["sqnr_db"] == pytest.approx(M.sqnr_db(flag + err, flag), rel=1e-5)
    assert found["flag"]["centered_sqnr_db"] == pytest.approx(M.centered_sqnr_db(flag + err, flag), rel=1e-5)
    assert found["state"] == {"sqnr_db": None, "centered_sqnr_db": None, "max_abs_error": 0.0}
    assert found["cls"] == {"identical": pytest.approx(36 / 40)}
    # the flag is judged against its variation (about 10 dB), not against its offset of 50 (about 44 dB)
    name, db = oo.worst_db(found)
    assert name == "flag" and db == pytest.approx(found["flag"]["centered_sqnr_db"]) and db < 15
    assert not oo.all_identical(found)
    same = oo.compare_others(ref, ref)
    assert oo.worst_db(same) is None and oo.all_identical(same)
    # a reference of zeros and an output that is not: -inf, not "identical"
    zeros = oo.compare_others(oo.OtherArrays({"z": np.ones((4, 2))}), oo.OtherArrays({"z": np.zeros((4, 2))}))
    assert oo.worst_db(zeros) == ("z", -math.inf)


def _with_others(tmp_path: Path, others: dict) -> object:
    results = synthetic_results(tmp_path)
    worst = oo.worst_db(others)
    measured = {oo.OTHER_KEY: worst[1] if worst else None} if worst or oo.all_identical(others) else {}
    evals = tuple(dataclasses.replace(e, other_outputs=others, metrics={**e.metrics, **measured})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    return dataclasses.replace(results, evaluations=evals, fallback=None)


def test_the_verdict_names_an_unjudged_output_that_collapsed(tmp_path: Path) -> None:
    base = find_collapse(_with_others(tmp_path, {}), CollapseConfig())
    assert not any("does not judge" in p for c in base for p in c.problems)
    results = _with_others(tmp_path, {"flags": {"sqnr_db": 30.0, "centered_sqnr_db": 4.5, "max_abs_error": 0.9},
                                      "state": {"sqnr_db": 8.0, "centered_sqnr_db": None, "max_abs_error": 0.2},
                                      "cls": {"identical": 0.3}})
    (c,) = [c for c in find_collapse(results, CollapseConfig()) if c.variant == "ort-int8"]
    assert c.severity == "collapsed"
    assert c.problems[:3] == (
        "output 'cls', which the run does not judge, reads as FP32's on 0.300 of the samples (collapse below 0.5)",
        "output 'flags', which the run does not judge (model.output is another), at 4.50 dB against FP32's "
        "variation over the samples (collapse below 10 dB)",
        "output 'state', which the run does not judge (model.output is another), at 8.00 dB against FP32 (collapse "
        "below 10 dB)")
    # the judged output is healthy: the cause and the fix speak to the other outputs, not to model.output's layers
    assert "measure model.output alone" in c.cause and c.fix.startswith("judge it: set model.output to 'flags'")
    assert c.fix_yaml == "model:\n  output: flags"


def test_unjudged_outputs_are_held_to_the_collapse_limits_alone(tmp_path: Path) -> None:
    # A sentence encoder's token output read 11.8 dB (its padded positions 6.8, its real tokens 19.9) while the
    # judged sentence embedding held 21.2 dB: only a collapse of an output the user did not choose is said.
    quiet = _with_others(tmp_path, {"last_hidden_state": {"sqnr_db": 12.7, "centered_sqnr_db": 11.8,
                                                          "max_abs_error": 5.4}})
    assert not [c for c in find_collapse(quiet, CollapseConfig()) if c.variant == "ort-int8"]


def test_a_collapsed_head_keeps_the_judged_outputs_own_finding_and_names_three(tmp_path: Path) -> None:
    # A pose model: the flag at 2.3 dB made the verdict COLLAPSED and the landmarks' own 16.1 dB went unsaid; three
    # more heads under 10 dB were in results.json alone (found probing).
    heads = {f"head{i}": {"sqnr_db": 9.0, "centered_sqnr_db": float(i), "max_abs_error": 1.0} for i in range(5)}
    results = _with_others(tmp_path, heads)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 16.1}) if e.variant == "ort-int8" else e
                  for e in results.evaluations)
    (c,) = [c for c in find_collapse(dataclasses.replace(results, evaluations=evals), CollapseConfig())
            if c.variant == "ort-int8"]
    assert c.severity == "collapsed"
    assert c.problems[0] == "output SQNR 16.10 dB against FP32 (degraded below 20 dB)"
    assert [p.split("'")[1] for p in c.problems[1:4]] == ["head0", "head1", "head2"]
    assert c.problems[4].startswith("and 2 more of the model's outputs below the collapse limits")
    assert "build:" in c.fix_yaml  # the judged output's own fix


def _gate(results: object, **bound: float) -> RuleOutcome:
    rule = GateRule(variant="ort-int8", metric=oo.OTHER_KEY, **bound)
    (o,) = evaluate_gate(results, [rule]).outcomes  # type: ignore[arg-type]
    return o


def test_a_gate_rule_reads_the_worst_other_output(tmp_path: Path) -> None:
    bad = _with_others(tmp_path, {"flags": {"sqnr_db": 30.0, "centered_sqnr_db": 14.0, "max_abs_error": 0.2}})
    assert _gate(bad, min=20).passed is False and _gate(bad, min=20).observed == pytest.approx(14.0)
    assert _gate(bad, min=10).passed is True
    same = _with_others(tmp_path, {"flags": {"sqnr_db": None, "centered_sqnr_db": None, "max_abs_error": 0.0}})
    assert _gate(same, min=200).passed is True and "= +inf dB" in _gate(same, min=200).message
    none = _with_others(tmp_path, {})
    o = _gate(none, min=20)
    assert o.passed is False and "this model has none" in o.message


def _two_heads(tmp_path: Path) -> None:
    """x [N, 8] -> a hidden ReLU layer -> logits [N, 4] (judged) and a presence logit around 40 [N, 1] (not)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    w3 = (0.02 * rng.standard_normal((16, 1))).astype(np.float32)
    model = float_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["logits"]), helper.make_node("MatMul", ["r", "W3"], ["m"]),
         helper.make_node("Add", ["m", "B"], ["flag"])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(w3, "W3"),
         numpy_helper.from_array(np.array([40.0], np.float32), "B")],
        {"x": ["N", 8]}, {"logits": ["N", 4], "flag": ["N", 1]})
    onnx.save(model, tmp_path / "two.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((48, 8)).astype(np.float32))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_measures_the_unjudged_head_as_an_independent_check_does(tmp_path: Path, workers: int) -> None:
    import onnxruntime as ort

    _two_heads(tmp_path)
    path = task_pipeline(tmp_path, "two", "task: classification", "null",
                         f"[{{variant: ort-int8, metric: {oo.OTHER_KEY}, min: 200}}]")
    path.write_text(path.read_text().replace("model: {path: two.onnx}", "model: {path: two.onnx, output: logits}"))
    assert main(["run", str(path), "-q", "--workers", str(workers), "--run-id", f"w{workers}"]) == 1  # the rule fails
    results = json.loads((tmp_path / "reports" / f"w{workers}" / "results.json").read_text())
    (int8,) = [e for e in results["evaluations"] if e["variant"] == "ort-int8"]
    (variant,) = [v for v in results["variants"] if v["name"] == "ort-int8"]
    x = np.load(tmp_path / "eval.npz")["x"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(tmp_path / "two.onnx"), opts).run(["flag"], {"x": x})[0]
    q = ort.InferenceSession(str(tmp_path / "reports" / f"w{workers}" / variant["artifact"]), opts).run(
        ["flag"], {"x": x})[0]
    flag = int8["other_outputs"]["flag"]
    assert flag["centered_sqnr_db"] == pytest.approx(M.centered_sqnr_db(q, ref), abs=0.05)
    assert flag["sqnr_db"] == pytest.approx(M.sqnr_db(q, ref), abs=0.05)
    assert int8["metrics"][oo.OTHER_KEY] == pytest.approx(flag["centered_sqnr_db"])
    assert int8["other_outputs_skipped"] == {}
    (rule,) = results["gate"]["outcomes"]
    assert rule["metric"] == oo.OTHER_KEY and rule["passed"] is False


def test_a_rule_on_other_outputs_of_a_one_output_model_says_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _two_heads(tmp_path)
    model = onnx.load(tmp_path / "two.onnx")
    del model.graph.output[1]
    onnx.save(model, tmp_path / "two.onnx")
    path = task_pipeline(tmp_path, "two", "task: classification", "null",
                         f"[{{variant: ort-int8, metric: {oo.OTHER_KEY}, min: 20}}]")
    assert main(["run", str(path), "-q", "--workers", "1"]) == 1
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    (rule,) = results["gate"]["outcomes"]
    assert "this model has none" in rule["message"]
    assert EvalResult(variant="v", num_samples=0, metrics={}).other_outputs == {}  # older results read as none


def test_workers_collect_the_other_outputs_one_process_does(tmp_path: Path) -> None:
    from quantpipe.artifacts import Variant
    from quantpipe.data import open_dataset
    from quantpipe.evaluate import open_runner, run_outputs, sharded_outputs
    from quantpipe.execution import LocalPool
    from quantpipe.model import load_model_spec

    _two_heads(tmp_path)
    spec, _ = load_model_spec(tmp_path / "two.onnx")
    ds = open_dataset(tmp_path / "eval.npz", spec.inputs, role="evaluation")
    v = Variant("ort-fp32", "onnxruntime", "fp32", "cpu", artifact=str(tmp_path / "two.onnx"))
    one = oo.OtherCollector("logits")
    with open_runner(v, 1) as runner:
        judged = run_outputs(runner, ds, "logits", 8, others=one)
    executor = LocalPool(2)
    try:
        (got,) = sharded_outputs(executor, [v], ds, output="logits", batch_size=8, threads=1, shards=3).values()
    finally:
        executor.close()
    np.testing.assert_array_equal(got.judged, judged)
    assert list(got.others.arrays) == ["flag"] and got.others.skipped == {}
    np.testing.assert_array_equal(got.others.arrays["flag"], one.result().arrays["flag"])


def test_a_state_fed_back_is_said_to_be_measured_open_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from quantpipe.inputs import state_pairs, warn_if_fed_back
    from quantpipe.model import load_model_spec

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["input", "W"], ["output"]), helper.make_node("Tanh", ["state"], ["stateN"]),
             helper.make_node("ReduceMean", ["h0"], ["hn"], axes=[2], keepdims=1)]
    # silero VAD declares stateN with unnamed dimensions: rank, type and name pair it with state
    model = float_model(nodes, [w], {"input": ["N", 4], "state": [2, "N", 8], "h0": [1, "N", 3]},
                        {"output": ["N", 4], "stateN": [None, None, None], "hn": [1, "N", 1]})
    onnx.save(model, tmp_path / "s.onnx")
    spec, _ = load_model_spec(tmp_path / "s.onnx")
    assert state_pairs(spec) == [("state", "stateN")]  # not input -> output; not h0 -> hn, whose fixed 3 != 1
    with caplog.at_level(logging.WARNING):
        assert warn_if_fed_back(spec)
    assert "input 'state' and output 'stateN' look like a state the deployed model feeds back" in caplog.text
    assert "open loop" in caplog.text and "other_outputs_sqnr_db" in caplog.text


def test_a_token_output_is_read_at_the_positions_its_attention_mask_marks(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mask = np.ones((6, 5), bool)
    mask[:, 3:] = False  # two padded positions per sample
    ref = rng.standard_normal((6, 5, 4))
    out = ref + 0.01 * rng.standard_normal(ref.shape)
    out[~mask] += 5.0  # padding nobody reads, far off
    found = oo.compare_others(oo.OtherArrays({"tokens": out}), oo.OtherArrays({"tokens": ref}), mask)
    assert found["tokens"]["sqnr_db"] == pytest.approx(M.sqnr_db(out[mask], ref[mask]), rel=1e-5)
    assert found["tokens"]["sqnr_db"] > 30 > oo.compare_others(oo.OtherArrays({"tokens": out}),
                                                               oo.OtherArrays({"tokens": ref}))["tokens"]["sqnr_db"]
    from quantpipe.artifacts import TensorInfo
    from quantpipe.data import open_dataset

    np.savez(tmp_path / "e.npz", input_ids=np.ones((6, 5), np.int64), attention_mask=mask.astype(np.int64))
    infos = [TensorInfo("input_ids", "int64", ("N", 5)), TensorInfo("attention_mask", "int64", ("N", 5))]
    ds = open_dataset(tmp_path / "e.npz", infos, role="evaluation")
    np.testing.assert_array_equal(oo.positions_of(ds, 4), mask)
    assert oo.positions_of(open_dataset(tmp_path / "e.npz", infos[:1], role="evaluation"), 4) is None


def test_the_terminal_table_shows_the_worst_other_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from quantpipe.console import print_summary

    print_summary(_with_others(tmp_path, {}))
    assert "others" not in capsys.readouterr().out
    print_summary(_with_others(tmp_path, {"flags": {"sqnr_db": 30.0, "centered_sqnr_db": 14.25, "max_abs_error": 0.2}}))
    out = capsys.readouterr().out
    assert "others" in out and "14.2dB" in out


def test_a_state_outputs_batch_axis_comes_from_its_input_not_a_guess() -> None:
    # With a batch of 2, a state [2, N, 128] has two axes of the batch's size: the guess takes the first, the layers.
    rng = np.random.default_rng(4)
    batches = [{"y": np.zeros((2, 1)), "stateN": rng.standard_normal((2, 2, 3))} for _ in range(3)]
    guessed, known = oo.OtherCollector("y"), oo.OtherCollector("y", axes={"stateN": 1})
    for b in batches:
        guessed.add(b, 2)
        known.add(b, 2)
    want = np.concatenate([np.moveaxis(b["stateN"], 1, 0) for b in batches])
    np.testing.assert_array_equal(known.result().arrays["stateN"], want)
    assert not np.array_equal(guessed.result().arrays["stateN"], want)


def test_the_evaluate_stage_pairs_a_state_output_with_its_inputs_axis(tmp_path: Path) -> None:
    from quantpipe.config import parse_config
    from quantpipe.evaluate_stage import other_axes
    from quantpipe.inputs import load_inputs
    from tests.e2e.test_batch_axis import _stateful_model

    _stateful_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((8, 3)).astype(np.float32),
                 state=rng.standard_normal((2, 8, 4)).astype(np.float32))
    cfg = parse_config({"version": 1, "name": "s", "model": {"path": "m.onnx", "output": "y",
                                                              "inputs": {"state": {"batch_axis": 1}}},
                        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}}},
                       base_dir=tmp_path)
    assert other_axes(load_inputs(cfg)) == {"state_out": 1}


def test_an_other_output_with_nan_is_said_and_never_reads_as_identical(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    ref = oo.OtherArrays({"heat": np.ones((4, 3), np.float32)})
    out = np.ones((4, 3), np.float32)
    out[1, 2] = np.nan
    found = oo.compare_others(oo.OtherArrays({"heat": out}), ref)
    assert found["heat"]["nonfinite"] == 1 and found["heat"]["max_abs_error"] is None
    json.dumps(found, allow_nan=False)  # results.json holds no NaN
    assert oo.worst_db(found) == ("heat", -math.inf) and not oo.all_identical(found)
    with caplog.at_level(logging.WARNING):
        oo.warn_nonfinite("ort-fp16", found)
    assert "ort-fp16: output 'heat' (besides model.output) holds 1 NaN or Inf value(s)" in caplog.text
    (c,) = [c for c in find_collapse(_with_others(tmp_path, found), CollapseConfig()) if c.variant == "ort-int8"]
    assert "output 'heat', which the run does not judge, holds 1 NaN or Inf value(s)" in c.problems[0]
