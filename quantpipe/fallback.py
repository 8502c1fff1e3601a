"""The accuracy fallback: keep the fewest, most sensitive layers in float until the accuracy budget holds.

It keeps layers in float one at a time, greedily, re-evaluating the quantized model on the selection data after
each choice, until the budget is met, then drops any kept layer the budget no longer needs. A budget that cannot
be met is reported with `met=False`. A step's candidates are judged together: each runs only the part of the graph
below its layer, fed from one run of the current model (`reference.run_candidates`; the same bits as a run of the
whole candidate model). With several workers, a step's candidates run in shares on them (`quantpipe.candidates`);
the steps themselves stay in order, so the same layers are kept.

The selection data is the calibration data or a validation split, never the evaluation data: the gate judges
the evaluation data, and a choice made on the samples it judges makes its number optimistic by construction.
A dataset opened with role "evaluation" is refused.

`keep_in="fp16"` records the intent for TensorRT, where a layer left out of INT8 runs in FP16; in the
ONNX Runtime CPU model the same layer simply has no Q/DQ and computes in FP32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from quantpipe import metrics as M
from quantpipe.artifacts import FallbackReport, FallbackStep, LayerSensitivity
from quantpipe.candidates import FP32_BASE, CandidateShare, run_shared, share_count
from quantpipe.config import FALLBACK_METRICS, FallbackMetric
from quantpipe.data import sample_count
from quantpipe.errors import ConfigError
from quantpipe.execution import Executor
from quantpipe.onnxgraph import linear_front_end, reaching, save_onnx, short_name
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.types import QuantizeReport
from quantpipe.reference import CANDIDATES_PER_RUN, Reference, prepare_reference, run_candidates, score
from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

__all__ = ["FallbackMetric", "accuracy_fallback", "best_prefix"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Eval:
    value: float
    """The budget metric."""
    sqnr: float
    """Output SQNR (dB) against FP32: the model's overall fidelity."""
    margin: float
    """Tie-break, higher is better. For top-1 metrics, how far the flipped samples are from agreeing again
    (sum of negative top-1 margins in units of the reference logit spread; 0 when all agree); otherwise `sqnr`
    (cosine, and the task metrics line_agreement, map_iou, box_agreement, pixel_agreement, miou,
    detection_agreement: a step that flips no line, pixel, box or detection still counts by how much closer the
    whole output came)."""


def _measure(metric: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None,
             task: TaskSpec = CLASSIFICATION, valid: np.ndarray | None = None) -> _Eval:
    out, ref_, labels = task.judged_all(out, ref, labels, valid)  # evaluate.valid_mask: the positions that count
    ref = ref if ref_ is None else ref_
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
    return _Eval(score(metric, out, ref, labels, task), s, margin)


