"""Which quantized layers cost accuracy.

Two measurements per quantized node (Conv, Gemm, MatMul, residual Add):

- *accumulated SQNR*: the node's output in the full Q/DQ model against the FP32 model, both run on
  the evaluation samples with the node outputs exposed. Cheap (two runs) but it grows with depth,
  since every layer inherits its predecessors' error.
- *one layer at a time*: the model output when only this node's Q/DQ is kept. One in-memory build
  per node, and a run of the part of the graph below it (`reference.run_candidates`: the FP32 tensors above it
  come from one run of the FP32 model per group of nodes; same bits as a run of the whole model); it can be capped: `one_at_a_time=N` measures the N nodes with the
  lowest *local* SQNR (the node's output with only its own inputs quantized, all measured in one run
  of an instrumented FP32 graph).

`quantpipe.fallback` turns such a ranking into a decision (which layers to keep in float).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.artifacts import LayerSensitivity
from quantpipe.candidates import FP32_BASE, CandidateShare, run_shared
from quantpipe.errors import EvaluationError, WorkerError
from quantpipe.evalconfig import SensitivityMetric
from quantpipe.execution import Executor, Stashed, plan_shards, share_threads, unstash
from quantpipe.metrics import SquaredSums, finite_or_none, sqnr_from_sums
from quantpipe.onnxgraph import depthwise_convs, expose_outputs, load_onnx, reaching, short_name
from quantpipe.ortsession import ort_session
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.rewrites.shift import tensor_offsets
from quantpipe.reference import COUNTED_SCORES, Reference, prepare_reference, score
from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

__all__ = ["SensitivityMetric", "layer_sensitivity", "tie_said", "worst_first"]

log = logging.getLogger(__name__)


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
    options: QuantizeOptions = QuantizeOptions(),
    calibration_data: Any | None = None,
    task: TaskSpec = CLASSIFICATION,
    executor: Executor | None = None,
    output_axis: int = 0,
) -> tuple[LayerSensitivity, ...]:
    """Per-layer sensitivity of the INT8 Q/DQ model, worst first.

    Args:
        model_path: the FP32 model.
        int8_model: the Q/DQ model that was built (its node outputs are compared); None or "" builds it here
            with the same options.
        amax: the calibrated amax the Q/DQ model was built from.
        eval_dataset: evaluation `Dataset`; the first `max_samples` samples are used.
        output: the model output the one-layer-at-a-time metric scores (default: the first output);
            output_axis: its batch axis.
        one_at_a_time: also measure the output with only one layer quantized: True for every layer, an int N
            for the N layers with the lowest local SQNR (each layer quantized alone, inputs from FP32; one
            instrumented run), False for none.
        metric: the one-layer-at-a-time output metric (sqnr_db is the most discriminating; line_agreement and
            map_iou / box_agreement read the output as `task` says, and layers they score alike are ordered by
            output SQNR).
        options / calibration_data: as given to `write_qdq_model` (smoothing, bias correction and splits
            must match the built model, or the single-layer builds differ from it).
        executor: the run's workers: the one-layer-at-a-time candidates run in shares there (the same numbers
            as in one process); None: this process.

    The accumulated SQNR covers every element of a tensor, padded positions included: in a padded transformer
    batch the padding's hidden states carry large errors that never reach a pooled output, so judge those
    layers by the one-layer-at-a-time output metric.

    Returns:
        One `LayerSensitivity` per quantized node: sqnr_db is the accumulated SQNR of its output;
        output_metric is the one-layer-at-a-time value (None when not measured). Sorted worst first: measured
        nodes by output_metric, then the others by their local SQNR.
    """
    ctx = prepare_reference(model_path, amax, eval_dataset, output=output, batch_size=batch_size,
                            max_samples=max_samples, options=options, calibration_data=calibration_data,
                            executor=executor, output_axis=output_axis)
    built, report = build_qdq_model(ctx.model, amax, ctx.options)
    full, nodes = built, report.quantized_nodes
    if int8_model:
        # Judge the model that was built; it may hold fewer quantized layers (a fallback kept some in float).
        full = load_onnx(int8_model)
        dq_out = {o for n in full.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        in_model = {n.name for n in full.graph.node if any(i in dq_out for i in n.input)}
        nodes = tuple(q for q in nodes if q.name in in_model)
    by_name = {n.name: n for n in ctx.model.graph.node}
    tensors = {q.name: by_name[q.name].output[0] for q in nodes if q.name in by_name}
    local, sqnr = _local_and_accumulated(ctx, built, full, [q.name for q in nodes], sorted(set(tensors.values())),
                                         executor)

    on_path = _on_path(ctx, nodes)
    count = len(nodes) if one_at_a_time is True else int(one_at_a_time or 0)
    order = sorted((q for q in nodes if q.name in on_path), key=lambda q: local.get(q.name, math.inf))
    measured, tie = _one_at_a_time(ctx, amax, order[:max(0, count)], metric, task, executor)

    depthwise = depthwise_convs(ctx.model)
    rows = [
        LayerSensitivity(node=q.name, op_type=q.op_type, tensor=tensors.get(q.name, ""),
                         sqnr_db=finite_or_none(sqnr.get(tensors.get(q.name, ""), math.nan)),
                         output_metric=finite_or_none(measured[q.name]) if q.name in measured else None,
                         metric_name=metric, output_sqnr_db=tie_said(metric, tie.get(q.name)),
                         num_samples=int(ctx.ref.shape[0]), depthwise=q.name in depthwise,
                         reaches_output=q.name in on_path)
        for q in nodes
    ]
    return worst_first(rows, measured, tie, local)


def worst_first(rows: Sequence[LayerSensitivity], measured: Mapping[str, float], tie: Mapping[str, float],
                other: Mapping[str, float]) -> tuple[LayerSensitivity, ...]:
    """Sensitivity rows worst first: the nodes measured one at a time by their output metric (ties: `tie`), then
    the others by `other` (a cheaper per-node SQNR, lowest first). nan sorts as the worst measured value and as
    the least worrying other one."""
    def key(r: LayerSensitivity) -> tuple[int, float, float]:
        if r.node in measured:
            v, t = measured[r.node], tie[r.node]
            return (0, v if not math.isnan(v) else -math.inf, t if not math.isnan(t) else -math.inf)
        o = other.get(r.node, math.inf)
        return (1, o if not math.isnan(o) else math.inf, 0.0)

    return tuple(sorted(rows, key=key))


def _on_path(ctx: Reference, nodes: Sequence[Any]) -> set[str]:
    """The nodes whose results reach the judged output; the others are said (another head's layers)."""
    on_path = reaching(ctx.model, [ctx.output])
    off = [q.name for q in nodes if q.name not in on_path]
    if off:
        log.info("sensitivity: %d quantized layer(s) do not reach model.output '%s' (e.g. %s): not measured one at a "
                 "time", len(off), ctx.output, short_name(off[0]))
    return on_path


def tie_said(metric: str, tie: float | None) -> float | None:
    """The tie-break a row keeps (`LayerSensitivity.output_sqnr_db`): the output SQNR where it orders layers an
    agreement count ties; None where the metric orders alone (the tie-break is then 0)."""
    return finite_or_none(tie) if tie is not None and metric in COUNTED_SCORES else None


def _one_at_a_time(ctx: Reference, amax: Mapping[str, float], nodes: Sequence[Any], metric: str,
                   task: TaskSpec, executor: Executor | None) -> tuple[dict[str, float], dict[str, float]]:
    """The output metric with only each node quantized, and a tie-break (output SQNR, for the metrics many layers
    score alike: agreement counts). The candidates run in shares on the executor's workers (`candidates`)."""
    measured: dict[str, float] = {}
    tie: dict[str, float] = {}
    share = CandidateShare(ctx.model, amax, ctx.options, tuple({"only_nodes": frozenset({q.name})} for q in nodes),
                           FP32_BASE, tuple(ctx.feeds), ctx.output, output_axis=ctx.output_axis)
    valid = task.valid_of(ctx.feeds)  # evaluate.valid_mask: the positions that count
    for q, out in zip(nodes, run_shared(executor, share), strict=True):
        measured[q.name] = score(metric, out, ctx.ref, ctx.labels, task, valid)
        tie[q.name] = score("sqnr_db", out, ctx.ref, None, task, valid) if metric in COUNTED_SCORES else 0.0
        log.debug("sensitivity %s (%s): %s = %.4g", q.name, q.op_type, metric, measured[q.name])
    return measured, tie


@dataclasses.dataclass(frozen=True)
class _SqnrJob:
    """One share of the SQNR runs (`_sqnr_sums`): handles to the instrumented FP32 graph (`_instrumented`), the
    Q/DQ model with the accumulated tensors exposed, an FP32 model exposing the tensors the first does not hold,
    and the samples; the share's batches."""

    local: Stashed
    """(instrumented model, its outputs, (node, fp32 tensor, local tensor) pairs, offsets) or None."""
    accumulated: Stashed
    """(Q/DQ model exposing `tensors`, tensors, offsets, FP32 model exposing the missing ones or None, missing)
    or None."""
    feeds: Stashed
    batches: tuple[int, int]
    threads: int | None = None


#: Per batch: ({node: (signal, noise)} of the local SQNR, {tensor: (signal, noise)} of the accumulated SQNR).
_BatchSums = tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]


