"""The gate as a pure function: every metric kind, bounds, vs, baseline, and rules that cannot be judged."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from quantpipe.artifacts import EvalResult, RunResults, to_jsonable
from quantpipe.config import GATE_METRICS, GateRule
from quantpipe.errors import ConfigError
from quantpipe.gate import evaluate_gate, format_bounds, format_value, judge_rule, observe
from quantpipe.report.compare import compare_runs
from tests.report_data import synthetic_results, with_top1


@pytest.fixture(scope="module")
def results() -> RunResults:
    return synthetic_results()


def _eval(results: RunResults, name: str) -> EvalResult:
    return next(e for e in results.evaluations if e.variant == name)


def _lat(results: RunResults, name: str, bs: int):  # noqa: ANN202 - test helper
    return next(s for s in _eval(results, name).latency if s.batch_size == bs)


def rule(**kw) -> GateRule:  # noqa: ANN003 - GateRule fields
    return GateRule(**kw)


@pytest.mark.parametrize("metric", ["top1", "top5", "top1_agreement", "cosine", "sqnr_db", "max_abs_error"])
def test_accuracy_metrics_are_read_from_the_evaluation(results: RunResults, metric: str) -> None:
    expected = _eval(results, "ort-int8").metrics[metric]
    assert observe(results, "ort-int8", metric).value == pytest.approx(expected)
    assert judge_rule(results, rule(variant="ort-int8", metric=metric, min=expected)).passed
    assert not judge_rule(results, rule(variant="ort-int8", metric=metric, min=expected + 0.01)).passed
    assert judge_rule(results, rule(variant="ort-int8", metric=metric, max=expected)).passed
    assert not judge_rule(results, rule(variant="ort-int8", metric=metric, max=expected - 0.01)).passed


_TASK_ONLY = {"line_agreement": 0.75, "cer": 0.04, "line_accuracy": 0.7, "label_cer": 0.05, "map_iou": 0.91,
              "map_iou_min": 0.42,
              "box_agreement": 0.88, "pixel_agreement": 0.97, "miou": 0.9, "detection_agreement": 0.93,
              "mae": 0.012, "centered_sqnr_db": 27.5, "rank_correlation": 0.996, "label_mae": 0.31}
"""Metrics of evaluate.task ctc / dense / segmentation / detection / regression (with the values a CTC / dense run would record for ort-int8)."""


def test_every_gate_metric_is_observable(results: RunResults) -> None:
    for metric in GATE_METRICS:
        if metric in _TASK_ONLY or metric in ("line_accuracy_drop", "label_mae_increase", "other_outputs_sqnr_db"):
            continue
        obs = observe(results, "ort-int8", metric)
        assert obs.value is not None and math.isfinite(obs.value), (metric, obs.reason)


def test_task_metrics_are_observable_when_recorded(results: RunResults) -> None:
    missing = observe(results, "ort-int8", "line_agreement")
    assert missing.value is None and "it needs evaluate.task: ctc" in (missing.reason or "")
    missing = observe(results, "ort-int8", "label_mae")
    assert missing.value is None and "it needs evaluate.task: regression and data.evaluation.labels" in missing.reason
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, **_TASK_ONLY}) if e.variant == "ort-int8" else
                  dataclasses.replace(e, metrics={**e.metrics, "line_accuracy": 0.8}) if e.variant == "ort-fp32" else e
                  for e in results.evaluations)
    ctc = dataclasses.replace(results, evaluations=evals)
    for metric, value in {**_TASK_ONLY, "line_accuracy_drop": 0.8 - 0.7}.items():
        assert observe(ctc, "ort-int8", metric).value == pytest.approx(value), metric
    assert judge_rule(ctc, rule(variant="ort-int8", metric="line_agreement", min=0.7)).passed
    failed = judge_rule(ctc, rule(variant="ort-int8", metric="cer", max=0.01))
    assert not failed.passed and "cer = 4.00%" in failed.message


def test_hook_metrics_are_judged_and_unknown_names_refused(results: RunResults) -> None:
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "coco_map": 0.41}) for e in results.evaluations)
    hooked = dataclasses.replace(results, evaluations=evals)
    rules = [rule(variant="ort-int8", metric="coco_map", min=0.4)]
    assert evaluate_gate(hooked, rules).passed
    with pytest.raises(ConfigError, match=r"metric 'coco_mAP'.*hooks returned: coco_map.*did you mean 'coco_map'"):
        evaluate_gate(hooked, [rule(variant="ort-int8", metric="coco_mAP", min=0.4)])


def test_top1_drop_is_recomputed_from_the_two_top1_values(results: RunResults) -> None:
    # A stale stored top1_drop must not win over the accuracies the report shows beside it.
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "top1_drop": 0.5}) if e.variant == "ort-int8" else e
                  for e in results.evaluations)
    stale = dataclasses.replace(results, evaluations=evals)
    assert observe(stale, "ort-int8", "top1_drop").value == pytest.approx(0.98 - 0.9733)
    assert observe(stale, "ort-int8", "top5_drop").value == pytest.approx(1.0 - 0.9978)


def test_top1_drop_falls_back_to_the_stored_value_without_the_reference_top1(results: RunResults) -> None:
    evals = tuple(dataclasses.replace(e, metrics={k: v for k, v in e.metrics.items() if k != "top1"})
                  if e.variant == "ort-fp32" else e for e in results.evaluations)
    r = dataclasses.replace(results, evaluations=evals)
    assert observe(r, "ort-int8", "top1_drop").value == pytest.approx(0.98 - 0.9733)


def test_bounds_are_inclusive_despite_float_rounding(results: RunResults) -> None:
    r = with_top1(with_top1(results, "ort-fp32", 0.98), "ort-int8", 0.97)
    assert 0.98 - 0.97 > 0.01  # the float trap this guards against
    out = judge_rule(r, rule(variant="ort-int8", metric="top1_drop", max=0.01))
    assert out.passed, out.message
    assert not judge_rule(r, rule(variant="ort-int8", metric="top1_drop", max=0.0099)).passed


def test_min_and_max_together(results: RunResults) -> None:
    ok = judge_rule(results, rule(variant="ort-int8", metric="top1", min=0.97, max=0.98))
    assert ok.passed and ok.allowed == ">= 97% and <= 98%"
    assert not judge_rule(results, rule(variant="ort-int8", metric="top1", min=0.975, max=0.98)).passed


def test_latency_metrics_default_to_the_largest_batch_size(results: RunResults) -> None:
    s32 = _lat(results, "ort-int8", 32)
    assert observe(results, "ort-int8", "latency_ms").value == s32.median_ms
    assert observe(results, "ort-int8", "latency_ms").batch_size == 32
    assert observe(results, "ort-int8", "latency_p99_ms").value == s32.p99_ms
    assert observe(results, "ort-int8", "throughput").value == s32.throughput
    s1 = _lat(results, "ort-int8", 1)
    assert observe(results, "ort-int8", "latency_ms", batch_size=1).value == s1.median_ms
    out = judge_rule(results, rule(variant="ort-int8", metric="latency_ms", batch_size=1, max=s1.median_ms))
    assert out.passed and "@bs1" in out.message


def test_speedup_vs_reference_and_vs_another_variant(results: RunResults) -> None:
    expected = _lat(results, "ort-fp32", 32).median_ms / _lat(results, "ort-int8", 32).median_ms
    obs = observe(results, "ort-int8", "speedup")
    assert obs.value == pytest.approx(expected) and obs.vs == "ort-fp32" and obs.batch_size == 32
    vs16 = observe(results, "ort-int8", "speedup", vs="ort-fp16", batch_size=1)
    assert vs16.value == pytest.approx(_lat(results, "ort-fp16", 1).median_ms / _lat(results, "ort-int8", 1).median_ms)


def test_failed_rule_message_names_variant_metric_observed_and_allowed(results: RunResults) -> None:
    out = judge_rule(results, rule(variant="ort-int8", metric="speedup", vs="ort-fp32", min=100))
    assert not out.passed
    speed = observe(results, "ort-int8", "speedup").value
    assert out.message == f"ort-int8 speedup vs ort-fp32 @bs32 = {speed:.2f}x, allowed >= 100x: FAILED"
    assert out.observed == pytest.approx(speed) and out.allowed == ">= 100x"
    assert out.variant == "ort-int8" and out.metric == "speedup" and out.rule == "ort-int8 speedup vs ort-fp32 >= 100"


def test_size_mb(results: RunResults) -> None:
    assert observe(results, "ort-int8", "size_mb").value == pytest.approx(33_981 / 1e6)
    assert not judge_rule(results, rule(variant="ort-int8", metric="size_mb", max=0.03)).passed


def test_rule_on_a_skipped_variant_fails_with_the_reason(results: RunResults) -> None:
    out = judge_rule(results, rule(variant="trt-int8", metric="top1", min=0.5))
    assert not out.passed and out.observed is None
    assert "trt-int8 was skipped" in out.message and "tensorrt: not installed" in out.message
    assert out.message.endswith("FAILED")


def test_speedup_vs_a_skipped_variant_fails(results: RunResults) -> None:
    out = judge_rule(results, rule(variant="ort-int8", metric="speedup", vs="trt-fp32", min=0.1))
    assert not out.passed and "cannot compare with trt-fp32" in out.message


def test_unknown_variant_fails(results: RunResults) -> None:
    out = judge_rule(results, rule(variant="ort-int4", metric="top1", min=0.5))
    assert not out.passed and "'ort-int4' is not in run" in out.message and "ort-int8" in out.message


def test_missing_metric_fails_and_says_labels_are_needed(results: RunResults) -> None:
    evals = tuple(dataclasses.replace(e, metrics={k: v for k, v in e.metrics.items() if k not in ("top1", "top1_drop")})
                  for e in results.evaluations)
    unlabelled = dataclasses.replace(results, evaluations=evals)
    for metric in ("top1", "top1_drop"):
        out = judge_rule(unlabelled, rule(variant="ort-int8", metric=metric, max=1.0))
        assert not out.passed and "labels" in out.message, out.message


def test_unmeasured_batch_size_fails_naming_the_measured_ones(results: RunResults) -> None:
    out = judge_rule(results, rule(variant="ort-int8", metric="latency_ms", batch_size=64, max=1000))
    assert not out.passed and "batch size 64" in out.message and "measured: 1, 32" in out.message


def test_no_latency_measured_fails(results: RunResults) -> None:
    evals = tuple(dataclasses.replace(e, latency=()) for e in results.evaluations)
    r = dataclasses.replace(results, evaluations=evals)
    out = judge_rule(r, rule(variant="ort-int8", metric="throughput", min=1))
    assert not out.passed and "no latency was measured" in out.message


def test_infinite_sqnr_of_identical_outputs_passes_a_minimum(results: RunResults) -> None:
    # The reference against itself: sqnr_db is stored as null and max_abs_error is exactly 0.
    out = judge_rule(results, rule(variant="ort-fp32", metric="sqnr_db", min=40))
    assert out.passed and out.observed is None and "inf dB" in out.message
    json.dumps(to_jsonable(out), allow_nan=False)  # results.json stays strict JSON


def test_null_metric_that_is_not_an_infinite_sqnr_fails(results: RunResults) -> None:
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "cosine": None}) if e.variant == "ort-int8" else e
                  for e in results.evaluations)
    out = judge_rule(dataclasses.replace(results, evaluations=evals), rule(variant="ort-int8", metric="cosine", min=0.9))
    assert not out.passed and "not a finite number" in out.message


def test_baseline_rule_judges_the_change(results: RunResults) -> None:
    baseline = with_top1(results, "ort-int8", 0.9800)
    baseline = dataclasses.replace(baseline, run_id="release-1")
    out = judge_rule(results, rule(variant="ort-int8", metric="top1", baseline=True, min=-0.002), baseline)
    assert not out.passed
    assert out.observed == pytest.approx(0.9733 - 0.98)
    assert out.message == "ort-int8 top1 change vs baseline release-1 = -0.67 pt, allowed >= -0.2 pt: FAILED"
    assert judge_rule(results, rule(variant="ort-int8", metric="top1", baseline=True, min=-0.01), baseline).passed


def test_baseline_rule_without_a_baseline_fails(results: RunResults) -> None:
    out = judge_rule(results, rule(variant="ort-int8", metric="top1", baseline=True, min=-0.002), None)
    assert not out.passed and "no baseline run was given" in out.message and "--baseline" in out.message


def test_baseline_rule_when_the_variant_is_missing_from_the_baseline(results: RunResults) -> None:
    baseline = dataclasses.replace(results, run_id="old", variants=tuple(v for v in results.variants if v.name != "ort-int8"))
    out = judge_rule(results, rule(variant="ort-int8", metric="top1", baseline=True, min=-0.002), baseline)
    assert not out.passed and "in baseline run old" in out.message


def test_baseline_speedup_uses_the_same_batch_size(results: RunResults) -> None:
    faster = synthetic_results(int8_speed=1.25)
    out = judge_rule(faster, rule(variant="ort-int8", metric="speedup", baseline=True, min=0.1), results)
    assert out.passed and "@bs32" in out.message
    now, old = observe(faster, "ort-int8", "speedup").value, observe(results, "ort-int8", "speedup").value
    assert out.observed == pytest.approx(now - old)


def test_injected_regression_is_flagged_and_its_rule_fails(results: RunResults) -> None:
    regressed = with_top1(results, "ort-int8", 0.9600)
    comparison = compare_runs(regressed, results)
    flagged = [d for d in comparison["deltas"] if d["regressed"]]
    assert [(d["variant"], d["metric"]) for d in flagged] == [("ort-int8", "top1")]
    assert comparison["regressions"] == ["ort-int8 top1: 97.33% -> 96.00% (-1.33 pt)"]
    decision = evaluate_gate(regressed, [rule(variant="ort-int8", metric="top1", baseline=True, min=-0.002)], results)
    assert not decision.passed


def test_evaluate_gate_passes_only_when_every_rule_passes(results: RunResults) -> None:
    good = rule(variant="ort-int8", metric="top1_agreement", min=0.98)
    bad = rule(variant="ort-int8", metric="top1_agreement", min=0.999)
    assert evaluate_gate(results, [good]).passed
    decision = evaluate_gate(results, [good, bad])
    assert not decision.passed and [o.passed for o in decision.outcomes] == [True, False]
    assert evaluate_gate(results, []).passed and evaluate_gate(results, []).outcomes == ()


def test_format_value_units() -> None:
    assert format_value("top1", 0.9733) == "97.33%"
    assert format_value("top1", -0.0067, delta=True) == "-0.67 pt"
    assert format_value("top1_drop", 0.0067) == "0.67 pt"
    assert format_value("top1", -0.0, delta=True) == "+0.00 pt"  # never "-0.00"
    assert format_value("speedup", 1.5412) == "1.54x"
    assert format_value("latency_ms", 1.8962) == "1.896 ms"
    assert format_value("latency_ms", 123.456) == "123.5 ms"
    assert format_value("throughput", 16873.2) == "16,873/s"
    assert format_value("sqnr_db", 30.4) == "30.40 dB"
    assert format_value("sqnr_db", math.inf) == "+inf dB"
    assert format_value("size_mb", 0.105) == "0.105 MB"
    assert format_value("cosine", None) == "n/a"
    assert format_bounds("top1_drop", None, 0.01) == "<= 1 pt"
    assert format_bounds("top1", -0.002, None, delta=True) == ">= -0.2 pt"


# --------------------------------------------------------------------------- an implausible reference (issue 14)

def _with_reference(results: RunResults, top1: float, *, n: int = 400, classes: int | None = 10) -> RunResults:
    evals = tuple(dataclasses.replace(e, num_samples=n, num_classes=classes, metrics={**e.metrics, "top1": top1})
                  if e.variant == results.reference else e for e in results.evaluations)
    return dataclasses.replace(results, evaluations=evals)


def test_below_chance_reference_fails_the_gate_and_every_label_rule(results: RunResults) -> None:
    r = with_top1(_with_reference(results, 0.0), "ort-int8", 0.0)  # float labels: 0% everywhere, drop 0 pt
    rules = [rule(variant="ort-int8", metric="top1_drop", max=0.01), rule(variant="ort-int8", metric="top1_agreement", min=0.9)]
    d = evaluate_gate(r, rules)
    assert not d.passed
    first, drop, agree = d.outcomes
    assert not first.passed and first.variant == "ort-fp32" and first.observed == 0.0
    assert "reference ort-fp32 top1 = 0.00% on 400 labelled samples, below chance (10.00% for 10 classes)" in first.message
    assert "data.evaluation.labels" in first.message
    assert not drop.passed and "cannot be judged" in drop.message and "below chance (10.00%)" in drop.message
    assert agree.passed  # agreement with the reference's outputs does not use the labels


@pytest.mark.parametrize(
    ("top1", "n", "classes"),
    [
        (0.10, 400, 10),   # at chance: not below it
        (0.0, 29, 10),     # too few samples to tell
        (0.0, 500, 1000),  # fewer samples than classes: a fair model may miss them all
        (0.0, 400, None),  # not a classifier output
        (0.99, 400, 10),   # the bundled example
    ],
)
def test_reference_check_needs_evidence(results: RunResults, top1: float, n: int, classes: int | None) -> None:
    r = _with_reference(results, top1, n=n, classes=classes)
    d = evaluate_gate(r, [rule(variant="ort-fp32", metric="top1", min=0.0)])
    assert len(d.outcomes) == 1 and d.passed


def test_results_json_without_num_classes_still_loads(results: RunResults) -> None:
    from quantpipe.artifacts import from_jsonable

    data = to_jsonable(results)
    for e in data["evaluations"]:
        e.pop("num_classes", None)
    assert evaluate_gate(from_jsonable(RunResults, data), []).passed


def test_an_unmeasured_metric_says_why_without_contradicting_the_config(results: RunResults) -> None:
    # "it must also be in evaluate.metrics" beside a config that listed top1_agreement, on a one-column output.
    evals = tuple(dataclasses.replace(e, metrics={k: v for k, v in e.metrics.items() if k != "top1_agreement"})
                  for e in results.evaluations)
    o = observe(dataclasses.replace(results, evaluations=evals), "ort-int8", "top1_agreement")
    assert o.value is None and "class scores" in o.reason and "must be in evaluate.metrics" not in o.reason
    o = observe(dataclasses.replace(results, evaluations=evals), "ort-int8", "cosine")
    assert o.value is not None
    stripped = tuple(dataclasses.replace(e, metrics={k: v for k, v in e.metrics.items() if k != "cosine"})
                     for e in results.evaluations)
    o = observe(dataclasses.replace(results, evaluations=stripped), "ort-int8", "cosine")
    assert o.reason.endswith("cosine was not measured for ort-int8; it must be in evaluate.metrics")