class _Search:
    """The fallback's evaluations: each keep-set built and judged once (cached), up to `max_evaluations`."""

    def __init__(self, ctx: Reference, amax: Mapping[str, float], metric: str, target: float,
                 max_evaluations: int, task: TaskSpec = CLASSIFICATION, executor: Executor | None = None,
                 lower_is_better: bool | None = None) -> None:
        self.ctx, self.amax, self.metric, self.target, self.task = ctx, amax, metric, target, task
        self.executor = executor
        self.max_evaluations = max_evaluations
        self.lower_is_better = metric == "top1_drop" if lower_is_better is None else lower_is_better
        self.valid = task.valid_of(ctx.feeds)
        self.cache: dict[frozenset[str], _Eval] = {}
        self.reports: dict[frozenset[str], QuantizeReport] = {}
        self.models: dict[frozenset[str], Any] = {}
        self.current = self.evaluate(frozenset())
        self.keep: list[str] = []
        self.unit_of: dict[str, int] = {}
        """Layers kept in one step together (the linear front end): name -> that step's end in `keep`."""

    def evaluate(self, keep: frozenset[str], *, force: bool = False) -> _Eval:
        return self.evaluate_many([keep], force=force)[0]

    def evaluate_many(self, keeps: Sequence[frozenset[str]], *, base: frozenset[str] | None = None,
                      force: bool = False) -> list[_Eval]:
        """Each keep-set's evaluation, in order, as `evaluate` one at a time would give them (raising
        `_BudgetExhausted` where that would, after caching the ones before). Keep-sets that differ from `base` in
        a layer or two run together, each computing only what differs from the model of `base`
        (`reference.run_candidates`); in shares on the executor's workers when they are work enough for two
        (`candidates.share_count`). `reports` holds the QuantizeReport of the keep-sets built here."""
        todo: list[frozenset[str]] = []
        exhausted = False
        for keep in keeps:
            if keep in self.cache or keep in todo:
                continue
            if len(self.cache) + len(todo) >= self.max_evaluations and not force:
                exhausted = True
                break
            todo.append(keep)
        ctx = self.ctx
        shares = share_count(self.executor, len(todo), ctx.feeds, ctx.model) if len(todo) > 1 else 1
        if shares > 1:  # built and run in shares on the workers (the same outputs as below)
            kept = ctx.options.keep_float_nodes
            share = CandidateShare(ctx.model, self.amax, ctx.options,
                                   tuple({"keep_float_nodes": kept | keep} for keep in todo),
                                   None if base is None else {"keep_float_nodes": kept | base}, tuple(ctx.feeds),
                                   ctx.output, output_axis=ctx.output_axis)
            for keep, out in zip(todo, run_shared(self.executor, share, shares=shares), strict=True):
                self.cache[keep] = _measure(self.metric, out, ctx.ref, ctx.labels, self.task, self.valid)
            todo = []
        for at in range(0, len(todo), CANDIDATES_PER_RUN):
            group = todo[at:at + CANDIDATES_PER_RUN]
            built = [self._build(keep) for keep in group]
            base_model = self._model(base) if base is not None and len(group) > 1 else None
            outs = run_candidates(base_model, [m for m, _ in built], ctx.feeds, ctx.output,
                                  output_axis=ctx.output_axis)
            for keep, (_, rep), out in zip(group, built, outs, strict=True):
                self.cache[keep] = _measure(self.metric, out, ctx.ref, ctx.labels, self.task, self.valid)
                self.reports[keep] = rep
            self.models = {keep: m for keep, (m, _) in zip(group, built, strict=True)}  # the next base is among them
        if exhausted:
            raise _BudgetExhausted
        return [self.cache[k] for k in keeps]

    def _build(self, keep: frozenset[str]) -> tuple[Any, QuantizeReport]:
        ctx = self.ctx
        return build_qdq_model(ctx.model, self.amax, dataclasses.replace(
            ctx.options, keep_float_nodes=ctx.options.keep_float_nodes | keep))

    def _model(self, keep: frozenset[str]) -> Any:
        return self.models[keep] if keep in self.models else self._build(keep)[0]

    def met(self, e: _Eval) -> bool:
        return e.value <= self.target if self.lower_is_better else e.value >= self.target

    def rank(self, e: _Eval) -> tuple[float, float]:
        return (-e.value if self.lower_is_better else e.value, e.margin)

    def improves(self, e: _Eval, than: _Eval) -> bool:
        return e.value < than.value if self.lower_is_better else e.value > than.value


