"""Which quantized layers cost accuracy, and the fallback that keeps the costliest ones in float.

Two measurements per quantized node (Conv, Gemm, MatMul, residual Add):

- *accumulated SQNR*: the node's output in the full Q/DQ model against the FP32 model, both run on
  the evaluation samples with the node outputs exposed. Cheap (two runs) but it grows with depth,
  since every layer inherits its predecessors' error.
- *one layer at a time*: the model output when only this node's Q/DQ is kept. One in-memory build
  and one short run per node, so it can be capped: `one_at_a_time=N` measures the N nodes with the
  lowest *local* SQNR (the node's output with only its own inputs quantized, all measured in one run
  of an instrumented FP32 graph).

`accuracy_fallback` turns this into a decision: it keeps layers in float one at a time, greedily,
re-evaluating the quantized model on the evaluation set after each choice, until the budget is met,
then drops any kept layer the budget no longer needs. A budget that cannot be met is reported with
`met=False`.

`keep_in="fp16"` records the intent for TensorRT, where a layer left out of INT8 runs in FP16; in the
ONNX Runtime CPU model the same layer simply has no Q/DQ and computes in FP32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from quantpipe import metrics as M
from quantpipe.artifacts import FallbackReport, FallbackStep, LayerSensitivity
from quantpipe.errors import ConfigError, EvaluationError
from quantpipe.quantize import (
    DEFAULT_FLOAT_OPS,
    ChannelStats,
    QuantizeOptions,
    QuantizeReport,
    build_qdq_model,
    expose_outputs,
    load_onnx,
    name_nodes,
    ort_session,
    save_onnx,
    tensor_offsets,
    with_calibration_data,
)

__all__ = ["FallbackMetric", "layer_sensitivity", "accuracy_fallback"]

log = logging.getLogger(__name__)

FallbackMetric = Literal["top1_agreement", "cosine", "top1_drop"]
SensitivityMetric = Literal["sqnr_db", "cosine", "top1_agreement"]


@dataclasses.dataclass
class _Context:
    """The FP32 model, its reference outputs on the evaluation samples, and how to build Q/DQ variants."""

    model: Any
    amax: Mapping[str, float]
    options: QuantizeOptions
    feeds: list[dict[str, np.ndarray]]
    ref: np.ndarray
    labels: np.ndarray | None
    output: str


def _prepare(
    model_path: str | os.PathLike[str],
    amax: Mapping[str, float],
    dataset: Any,
    *,
    output: str | None,
    batch_size: int,
    max_samples: int | None,
    options: QuantizeOptions,
    calibration_data: Any | None,
) -> _Context:
    model = load_onnx(model_path)
    name_nodes(model.graph)
    if calibration_data is not None:
        options = with_calibration_data(model, options, calibration_data, batch_size=batch_size, amax=amax)
    outputs = [o.name for o in model.graph.output]
    out = output or outputs[0]
    if out not in outputs:
        raise ConfigError(f"output '{out}' is not an output of {model_path} (outputs: {outputs}).")
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    seen = 0
    for batch in dataset.batches(batch_size):
        f = dict(batch.feeds)
        lab = batch.labels
        if max_samples is not None and seen + batch.size > max_samples:
            keep = max_samples - seen
            f = {k: v[:keep] for k, v in f.items()}
            lab = None if lab is None else lab[:keep]
        feeds.append(f)
        if lab is not None:
            labels.append(np.asarray(lab))
        seen += next(iter(f.values())).shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if not feeds:
        raise EvaluationError("the evaluation data holds no samples; sensitivity and fallback need at least one.")
    ref = _run(ort_session(model), feeds, out)
    return _Context(model, amax, options, feeds, ref, np.concatenate(labels) if labels else None, out)


def _run(sess: Any, feeds: Sequence[Mapping[str, np.ndarray]], output: str) -> np.ndarray:
    return np.concatenate([sess.run([output], dict(f))[0] for f in feeds], axis=0)


def _options(per_channel: bool, keep_float_ops: Collection[str], keep_float_nodes: Collection[str],
             quantize_residual_add: bool, channel_stats: Mapping[str, ChannelStats] | None,
             options: QuantizeOptions | None) -> QuantizeOptions:
    if options is not None:
        return options if channel_stats is None else dataclasses.replace(options, channel_stats=channel_stats)
    return QuantizeOptions(per_channel=per_channel, keep_float_ops=frozenset(keep_float_ops),
                           keep_float_nodes=frozenset(keep_float_nodes), quantize_residual_add=quantize_residual_add,
                           channel_stats=channel_stats)


def _score(name: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    if name == "sqnr_db":
        return M.sqnr_db(out, ref)
    if name == "cosine":
        return M.mean_cosine(out, ref)
    if name == "top1_agreement":
        return M.top1_agreement(out, ref)
    if name == "top1_drop":
        if labels is None:
            raise ConfigError("the fallback metric top1_drop needs labels in the evaluation data "
                              "(data.evaluation.labels); use top1_agreement or cosine without labels.")
        return M.topk_accuracy(ref, labels, 1) - M.topk_accuracy(out, labels, 1)
    raise ConfigError(f"unknown metric '{name}'; expected one of sqnr_db, cosine, top1_agreement, top1_drop.")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def layer_sensitivity(
    model_path: str | os.PathLike[str],
    int8_model: str | os.PathLike[str] | None,
    amax: Mapping[str, float],
    eval_dataset: Any,
    *,
    output: str | None = None,
    max_samples: int | None = 64,
    one_at_a_time: bool | int = True,
    metric: SensitivityMetric = "sqnr_db",
    batch_size: int = 8,
    per_channel: bool = True,
    keep_float_ops: Collection[str] = DEFAULT_FLOAT_OPS,
    keep_float_nodes: Collection[str] = (),
    quantize_residual_add: bool = True,
    calibration_data: Any | None = None,
    channel_stats: Mapping[str, ChannelStats] | None = None,
    options: QuantizeOptions | None = None,
) -> tuple[LayerSensitivity, ...]:
    """Per-layer sensitivity of the INT8 Q/DQ model, worst first.

    Args:
        model_path: the FP32 model.
        int8_model: the Q/DQ model that was built (its node outputs are compared); None or "" builds it here
            with the same options.
        amax: the calibrated amax the Q/DQ model was built from.
        eval_dataset: evaluation `Dataset`; the first `max_samples` samples are used.
        output: the model output the one-layer-at-a-time metric scores (default: the first output).
        one_at_a_time: also measure the output with only one layer quantized: True for every layer, an int N
            for the N layers with the lowest local SQNR (each layer quantized alone, inputs from FP32; one
            instrumented run), False for none.
        metric: the one-layer-at-a-time output metric (sqnr_db is the most discriminating).
        calibration_data / channel_stats / options: as given to `write_qdq_model` (smoothing and bias correction
            must match the built model, or the single-layer builds differ from it).

    The accumulated SQNR covers every element of a tensor, padded positions included: in a padded transformer
    batch the padding's hidden states carry large errors that never reach a pooled output, so judge those
    layers by the one-layer-at-a-time output metric.

    Returns:
        One `LayerSensitivity` per quantized node: sqnr_db is the accumulated SQNR of its output;
        output_metric is the one-layer-at-a-time value (None when not measured). Sorted worst first: measured
        nodes by output_metric, then the others by their local SQNR.
    """
    opts = _options(per_channel, keep_float_ops, keep_float_nodes, quantize_residual_add, channel_stats, options)
    ctx = _prepare(model_path, amax, eval_dataset, output=output, batch_size=batch_size, max_samples=max_samples,
                   options=opts, calibration_data=calibration_data)
    full, report = build_qdq_model(ctx.model, amax, ctx.options)
    nodes = report.quantized_nodes
    if int8_model:
        # Judge the model that was built; it may hold fewer quantized layers (a fallback kept some in float).
        full = load_onnx(int8_model)
        dq_out = {o for n in full.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        in_model = {n.name for n in full.graph.node if any(i in dq_out for i in n.input)}
        nodes = tuple(q for q in nodes if q.name in in_model)
    by_name = {n.name: n for n in ctx.model.graph.node}
    tensors = {q.name: by_name[q.name].output[0] for q in nodes if q.name in by_name}
    sqnr = _accumulated_sqnr(ctx, full, sorted(set(tensors.values())))
    local = _local_sqnr(ctx, build_qdq_model(ctx.model, amax, ctx.options)[0], [q.name for q in nodes])

    measured: dict[str, float] = {}
    count = len(nodes) if one_at_a_time is True else int(one_at_a_time or 0)
    if count > 0:
        order = sorted(nodes, key=lambda q: local.get(q.name, math.inf))
        for q in order[:count]:
            single, _ = build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, only_nodes=frozenset({q.name})))
            out = _run(ort_session(single, int8=True), ctx.feeds, ctx.output)
            measured[q.name] = _score(metric, out, ctx.ref, ctx.labels)
            log.debug("sensitivity %s (%s): %s = %.4g", q.name, q.op_type, metric, measured[q.name])

    rows = [
        LayerSensitivity(node=q.name, op_type=q.op_type, tensor=tensors.get(q.name, ""),
                         sqnr_db=_finite(sqnr.get(tensors.get(q.name, ""), math.nan)),
                         output_metric=_finite(measured[q.name]) if q.name in measured else None,
                         metric_name=metric)
        for q in nodes
    ]

    def key(r: LayerSensitivity) -> tuple[int, float]:
        if r.node in measured:
            v = measured[r.node]
            return (0, v if not math.isnan(v) else -math.inf)
        return (1, local.get(r.node, math.inf))

    return tuple(sorted(rows, key=key))


def _local_sqnr(ctx: _Context, qdq: Any, names: Sequence[str]) -> dict[str, float]:
    """SQNR (dB) of each quantized node's output when only its own inputs are quantized, the rest in FP32.

    One run of an instrumented FP32 graph: it also holds the Q/DQ model's quantization nodes (which read
    the FP32 tensors there) and a copy of every quantized node fed through them. Unlike the accumulated
    SQNR this does not fall with depth: it is the layer's own error (input rounding times its gain).
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(ctx.model)
    g = m.graph
    have_init = {t.name for t in g.initializer}
    fp_nodes = {n.name for n in g.node}
    g.initializer.extend(t for t in qdq.graph.initializer if t.name not in have_init)
    wanted = set(names)
    # Tensors the Q/DQ graph holds shifted by -c (shift_nonnegative): its own nodes read them that way, so
    # they read a shifted copy of the FP32 tensor here.
    offsets = tensor_offsets(qdq)
    extra, pairs = [], []
    for t, c in sorted(offsets.items()):
        extra.append(onnx.helper.make_node("Sub", [t, f"{t}__offset"], [f"{t}__shifted"], name=f"{t}__shift"))
        g.initializer.append(onnx.numpy_helper.from_array(np.array(c, dtype=np.float32), f"{t}__offset"))
    fp_tensors = {o for n in g.node for o in n.output}
    for n in qdq.graph.node:
        # Nodes the Q/DQ graph added (QuantizeLinear / DequantizeLinear / smoothing Mul / Pad / Constant) or
        # rewired to new tensors (a split activation's producer): the instrumented graph needs them too.
        added = n.name not in fp_nodes or not all(o in fp_tensors for o in n.output if o)
        if added or n.name in wanted:
            for k, i in enumerate(n.input):
                if i in offsets:
                    n = _with_input(n, k, f"{i}__shifted")
        if added:
            if n.name in fp_nodes:
                n = _renamed(n, f"{n.name}__qdq")
            extra.append(n)
        elif n.name in wanted and n.output:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"{n.name}__local"
            del copy.output[:]
            copy.output.extend(f"{o}__local" if o else "" for o in n.output)
            extra.append(copy)
            pairs.append((n.name, n.output[0], f"{n.output[0]}__local"))
    if not pairs:
        return {}
    g.node.extend(extra)
    sorted_nodes = _toposort(list(g.node), {i.name for i in g.input} | {t.name for t in g.initializer})
    del g.node[:]
    g.node.extend(sorted_nodes)
    outs = [t for _, a, b in pairs for t in (a, b)]
    sess = ort_session(expose_outputs(m, outs), optimize=False)
    sig = {name: 0.0 for name, _, _ in pairs}
    noise = dict(sig)
    for f in ctx.feeds:
        res = dict(zip(outs, sess.run(outs, dict(f)), strict=True))
        for name, a, b in pairs:
            x = np.asarray(res[a], dtype=np.float64)
            sig[name] += float(np.sum(x**2))
            noise[name] += float(np.sum((np.asarray(res[b], dtype=np.float64) + offsets.get(a, 0.0) - x) ** 2))
    return {k: (math.inf if noise[k] == 0 else -math.inf if sig[k] == 0 else 10.0 * math.log10(sig[k] / noise[k]))
            for k in sig}


