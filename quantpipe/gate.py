"""The release gate: a pure function from a run's results and the rules in pipeline.yaml to a verdict.

Nothing here measures anything (evaluate did that) and nothing is written (the report does that).
Each rule reads one number from `RunResults`, compares it with its bounds and says, in one line,
which variant, which metric, what was observed and what was allowed.

Rules that cannot be judged fail; they never pass silently. That covers a variant that was skipped
(e.g. TensorRT not installed), a variant that is not in the run, a metric that was not measured
(top-1 without labels, latency with latency disabled, a batch size not measured), and a rule with
`baseline: true` when no baseline run was given. Bounds are inclusive.

Nothing is judged against nonsense labels: a reference whose top-1 on the labels is below chance (1 / classes)
on a set large enough to tell (`REFERENCE_MIN_SAMPLES`, and at least one sample per class) fails the gate with
its own outcome, and every rule on a label metric (top1, top5 and their drops) cannot be judged.

Values are stored raw (fractions for accuracies, ms, samples/s, MB) in results.json and junit.xml;
`format_value` is the one place that turns them into text (accuracies as percent, drops and changes
of accuracies in percentage points).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from quantpipe.artifacts import IDENTICAL_KEY, EvalResult, GateDecision, LatencyStats, RuleOutcome, RunResults, Variant
from quantpipe.configbase import did_you_mean
from quantpipe.errors import ConfigError
from quantpipe.evalconfig import LATENCY_RULE_METRICS
from quantpipe.gateconfig import GATE_METRICS, NEEDS_LABELS, TASK_OF_METRIC, GateRule
from quantpipe.other_outputs import OTHER_KEY, all_identical

__all__ = [
    "ACCURACY_METRICS",
    "LATENCY_METRICS",
    "HIGHER_IS_BETTER",
    "Observation",
    "observe",
    "judge_rule",
    "evaluate_gate",
    "check_rule_metrics",
    "hook_metrics",
    "hook_higher_is_better",
    "format_value",
    "format_bounds",
    "REFERENCE_MIN_SAMPLES",
    "implausible_reference",
]

ACCURACY_METRICS = ("top1", "top5", "top1_drop", "top5_drop", "top1_agreement", "cosine", "sqnr_db", "max_abs_error",
                    "line_agreement", "cer", "line_accuracy", "label_cer", "line_accuracy_drop", "map_iou", "map_iou_min",
                    "box_agreement", "pixel_agreement", "miou", "detection_agreement", "mae", "centered_sqnr_db",
                    "rank_correlation", "label_mae", "label_mae_increase", OTHER_KEY)
"""Metrics that come from EvalResult.metrics (batch-size independent)."""
LATENCY_METRICS = LATENCY_RULE_METRICS
"""Metrics read at one batch size."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "top1": True,
    "top5": True,
    "top1_drop": False,
    "top5_drop": False,
    "top1_agreement": True,
    "cosine": True,
    "sqnr_db": True,
    "max_abs_error": False,
    "line_agreement": True,
    "cer": False,
    "line_accuracy": True,
    "label_cer": False,
    "line_accuracy_drop": False,
    "map_iou": True,
    "map_iou_min": True,
    "box_agreement": True,
    "pixel_agreement": True,
    "miou": True,
    "detection_agreement": True,
    "mae": False,
    "centered_sqnr_db": True,
    OTHER_KEY: True,
    "rank_correlation": True,
    "label_mae": False,
    "label_mae_increase": False,
    "latency_ms": False,
    "latency_p99_ms": False,
    "throughput": True,
    "speedup": True,
    "size_mb": False,
}
"""Which direction is an improvement (baseline comparison flags the other direction). A hook's metric is not
listed: it is taken as higher-is-better."""