def _greedy(search: _Search, remaining: list[str], ops: Mapping[str, str], *, limit: int,
            candidates_per_step: int, on_step: Callable[[str, float], None] | None, front: Sequence[str] = ()) -> None:
    """Keep the layer that helps most, one at a time, until the budget holds; then drop the kept layers it no
    longer needs. Where no single layer meets the budget, the linear front end (`front`: 2 or more quantized layers
    the input reaches through linear ops, `onnxgraph.linear_front_end`) is tried whole and kept in one step when that
    meets it: a filter bank that INT8 breaks only together (basic-pitch's 26 CQT Convs) is out of reach one layer at a
    time. Progress lives in `search.keep` / `search.current`, so a search stopped by `_BudgetExhausted` reports what
    it had reached."""
    while not search.met(search.current) and remaining and len(search.keep) < limit:
        keep = search.keep
        first = remaining[:max(1, candidates_per_step)]
        trials = list(zip(search.evaluate_many([frozenset(keep + [c]) for c in first], base=frozenset(keep)), first,
                          strict=True))
        best, choice = max(trials, key=lambda t: search.rank(t[0]))
        if not search.improves(best, search.current) and len(remaining) > candidates_per_step:
            # None of the most sensitive layers moves the budget metric (typically: the last few
            # samples sit on a near-tie that no single top layer flips). Keeping one only for its
            # margin tends to stack several layers that never flip it; look at every layer first.
            rest = remaining[candidates_per_step:]
            log.info("fallback: none of the %d most sensitive layers moves %s; trying the other %d one by one",
                     candidates_per_step, search.metric, len(rest))
            trials += zip(search.evaluate_many([frozenset(keep + [c]) for c in rest], base=frozenset(keep)), rest,
                          strict=True)
            best, choice = max(trials, key=lambda t: search.rank(t[0]))
        unit, best = _front_end_step(search, front, remaining, limit, (choice,), best)
        search.keep.extend(unit)
        for c in unit:
            remaining.remove(c)
        search.current = best
        if len(unit) > 1:
            search.unit_of.update(dict.fromkeys(unit, len(search.keep)))
            log.info("fallback: no single layer meets the budget; keeping the linear front end in float (%d layers: "
                     "%s) -> %s = %.6g", len(unit), ", ".join(map(short_name, unit[:3])) + (", ..." if len(unit) > 3 else ""),
                     search.metric, best.value)
        else:
            log.info("fallback: keeping %s (%s) in float -> %s = %.6g", short_name(choice), ops[choice], search.metric,
                     best.value)
        if on_step is not None:
            on_step(unit[0] if len(unit) == 1 else f"the linear front end ({len(unit)} layers)", best.value)
    if search.met(search.current):
        # Drop layers the budget no longer needs (a later choice can make an earlier one redundant).
        keep = list(search.keep)
        if len(keep) > 1 and search.max_evaluations - len(search.cache) >= 2 * len(keep) + 1:
            # Every single removal at once (in shares on the workers when there are any), where the budget has room
            # for them and the loop's own evaluations: the loop reads them from the cache, deciding as it would
            # one at a time (a removal it takes makes the later sets other ones, evaluated then).
            search.evaluate_many([frozenset(k for k in keep if k != c) for c in reversed(keep)], base=frozenset(keep))
        for c in list(reversed(search.keep)):
            trial = [k for k in search.keep if k != c]
            if search.met(search.evaluate(frozenset(trial))):
                search.keep = trial
        search.current = search.evaluate(frozenset(search.keep))


def _front(ctx: Reference, remaining: Sequence[str]) -> list[str]:
    """The quantized layers of the model's linear front end (`onnxgraph.linear_front_end`), in ranking order."""
    front = linear_front_end(ctx.model)
    return [n for n in remaining if n in front]


def _front_end_step(search: _Search, front: Sequence[str], remaining: Sequence[str], limit: int,
                    unit: tuple[str, ...], best: _Eval) -> tuple[tuple[str, ...], _Eval]:
    """The step `_greedy` takes: `unit` (the best single layer, `best` with it), or the whole linear front end where
    that meets the budget and the single layer does not (all of it still quantized, within `limit`)."""
    if len(front) < 2 or search.met(best) or not set(front) <= set(remaining) or len(search.keep) + len(front) > limit:
        return unit, best
    whole = search.evaluate_many([frozenset([*search.keep, *front])], base=frozenset(search.keep))[0]
    return (tuple(front), whole) if search.met(whole) else (unit, best)