def _sqnr_sums(job: _SqnrJob) -> list[_BatchSums]:
    """Run in a worker (or this process): the local and accumulated SQNR's squared sums of each of the share's
    batches. The FP32 tensors of the instrumented run serve the accumulated SQNR too (without graph optimizations
    every node runs as written, so they are the bits a run of the FP32 model gives)."""
    local, accumulated = unstash(job.local), unstash(job.accumulated)
    lo, hi = job.batches
    feeds = unstash(job.feeds)[lo:hi]
    sess = ort_session(local[0], optimize=False, threads=job.threads) if local else None
    qs = fs = None
    if accumulated:
        qs = ort_session(accumulated[0], optimize=False, threads=job.threads)
        fs = ort_session(accumulated[3], optimize=False, threads=job.threads) if accumulated[3] else None
    out: list[_BatchSums] = []
    sums = SquaredSums()
    for f in feeds:
        fp: dict[str, tuple[np.ndarray, float]] = {}
        loc: dict[str, tuple[float, float]] = {}
        if sess is not None:
            _, outs, pairs, offsets = local
            res = dict(zip(outs, sess.run(list(outs), dict(f)), strict=True))
            for name, a, b in pairs:
                x = res[a]
                fp[a] = (x, sums.signal(x))
                loc[name] = (fp[a][1], sums.error(res[b], x, offsets.get(a, 0.0)))
            del res
        acc: dict[str, tuple[float, float]] = {}
        if qs is not None:
            _, tensors, offsets, _, missing = accumulated
            if fs is not None:  # not among the instrumented run's tensors: from a run of the FP32 model itself
                fp.update({t: (x, sums.signal(x))
                           for t, x in zip(missing, fs.run(list(missing), dict(f)), strict=True)})
            for t, y in zip(tensors, qs.run(list(tensors), dict(f)), strict=True):
                x, sq = fp[t]
                acc[t] = (sq, sums.error(y, x, offsets.get(t, 0.0)))
        out.append((loc, acc))
        del fp
    return out