LABEL_METRICS = ("top1", "top5", "top1_drop", "top5_drop")
"""Metrics computed against the labels (meaningless when the reference shows the labels are)."""
REFERENCE_MIN_SAMPLES = 30
"""Labelled samples (and at least one per class) before a below-chance reference counts as implausible: with
fewer, even a fair model can score below chance by luck (a 70% binary classifier on 30 samples: < 2%)."""

_PERCENT = {"top1", "top5", "top1_agreement", "line_agreement", "line_accuracy", "cer", "label_cer"}
_POINTS = {"top1_drop", "top5_drop", "line_accuracy_drop"}
_DB = {"sqnr_db", "centered_sqnr_db", OTHER_KEY}
_BOUND_SLACK = 1e-9
"""Relative slack on bounds: 0.98 - 0.97 is 0.010000000000000009 in floats and must pass `max: 0.01`."""


@dataclasses.dataclass(frozen=True)
class Observation:
    """One metric of one variant as read from a run; `value` is None when it cannot be read (see `reason`)."""

    variant: str
    metric: str
    value: float | None
    reason: str | None = None
    batch_size: int | None = None
    vs: str | None = None

    @property
    def context(self) -> str:
        """' vs ort-fp32 @bs32' style suffix naming what the number was measured against."""
        parts = []
        if self.vs is not None:
            parts.append(f"vs {self.vs}")
        if self.batch_size is not None:
            parts.append(f"@bs{self.batch_size}")
        return (" " + " ".join(parts)) if parts else ""


_LABELS_HINT = (" (it needs labels that fit model.output: data.evaluation.labels, one per sample of class scores "
                "[N, classes], or one per position [N, T] with evaluate.valid_mask; the log says why labels given were "
                "not read)")


def _missing(variant: str, metric: str, reason: str, *, batch_size: int | None = None, vs: str | None = None) -> Observation:
    return Observation(variant, metric, None, reason, batch_size, vs)


def _find_variant(results: RunResults, name: str) -> Variant | None:
    return next((v for v in results.variants if v.name == name), None)


def _find_eval(results: RunResults, name: str) -> EvalResult | None:
    return next((e for e in results.evaluations if e.variant == name), None)


def _unavailable(results: RunResults, name: str) -> str | None:
    """Why variant `name` has no measurements in this run, or None when it ran and was evaluated."""
    v = _find_variant(results, name)
    if v is None:
        known = ", ".join(x.name for x in results.variants) or "none"
        return f"variant '{name}' is not in run {results.run_id} (variants: {known})"
    if v.skipped is not None:
        return f"variant {name} was skipped: {v.skipped}"
    e = _find_eval(results, name)
    if e is None:
        return f"variant {name} was not evaluated in run {results.run_id}"
    if e.skipped is not None:
        return f"variant {name} was not evaluated: {e.skipped}"
    return None


def _latency_at(e: EvalResult, batch_size: int) -> LatencyStats | None:
    return next((s for s in e.latency if s.batch_size == batch_size), None)


def _measured(e: EvalResult) -> str:
    sizes = sorted({s.batch_size for s in e.latency})
    return ", ".join(map(str, sizes)) if sizes else "none"