def accuracy_fallback(
    model_path: str | os.PathLike[str],
    amax: Mapping[str, float],
    dataset: Any,
    *,
    metric: FallbackMetric,
    target: float,
    keep_in: Literal["fp16", "fp32"] = "fp16",
    max_layers: int | None = None,
    out_path: str | os.PathLike[str] | None = None,
    output: str | None = None, output_axis: int = 0, batch_size: int = 8, max_samples: int | None = None,
    options: QuantizeOptions = QuantizeOptions(), calibration_data: Any | None = None,
    sensitivity: Sequence[LayerSensitivity] | None = None,
    candidates_per_step: int = 12, max_evaluations: int = 400, ranking_samples: int = 32,
    on_step: Callable[[str, float], None] | None = None,
    task: TaskSpec = CLASSIFICATION,
    executor: Executor | None = None,
    lower_is_better: bool | None = None,
) -> tuple[QuantizeReport, FallbackReport]:
    """Keep the fewest, most sensitive layers in float until the accuracy budget holds.

    Args:
        model_path / amax: the FP32 model; calibrated amax per tensor.
        dataset: the `Dataset` the layers are chosen and the budget measured on: calibration or validation data
            (labels for top1_drop), never the evaluation data (role "evaluation": ConfigError).
        metric: top1_agreement, cosine, line_agreement (`task` ctc), map_iou / box_agreement (dense), pixel_agreement
            / miou (segmentation), detection_agreement (detection): >= target; top1_drop (labels): <= target; vs FP32;
            or a name one of `task.hooks` returns (`lower_is_better`: which way it reads; default higher).
        target: the budget. max_layers: keep at most this many layers in float (None: no limit).
        keep_in: what a kept layer runs in on TensorRT (fp16 or fp32); in ONNX Runtime it computes in FP32.
        out_path: write the final Q/DQ model here (checked, atomically; None: only report); options /
            calibration_data: how to quantize, as given to `write_qdq_model`.
        sensitivity: a precomputed ranking (worst first), measured on selection data, not the evaluation data;
            default: one-layer-at-a-time output SQNR measured here on `ranking_samples` samples of `dataset`.
        candidates_per_step: how many of the next-ranked layers are tried at each step; the one that raises the
            budget metric most is kept (ties: the one that brings the flipped samples' top-1 margins closest to
            agreeing; for cosine, the output SQNR). When none of them raises the metric, every remaining layer
            is tried before one is kept for its margin alone.
        max_evaluations: cap on model builds + evaluation runs (the search stops there and reports met=False).
        ranking_samples: samples that rank the layers one at a time (when `sensitivity` is not given).
        on_step: progress callback (layer name, metric after keeping it); task / output_axis: how the output is
            read, its batch axis. executor: the ranking's and each step's candidates run on its workers.

    Returns: the final model's QuantizeReport and the FallbackReport (met=False when the budget was not reached).
    """
    role = _check_arguments(metric, keep_in, dataset, task)
    ctx = prepare_reference(model_path, amax, dataset, output=output, batch_size=batch_size,
                            max_samples=max_samples, options=options, calibration_data=calibration_data,
                            executor=executor, output_axis=output_axis)
    _check_labels(metric, ctx, role, dataset)
    search = _Search(ctx, amax, metric, target, max_evaluations, task, executor, lower_is_better)
    initial = search.current
    first = search.reports[frozenset()]
    ops = {q.name: q.op_type for q in first.quantized_nodes}
    exhausted = False
    log.info("fallback: the INT8 model reads %s = %.6g on %d %s sample(s) (budget %s %.6g)%s", metric, initial.value,
             int(ctx.ref.shape[0]), role or "given", "<=" if search.lower_is_better else ">=", target,
             "" if search.met(initial) else f"; ranking its {len(ops)} quantized layers one at a time")
    if not search.met(initial):
        try:
            ranking = _ranking(ctx, amax, [q.name for q in first.quantized_nodes], sensitivity, ranking_samples,
                               executor, task)
            remaining = [n for n in ranking if n in ops]
            _greedy(search, remaining, ops, candidates_per_step=candidates_per_step, on_step=on_step,
                    limit=max_layers if max_layers is not None else len(remaining), front=_front(ctx, remaining))
        except _BudgetExhausted:
            exhausted = True
            log.warning("fallback: stopped after %d evaluations (max_evaluations)", max_evaluations)
    _best_prefix(search)
    keep, current = search.keep, search.current
    steps = _steps(search, keep, ops, keep_in, initial)
    rep = _final_model(ctx, amax, search, keep, current, exhausted=exhausted, max_layers=max_layers,
                       model_path=model_path, out_path=out_path)
    fallback = FallbackReport(metric=metric, target=float(target), initial=initial.value, final=current.value,
                              met=search.met(current), num_quantizable=first.num_quantizable, steps=steps,
                              chosen_on=role, chosen_samples=int(ctx.ref.shape[0]),
                              lower_is_better=search.lower_is_better)
    _say_unmet(fallback, rep, role)
    return rep, fallback


