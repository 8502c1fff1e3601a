"""Loud on collapse: an INT8 variant whose output SQNR or task agreement is catastrophic, with cause and fix.

A judgment, like the gate: a pure function of the results and the limits in `evaluate.collapse`. The report,
summary.md and the CLI summary say it first, before any table, because a collapsed model that a gate without
rules lets through is the worst outcome a quantization tool can hand a user.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantpipe.artifacts import (
    IDENTICAL_KEY,
    Collapse,
    EvalResult,
    FallbackReport,
    LayerSensitivity,
    RunResults,
    Variant,
)
from quantpipe.evalconfig import CollapseConfig
from quantpipe.gate import hook_metrics
from quantpipe.onnxgraph import RECURRENT_OPS, short_name
from quantpipe.other_outputs import OTHER_KEY, output_db, worst_db

__all__ = ["AGREEMENT_METRICS", "FALLBACK_BUDGETS", "RECURRENT_OPS", "SUBGRAPH_OPS", "TASK_JUDGED", "find_collapse"]

AGREEMENT_METRICS = ("top1_agreement", "line_agreement", "map_iou", "box_agreement", "pixel_agreement",
                     "detection_agreement")
"""Task agreement with FP32 (fractions, 1 = identical decisions) judged against `min_agreement`."""

TASK_JUDGED = ("line_agreement", "map_iou", "box_agreement", "pixel_agreement", "miou", "detection_agreement")
"""Task metrics that read a map or sequence output: where one is measured, a channel's SQNR is no collapse."""

FALLBACK_BUDGETS: dict[str, float] = {"line_agreement": 0.98, "top1_agreement": 0.99, "box_agreement": 0.99,
                                      "pixel_agreement": 0.99, "detection_agreement": 0.99, "map_iou": 0.95,
                                      "centered_sqnr_db": 30.0, "cosine": 0.999}
"""The budget suggested for `build.fallback`, by the metric the task is judged on (first one measured wins)."""

_WORST_SHOWN = 3


def _sqnr(e: EvalResult) -> float | None:
    """The output SQNR the limits judge: against the output's variation over the samples where the task is a
    regression (`centered_sqnr_db`; a score around an offset read 24.6 dB against it and 12.5 dB against its
    variation, found probing), else against the output itself."""
    v = e.metrics.get("centered_sqnr_db")
    v = e.metrics.get("sqnr_db") if v is None else v
    if v is None:
        return math.inf if e.metrics.get("max_abs_error") == 0.0 else None
    return float(v)


def _problems(e: EvalResult, sqnr_db: float, agreement: float, word: str) -> list[str]:
    """What is below `sqnr_db` / `agreement`, each said with its limit ('collapse below 10 dB')."""
    out = []
    s = _sqnr(e)
    if s is not None and s < sqnr_db:
        against = "FP32's variation over the samples" if e.metrics.get("centered_sqnr_db") is not None else "FP32"
        out.append(f"output SQNR {s:.2f} dB against {against} ({word} below {sqnr_db:g} dB)")
    c = e.metrics.get("channel_sqnr_min_db")
    # Where a task metric reads the output, its decisions judge the channels, not their SQNR: YOLOv8n at 0.947 of
    # FP32's detections had a class row at 6.3 dB, mostly anchors far under any threshold; SLANet's table tokens
    # (segmentation, 0.958 of its structures as FP32) one at -0.56 dB that never wins; both were called COLLAPSED
    # (found probing).
    if c is not None and float(c) < sqnr_db and not any(e.metrics.get(m) is not None for m in TASK_JUDGED):
        k = int(e.metrics.get("channel_sqnr_min_index") or 0)
        axis = int(e.metrics.get("channel_sqnr_min_axis") or 1)
        out.append(f"output channel {k} (axis {axis}) at {float(c):.2f} dB against FP32 ({word} below {sqnr_db:g} dB), hidden in "
                   f"the pooled SQNR by larger channels (as a detection head's boxes hide its class scores)")
    for m in AGREEMENT_METRICS:
        v = e.metrics.get(m)
        if v is not None and float(v) < agreement:
            out.append(f"{m} {float(v):.3f} ({word} below {agreement:g})")
    return out