def _accuracy(results: RunResults, name: str, e: EvalResult, metric: str) -> Observation:
    if metric in ("top1_drop", "top5_drop", "line_accuracy_drop"):
        base = metric.removesuffix("_drop")
        ref = _find_eval(results, results.reference)
        this, that = e.metrics.get(base), (ref.metrics.get(base) if ref is not None else None)
        # Recompute from the two accuracies so the drop always matches the numbers shown beside it.
        if this is not None and that is not None:
            return Observation(name, metric, float(that) - float(this))
        stored = e.metrics.get(metric)
        if stored is not None:
            return Observation(name, metric, float(stored))
        return _missing(name, metric, f"{metric} needs {base} of both {name} and the reference {results.reference}, "
                        f"which this run did not measure{_LABELS_HINT}")
    if metric not in e.metrics:
        if metric in ("label_mae", "label_mae_increase"):
            hint = (" (it needs evaluate.task: regression and data.evaluation.labels holding each sample's target "
                    "values)")
        elif metric in NEEDS_LABELS:
            hint = _LABELS_HINT
        elif metric in TASK_OF_METRIC:
            hint = f" (it needs evaluate.task: {TASK_OF_METRIC[metric]})"
        elif metric == OTHER_KEY:
            hint = (" (it needs numeric outputs besides model.output with an axis of the batch's size: "
                    + (f"{', '.join(e.other_outputs_skipped)} were not compared, the log says why)"
                       if e.other_outputs_skipped else "this model has none)"))
        else:
            hint = (" (it needs class scores shaped [N, classes] of 2 classes or more; for a score or an estimate set "
                    "evaluate.task: regression and gate on mae or centered_sqnr_db)") if metric == "top1_agreement" else ""
        # Where the hint says why, the metric may well be in evaluate.metrics already (found probing: "it must also
        # be in evaluate.metrics" beside a config that listed it).
        return _missing(name, metric, f"{metric} was not measured for {name}"
                        + (hint if hint else "; it must be in evaluate.metrics"))
    value = e.metrics[metric]
    if value is None:
        # evaluate stores non-finite numbers as null; SQNR is +inf exactly when the outputs are identical.
        if (metric == "sqnr_db" and e.metrics.get("max_abs_error") == 0.0) or (
                metric == OTHER_KEY and all_identical(e.other_outputs)):
            return Observation(name, metric, math.inf)
        return _missing(name, metric, f"{metric} of {name} is not a finite number in this run")
    return Observation(name, metric, float(value))


def _common_batch(e: EvalResult, other: EvalResult | None) -> int | None:
    sizes = {s.batch_size for s in e.latency}
    if other is not None:
        sizes &= {s.batch_size for s in other.latency}
    return max(sizes) if sizes else None


def observe(
    results: RunResults, variant: str, metric: str, *, batch_size: int | None = None, vs: str | None = None
) -> Observation:
    """Read one gate metric of one variant (see config.GATE_METRICS for the meanings).

    Latency metrics default to the largest batch size measured (for speedup: measured by both
    variants); speedup compares with `vs`, default the run's reference.
    """
    if metric not in GATE_METRICS and metric not in _hook_metrics(results):
        return _missing(variant, metric, f"unknown metric '{metric}' (known: {', '.join(GATE_METRICS)})")
    why = _unavailable(results, variant)
    if why is not None:
        return _missing(variant, metric, why, batch_size=batch_size, vs=vs if metric == "speedup" else None)
    if metric == "size_mb":
        v = _find_variant(results, variant)
        if v is None or v.size_bytes is None:
            return _missing(variant, metric, f"the size of {variant}'s model or engine was not recorded")
        return Observation(variant, metric, v.size_bytes / 1e6)
    e = _find_eval(results, variant)
    assert e is not None  # _unavailable checked it
    if metric not in LATENCY_METRICS:
        return _accuracy(results, variant, e, metric)

    other: EvalResult | None = None
    if metric == "speedup":
        vs = vs or results.reference
        why = _unavailable(results, vs)
        if why is not None:
            return _missing(variant, metric, f"cannot compare with {vs}: {why}", batch_size=batch_size, vs=vs)
        other = _find_eval(results, vs)
    if not e.latency:
        return _missing(variant, metric, f"no latency was measured for {variant} (is evaluate.latency.enabled false?)",
                        vs=vs)
    bs = batch_size if batch_size is not None else _common_batch(e, other)
    if bs is None:
        return _missing(variant, metric, f"{variant} and {vs} have no batch size measured in common "
                        f"({_measured(e)} vs {_measured(other) if other else 'none'})", vs=vs)
    mine = _latency_at(e, bs)
    if mine is None:
        return _missing(variant, metric, f"{variant} latency was not measured at batch size {bs} "
                        f"(measured: {_measured(e)}; see evaluate.latency.batch_sizes)", batch_size=bs, vs=vs)
    if metric == "latency_ms":
        return Observation(variant, metric, mine.median_ms, batch_size=bs)
    if metric == "latency_p99_ms":
        return Observation(variant, metric, mine.p99_ms, batch_size=bs)
    if metric == "throughput":
        return Observation(variant, metric, mine.throughput, batch_size=bs)
    assert other is not None and vs is not None
    theirs = _latency_at(other, bs)
    if theirs is None:
        return _missing(variant, metric, f"{vs} latency was not measured at batch size {bs} (measured: {_measured(other)})",
                        batch_size=bs, vs=vs)
    if mine.median_ms <= 0:
        return _missing(variant, metric, f"{variant} median latency is {mine.median_ms} ms", batch_size=bs, vs=vs)
    return Observation(variant, metric, theirs.median_ms / mine.median_ms, batch_size=bs, vs=vs)


