"""The evaluate stage: every built variant run over the evaluation data and measured against the FP32 reference.

The FP32 onnxruntime variant runs first and is the reference; every other variant's judged output (model.output)
and its other outputs (`quantpipe.other_outputs`) are compared with its. With several workers the outputs are
computed first as variants x shards (`evaluate.sharded_outputs`, the same arrays as one process); metrics and latency
then run in this process, one variant at a time, so latency is never measured beside other work.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantpipe.artifacts import EvalResult, Variant
from quantpipe.config import PipelineConfig, variant_name
from quantpipe.execution import Executor
from quantpipe.inputs import LoadedInputs, state_pairs
from quantpipe.workspace import Progress

if TYPE_CHECKING:
    from quantpipe.evaluate import VariantOutputs

__all__ = ["other_axes", "stage_evaluate"]

log = logging.getLogger(__name__)


def stage_evaluate(
    cfg: PipelineConfig, li: LoadedInputs, variants: list[Variant], progress: Progress,
    executor: Executor | None = None,
) -> tuple[list[EvalResult], str]:
    """Evaluate every variant that was built; the FP32 ONNX Runtime variant is the reference.

    With an executor of several workers, the variants' outputs are computed first as variants x shards
    (evaluate.sharded_outputs, the same arrays as one process); metrics and latency then run here, one variant
    at a time, so latency is never measured beside other work.
    """
    from quantpipe.evaluate import (
        LABELLED,
        VariantOutputs,
        accuracy_metrics,
        accuracy_threads,
        evaluate_variant,
        open_runner,
        run_outputs,
        warn_about_reference,
    )
    from quantpipe.other_outputs import OtherArrays, OtherCollector, log_others, positions_of
    from quantpipe.taskmetrics import TaskSpec

    ev = cfg.evaluate
    task, hooks, wanted = TaskSpec.from_config(ev), ev.hooks(), ev.wanted()
    lat = ev.latency
    ran = [v for v in variants if v.ran]
    ref_name = variant_name("onnxruntime", "fp32")
    results: list[EvalResult] = []
    reference: np.ndarray | None = None
    ref_others: OtherArrays | None = None
    ref_labelled: dict[str, float] | None = None
    if not any(v.name == ref_name for v in ran):
        log.warning("no %s variant: agreement metrics need the FP32 reference; enable onnxruntime fp32", ref_name)
    order = sorted(ran, key=lambda v: v.name != ref_name)
    threads = cfg.build.backends.onnxruntime.threads
    axes = other_axes(li)
    outputs = _sharded_outputs(cfg, li, order, progress, executor, axes)
    valid = task.valid_of(b.feeds for b in li.eval.batches(cfg.data.batch_size)) if task.valid_mask else None
    positions: np.ndarray | None = None
    for v in order:
        n_lat = len(lat.batch_sizes) if lat.enabled else 0
        if v.name not in outputs and n_lat and accuracy_threads(threads) != threads and v.device == "cpu":
            # The scored outputs on one fixed thread count (evaluate.accuracy_threads), latency on `threads`.
            with progress.task(f"evaluating {v.name}", li.eval.num_samples) as advance, \
                    open_runner(v, accuracy_threads(threads)) as runner:
                collector = OtherCollector(li.output, cfg.model.output_batch_axis, axes)
                outputs[v.name] = VariantOutputs(run_outputs(
                    runner, li.eval, li.output, cfg.data.batch_size, advance, classify=task.task == "classification",
                    output_axis=cfg.model.output_batch_axis, others=collector), collector.result())
        runner = open_runner(v, threads if n_lat else accuracy_threads(threads))
        what = f"measuring {v.name}" if v.name in outputs else f"evaluating {v.name}"
        with progress.task(what, None if v.name in outputs else li.eval.num_samples) as advance, runner:
            res, outs = evaluate_variant(
                runner, li.eval, output=li.output, batch_size=cfg.data.batch_size, metrics=wanted,
                reference=reference, ref_labelled=ref_labelled,
                latency_batch_sizes=lat.batch_sizes if n_lat else (), warmup=lat.warmup, iterations=lat.iterations,
                max_seconds=lat.max_seconds,
                on_batch=advance, task=task, hooks=hooks if v.name != ref_name else (),  # the ref's: below, vs itself
                outputs=outputs.get(v.name), output_axis=cfg.model.output_batch_axis, valid=valid,
                reference_others=ref_others, other_positions=positions, other_axes=axes,
            )
        if v.name == ref_name:
            reference = out = outs.judged
            ref_others = outs.others
            warn_about_reference(out, li.output, task, cfg.gate.rules, li.eval.labels, valid, ev.listed())
            log_others(ref_others, li.output)
            if ref_others.arrays:  # the positions that count, read only where there are other outputs to compare
                positions = valid if valid is not None else positions_of(li.eval, cfg.data.batch_size)
            ref_labelled = {k: float(val) for k, val in res.metrics.items() if k in LABELLED and val is not None}
            # The reference against itself: exact agreement by definition, recomputed for honesty.
            res = dataclasses.replace(res, metrics={**res.metrics, **accuracy_metrics(
                out, out, li.eval.labels, wanted, ref_labelled, task, hooks, valid, outs.by_name(li.output),
                outs.by_name(li.output))})
        results.append(res)
    for v in variants:
        if not v.ran:
            results.append(EvalResult(variant=v.name, num_samples=0, metrics={}, skipped=v.skipped))
    by_name = {r.variant: r for r in results}
    return [by_name[v.name] for v in variants if v.name in by_name], ref_name


def _sharded_outputs(cfg: PipelineConfig, li: LoadedInputs, variants: list[Variant], progress: Progress,
                     executor: Executor | None, axes: dict[str, int]) -> dict[str, VariantOutputs]:
    """The outputs of the variants the executor's workers can run, as variants x shards (empty: one worker)."""
    from quantpipe.evaluate import accuracy_threads, shardable, sharded_outputs
    from quantpipe.execution import model_mb, plan_shards

    if executor is None or executor.workers < 2:
        return {}
    chosen = [v for v in variants if shardable(v, executor)]
    # Small work stays in this process (no pool): samples x the variants' model MB must fill two shards.
    work = li.eval.num_samples * sum(model_mb(v.artifact) for v in chosen if v.artifact and Path(v.artifact).is_file())
    shards = plan_shards(executor, items=len(li.eval.batch_bounds(cfg.data.batch_size)), work_mb=work)
    if not chosen or shards < 2:
        return {}
    total = len(chosen) * li.eval.num_samples
    with progress.task(f"evaluating {len(chosen)} variant(s) on {executor.workers} {executor.engine} workers",
                       total) as advance:
        return sharded_outputs(executor, chosen, li.eval, output=li.output, batch_size=cfg.data.batch_size,
                               threads=accuracy_threads(cfg.build.backends.onnxruntime.threads),
                               on_samples=advance, shards=shards, output_axis=cfg.model.output_batch_axis,
                               other_axes=axes)


def other_axes(li: LoadedInputs) -> dict[str, int]:
    """The batch axis of each output paired with a state input (`inputs.state_pairs`): that input's."""
    return {o: li.eval.batch_axes.get(i, 0) for i, o in state_pairs(li.spec)}