def _others_below(e: EvalResult, sqnr_db: float, agreement: float) -> list[str]:
    """The outputs the run does not judge that are below the collapse limits, worst first (three named): a model's
    other heads break unjudged (a pose model's presence flag at 2.3 dB flipped on 15 of 120 samples; found probing).
    Only the collapse limits: the user chose the output to judge, and a token output's padded positions read a
    sentence encoder's hidden states 8 dB below its real tokens (found probing)."""
    low = []
    for name, found in e.other_outputs.items():
        if found.get("nonfinite"):
            low.append((-math.inf, f"output '{short_name(name)}', which the run does not judge, holds "
                                   f"{int(found['nonfinite'] or 0)} NaN or Inf value(s) where FP32's holds numbers"))
            continue
        db = output_db(found)
        if db is not None and db[0] < sqnr_db:
            low.append((db[0], f"output '{short_name(name)}', which the run does not judge (model.output is another), "
                               f"at {db[0]:.2f} dB against {db[1]} (collapse below {sqnr_db:g} dB)"))
        same = found.get("identical")
        if same is not None and same < agreement:
            low.append((-math.inf, f"output '{short_name(name)}', which the run does not judge, reads as FP32's on "
                                   f"{same:.3f} of the samples (collapse below {agreement:g})"))
    low.sort(key=lambda t: t[0])
    out = [text for _, text in low[:_WORST_SHOWN]]
    if len(low) > _WORST_SHOWN:
        out.append(f"and {len(low) - _WORST_SHOWN} more of the model's outputs below the collapse limits (results.json: "
                   f"other_outputs)")
    return out


def _judge_other(e: EvalResult) -> tuple[str, str, str]:
    """Cause, fix and YAML where only outputs the run does not judge collapsed: the sensitivity and the fallback
    measure model.output alone, so neither their worst layers nor a fallback budget speak to them (found probing)."""
    worst = worst_db(e.other_outputs)
    name = worst[0] if worst is not None else next(iter(e.other_outputs), "")
    cause = ("the layers that compute an output the run does not judge: the per-layer sensitivity and the accuracy "
             "fallback measure model.output alone (layers that do not reach it are not ranked), so neither sees it.")
    fix = (f"judge it: set model.output to '{short_name(name)}' and the sensitivity ranks its layers and the fallback can "
           f"hold it; or gate {OTHER_KEY}. If nothing reads that output, leave it out of the model's outputs:")
    return cause, fix, f"model:\n  output: {name}" if name else ""


def _cause(sens: Sequence[LayerSensitivity], equalized: bool = False) -> str:
    if not sens:
        return ("per-layer sensitivity did not run, so the layers to blame are unknown: set "
                "evaluate.sensitivity.enabled: true to name them.")
    shown = []
    for r in sens[:_WORST_SHOWN]:
        if r.output_metric is not None:
            shown.append(f"{short_name(r.node)} ({r.op_type}; {r.metric_name} {r.output_metric:.4g} when quantized alone)")
        else:
            sq = f"{r.sqnr_db:.1f} dB" if r.sqnr_db is not None else "n/a"
            shown.append(f"{short_name(r.node)} ({r.op_type}; output SQNR {sq})")
    said = "the most sensitive layers (per-layer sensitivity, worst first): " + "; ".join(shown) + "."
    depthwise = [short_name(r.node) for r in sens[:_WORST_SHOWN] if r.depthwise]
    # it fired for any Conv (found probing a detector whose worst layers were dense 3x3 Convs), and where the build
    # had equalized them already (SLANet, found probing)
    if depthwise and not equalized:
        what = "is a depthwise convolution" if len(depthwise) == 1 else "are depthwise convolutions"
        said += (f" {', '.join(depthwise)} {what} (MobileNet / PicoDet-style blocks), whose input channels span "
                 "very different ranges under one scale: try build.quantize.equalize_depthwise: true first (its "
                 "default, auto, applies it only where the calibration data's output noise says so).")
    return said + (" The ranges come from the calibration data: if it lacks what the model exists to see (the "
                   "wake word, the rare class, the document), add such samples.")