def _below_chance(results: RunResults) -> tuple[float, float, int, int] | None:
    """(top1, chance, samples, classes) of the reference when its top-1 is below chance on enough samples."""
    ref = _find_eval(results, results.reference)
    if ref is None or ref.skipped is not None or ref.num_classes is None or ref.num_classes < 2:
        return None
    top1 = ref.metrics.get("top1")
    n, classes = ref.num_samples, ref.num_classes
    chance = 1.0 / classes
    if top1 is None or n < max(REFERENCE_MIN_SAMPLES, classes) or top1 >= chance:
        return None
    return float(top1), chance, n, classes


def implausible_reference(results: RunResults) -> RuleOutcome | None:
    """A failed outcome when the reference's top-1 is below chance on enough labelled samples, else None.

    A trained FP32 model below chance means the labels do not index its output (floats, another class order,
    another output); every accuracy and drop computed against them is then noise, so nothing may pass on them.
    """
    found = _below_chance(results)
    if found is None:
        return None
    top1, chance, n, classes = found
    allowed = format_bounds("top1", chance, None)
    return RuleOutcome(
        rule=f"{results.reference} top1 above chance", variant=results.reference, metric="top1", observed=top1,
        allowed=allowed, passed=False,
        message=(f"reference {results.reference} top1 = {format_value('top1', top1)} on {n} labelled samples, below "
                 f"chance ({format_value('top1', chance)} for {classes} classes), so the labels do not index the "
                 f"model's output: check the labels array (data.evaluation.labels), its class order and model.output; "
                 f"allowed {allowed}: FAILED"),
    )


def _within(value: float, lo: float | None, hi: float | None) -> bool:
    if math.isnan(value):
        return False
    if lo is not None and value < lo - _BOUND_SLACK * max(1.0, abs(lo)):
        return False
    return not (hi is not None and value > hi + _BOUND_SLACK * max(1.0, abs(hi)))