def _local_and_accumulated(ctx: Reference, built: Any, full: Any, names: Sequence[str], tensors: Sequence[str],
                           executor: Executor | None) -> tuple[dict[str, float], dict[str, float]]:
    """The local SQNR of each quantized node (`_instrumented`) and the accumulated SQNR of each tensor (the Q/DQ
    model `full` against FP32, over every element), summed over the evaluation batches in batch order: the
    batches run in shares on the executor's workers, with the same numbers as in one process."""
    local = _instrumented(ctx, built, names)
    in_full = {o for n in full.graph.node for o in n.output}
    tensors = [t for t in tensors if t in in_full]  # a split activation's producer writes a new tensor
    accumulated = None
    if tensors:
        have = {a for _, a, _ in local[2]} if local else set()
        missing = tuple(t for t in tensors if t not in have)
        fp = expose_outputs(ctx.model, list(missing)) if missing else None
        # Unoptimized sessions: with fusions on, onnxruntime may hand back another value for an exposed
        # intermediate of a Q/DQ graph (e.g. a Conv output fused with its Clip).
        accumulated = (expose_outputs(full, tensors), tuple(tensors), tensor_offsets(full), fp, missing)
    if local is None and accumulated is None:
        return {}, {}
    batches = len(ctx.feeds)
    work = (local[0].ByteSize() if local else 0) + (accumulated[0].ByteSize() if accumulated else 0)
    shares = plan_shards(executor, items=batches, work_mb=len(ctx.ref) * work / 1e6)
    if executor is None or shares < 2:
        inline = [Stashed("", "inline", value=v) for v in (local, accumulated, tuple(ctx.feeds))]
        sums = [_sqnr_sums(_SqnrJob(inline[0], inline[1], inline[2], batches=(0, batches)))]
    else:
        h = [executor.stash(v) for v in (local, accumulated, tuple(ctx.feeds))]
        cuts = [round(batches * k / shares) for k in range(shares + 1)]
        spans = [(lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo]
        threads = share_threads(executor, len(spans))
        jobs = [_SqnrJob(h[0], h[1], h[2], batches=span, threads=threads) for span in spans]
        sums = executor.map(_sqnr_sums, jobs)
    per_batch = [b for part in sums for b in part]
    if len(per_batch) != batches:
        raise WorkerError(f"the SQNR runs returned {len(per_batch)} of {batches} batches; no partial result is used")
    node_sums: dict[str, list[float]] = {name: [0.0, 0.0] for name, _, _ in (local[2] if local else ())}
    tensor_sums: dict[str, list[float]] = {t: [0.0, 0.0] for t in tensors}
    for loc, acc in per_batch:  # in batch order: the same additions as one process makes
        for k, (sq, n) in loc.items():
            node_sums[k][0] += sq
            node_sums[k][1] += n
        for t, (sq, n) in acc.items():
            tensor_sums[t][0] += sq
            tensor_sums[t][1] += n
    return ({k: sqnr_from_sums(*v) for k, v in node_sums.items()},
            {t: sqnr_from_sums(*v) for t, v in tensor_sums.items()})


def _instrumented(ctx: Reference, qdq: Any, names: Sequence[str]
                  ) -> tuple[Any, tuple[str, ...], tuple[tuple[str, str, str], ...], dict[str, float]] | None:
    """The graph the local SQNR runs: the node's output when only its own inputs are quantized, the rest in FP32.

    An instrumented FP32 graph: it also holds the Q/DQ model's quantization nodes (which read the FP32 tensors
    there) and a copy of every quantized node fed through them. Unlike the accumulated SQNR this does not fall
    with depth: it is the layer's own error (input rounding times its gain). Returns (the model, its
    exposed outputs, (node, fp32 tensor, local tensor) pairs, the shift offsets), None when no node is there.
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
        return None
    g.node.extend(extra)
    sorted_nodes = _toposort(list(g.node), {i.name for i in g.input} | {t.name for t in g.initializer})
    del g.node[:]
    g.node.extend(sorted_nodes)
    outs = tuple(t for _, a, b in pairs for t in (a, b))
    return expose_outputs(m, list(outs)), outs, tuple(pairs), offsets


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