def _budget_metric(e: EvalResult) -> str:
    """The fallback budget's metric: the first measured one the variant misses; one it already meets cannot drive
    the fallback (a piano roll's box_agreement was 1.0 with no box on either side: the pasted fix kept nothing in
    float and was pasted again, found probing)."""
    measured = {m: v for m in FALLBACK_BUDGETS if (v := e.metrics.get(m)) is not None}
    missed = [m for m, v in measured.items() if float(v) < FALLBACK_BUDGETS[m]]
    return next(iter(missed or measured), "cosine")


def _own_failed_rule(results: RunResults, variant: str) -> tuple[str, str, float] | None:
    """The first gate rule on one of the user's own hook metrics that this variant failed, as (metric, 'min' or
    'max', bound): the budget the pasted fallback holds, where no fallback ran (it pasted `cosine 0.999` beside a
    failed rule on the user's own detector F1; found probing)."""
    own = set(hook_metrics(results))
    for o in results.gate.outcomes if results.gate else ():
        parts = o.allowed.split(" ")
        if o.variant == variant and o.metric in own and not o.passed and len(parts) == 2 and parts[0] in (">=", "<="):
            try:
                return o.metric, "min" if parts[0] == ">=" else "max", float(parts[1])
            except ValueError:
                return None
    return None


def _fix(results: RunResults, e: EvalResult, hooks_budget: bool = True) -> tuple[str, str]:
    metric = _budget_metric(e)
    fb = results.fallback
    if fb is not None and fb.met and metric == fb.metric:  # it held that budget and the loss is still there
        metric = "cosine"
    quantizable = (results.fallback.num_quantizable if results.fallback is not None
                   else len(results.sensitivity) or None)
    budget = max(1, math.ceil(0.1 * quantizable)) if quantizable else None
    lines = ["build:", "  fallback:", f"    metric: {metric}", f"    min: {FALLBACK_BUDGETS[metric]:g}"]
    own = _own_failed_rule(results, e.variant) if fb is None and hooks_budget else None
    if own is not None:
        lines[2:] = [f"    metric: {own[0]}", f"    {own[1]}: {own[2]:g}"]
    kept = len(fb.steps) if fb is not None and not fb.met else 0
    if budget is not None and quantizable and budget <= kept:
        # The fallback already kept that many and missed: pasting the same cap again loops (a 2-layer front end,
        # "max_layers: 1" pasted twice; found probing).
        budget = min(quantizable - 1, 2 * kept)
        if budget > kept:
            lines.append(f"    max_layers: {budget}   # the last run kept {kept} of the {quantizable} quantized "
                         f"layers and missed")
    elif budget is not None:
        lines.append(f"    max_layers: {budget}   # 10% of the {quantizable} quantized layers")
    yaml = "\n".join(lines)
    if kept and quantizable and (budget is None or budget <= kept):
        return (f"the accuracy fallback kept {kept} of this model's {quantizable} quantized layers in float and missed "
                f"its budget ({fb.metric} {fb.target:g}); keeping more leaves too little in INT8 to be worth it. "  # type: ignore[union-attr]
                f"Ship FP16 (or FP32) for this model, or loosen the budget.", "")
    if fb is not None:
        held = e.metrics.get(fb.metric)
        here = held is not None and (float(held) <= fb.target if fb.lower_is_better else float(held) >= fb.target)
        if fb.met and here and fb.metric not in FALLBACK_BUDGETS:  # the user's own metric held, here too
            assert held is not None  # `here` implies it
            fix = (f"the accuracy fallback met its budget on your own metric {fb.metric} ({fb.target:g}, "
                   f"{len(fb.steps)} layer(s) kept in float) on the {fb.chosen_on or 'selection'} data and here "
                   f"({float(held):.4g}): where {fb.metric} is what this output means, nothing is to mend (lower "
                   f"evaluate.collapse's limits); where it is not, budget the fallback on a measure that sees the loss:")
        elif fb.met and here:  # met on the evaluation data too
            assert held is not None  # `here` implies it
            fix = (f"the accuracy fallback met its budget ({fb.metric} {fb.target:g}, {len(fb.steps)} layer(s) kept in "
                   f"float) on the {fb.chosen_on or 'selection'} data and on the evaluation data ({float(held):.4g}): "
                   f"{fb.metric} does not see this loss. Budget the fallback on a measure that does:")
        elif fb.met:  # met where it chose, not on the evaluation data: the choice did not carry over
            fix = (f"the accuracy fallback met its budget ({fb.metric} {fb.target:g}, {len(fb.steps)} layer(s) kept "
                   f"in float) on the {fb.chosen_on or 'selection'} data ({fb.chosen_samples} samples), which did not "
                   f"carry over to the evaluation data: let it choose on more samples that look like them (a "
                   f"data.validation split), with the task's metric and room in max_layers:")
        else:
            fix = (f"the accuracy fallback ran (budget {fb.metric} {fb.target:g}: NOT met with {len(fb.steps)} "
                   f"layer(s) kept in float, its best step): the budget may be out of INT8's reach on this data. "
                   f"Loosen it, or let the fallback choose on data like the evaluation data (data.validation); "
                   f"max_layers caps what a budget out of reach costs:")
    elif own is not None:
        fix = (f"keep the most sensitive layers in float with the accuracy fallback, budgeted on your own metric "
               f"{own[0]}, whose gate rule failed; paste into pipeline.yaml:")
    elif _own_metrics_held(results, e.variant):
        fix = ("by your own metrics nothing is to mend (the gate's rules on them held); where they do not see what "
               "the numbers above show, keep the most sensitive layers in float with the accuracy fallback, budgeted "
               "on a measure that does; paste into pipeline.yaml:")
    else:
        fix = "keep the most sensitive layers in float with the accuracy fallback; paste into pipeline.yaml:"
    return fix, yaml