def judge_rule(results: RunResults, rule: GateRule, baseline: RunResults | None = None) -> RuleOutcome:
    """Judge one rule; the outcome's message names variant, metric, observed and allowed values."""
    allowed = format_bounds(rule.metric, rule.min, rule.max, delta=rule.baseline)
    obs = observe(results, rule.variant, rule.metric, batch_size=rule.batch_size, vs=rule.vs)
    below = _below_chance(results) if rule.metric in LABEL_METRICS else None
    if below is not None:
        obs = dataclasses.replace(obs, value=None, reason=(
            f"the reference {results.reference} scores top1 {format_value('top1', below[0])}, below chance "
            f"({format_value('top1', below[1])}), so the labels do not index the model's output"))
    what = f"{rule.variant} {rule.metric}{obs.context}"
    value = obs.value
    if rule.baseline:
        what = f"{rule.variant} {rule.metric}{obs.context} change vs baseline"
        if baseline is None:
            obs = dataclasses.replace(obs, value=None, reason="no baseline run was given (pass --baseline "
                                      "reports/<run-id> or set report.baseline in pipeline.yaml)")
        elif value is not None:
            what += f" {baseline.run_id}"
            # The same batch size and comparison variant as this run's number, so the change is like for like.
            old = observe(baseline, rule.variant, rule.metric, batch_size=obs.batch_size, vs=obs.vs)
            if old.value is None:
                obs = dataclasses.replace(obs, value=None, reason=f"in baseline run {baseline.run_id}: {old.reason}")
            elif math.isinf(value) or math.isinf(old.value):
                obs = dataclasses.replace(obs, value=None, reason="the value is infinite in one of the runs, so it has no change")
            else:
                obs = dataclasses.replace(obs, value=value - old.value)
        value = obs.value
    if value is None:
        return RuleOutcome(
            rule=rule.describe(), variant=rule.variant, metric=rule.metric, observed=None, allowed=allowed, passed=False,
            message=f"{what} cannot be judged: {obs.reason}; allowed {allowed}: FAILED",
        )
    passed = _within(value, rule.min, rule.max)
    shown = format_value(rule.metric, value, delta=rule.baseline)
    return RuleOutcome(
        rule=rule.describe(), variant=rule.variant, metric=rule.metric,
        observed=value if math.isfinite(value) else None,  # results.json is strict JSON: no Infinity
        allowed=allowed, passed=passed,
        message=f"{what} = {shown}, allowed {allowed}: {'passed' if passed else 'FAILED'}",
    )


def _hook_metrics(results: RunResults) -> set[str]:
    """Metric names this run recorded beyond the built-in ones (returned by evaluate.metrics hooks)."""
    return {k for e in results.evaluations for k in e.metrics if k not in GATE_METRICS}


CHANNEL_METRICS = ("channel_sqnr_min_db", "channel_sqnr_min_index", "channel_sqnr_min_axis")
"""What quantpipe records beside its metrics where one output channel hides under the pooled SQNR (README)."""


def hook_metrics(results: RunResults) -> list[str]:
    """The names evaluate.metrics hooks returned in this run, sorted: the report's tables, results.csv, the terminal
    and the baseline comparison show them beside the built-in metrics."""
    return sorted(_hook_metrics(results) - {*CHANNEL_METRICS, IDENTICAL_KEY})


def hook_higher_is_better(results: RunResults, metric: str) -> bool | None:
    """Which way a hook's metric improves, as this run's gate rules bound it (only `min`: higher; only `max`: lower);
    None when no rule says (a hook's median error and its agreement read in opposite ways)."""
    bounds = {part.split(" ")[0] for o in (results.gate.outcomes if results.gate else ()) if o.metric == metric
              for part in o.allowed.split(" and ")}
    return True if bounds == {">="} else False if bounds == {"<="} else None


def check_rule_metrics(results: RunResults, rules: Sequence[GateRule]) -> None:
    """Refuse a rule on a metric that is neither built in nor recorded by a hook in this run (ConfigError).

    pipeline.yaml cannot know a hook's names before it runs; once the results exist, a typo is an error, never a
    rule that fails for a reason nobody reads.
    """
    produced = _hook_metrics(results)
    for i, rule in enumerate(rules):
        if rule.metric not in GATE_METRICS and rule.metric not in produced:
            known = sorted(produced)
            raise ConfigError(
                f"gate.rules[{i}] ({rule.variant}) names metric '{rule.metric}', which is not a quantpipe metric and "
                f"was not returned by any evaluate.metrics hook in run {results.run_id} (hooks returned: "
                f"{', '.join(known) or 'nothing'}){did_you_mean(rule.metric, [*GATE_METRICS, *known])}. Fix the name in "
                f"gate.rules, or return it from the hook.")


