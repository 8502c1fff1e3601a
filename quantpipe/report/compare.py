"""This run against a baseline run: the change of every metric, and which changes are regressions.

A regression is a change in the worse direction (config.GATE_METRICS / gate.HIGHER_IS_BETTER) by more
than a small tolerance, so one sample of noise on a small evaluation set or a few percent of timer
jitter is not flagged. The comparison is informational: only gate rules with `baseline: true` fail
a release.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from quantpipe.artifacts import RunResults
from quantpipe.gate import (
    ACCURACY_METRICS,
    HIGHER_IS_BETTER,
    format_value,
    hook_higher_is_better,
    hook_metrics,
    observe,
)

__all__ = ["TOLERANCES", "RELATIVE_METRICS", "compare_runs", "is_regression", "with_baseline"]

log = logging.getLogger(__name__)

TOLERANCES: dict[str, tuple[str, float]] = {
    "top1": ("abs", 0.001),
    "top5": ("abs", 0.001),
    "top1_drop": ("abs", 0.001),
    "top5_drop": ("abs", 0.001),
    "top1_agreement": ("abs", 0.001),
    "cosine": ("abs", 1e-4),
    "sqnr_db": ("abs", 0.5),
    "max_abs_error": ("rel", 0.10),
    "latency_ms": ("rel", 0.10),
    "latency_p99_ms": ("rel", 0.20),
    "throughput": ("rel", 0.10),
    "size_mb": ("rel", 0.01),
}
"""How much worse a metric may get before it is flagged: absolute, or relative to the baseline value."""

RELATIVE_METRICS = ("latency_ms", "latency_p99_ms", "throughput", "size_mb", "max_abs_error")
"""Metrics whose change reads best in percent of the baseline (10% slower, not +0.0036 ms)."""
_COMPARED_LATENCY = ("latency_ms", "latency_p99_ms", "throughput")


def is_regression(metric: str, old: float, new: float, higher_is_better: bool | None = None) -> bool:
    """True when `new` is worse than `old` by more than the metric's tolerance (`higher_is_better`: a hook metric's
    direction; None for a built-in metric, whose direction is known)."""
    up = HIGHER_IS_BETTER[metric] if higher_is_better is None else higher_is_better
    worse = (old - new) if up else (new - old)
    kind, tol = TOLERANCES.get(metric, ("rel", 0.0))
    limit = tol if kind == "abs" else tol * abs(old)
    return worse > limit + 1e-12


def _improvement(metric: str, old: float, new: float, higher_is_better: bool | None = None) -> bool:
    return is_regression(metric, new, old, higher_is_better)


def _machine(results: RunResults) -> str:
    env = results.environment
    gpu = env.get("gpu") or {}
    gpus = ",".join(g.get("name", "") for g in gpu.get("gpus", [])) if isinstance(gpu, dict) else ""
    return f"{env.get('processor', '')}|{env.get('cpu_count', '')}|{gpus}"


def _same_data(results: RunResults, baseline: RunResults) -> bool | None:
    """Whether both runs were judged on the same evaluation data (None where either did not record it). A baseline
    of other data (another model's run, a changed evaluation set) was compared without a word (found probing)."""
    if results.evaluation_data is None or baseline.evaluation_data is None:
        return None
    same = results.evaluation_data == baseline.evaluation_data
    if not same:
        log.warning("the baseline run %s was judged on other evaluation data than run %s: its changes compare data, "
                    "not models (and baseline gate rules with them). Compare with a run on this evaluation data.",
                    baseline.run_id, results.run_id)
    return same


def compare_runs(results: RunResults, baseline: RunResults) -> dict[str, Any]:
    """Every comparable metric of every variant in both runs: values, change, regression flag.

    Returns plain JSON (it is stored as RunResults.baseline in results.json):
    {"run_id", "created", "same_machine", "tolerances", "deltas": [{variant, metric, batch_size,
    current, baseline, delta, relative, regressed, improved, change, text}], "regressions": [text, ...]}.
    `change` is the delta for people (percent of the baseline for latency, throughput, size, error).
    """
    deltas: list[dict[str, Any]] = []
    base_names = {v.name for v in baseline.variants}
    for v in results.variants:
        if v.name not in base_names:
            continue
        now_e = next((e for e in results.evaluations if e.variant == v.name), None)
        old_e = next((e for e in baseline.evaluations if e.variant == v.name), None)
        common_bs = sorted({s.batch_size for s in (now_e.latency if now_e else ())}
                           & {s.batch_size for s in (old_e.latency if old_e else ())})
        # Drops are differences of two compared top-1 values: flagging them too would report one change twice.
        keys: list[tuple[str, int | None]] = [(m, None) for m in ACCURACY_METRICS if not m.endswith("_drop")]
        keys += [(m, None) for m in hook_metrics(results)] + [("size_mb", None)]
        keys += [(m, bs) for bs in common_bs for m in _COMPARED_LATENCY]
        for metric, bs in keys:
            now = observe(results, v.name, metric, batch_size=bs)
            old = observe(baseline, v.name, metric, batch_size=bs)
            if now.value is None or old.value is None or not (math.isfinite(now.value) and math.isfinite(old.value)):
                continue
            delta = now.value - old.value
            rel = delta / abs(old.value) if old.value else None
            # A hook's metric is judged the way this run's gate rules bound it; one no rule bounds only shows its change.
            up = hook_higher_is_better(results, metric) if metric not in HIGHER_IS_BETTER else None
            known = metric in HIGHER_IS_BETTER or up is not None
            regressed = known and is_regression(metric, old.value, now.value, up)
            at = f" @bs{bs}" if bs is not None else ""
            change = format_value(metric, delta, delta=True) if metric not in RELATIVE_METRICS or rel is None else f"{rel:+.1%}"
            deltas.append({
                "variant": v.name,
                "metric": metric,
                "batch_size": bs,
                "current": now.value,
                "baseline": old.value,
                "delta": delta,
                "relative": rel,
                "regressed": regressed,
                "improved": known and _improvement(metric, old.value, now.value, up),
                "text": (f"{v.name} {metric}{at}: {format_value(metric, old.value)} -> {format_value(metric, now.value)} "
                         f"({change})"),
                "change": change,
            })
    return {
        "run_id": baseline.run_id,
        "created": baseline.created,
        "same_machine": _machine(results) == _machine(baseline),
        "same_data": _same_data(results, baseline),
        "tolerances": {m: {"kind": k, "value": t} for m, (k, t) in TOLERANCES.items()},
        "deltas": deltas,
        "regressions": [d["text"] for d in deltas if d["regressed"]],
    }


def with_baseline(results: RunResults, baseline: RunResults | None) -> RunResults:
    """`results` carrying its comparison with `baseline` (RunResults.baseline); unchanged when baseline is None."""
    if baseline is None:
        return results
    return dataclasses.replace(results, baseline=compare_runs(results, baseline))