def _unmeasured(results: RunResults, e: EvalResult, variant: Variant) -> Collapse:
    """An INT8 variant whose judged output equals FP32's bit for bit, or that holds no quantized layer: a gate on it
    would pass vacuously."""
    quantized = variant.quantize_detail("quantized")
    recurrent = {op: n for op, n in results.model.op_counts.items() if op in RECURRENT_OPS and n}
    held = (" (" + ", ".join(f"{n} {op}" for op, n in recurrent.items()) + " in this model, left in float)"
            if recurrent else "")
    if quantized == 0 and results.fallback is not None and results.fallback.steps:
        return _kept_everything(e, results.fallback)
    reached = variant.quantize_detail("outputs_reached")
    # The float outputs an INT8 layer reaches (the build records them), not every output: the judged one and a bool
    # pass-through were offered before (found probing a GRU encoder).
    others = [o.name for o in results.model.outputs if reached is None or
              (o.name in reached and o.dtype.startswith(("float", "bfloat")))]
    yaml = ("model:\n  output: " + " | ".join(others)) if (len(others) > 1 if reached is None else others) else ""
    return Collapse(
        variant=e.variant, severity="unmeasured",
        problems=((f"its output equals FP32's bit for bit on all {e.num_samples} evaluation samples: no INT8 layer "
                   f"lies on the path to model.output" if e.metrics.get(IDENTICAL_KEY) == 1.0 else
                   "it holds no INT8 layer") + ", so its accuracy numbers and any gate rule on them say nothing about INT8",),
        cause=(_nothing_quantized(results, held) if quantized == 0 else
               f"the layers that compute model.output are ones quantpipe keeps in float{held}; the Q/DQ layers "
               f"(build details: quantized nodes) only reach other outputs."),
        fix="judge an output the INT8 layers reach (model.output in pipeline.yaml), or release this model knowing "
            "its judged output is not quantized:" if yaml else "release this model knowing its output is not "
            "quantized (recurrent layers and the ops quantpipe leaves in float are not).", fix_yaml=yaml)


