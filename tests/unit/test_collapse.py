"""Loud on collapse: a crafted INT8 collapse is said first, with the worst layers and the YAML that fixes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from quantpipe.artifacts import RunResults
from quantpipe.collapse import find_collapse
from quantpipe.config import CollapseConfig
from quantpipe.console import collapse_lines
from quantpipe.report import write_report
from tests.report_data import synthetic_results


def _collapsed(tmp: Path) -> RunResults:
    results = synthetic_results(tmp)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 2.8, "top1_agreement": 0.31})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    results = dataclasses.replace(results, evaluations=evals, fallback=None)
    return dataclasses.replace(results, collapse=find_collapse(results, CollapseConfig()))


def test_healthy_int8_is_not_flagged(tmp_path: Path) -> None:
    assert find_collapse(synthetic_results(tmp_path), CollapseConfig()) == ()


def test_collapse_names_problem_cause_and_fix(tmp_path: Path) -> None:
    (c,) = _collapsed(tmp_path).collapse
    assert c.variant == "ort-int8"
    assert c.problems == ("output SQNR 2.80 dB against FP32 (collapse below 10 dB)",
                          "top1_agreement 0.310 (collapse below 0.5)")
    assert c.cause.startswith("the most sensitive layers (per-layer sensitivity, worst first): /conv1/Conv (Conv;")
    # Dense convolutions among the worst: no depthwise rewrite is named (it was, for any Conv); the calibration
    # data's coverage, always.
    assert "equalize_depthwise" not in c.cause and "add such samples" in c.cause
    # A depthwise one among the worst: it is named, with the rewrite.
    results = _collapsed(tmp_path)
    dw = (dataclasses.replace(results.sensitivity[0], depthwise=True), *results.sensitivity[1:])
    (d,) = find_collapse(dataclasses.replace(results, sensitivity=dw), CollapseConfig())
    assert (f"{dw[0].node} is a depthwise convolution (MobileNet / PicoDet-style blocks)" in d.cause
            and "build.quantize.equalize_depthwise: true" in d.cause)
    # ... unless the build equalized them already (SLANet, found probing: advice for what was done)
    variants = tuple(dataclasses.replace(v, details={"quantize": {"equalized_depthwise": True}})
                     if v.name == "ort-int8" else v for v in results.variants)
    (q,) = find_collapse(dataclasses.replace(results, sensitivity=dw, variants=variants), CollapseConfig())
    assert "equalize_depthwise" not in q.cause
    fix = yaml.safe_load(c.fix_yaml)
    assert fix == {"build": {"fallback": {"metric": "top1_agreement", "min": 0.99, "max_layers": 1}}}
    # limits come from the config: a looser SQNR limit leaves only the agreement
    (loose,) = find_collapse(_collapsed(tmp_path), CollapseConfig(min_sqnr_db=1.0))
    assert loose.problems == ("top1_agreement 0.310 (collapse below 0.5)",)


def test_without_sensitivity_the_cause_says_how_to_get_it(tmp_path: Path) -> None:
    results = dataclasses.replace(_collapsed(tmp_path), sensitivity=())
    (c,) = find_collapse(results, CollapseConfig())
    assert "evaluate.sensitivity.enabled: true" in c.cause
    assert "max_layers" not in c.fix_yaml  # no layer count known


def test_reports_say_it_before_the_tables(tmp_path: Path) -> None:
    results = _collapsed(tmp_path)
    written = write_report(tmp_path / "run", results)
    for fmt, first_table in (("md", "| Variant"), ("summary", "| Variant"), ("html", "<table")):
        text = written[fmt].read_text()
        at = text.find("INT8 COLLAPSED" if fmt != "html" else "INT8 collapsed: ort-int8")
        assert 0 <= at < text.find(first_table), fmt
        assert "metric: top1_agreement" in text and "/conv1/Conv" in text, fmt


def test_cli_summary_prints_it_first(tmp_path: Path) -> None:
    lines = collapse_lines(_collapsed(tmp_path))
    console = Console(record=True, width=200)
    for line in lines:
        console.print(line)
    text = console.export_text()
    assert text.startswith("INT8 COLLAPSED: ort-int8: output SQNR 2.80 dB")
    assert "likely cause: the most sensitive layers" in text and "    metric: top1_agreement" in text
    assert collapse_lines(synthetic_results(tmp_path)) == []


def test_a_degraded_int8_is_said_first_too_as_a_warning(tmp_path: Path) -> None:
    # 10.8 dB and 0.656 agreement (a real orientation classifier): not a collapse, far from healthy; said, not hidden.
    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 10.77, "top1_agreement": 0.656})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    results = dataclasses.replace(results, evaluations=evals, fallback=None)
    (c,) = find_collapse(results, CollapseConfig())
    assert c.severity == "degraded"
    assert c.problems == ("output SQNR 10.77 dB against FP32 (degraded below 20 dB)",
                          "top1_agreement 0.656 (degraded below 0.95)")
    assert "metric: top1_agreement" in c.fix_yaml
    assert find_collapse(results, CollapseConfig(warn_sqnr_db=0, warn_agreement=0)) == ()  # warning turned off
    results = dataclasses.replace(results, collapse=(c,))
    written = write_report(tmp_path / "run", results)
    text = written["summary"].read_text()
    assert 0 <= text.find("INT8 DEGRADED: `ort-int8`") < text.find("| Variant")
    assert "INT8 degraded: ort-int8" in written["html"].read_text()
    console = Console(record=True, width=200)
    for line in collapse_lines(results):
        console.print(line)
    assert console.export_text().startswith("INT8 DEGRADED: ort-int8: output SQNR 10.77 dB")


def test_a_fallback_met_on_its_data_but_degraded_here_points_at_the_selection_data(tmp_path: Path) -> None:
    from quantpipe.artifacts import FallbackReport

    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "top1_agreement": 0.833})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    fb = FallbackReport(metric="top1_agreement", target=0.99, initial=0.89, final=1.0, met=True, num_quantizable=59,
                        steps=(), chosen_on="calibration", chosen_samples=63)
    (c,) = find_collapse(dataclasses.replace(results, evaluations=evals, fallback=fb), CollapseConfig())
    assert c.severity == "degraded" and "met its budget" in c.fix and "on the calibration data (63 samples)" in c.fix
    assert "data.validation" in c.fix and "max_layers: 6" in c.fix_yaml


def test_a_budget_that_held_on_the_evaluation_data_is_not_pasted_again(tmp_path: Path) -> None:
    # basic-pitch's note map (found probing): box_agreement 1.0 with no box on either side, map IoU 0.66; the fix
    # pasted a box_agreement budget, the fallback met it with nothing in float, and the same fix came back, saying
    # the choice "did not carry over" where the evaluation data held it too.
    from quantpipe.artifacts import FallbackReport

    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={"box_agreement": 1.0, "map_iou": 0.658, "sqnr_db": 10.8,
                                                  "cosine": 0.9527}) if e.variant == "ort-int8" else e
                  for e in results.evaluations)
    results = dataclasses.replace(results, evaluations=evals, fallback=None)
    (c,) = find_collapse(results, CollapseConfig())
    assert "metric: map_iou" in c.fix_yaml  # the measure it misses, not the first one measured
    fb = FallbackReport(metric="box_agreement", target=0.99, initial=1.0, final=1.0, met=True, num_quantizable=40,
                        steps=(), chosen_on="calibration", chosen_samples=64)
    (d,) = find_collapse(dataclasses.replace(results, fallback=fb), CollapseConfig())
    assert "on the evaluation data (1): box_agreement does not see this loss" in d.fix
    assert "did not carry over" not in d.fix and "metric: map_iou" in d.fix_yaml
    quiet = tuple(dataclasses.replace(e, metrics={**e.metrics, "map_iou": 0.99, "cosine": 0.9995})
                  if e.variant == "ort-int8" else e for e in evals)  # only the SQNR is low: not box_agreement again
    (q,) = find_collapse(dataclasses.replace(results, evaluations=quiet, fallback=fb), CollapseConfig())
    assert "metric: cosine" in q.fix_yaml


def test_a_channel_hidden_under_the_pooled_sqnr_is_said(tmp_path: Path) -> None:
    # nudenet's YOLOv8n: 30.7 dB pooled, its class-score rows at 10.7 dB under the box rows.
    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 30.7, "top1_agreement": 1.0,
                                                  "channel_sqnr_min_db": 10.7, "channel_sqnr_min_index": 4.0})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    results = dataclasses.replace(results, evaluations=evals, fallback=None)
    (c,) = find_collapse(results, CollapseConfig())
    assert c.severity == "degraded"
    assert c.problems[0].startswith("output channel 4 (axis 1) at 10.70 dB against FP32 (degraded below 20 dB), hidden")
    # Read as detections (evaluate.task: detection), the head is judged by them, not by a row's SQNR over every anchor.
    judged = tuple(dataclasses.replace(e, metrics={**e.metrics, "channel_sqnr_min_db": 6.3, "detection_agreement": 0.97})
                   if e.variant == "ort-int8" else e for e in results.evaluations)
    assert not find_collapse(dataclasses.replace(results, evaluations=judged), CollapseConfig())
    # So for any task metric that reads a map or a sequence: SLANet's table tokens (segmentation over the tokens,
    # 0.958 of its structures as FP32) had one token at -0.56 dB that never wins, and were called COLLAPSED.
    tokens = tuple(dataclasses.replace(e, metrics={**e.metrics, "channel_sqnr_min_db": -0.56, "pixel_agreement": 0.99})
                   if e.variant == "ort-int8" else e for e in results.evaluations)
    assert not find_collapse(dataclasses.replace(results, evaluations=tokens), CollapseConfig())


def test_an_int8_output_equal_to_fp32_is_said_not_measured(tmp_path: Path) -> None:
    # arabic_name_romanizer's encoder (found probing): its judged output comes from a GRU, which stays in float; the
    # one quantized Gemm feeds another output, so INT8 "scored" cosine 1.0 and no SQNR, said by nothing.
    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": None, "max_abs_error": 0.0,
                                                  "top1_agreement": 1.0, "identical_to_fp32": 1.0})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    model = dataclasses.replace(results.model, op_counts={**results.model.op_counts, "GRU": 2})
    results = dataclasses.replace(results, evaluations=evals, model=model)
    (c,) = find_collapse(results, CollapseConfig())
    assert c.severity == "unmeasured" and c.variant == "ort-int8"
    assert c.problems[0].startswith("its output equals FP32's bit for bit on all") and "2 GRU" in c.cause
    results = dataclasses.replace(results, collapse=(c,))
    written = write_report(tmp_path / "run", results)
    assert "INT8 NOT MEASURED: `ort-int8`" in written["md"].read_text()
    assert "INT8 NOT MEASURED: `ort-int8`" in written["summary"].read_text()
    assert "INT8 not measured: ort-int8" in written["html"].read_text()
    console = Console(record=True, width=200)
    for line in collapse_lines(results):
        console.print(line)
    assert "INT8 NOT MEASURED: ort-int8" in console.export_text()


def test_an_identical_label_output_or_one_without_the_key_is_not_said_not_measured(tmp_path: Path) -> None:
    # An int64 label output (ArgMax after INT8 layers) equals FP32's while its layers are quantized: evaluation sets
    # identical_to_fp32 only for float outputs, and SQNR / max_abs_error alone no longer decide (found probing).
    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": None, "max_abs_error": 0.0})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    assert find_collapse(dataclasses.replace(results, evaluations=evals), CollapseConfig()) == ()


def test_a_verdict_says_when_the_gates_rules_on_the_users_own_metrics_held(tmp_path: Path) -> None:
    # A pitch tracker (360 bins, one pitch spread over neighbours): top-1 agreement 0.688 called DEGRADED while the
    # user's hook, every frame within 50 cents of FP32, held; the verdict said nothing of it (found probing).
    from quantpipe.config import GateRule
    from quantpipe.gate import evaluate_gate

    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 11.8, "top1_agreement": 0.688,
                                                  "pitch_agree_50c": 1.0}) for e in results.evaluations)
    results = dataclasses.replace(results, evaluations=evals, fallback=None)
    for bound, said in ((0.98, True), (1.01, False)):
        gate = evaluate_gate(results, [GateRule(variant="ort-int8", metric="pitch_agree_50c", min=bound)])
        (c,) = find_collapse(dataclasses.replace(results, gate=gate), CollapseConfig())
        assert c.severity == "degraded"
        assert any(p.startswith("the gate's rules on your own metrics held (pitch_agree_50c 1 (>= 0.98))")
                   for p in c.problems) is said
        # The pasted fallback: budgeted on the user's own metric where its rule failed (it pasted `cosine 0.999`
        # beside a failed rule on a detector's F1; found probing); where it held, the fix says nothing is to mend by it.
        pasted = yaml.safe_load(c.fix_yaml)["build"]["fallback"]
        if said:
            assert pasted["metric"] == "top1_agreement" and c.fix.startswith("by your own metrics nothing is to mend")
        else:
            assert (pasted["metric"], pasted["min"]) == ("pitch_agree_50c", 1.01) and "your own metric" in c.fix
            # Not where only hooks reading every output could give it: the fallback refuses those budgets.
            (c,) = find_collapse(dataclasses.replace(results, gate=gate), CollapseConfig(), hooks_budget=False)
            assert yaml.safe_load(c.fix_yaml)["build"]["fallback"]["metric"] == "top1_agreement"
    (c,) = find_collapse(results, CollapseConfig())  # no gate rule on it: nothing to say
    assert not any("your own metrics" in p for p in c.problems)
    assert c.fix.startswith("keep the most sensitive layers")


def test_not_measured_offers_only_the_float_outputs_an_int8_layer_reaches(tmp_path: Path) -> None:
    # A GRU encoder (found probing): the advice listed memory_out | src_mask_out | hidden_out, the judged output and
    # a bool pass-through among them; only hidden_out is reached by INT8.
    from quantpipe.artifacts import TensorInfo

    results = synthetic_results(tmp_path)
    outs = (TensorInfo("memory_out", "float32", ("N", 8, 16)), TensorInfo("src_mask_out", "bool", ("N", 8)),
            TensorInfo("hidden_out", "float32", ("N", 16)))
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "identical_to_fp32": 1.0})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    variants = tuple(dataclasses.replace(v, details={"quantize": {"quantized": 1, "outputs_reached": [
        "src_mask_out", "hidden_out"]}}) if v.name == "ort-int8" else v for v in results.variants)
    results = dataclasses.replace(results, evaluations=evals, variants=variants,
                                  model=dataclasses.replace(results.model, outputs=outs))
    (c,) = find_collapse(results, CollapseConfig())
    assert c.severity == "unmeasured" and c.fix_yaml == "model:\n  output: hidden_out"
    none = tuple(dataclasses.replace(v, details={"quantize": {"quantized": 1, "outputs_reached": []}})
                 if v.name == "ort-int8" else v for v in variants)
    (c,) = find_collapse(dataclasses.replace(results, variants=none), CollapseConfig())
    assert c.fix_yaml == "" and c.fix.startswith("release this model knowing")


def test_a_fallback_that_kept_every_layer_is_said_so(tmp_path: Path) -> None:
    # 5 of 5 layers kept for a budget only FP32 met, then "nothing in this model was quantized" (found probing).
    from quantpipe.artifacts import FallbackReport, FallbackStep

    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "identical_to_fp32": 1.0})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    variants = tuple(dataclasses.replace(v, details={"quantize": {"quantized": 0}}) if v.name == "ort-int8" else v
                     for v in results.variants)
    steps = tuple(FallbackStep(node=f"n{i}", op_type="Conv", kept_in="fp16", metric_before=0.99, metric_after=1.0)
                  for i in range(5))
    fb = FallbackReport(metric="boundary_f1", target=0.999, initial=0.99, final=1.0, met=True, num_quantizable=5,
                        steps=steps, chosen_on="calibration", chosen_samples=48)
    (c,) = find_collapse(dataclasses.replace(results, evaluations=evals, variants=variants, fallback=fb),
                         CollapseConfig())
    assert c.severity == "unmeasured" and "kept every quantized layer in float (5 of 5)" in c.problems[0]
    # the same where a leftover op moves the output off FP32's bits (found probing): no INT8 layer is no INT8
    (c,) = find_collapse(dataclasses.replace(results, variants=variants, fallback=fb), CollapseConfig())
    assert c.severity == "unmeasured" and "only FP32 met" in c.cause
    assert "only FP32 met" in c.cause and c.fix.startswith("loosen the budget") and c.fix_yaml == ""


def test_a_fallback_on_the_users_own_metric_that_held_is_not_called_blind(tmp_path: Path) -> None:
    from quantpipe.artifacts import FallbackReport

    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 11.8, "top1_agreement": 0.688,
                                                  "pitch_median_cents": 0.3}) for e in results.evaluations)
    fb = FallbackReport(metric="pitch_median_cents", target=1.0, initial=3.1, final=0.2, met=True, num_quantizable=7,
                        steps=(), chosen_on="calibration", chosen_samples=64, lower_is_better=True)
    results = dataclasses.replace(results, evaluations=evals, fallback=fb)
    (c,) = find_collapse(results, CollapseConfig())
    assert "met its budget on your own metric pitch_median_cents" in c.fix and "does not see" not in c.fix
    md = write_report(tmp_path / "run", dataclasses.replace(results, collapse=(c,)))["md"].read_text()
    assert "pitch_median_cents <= 1" in md  # an upper bound is said as one


def test_the_verdict_cuts_a_converters_joined_node_names(tmp_path: Path) -> None:
    # tf2onnx joins every fused op's name with ';': three layers filled six lines of a verdict (found probing).
    results = _collapsed(tmp_path)
    joined = "model/conv2d_5/Conv2D;model/batch_normalization_5/FusedBatchNormV3;model/conv2d_5/BiasAdd/ReadVariableOp"
    sens = (dataclasses.replace(results.sensitivity[0], node=joined), *results.sensitivity[1:])
    (c,) = find_collapse(dataclasses.replace(results, sensitivity=sens), CollapseConfig())
    assert "model/conv2d_5/Conv2D… (" in c.cause and "FusedBatchNormV3" not in c.cause
    sens = (dataclasses.replace(results.sensitivity[0], node="x" * 200), *results.sensitivity[1:])
    (c,) = find_collapse(dataclasses.replace(results, sensitivity=sens), CollapseConfig())
    assert "x" * 29 + "…" + "x" * 29 + " (" in c.cause and "x" * 30 not in c.cause


@pytest.mark.parametrize(("quantizable", "kept", "pasted"), [(59, 6, "max_layers: 12   # the last run kept 6 of the 59"),
                                                             (59, 2, "max_layers: 6   # 10% of the 59"),
                                                             (2, 1, None)])
def test_a_missed_budget_never_pastes_the_cap_it_already_ran_with(tmp_path: Path, quantizable: int, kept: int,
                                                                  pasted: str | None) -> None:
    # A 2-layer front end: the fallback kept 1 and missed, and the verdict pasted "max_layers: 1" again (found probing).
    from quantpipe.artifacts import FallbackReport, FallbackStep

    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "sqnr_db": 8.0}) if e.variant == "ort-int8" else e
                  for e in results.evaluations)
    steps = tuple(FallbackStep(node=f"n{i}", op_type="Conv", kept_in="fp32", metric_before=0.5, metric_after=0.6)
                  for i in range(kept))
    fb = FallbackReport(metric="cosine", target=0.999, initial=0.5, final=0.6, met=False, num_quantizable=quantizable,
                        steps=steps, chosen_on="calibration", chosen_samples=48)
    (c,) = find_collapse(dataclasses.replace(results, evaluations=evals, fallback=fb), CollapseConfig())
    if pasted is None:
        assert c.fix_yaml == "" and c.fix.startswith("the accuracy fallback kept 1 of this model's 2 quantized layers")
        assert "Ship FP16 (or FP32) for this model" in c.fix
    else:
        assert pasted in c.fix_yaml