def _renamed(node: Any, name: str) -> Any:
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = name
    return copy


def _with_input(node: Any, k: int, name: str) -> Any:
    """A copy of `node` reading `name` as its k-th input (the Q/DQ model's graph stays untouched)."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[k] = name
    return copy


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Nodes ordered so that every input is produced first (stable where the order is already valid)."""
    done = set(available) | {""}
    out: list[Any] = []
    pending = nodes
    while pending:
        rest = [n for n in pending if not all(i in done for i in n.input)]
        ready = [n for n in pending if all(i in done for i in n.input)]
        if not ready:
            raise EvaluationError("could not order the instrumented sensitivity graph (a cycle or a missing input)")
        for n in ready:
            out.append(n)
            done.update(n.output)
        pending = rest
    return out


def _accumulated_sqnr(ctx: _Context, qdq: Any, tensors: Sequence[str]) -> dict[str, float]:
    """SQNR (dB) of each tensor in the Q/DQ run against the FP32 run, summed over the evaluation batches."""
    in_qdq = {o for n in qdq.graph.node for o in n.output}
    tensors = [t for t in tensors if t in in_qdq]  # a split activation's producer writes a new tensor
    if not tensors:
        return {}
    # Unoptimized sessions: with fusions on, onnxruntime may hand back another value for an exposed
    # intermediate of a Q/DQ graph (e.g. a Conv output fused with its Clip).
    fp = ort_session(expose_outputs(ctx.model, tensors), optimize=False)
    qs = ort_session(expose_outputs(qdq, tensors), optimize=False)
    offsets = tensor_offsets(qdq)  # tensors the Q/DQ model holds shifted by -c (shift_nonnegative)
    sig = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    for f in ctx.feeds:
        a = fp.run(list(tensors), dict(f))
        b = qs.run(list(tensors), dict(f))
        for t, x, y in zip(tensors, a, b, strict=True):
            x64 = np.asarray(x, dtype=np.float64)
            sig[t] += float(np.sum(x64**2))
            noise[t] += float(np.sum((np.asarray(y, dtype=np.float64) + offsets.get(t, 0.0) - x64) ** 2))
    out = {}
    for t in tensors:
        if noise[t] == 0.0:
            out[t] = math.inf
        elif sig[t] == 0.0:
            out[t] = -math.inf
        else:
            out[t] = 10.0 * math.log10(sig[t] / noise[t])
    return out