def _nothing_quantized(results: RunResults, held: str) -> str:
    """Why no layer was quantized: none of the ops quantpipe quantizes, or those there sit inside subgraphs (silero
    VAD's 6 Conv and its LSTM inside an If on the sample rate: "no Conv ... it quantizes" named no cause; found
    probing)."""
    from quantpipe.quantize.placement import QUANTIZABLE_OPS  # here: the quantize package is heavy to import

    inside = {op: n for op, n in results.model.subgraph_op_counts.items()
              if op in QUANTIZABLE_OPS or op in RECURRENT_OPS}
    if not inside:
        return f"nothing in this model was quantized (no Conv / ConvTranspose / Gemm / MatMul it quantizes{held})."
    holders = ", ".join(f"{n} {op}" for op, n in results.model.op_counts.items() if op in SUBGRAPH_OPS)
    return (f"nothing in this model was quantized: its {', '.join(f'{n} {op}' for op, n in inside.items())} sit inside "
            f"the branches or bodies of {holders or 'its subgraph'} node(s), which quantpipe leaves in float. Where the "
            f"branch the model takes is fixed (an If on a sample rate or a mode you always set), `quantpipe prepare "
            f"MODEL OUT --fix NAME=VALUE` puts that branch's nodes in the main graph (checked against the model with "
            f"--data); run again on OUT.")



def _kept_everything(e: EvalResult, fb: FallbackReport) -> Collapse:
    """An INT8 variant the accuracy fallback left without a quantized layer: FP32 under another name (a budget only
    FP32 meets; found probing: 5 of 5 layers kept, then "nothing in this model was quantized")."""
    return Collapse(
        variant=e.variant, severity="unmeasured",
        problems=(f"it holds no INT8 layer: the accuracy fallback kept every quantized layer in float ({len(fb.steps)} "
                  f"of {fb.num_quantizable}), so its numbers on the {e.num_samples} evaluation samples are FP32's",),
        cause=f"its budget ({fb.metric} {fb.target:g} on the {fb.chosen_on or 'selection'} data) is one only FP32 met.",
        fix="loosen the budget, or cap build.fallback.max_layers: on a few dozen samples a budget this tight (an "
            "agreement of 0.999, an error near 0) asks for outputs identical to FP32's.", fix_yaml="")


#: Ops whose subgraphs the FP16 writer leaves in FP32 (with the nodes they read from the outer scope).
SUBGRAPH_OPS = ("If", "Loop", "Scan")


def _fp16_unmeasured(results: RunResults, e: EvalResult, variant: Variant) -> Collapse:
    """An FP16 variant whose judged output equals FP32's bit for bit: nothing on its path runs in FP16, or what does
    ran in FP32 on this backend."""
    fp16_nodes = int(((variant.details or {}).get("compute") or {}).get("fp16", 0))
    if fp16_nodes and variant.device == "cpu":
        # A document unwarper's 110 FP16 nodes, called "kept in FP32 or control flow" (found probing).
        return Collapse(
            variant=e.variant, severity="unmeasured", precision="fp16",
            problems=(f"its output equals FP32's bit for bit on all {e.num_samples} evaluation samples, though the "
                      f"model holds {fp16_nodes} FP16 compute node(s): on the CPU onnxruntime has no FP16 kernel for "
                      f"most ops (Conv among them) and runs them in FP32 between casts, so these numbers measure the "
                      f"weights' FP16 rounding alone (none here: they were exact in FP16), not FP16 arithmetic",),
            cause="the backend, not the model: the FP16 file is what TensorRT or CUDA runs in FP16.",
            fix="judge FP16 on the GPU: a tensorrt fp16 variant, or onnxruntime with device: cuda.", fix_yaml="")
    held = {op: n for op, n in results.model.op_counts.items() if op in SUBGRAPH_OPS and n}
    why = ("; ".join(f"{n} {op}" for op, n in held.items()) + " node(s) in this model: the FP16 writer keeps nodes "
           "with subgraphs, and what they read, in FP32 (its warning in the build log names them)") if held else \
        "every node that computes model.output stays FP32 (build.fp16's keep lists, or values beyond FP16's range: " \
        "the build log names them)"
    return Collapse(
        variant=e.variant, severity="unmeasured", precision="fp16",
        problems=(f"its output equals FP32's bit for bit on all {e.num_samples} evaluation samples: nothing on the "
                  f"path to model.output runs in FP16, so its accuracy and latency numbers and any gate rule on "
                  f"them say nothing about FP16",),
        cause=why + ".",
        fix="release the FP32 model for this path, or export the model without control flow around its layers "
            "(e.g. torch.onnx.export of the traced module, not the scripted one) so they can run in FP16.",
        fix_yaml="")