def _check_labels(metric: str, ctx: Reference, role: str | None, dataset: Any) -> None:
    """ConfigError where the budget metric cannot be read from this output or data."""
    if metric in ("top1_agreement", "top1_drop") and ctx.ref.size <= len(ctx.ref):
        # An argmax over one column is always 0: 'met, 0 of 26 layers kept' on a per-character sigmoid (found probing).
        raise ConfigError(
            f"the fallback metric {metric} needs class scores of 2 classes or more per sample, but model.output "
            f"'{ctx.output}' has shape {list(ctx.ref.shape)} on the {role or 'given'} data. Use a metric of its task "
            f"(evaluate.task and its metrics), or cosine.")
    if metric == "top1_drop" and ctx.labels is None:
        raise ConfigError(
            f"the fallback metric top1_drop needs labels in the data it chooses on ({role or 'the given'} data "
            f"{getattr(dataset, 'path', '')}); add a labelled validation split (data.validation with labels), or "
            "use top1_agreement or cosine, which need no labels.")


def _say_unmet(fallback: FallbackReport, rep: QuantizeReport, role: str | None) -> None:
    """A budget not met, at WARNING level: the CLI, the log and the report's warnings say it, not only the fallback's
    section deep in report.md under a passing gate (found probing a pitch tracker)."""
    if fallback.met:
        return
    log.warning("the accuracy fallback did not meet its budget on the %s data: %s. Raise build.fallback.max_layers "
                "(or max_evaluations), or loosen the budget.", role or "selection",
                next(w for w in rep.warnings if "NOT met" in w))


def best_prefix(ranks: Mapping[int, tuple[float, float]]) -> int:
    """Of the step counts measured, the one whose keep-set ranks highest (`_Search.rank`: the budget metric, then
    the margin); the fewest steps among equals."""
    return max(ranks, key=lambda k: (ranks[k], -k))


def _best_prefix(search: _Search) -> None:
    """A search that did not meet its budget keeps the layers up to its best step (by `_Search.rank`; the fewest
    among equals), not every step it took: a step kept for its margin alone can lower the metric, and a search that
    stopped there reported less than it had reached (PP-OCRv3 rec, found probing: 0.875 -> 0.9375 on the fourth of
    ten steps, 0.922 at the tenth)."""
    if search.met(search.current):
        return
    seen = {k: search.cache[frozenset(search.keep[:k])] for k in range(len(search.keep) + 1)
            if frozenset(search.keep[:k]) in search.cache}
    k = best_prefix({n: search.rank(e) for n, e in seen.items()})
    e = seen[k]
    if k < len(search.keep):
        log.info("fallback: budget not met; keeping the first %d of the %d layers it kept, where %s was best (%.4f; "
                 "%.4f after all of them)", k, len(search.keep), search.metric, e.value, search.current.value)
        search.keep, search.current = search.keep[:k], e


def _check_arguments(metric: str, keep_in: str, dataset: Any, task: TaskSpec) -> str | None:
    """Refuse an unknown metric (not built in, and no hook to return it) or keep_in, and the evaluation data; return
    the dataset's role."""
    if metric not in FALLBACK_METRICS and not task.hooks:
        raise ConfigError(f"fallback metric must be one of {', '.join(FALLBACK_METRICS)} or a hook's (evaluate.metrics),"
                          f" not '{metric}'.")
    if metric not in FALLBACK_METRICS:
        task.check_fallback_hooks(metric)  # before any work
    if keep_in not in ("fp16", "fp32"):
        raise ConfigError(f"fallback keep_in must be fp16 or fp32, not '{keep_in}'.")
    role = getattr(dataset, "role", None)
    if role == "evaluation":
        raise ConfigError(
            f"the accuracy fallback was given the evaluation data ({getattr(dataset, 'path', '?')}); it chooses "
            "which layers stay in float, and choosing on the data the gate judges makes the gate's number "
            "optimistic. Pass the calibration data or a separate validation split (data.validation).")
    return role