def evaluate_gate(results: RunResults, rules: Sequence[GateRule], baseline: RunResults | None = None) -> GateDecision:
    """Judge every rule; the gate passes only when all of them pass (no rules: it passes).

    An implausible reference (see `implausible_reference`) adds a failed outcome of its own, first. A rule on a
    metric that neither quantpipe nor a hook recorded raises ConfigError (`check_rule_metrics`).
    """
    check_rule_metrics(results, rules)
    bad_ref = implausible_reference(results)
    outcomes = ((bad_ref,) if bad_ref is not None else ()) + tuple(judge_rule(results, r, baseline) for r in rules)
    return GateDecision(passed=all(o.passed for o in outcomes), outcomes=outcomes)


def _fixed(v: float, sig: int = 4) -> str:
    """`sig` significant digits without scientific notation for everyday magnitudes (1234, 12.34, 0.1234)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    decimals = max(0, min(6, sig - 1 - math.floor(math.log10(abs(v)))))
    return f"{v:,.{decimals}f}"


def format_value(metric: str, v: float | None, *, delta: bool = False) -> str:
    """A metric's value for people: accuracies in %, their changes in percentage points, units attached.

    `delta=True` formats a difference between two runs (signed).
    """
    if v is None:
        return "n/a"
    v = float(v) + 0.0  # -0.0 -> 0.0: a zero change must not print as "-0.00"
    if math.isinf(v):
        return ("+" if v > 0 else "-") + "inf" + (" dB" if metric in _DB else "")
    sign = "+" if delta and v > 0 else ""
    if metric in _PERCENT:
        return f"{v * 100:+.2f} pt" if delta else f"{v * 100:.2f}%"
    if metric in _POINTS:
        return f"{v * 100:+.2f} pt" if delta else f"{v * 100:.2f} pt"
    if metric == "cosine":
        return f"{v:+.2e}" if delta else f"{v:.6f}"
    if metric in ("map_iou", "map_iou_min", "box_agreement", "pixel_agreement", "miou", "detection_agreement",
                  "rank_correlation"):
        return f"{v:+.4f}" if delta else f"{v:.4f}"
    if metric in _DB:
        return f"{v:{'+' if delta else ''}.2f} dB"
    if metric in ("max_abs_error", "mae", "label_mae", "label_mae_increase"):
        return f"{v:+.3g}" if delta else f"{v:.4g}"
    if metric in ("latency_ms", "latency_p99_ms"):
        return f"{sign}{_fixed(v)} ms"
    if metric == "throughput":
        return f"{sign}{v:,.0f}/s" if abs(v) >= 100 else f"{sign}{_fixed(v, 3)}/s"
    if metric == "speedup":
        return f"{v:{'+' if delta else ''}.2f}x"
    if metric == "size_mb":
        return f"{sign}{_fixed(v, 3)} MB"
    return f"{sign}{v:.4g}"


_BOUND_UNITS = {"sqnr_db": " dB", OTHER_KEY: " dB", "latency_ms": " ms", "latency_p99_ms": " ms", "throughput": "/s", "speedup": "x",
                "size_mb": " MB"}


def _bound(metric: str, v: float, delta: bool) -> str:
    """A bound as the user wrote it (no padding digits), in the metric's display unit."""
    sign = "+" if delta and v > 0 else ""
    if metric in _PERCENT:
        return f"{sign}{v * 100:.6g}{' pt' if delta else '%'}"
    if metric in _POINTS:
        return f"{sign}{v * 100:.6g} pt"
    return f"{sign}{v:.6g}{_BOUND_UNITS.get(metric, '')}"


def format_bounds(metric: str, lo: float | None, hi: float | None, *, delta: bool = False) -> str:
    """'>= 1.5x', '<= 1 pt', '>= 97% and <= 100%' (delta: bounds on a change, e.g. '>= -0.2 pt')."""
    parts = []
    if lo is not None:
        parts.append(f">= {_bound(metric, lo, delta)}")
    if hi is not None:
        parts.append(f"<= {_bound(metric, hi, delta)}")
    return " and ".join(parts) or "anything"