def _own_metrics_held(results: RunResults, variant: str) -> list[str]:
    """Where the gate judged this variant by metrics of the user's own hooks and every such rule passed, a line
    saying so beside the verdict: the limits above read quantpipe's metrics (a pitch tracker whose 360 bins spread one
    pitch over neighbours: top-1 agreement 0.688, every frame within 50 cents; found probing)."""
    own = set(hook_metrics(results))
    rules = [o for o in (results.gate.outcomes if results.gate else ()) if o.variant == variant and o.metric in own]
    if not rules or not all(o.passed for o in rules):
        return []
    held = ", ".join(f"{o.metric} {o.observed:.4g} ({o.allowed})" for o in rules if o.observed is not None)
    return [f"the gate's rules on your own metrics held ({held}): where the metrics above do not measure what this "
            f"output means, judge by yours and lower evaluate.collapse.warn_agreement / warn_sqnr_db"]


def find_collapse(results: RunResults, limits: CollapseConfig, *, hooks_budget: bool = True) -> tuple[Collapse, ...]:
    """Every INT8 variant that ran and whose output SQNR or task agreement is below the collapse limits
    (severity 'collapsed'), or else below the warning limits ('degraded'); and every INT8 or FP16 one whose judged
    output equals FP32's bit for bit ('unmeasured'). `hooks_budget`: whether a metric of the user's hooks can hold
    the fallback's budget (not where every hook reads all outputs: `taskmetrics.TaskSpec.check_fallback_hooks`)."""
    variants = {v.name: v for v in results.variants}
    int8 = {v.name for v in results.variants if v.precision == "int8" and v.skipped is None}
    fp16 = {v.name for v in results.variants if v.precision == "fp16" and v.skipped is None}
    found = []
    for e in results.evaluations:
        if e.skipped is not None:
            continue
        if e.variant in fp16 and e.metrics.get(IDENTICAL_KEY) == 1.0:
            found.append(_fp16_unmeasured(results, e, variants[e.variant]))
            continue
        if e.variant not in int8:
            continue
        variant = variants[e.variant]
        if e.metrics.get(IDENTICAL_KEY) == 1.0 or variant.quantize_detail("quantized") == 0:
            # No quantized layer left is FP32 too, even where a leftover Mul moves its output by 6e-8 (found probing).
            found.append(_unmeasured(results, e, variant))
            continue
        severity, problems = "collapsed", _problems(e, limits.min_sqnr_db, limits.min_agreement, "collapse")
        judged = bool(problems) or bool(_problems(e, limits.warn_sqnr_db, limits.warn_agreement, "degraded"))
        others = _others_below(e, limits.min_sqnr_db, limits.min_agreement)
        if not problems:
            severity = "collapsed" if others else "degraded"
            problems = _problems(e, limits.warn_sqnr_db, limits.warn_agreement, "degraded")
        problems += others
        if problems:
            problems += _own_metrics_held(results, e.variant)
            if judged:
                fix, yaml = _fix(results, e, hooks_budget)
                cause = _cause(results.sensitivity, bool(variant.quantize_detail("equalized_depthwise")))
            else:
                cause, fix, yaml = _judge_other(e)
            found.append(Collapse(variant=e.variant, problems=tuple(problems), cause=cause, fix=fix, fix_yaml=yaml,
                                  severity=severity))
    return tuple(found)