def _steps(search: _Search, keep: Sequence[str], ops: Mapping[str, str], keep_in: str,
           initial: _Eval) -> tuple[FallbackStep, ...]:
    """The metric before and after each kept layer, in the order they were kept (for the report)."""
    steps: list[FallbackStep] = []
    before, i = initial, 0
    while i < len(keep):
        j, unit = i + 1, search.unit_of.get(keep[i])
        while unit is not None and j < len(keep) and search.unit_of.get(keep[j]) == unit:
            j += 1  # the layers kept in one step together (the linear front end) are one step here too
        after = search.evaluate(frozenset(keep[:j]), force=True)  # at most len(keep) more runs
        steps += [FallbackStep(node=name, op_type=ops[name], kept_in=keep_in, metric_before=(after if k else before).value,
                               metric_after=after.value, same_step=k > 0) for k, name in enumerate(keep[i:j])]
        before, i = after, j
    return tuple(steps)


def _final_model(ctx: Reference, amax: Mapping[str, float], search: _Search, keep: Sequence[str], current: _Eval, *,
                 exhausted: bool, max_layers: int | None, model_path: str | os.PathLike[str],
                 out_path: str | os.PathLike[str] | None) -> QuantizeReport:
    """Build (and write, with `out_path`) the model with `keep` in float; its report says when the budget failed."""
    final_opts = dataclasses.replace(ctx.options, keep_float_nodes=ctx.options.keep_float_nodes | frozenset(keep))
    model, rep = build_qdq_model(ctx.model, amax, final_opts)
    warnings = list(rep.warnings)
    if not search.met(current):
        why = "max_evaluations ran out" if exhausted else (
            f"max_layers={max_layers} reached" if max_layers is not None and len(keep) >= max_layers
            else "every quantized layer was tried")
        warnings.append(f"accuracy budget {search.metric} {'<=' if search.lower_is_better else '>='} "
                        f"{search.target} NOT met: {current.value:.8g} after keeping {len(keep)} layer(s) in float "
                        f"({why})")
    if out_path is not None:
        warnings += save_onnx(model, out_path, reference=ctx.model)
    # The report's opset is the user's file's, not that of the copy the search upgraded (Q/DQ per channel needs 13).
    return dataclasses.replace(rep, model_path=os.fspath(model_path), opset_before=ctx.source_opset,
                               output_path=os.fspath(out_path) if out_path is not None else None,
                               warnings=tuple(warnings))


class _BudgetExhausted(Exception):
    """Raised inside the fallback when max_evaluations is reached."""


def _ranking(ctx: Reference, amax: Mapping[str, float], quantized: Sequence[str],
             sensitivity: Sequence[LayerSensitivity] | None, samples: int, executor: Executor | None,
             task: TaskSpec = CLASSIFICATION) -> list[str]:
    """Layer names, most sensitive first: the given ranking, or one-layer-at-a-time output SQNR; only layers whose
    results reach the judged output (another head's layers cannot move the budget)."""
    on_path = reaching(ctx.model, [ctx.output])
    quantized = [q for q in quantized if q in on_path]
    if sensitivity:
        names = [s.node for s in sensitivity if s.node in on_path]
        return names + [q for q in quantized if q not in set(names)]
    # A subset is enough to order the layers; the budget itself is always judged on every sample.
    feeds, n = [], 0
    for f in ctx.feeds:
        if n >= samples:
            break
        feeds.append(f)
        n += sample_count(f)
    ref = ctx.ref[:n]
    scores = []
    share = CandidateShare(ctx.model, amax, ctx.options, tuple({"only_nodes": frozenset({name})} for name in quantized),
                           FP32_BASE, tuple(feeds), ctx.output, output_axis=ctx.output_axis)
    valid = task.valid_of(feeds)  # evaluate.valid_mask: the positions that count
    for name, out in zip(quantized, run_shared(executor, share), strict=True):
        s = score("sqnr_db", out, ref, None, task, valid)
        scores.append((s if not math.isnan(s) else -math.inf, name))
    return [n for _, n in sorted(scores)]