@dataclasses.dataclass(frozen=True)
class _Eval:
    value: float
    """The budget metric."""
    sqnr: float
    """Output SQNR (dB) against FP32: the model's overall fidelity."""
    margin: float
    """Tie-break, higher is better. For top-1 metrics, how far the flipped samples are from agreeing again
    (sum of negative top-1 margins in units of the reference logit spread; 0 when all agree); otherwise `sqnr`."""


def _measure(metric: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> _Eval:
    s = M.sqnr_db(out, ref)
    s = s if not math.isnan(s) else -math.inf
    margin = s
    if metric in ("top1_agreement", "top1_drop"):
        o = np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1)
        r = np.asarray(ref).reshape(ref.shape[0], -1).argmax(axis=1)
        rows = np.arange(o.shape[0])
        own = o[rows, r]
        o[rows, r] = -np.inf
        spread = float(np.std(ref)) or 1.0
        margin = float(np.sum(np.minimum(own - o.max(axis=1), 0.0)) / spread)
    return _Eval(_score(metric, out, ref, labels), s, margin)


def accuracy_fallback(
    model_path: str | os.PathLike[str],
    amax: Mapping[str, float],
    eval_dataset: Any,
    *,
    metric: FallbackMetric,
    target: float,
    keep_in: Literal["fp16", "fp32"] = "fp16",
    max_layers: int | None = None,
    out_path: str | os.PathLike[str] | None = None,
    output: str | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    per_channel: bool = True,
    keep_float_ops: Collection[str] = DEFAULT_FLOAT_OPS,
    keep_float_nodes: Collection[str] = (),
    quantize_residual_add: bool = True,
    calibration_data: Any | None = None,
    channel_stats: Mapping[str, ChannelStats] | None = None,
    options: QuantizeOptions | None = None,
    sensitivity: Sequence[LayerSensitivity] | None = None,
    candidates_per_step: int = 12,
    max_evaluations: int = 400,
    ranking_samples: int = 32,
    on_step: Callable[[str, float], None] | None = None,
) -> tuple[QuantizeReport, FallbackReport]:
    """Keep the fewest, most sensitive layers in float until the accuracy budget holds.

    Args:
        model_path: the FP32 model.
        amax: calibrated amax per tensor.
        eval_dataset: evaluation `Dataset` the budget is judged on (labels needed for top1_drop).
        metric: top1_agreement (>= target), cosine (>= target) or top1_drop (<= target, needs labels), all
            against the FP32 model's `output`.
        target: the budget.
        keep_in: what a kept layer runs in on TensorRT (fp16 or fp32); in the ONNX Runtime model it has no
            Q/DQ and computes in FP32 either way.
        max_layers: keep at most this many layers in float (None: no limit).
        out_path: write the final Q/DQ model here (checked, atomically); None: only report.
        sensitivity: a precomputed ranking (worst first); default: one-layer-at-a-time output SQNR measured here
            on `ranking_samples` samples.
        candidates_per_step: how many of the next-ranked layers are tried at each step; the one that raises the
            budget metric most is kept (ties: the one that brings the flipped samples' top-1 margins closest to
            agreeing; for cosine, the output SQNR). When none of them raises the metric, every remaining layer
            is tried before one is kept for its margin alone.
        max_evaluations: cap on model builds + evaluation runs (the search stops there and reports met=False).
        ranking_samples: samples used to rank the layers one at a time (when `sensitivity` is not given).
        on_step: progress callback (layer name, metric after keeping it).

    Returns:
        The final model's QuantizeReport and the FallbackReport (met=False when the budget was not reached).
    """
    if metric not in ("top1_agreement", "cosine", "top1_drop"):
        raise ConfigError(f"fallback metric must be top1_agreement, cosine or top1_drop, not '{metric}'.")
    if keep_in not in ("fp16", "fp32"):
        raise ConfigError(f"fallback keep_in must be fp16 or fp32, not '{keep_in}'.")
    opts = _options(per_channel, keep_float_ops, keep_float_nodes, quantize_residual_add, channel_stats, options)
    ctx = _prepare(model_path, amax, eval_dataset, output=output, batch_size=batch_size, max_samples=max_samples,
                   options=opts, calibration_data=calibration_data)
    if metric == "top1_drop" and ctx.labels is None:
        _score("top1_drop", ctx.ref, ctx.ref, None)  # raises the ConfigError that explains it

    lower_is_better = metric == "top1_drop"
    cache: dict[frozenset[str], _Eval] = {}
    reports: dict[frozenset[str], QuantizeReport] = {}

    def evaluate(keep: frozenset[str], *, force: bool = False) -> _Eval:
        if keep not in cache:
            if len(cache) >= max_evaluations and not force:
                raise _BudgetExhausted
            qm, rep = build_qdq_model(ctx.model, amax, dataclasses.replace(
                ctx.options, keep_float_nodes=ctx.options.keep_float_nodes | keep))
            out = _run(ort_session(qm, int8=True), ctx.feeds, ctx.output)
            cache[keep] = _measure(metric, out, ctx.ref, ctx.labels)
            reports[keep] = rep
        return cache[keep]

    def met(e: _Eval) -> bool:
        return e.value <= target if lower_is_better else e.value >= target

    def rank(e: _Eval) -> tuple[float, float]:
        return (-e.value if lower_is_better else e.value, e.margin)

    def improves(e: _Eval, than: _Eval) -> bool:
        return e.value < than.value if lower_is_better else e.value > than.value

    initial = evaluate(frozenset())
    num_quantizable = reports[frozenset()].num_quantizable
    quantized = [q.name for q in reports[frozenset()].quantized_nodes]
    ops = {q.name: q.op_type for q in reports[frozenset()].quantized_nodes}
    keep: list[str] = []
    current = initial
    exhausted = False
    if not met(initial):
        try:
            ranking = _ranking(ctx, amax, quantized, sensitivity, ranking_samples)
            remaining = [n for n in ranking if n in ops]
            limit = max_layers if max_layers is not None else len(remaining)
            while not met(current) and remaining and len(keep) < limit:
                trials = [(evaluate(frozenset(keep + [c])), c) for c in remaining[:max(1, candidates_per_step)]]
                best, choice = max(trials, key=lambda t: rank(t[0]))
                if not improves(best, current) and len(remaining) > candidates_per_step:
                    # None of the most sensitive layers moves the budget metric (typically: the last few
                    # samples sit on a near-tie that no single top layer flips). Keeping one only for its
                    # margin tends to stack several layers that never flip it; look at every layer first.
                    trials += [(evaluate(frozenset(keep + [c])), c) for c in remaining[candidates_per_step:]]
                    best, choice = max(trials, key=lambda t: rank(t[0]))
                keep.append(choice)
                remaining.remove(choice)
                current = best
                log.info("fallback: keeping %s (%s) in float -> %s = %.4f", choice, ops[choice], metric, best.value)
                if on_step is not None:
                    on_step(choice, best.value)
            if met(current):
                # Drop layers the budget no longer needs (a later choice can make an earlier one redundant).
                for c in list(reversed(keep)):
                    trial = [k for k in keep if k != c]
                    if met(evaluate(frozenset(trial))):
                        keep = trial
                current = evaluate(frozenset(keep))
        except _BudgetExhausted:
            exhausted = True
            log.warning("fallback: stopped after %d evaluations (max_evaluations)", max_evaluations)

    steps: list[FallbackStep] = []
    before = initial
    for i, name in enumerate(keep):
        after = evaluate(frozenset(keep[: i + 1]), force=True)  # at most len(keep) more runs, for the report
        steps.append(FallbackStep(node=name, op_type=ops[name], kept_in=keep_in, metric_before=before.value,
                                  metric_after=after.value))
        before = after

    final_keep = frozenset(keep)
    final_opts = dataclasses.replace(ctx.options, keep_float_nodes=ctx.options.keep_float_nodes | final_keep)
    model, rep = build_qdq_model(ctx.model, amax, final_opts)
    warnings = list(rep.warnings)
    if not met(current):
        why = "the evaluation budget ran out" if exhausted else (
            f"max_layers={max_layers} reached" if max_layers is not None and len(keep) >= max_layers
            else "every quantized layer was tried")
        warnings.append(f"accuracy budget {metric} {'<=' if lower_is_better else '>='} {target} NOT met: "
                        f"{current.value:.4f} after keeping {len(keep)} layer(s) in float ({why})")
    if out_path is not None:
        warnings += save_onnx(model, out_path, reference=ctx.model)
    rep = dataclasses.replace(rep, model_path=os.fspath(model_path),
                              output_path=os.fspath(out_path) if out_path is not None else None,
                              warnings=tuple(warnings))
    fallback = FallbackReport(metric=metric, target=float(target), initial=initial.value, final=current.value,
                              met=met(current), num_quantizable=num_quantizable, steps=tuple(steps))
    return rep, fallback


class _BudgetExhausted(Exception):
    """Raised inside the fallback when max_evaluations is reached."""


def _ranking(ctx: _Context, amax: Mapping[str, float], quantized: Sequence[str],
             sensitivity: Sequence[LayerSensitivity] | None, samples: int) -> list[str]:
    """Layer names, most sensitive first: the given ranking, or one-layer-at-a-time output SQNR."""
    if sensitivity:
        names = [s.node for s in sensitivity]
        return names + [q for q in quantized if q not in set(names)]
    # A subset is enough to order the layers; the budget itself is always judged on every sample.
    feeds, n = [], 0
    for f in ctx.feeds:
        if n >= samples:
            break
        feeds.append(f)
        n += next(iter(f.values())).shape[0]
    ref = ctx.ref[:n]
    scores = []
    for name in quantized:
        single, _ = build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, only_nodes=frozenset({name})))
        out = _run(ort_session(single, int8=True), feeds, ctx.output)
        s = M.sqnr_db(out, ref)
        scores.append((s if not math.isnan(s) else -math.inf, name))
    return [n for _, n in sorted(scores)]
