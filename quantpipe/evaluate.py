"""The evaluate stage: every variant on the same evaluation set, against labels and the reference.

Run first, judge later: this module records raw numbers (accuracy, agreement with the FP32
reference, latency) and never decides pass or fail; quantpipe.gate does that.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe import metrics as M
from quantpipe.artifacts import IDENTICAL_KEY, ORT_OPTIMIZATION_KEY, EvalResult, LatencyStats, Variant
from quantpipe.backends.base import Runner, Timings
from quantpipe.data import Dataset, varying_output
from quantpipe.errors import DataError, EvaluationError
from quantpipe.execution import Executor, shard_bounds
from quantpipe.other_outputs import (
    OTHER_KEY,
    OtherArrays,
    OtherCollector,
    all_identical,
    compare_others,
    warn_nonfinite,
    worst_db,
)
from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec, run_hooks, task_metrics

__all__ = ["LABELLED", "run_outputs", "accuracy_metrics", "latency_stats", "latency_feeds", "evaluate_variant",
           "open_runner", "warn_if_constant",
           "warn_if_no_detections", "warn_if_cosine_blind", "warn_about_reference", "warn_if_labels_unread",
           "warn_if_offset_dominates",
           "with_sessions_checked", "ORT_OPTIMIZATION_KEY",
           "OutputsJob", "VariantOutputs", "outputs_job", "sharded_outputs", "shardable", "stack_outputs"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class VariantOutputs:
    """A variant's outputs on the evaluation samples: the judged one (model.output) and the others."""

    judged: np.ndarray
    others: OtherArrays = dataclasses.field(default_factory=OtherArrays)

    def by_name(self, output: str) -> dict[str, np.ndarray]:
        """Every output kept, by name, model.output (`output`) first: what a hook declaring `all_outputs` is given."""
        return _by_name(output, self.judged, self.others)


def _by_name(output: str, judged: np.ndarray, others: OtherArrays | None) -> dict[str, np.ndarray]:
    return {output: judged, **(others.arrays if others is not None else {})}


def run_outputs(
    runner: Runner, dataset: Dataset, output: str, batch_size: int, on_batch: ProgressFn | None = None,
    *, classify: bool = True, output_axis: int = 0, others: OtherCollector | None = None,
) -> np.ndarray:
    """Run every evaluation batch; return the chosen output for all samples, stacked on axis 0 (its batch axis
    `output_axis` moved there: a time-major [T, N, C] output comes back [N, T, C]). `others` collects the rest."""
    chunks: list[np.ndarray] = []
    for batch in dataset.batches(batch_size):
        outs = runner.infer(batch.feeds)
        if others is not None:
            others.add(outs, batch.size)
        if output not in outs:
            raise EvaluationError(f"variant {runner.name} has no output '{output}' (outputs: {sorted(outs)}).")
        chunk = np.asarray(outs[output], dtype=np.float32)
        if chunk.ndim <= output_axis or chunk.shape[output_axis] != batch.size:
            raise DataError(
                f"output '{output}' of variant {runner.name} has shape {list(chunk.shape)} for a batch of {batch.size} "
                f"sample(s): its axis {output_axis} is not the batch, and quantpipe compares outputs sample by sample "
                f"along that axis. Set model.output_batch_axis to the axis that holds the samples (1 for an RNN's "
                f"time-major [T, N, C]), or model.output to another output (a detector's raw head before its "
                f"NonMaxSuppression, whose [K, 4] boxes have no batch axis).")
        if output_axis:
            chunk = np.ascontiguousarray(np.moveaxis(chunk, output_axis, 0))
        chunks.append(chunk)
        if classify and len(chunks) == 1 and _is_classifier(chunks[0]):
            # Where the model leaves the class count dynamic, the first batch tells it: check the labels
            # against it before anything is scored (a no-op when the load stage already could).
            dataset.check_label_range(int(chunks[0].shape[1]), output)
        if on_batch is not None:
            on_batch(batch.size)
    return stack_outputs(chunks, runner.name, output)


def stack_outputs(chunks: Sequence[np.ndarray], variant: str, output: str) -> np.ndarray:
    """The outputs of consecutive batches (or shards) stacked on axis 0; EvaluationError when their shapes differ."""
    shapes = {c.shape[1:] for c in chunks}
    if len(shapes) > 1:
        raise varying_output(output, list(shapes), f"variant {variant}")
    return np.concatenate(chunks, axis=0)


def _is_classifier(out: np.ndarray) -> bool:
    """[N, classes] with more than one class: what top-1/top-5 against labels are computed on."""
    return out.ndim == 2 and out.shape[1] > 1


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def accuracy_metrics(
    out: np.ndarray,
    ref: np.ndarray | None,
    labels: np.ndarray | None,
    wanted: Sequence[str],
    ref_labelled: dict[str, float] | None = None,
    task: TaskSpec = CLASSIFICATION,
    hooks: Sequence[str] = (),
    valid: np.ndarray | None = None,
    all_outputs: Mapping[str, np.ndarray] | None = None,
    all_reference: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float | None]:
    """Accuracy against labels and agreement with the reference, for the metrics asked for.

    `ref_labelled` holds the reference's own labelled metrics (LABELLED) so drops can be
    recorded beside them. `task` says how to read a CTC or dense output; `hooks` are `module:function` metrics.
    `valid`: the positions that count (evaluate.valid_mask, `TaskSpec.judged`); the hooks read whole outputs, and
    those that declare it every output by name (`all_outputs`, FP32's `all_reference`; `taskmetrics.run_hooks`).
    """
    whole = (out, ref, labels)
    out, ref, labels = task.judged_all(out, ref, labels, valid)
    res: dict[str, float | None] = {}
    classify = _is_classifier(out) and task.task == "classification"
    if labels is not None and classify and out.shape[0] == labels.shape[0]:
        if "top1" in wanted:
            res["top1"] = M.topk_accuracy(out, labels, 1)
        if "top5" in wanted:
            res["top5"] = M.topk_accuracy(out, labels, 5)
        if ref_labelled:
            for k in ("top1", "top5"):
                if k in res and k in ref_labelled and res[k] is not None:
                    res[f"{k}_drop"] = ref_labelled[k] - float(res[k])  # type: ignore[arg-type]
    if ref is not None:
        if ref.shape != out.shape:
            raise EvaluationError(f"output shape {out.shape} differs from the reference's {ref.shape}.")
        if "top1_agreement" in wanted and classify:
            res["top1_agreement"] = M.top1_agreement(out, ref)
        if "cosine" in wanted:
            res["cosine"] = _finite(M.mean_cosine(out, ref))
        if "sqnr_db" in wanted:
            res["sqnr_db"] = _finite(M.sqnr_db(out, ref))
            res.update(_hidden_channel(out, ref, res["sqnr_db"], task))
        if "max_abs_error" in wanted:
            res["max_abs_error"] = _finite(M.max_abs_error(out, ref))
    res.update(task_metrics(out, ref, labels, wanted, task))
    if ref_labelled and res.get("line_accuracy") is not None and "line_accuracy" in ref_labelled:
        res["line_accuracy_drop"] = ref_labelled["line_accuracy"] - float(res["line_accuracy"])  # type: ignore[arg-type]
    if ref_labelled and res.get("label_mae") is not None and "label_mae" in ref_labelled:
        res["label_mae_increase"] = float(res["label_mae"]) - ref_labelled["label_mae"]  # type: ignore[arg-type]
    if hooks:
        res.update(run_hooks(hooks, *whole, all_outputs=all_outputs, all_reference=all_reference))
    return res


LABELLED = ("top1", "top5", "line_accuracy", "label_mae")
"""The metrics against labels whose change from the reference's is recorded too (`*_drop`, `label_mae_increase`)."""

CHANNEL_GAP_DB = 10.0
"""How far below the pooled output SQNR one channel must be to be recorded (`channel_sqnr_min_db`)."""


def _hidden_channel(out: np.ndarray, ref: np.ndarray, pooled: float | None, task: TaskSpec) -> dict[str, float]:
    """`channel_sqnr_min_db` (its channel and that channel's axis, `metrics.channel_axis`) where one channel of an
    output of rank 3 or more is CHANNEL_GAP_DB or more below the pooled SQNR (a YOLO head's class rows under its box
    rows); nothing otherwise, nor for a CTC output, whose axis 1 is time."""
    if pooled is None or task.task == "ctc":
        return {}
    worst = M.worst_channel_sqnr_db(out, ref)
    if worst is None or worst[2] > pooled - CHANNEL_GAP_DB:
        return {}
    return {"channel_sqnr_min_db": worst[2], "channel_sqnr_min_index": float(worst[1]),
            "channel_sqnr_min_axis": float(worst[0])}


def warn_if_constant(reference: np.ndarray, output: str) -> bool:
    """Warn (and return True) where the FP32 reference output is the same for every evaluation sample: it does not
    depend on the input there, so every variant's agreement and SQNR against it say little (SSDlite with an untrained
    head scored 300 dB for every candidate, found probing)."""
    if len(reference) < 2 or not np.array_equal(reference, np.broadcast_to(reference[:1], reference.shape)):
        return False
    log.warning("the FP32 reference's model.output '%s' is the same for all %d evaluation samples: it does not depend "
                "on the input here (an untrained head? the wrong output?), so agreement and SQNR against it say little "
                "about quantization. Judge an output that varies with the input.", output, len(reference))
    return True


def warn_if_cosine_blind(reference: np.ndarray, output: str, rules: Sequence[Any]) -> bool:
    """Warn (and return True) where a gate rule judges `cosine` on an output of one value per sample: there it is
    the cosine of all samples' values as one vector, blind to an error that scales them all (a pitch tracker's
    octave, x2, and semitone, x1.0595, both score 1.0: found probing)."""
    gated = sorted({r.variant for r in rules if r.metric == "cosine"})
    if not gated or reference.ndim < 1 or reference.size != len(reference):
        return False
    log.warning("gate rule(s) on cosine (%s) judge model.output '%s', one value per sample: its cosine is that of all "
                "samples' values as one vector, and scaling them all (a unit, an octave) keeps it at 1.0. Gate on "
                "sqnr_db or max_abs_error there, or on a hook metric of the task.", ", ".join(gated), output)
    return True


def warn_if_offset_dominates(reference: np.ndarray, output: str, task: TaskSpec) -> bool:
    """Warn (and return True) where an output read as class scores sits around an offset that holds most of its
    power: sqnr_db and cosine count the offset as signal (a speech-quality model's MOS, 2.3-3.3: 24.6 dB and cosine
    0.9994 for an error of 0.08 MOS that flipped 3 of 64 decisions; face landmarks 45.3 dB, 29.7 around their mean
    position; found probing). Class scores, embeddings and maps sit at 0.5-4.7 dB (`metrics.OFFSET_WARN_DB`)."""
    if task.task != "classification" or np.ndim(reference) == 0 or len(reference) < 2:
        return False
    sums = M.OffsetSums.of(reference)
    offset_db = sums.db()
    if not M.OFFSET_WARN_DB <= offset_db < math.inf:  # inf: constant, said by warn_if_constant
        return False
    log.warning("model.output '%s' varies little around its mean over the evaluation samples (mean %.4g, spread %.4g): "
                "sqnr_db and cosine count that offset as signal and read %.1f dB above the error measured against the "
                "outputs' own variation. For a score, an estimate or coordinates, set evaluate.task: regression (mae in "
                "the output's units, centered_sqnr_db against that variation, rank_correlation); for a detector's raw "
                "head, evaluate.task: detection; or judge with a hook metric. (Class probabilities where one class "
                "dominates the samples sit there too: judge those by top1_agreement.)",
                output, sums.mean(), math.sqrt(sums.spread() / np.size(reference)), offset_db)
    return True


def warn_if_labels_unread(reference: np.ndarray, output: str, task: TaskSpec, labels: np.ndarray | None) -> bool:
    """Warn (and return True) where data.evaluation has labels that nothing reads: a classification output that is
    not class scores [N, classes] of 2 or more (a single sigmoid per sample showed top-1 as '—' without a word:
    found probing); or labels one per sample where evaluate.valid_mask scores each position of a per-token output."""
    if labels is None or task.task != "classification":
        return False
    if task.valid_mask:
        if labels.ndim == 2 or np.ndim(reference) < 3:
            return False
        log.warning("data.evaluation has one label per sample, but evaluate.valid_mask scores each position of "
                    "model.output '%s' %s: top1 / top5 read a label per position, rows [N, T] (-100 where a position "
                    "is not scored), and are not measured.", output, list(reference.shape))
        return True
    if _is_classifier(reference):
        return False
    log.warning("data.evaluation has labels, but model.output '%s' has shape %s, not class scores [N, classes] of 2 "
                "classes or more: top1 / top5 and their drops are not measured. A single score per sample: judge it "
                "with a hook metric (e.g. accuracy at your threshold); a map or sequence: set evaluate.task.", output,
                list(reference.shape))
    return True


def warn_about_reference(reference: np.ndarray, output: str, task: TaskSpec, rules: Sequence[Any],
                         labels: np.ndarray | None = None, valid: np.ndarray | None = None,
                         asked: Sequence[str] = ()) -> None:
    """What the FP32 reference says about the metrics asked of it: `warn_if_constant`, else `warn_if_no_detections`;
    `warn_if_cosine_blind`; `warn_if_labels_unread`; `warn_if_offset_dominates` (on the positions `valid` marks, as
    the metrics read them); `warn_if_top1_unread` (`asked`: the metrics evaluate.metrics lists, not its defaults)."""
    if not warn_if_constant(reference, output):
        warn_if_no_detections(reference, task)
    warn_if_top1_unread(task.judged(reference, valid), output, task, asked)
    warn_if_cosine_blind(reference, output, rules)
    warn_if_labels_unread(reference, output, task, labels)
    warn_if_offset_dominates(task.judged(reference, valid), output, task)


TOP1_METRICS = ("top1", "top5", "top1_agreement")
"""The metrics read over one row of class scores per sample (`_is_classifier`)."""


def warn_if_top1_unread(reference: np.ndarray, output: str, task: TaskSpec, asked: Sequence[str]) -> bool:
    """Warn where evaluate.metrics lists a top-1 metric that this output's shape leaves uncomputed (a phoneme BERT's
    [N, T, C]: top1_agreement asked for, a dash in every table and no word why; found probing)."""
    listed = [m for m in asked if m in TOP1_METRICS]
    if not listed or task.task != "classification" or _is_classifier(reference):
        return False
    log.warning("evaluate.metrics lists %s, but model.output '%s' is %s on the evaluation data, not [samples, classes]: "
                "no top-1 is computed on it. For a score per position ([N, T, classes]) set evaluate.valid_mask to "
                "the input marking the real positions, which makes each position a sample; otherwise judge it with "
                "its task's metrics or a hook.", ", ".join(listed), output, list(reference.shape))
    return True


def warn_if_no_detections(reference: np.ndarray, task: TaskSpec) -> bool:
    """Warn (and return True) where the FP32 reference detects nothing on any evaluation sample (evaluate.task:
    detection): detection_agreement is then 1.0 for any variant that detects nothing either, and a gate on it passes
    whatever INT8 did (found probing: a threshold of 1.5, or objectness read from a class row, scored 1.0). The same
    for a dense map without a box (`_warn_if_no_boxes`)."""
    if task.task == "dense" and len(reference) and np.ndim(reference) >= 3:
        return _warn_if_no_boxes(reference, task)
    if task.task != "detection" or len(reference) == 0:
        return False
    dets = task.detections(reference)
    if any(len(d.scores) for d in dets):
        if all(len(d.scores) >= task.det_max_detections for d in dets):
            log.warning("FP32 detects evaluate.detection.max_detections (%d) on every evaluation sample: every anchor "
                        "passes the score threshold %g. Are the scores probabilities read as logits (logits: true on a "
                        "head that ends in a sigmoid)?", task.det_max_detections, task.det_score_threshold)
            return True
        return False
    log.warning("FP32 detects nothing on the %d evaluation samples at evaluate.detection.score_threshold %g: "
                "detection_agreement is 1.0 for any variant that detects nothing either, so it says nothing about "
                "quantization here. Check score_threshold, objectness and layout against the model's own "
                "post-processing, and that the samples hold what it detects.", len(reference), task.det_score_threshold)
    return True


def _warn_if_no_boxes(reference: np.ndarray, task: TaskSpec) -> bool:
    """evaluate.task: dense: warn (and return True) where FP32's thresholded map holds no box of min_box_side pixels a
    side on any evaluation sample: box_agreement is then 1.0 for every variant (basic-pitch's note map, whose notes
    are one pitch bin wide: 1.0 for INT8 at 0.86 note F1 and for an FP16 model that output NaN, found probing)."""
    maps = np.asarray(task.mask(reference), dtype=bool)
    maps = maps.reshape(-1, *maps.shape[-2:])
    side = task.min_box_side
    if any(M.detection_boxes(m, side) for m in maps):
        return False
    log.warning("FP32's map (evaluate.dense.threshold %g) holds no component of at least evaluate.dense.min_box_side "
                "(%d) pixels a side on the %d evaluation samples: box_agreement is 1.0 for any variant, so it says "
                "nothing about quantization here. Lower min_box_side (1 counts every component), check the threshold, "
                "or judge map_iou.", task.threshold, side, len(reference))
    return True


def latency_feeds(dataset: Dataset, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of exactly `batch_size` real samples (the first ones, repeated if there are fewer)."""
    first = dataset.first_batch(batch_size).feeds
    rows = np.arange(batch_size) % first.size
    return {name: np.ascontiguousarray(np.take(arr, rows, axis=first.axes.get(name, 0))) for name, arr in first.items()}


#: The fewest timed runs a latency budget (`evaluate.latency.max_seconds`) cuts a measurement to.
MIN_LATENCY_ITERATIONS = 5


def measure_latency(runner: Runner, feeds: Mapping[str, np.ndarray], batch_size: int, warmup: int, iterations: int,
                    max_seconds: float | None) -> LatencyStats:
    """Time `runner` on `feeds`: one untimed run first (one of the `warmup` runs) says how long a run takes; where
    warmup + iterations of it would pass `max_seconds`, fewer runs are timed (at least MIN_LATENCY_ITERATIONS,
    warm-up cut to a tenth of them) and the log says so, and any measurement of more than 30 s is announced with
    its estimate first (a 144160-sample audio model at batch 32 on 2 cores: 11 s a run, 11 minutes as configured)."""
    first = float(np.asarray(runner.measure(feeds, 0, 1).total, dtype=np.float64)[0]) / 1e3
    runs = max(warmup, 1) + iterations
    if max_seconds is not None and runs * first > max_seconds:
        fit = max(MIN_LATENCY_ITERATIONS, int(max_seconds / first) if first > 0 else runs)
        cut_warmup = min(warmup, max(1, fit // 10))
        cut_iterations = max(MIN_LATENCY_ITERATIONS, fit - cut_warmup)
        log.info("latency of %s at batch %d: one run takes %.1f s, so %d timed runs (+%d warm-up) instead of %d "
                 "(+%d) keep it near evaluate.latency.max_seconds (%g s)", runner.name, batch_size, first,
                 cut_iterations, cut_warmup, iterations, warmup, max_seconds)
        warmup, iterations = cut_warmup, cut_iterations
    _warn_if_busy()
    more = max(warmup - 1, 0) + iterations
    if more * first > 30.0:
        log.info("latency of %s at batch %d: about %.0f s more (%d runs of %.1f s)", runner.name, batch_size,
                 more * first, more, first)
    # The first run was a warm-up run: the record says so even where none was asked for.
    return latency_stats(runner.measure(feeds, max(warmup - 1, 0), iterations), batch_size, max(warmup, 1))


#: The 1-minute load average, per core, above which latency is said to be measured on a busy machine.
BUSY_LOAD_PER_CORE = 1.5
_busy_said: set[bool] = set()


def _warn_if_busy() -> None:
    """Warn once per process when the machine is busy with other work as latency is measured: the variants are timed
    one after another, so a neighbour's load lands on some of them (found probing: the same two models gave a
    speedup of 1.27x in one run and 0.58x in the next on a shared 2-core host)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > BUSY_LOAD_PER_CORE * cores and not _busy_said:
        _busy_said.add(True)
        log.warning("latency is being measured on a busy machine (1-minute load average %.1f on %d cores): its numbers, "
                    "and latency or speedup gate rules, can move from run to run; gate on latency from an idle "
                    "machine or a dedicated runner.", load, cores)


def latency_stats(t: Timings, batch_size: int, warmup: int) -> LatencyStats:
    """Summarise per-iteration times: median / p90 / p99 and throughput at the median."""
    a = np.asarray(t.total, dtype=np.float64)
    med = float(np.median(a))

    def med_of(x: np.ndarray | None) -> float | None:
        return None if x is None else float(np.median(x))

    return LatencyStats(
        batch_size=batch_size,
        warmup=warmup,
        iterations=int(a.size),
        median_ms=med,
        p90_ms=float(np.percentile(a, 90)),
        p99_ms=float(np.percentile(a, 99)),
        mean_ms=float(a.mean()),
        min_ms=float(a.min()),
        throughput=batch_size / (med / 1e3) if med > 0 else float("nan"),
        timer=t.timer,
        samples_ms=tuple(float(x) for x in a),
        compute_median_ms=med_of(t.compute),
        h2d_median_ms=med_of(t.h2d),
        d2h_median_ms=med_of(t.d2h),
    )


def evaluate_variant(
    runner: Runner,
    dataset: Dataset,
    *,
    output: str,
    batch_size: int,
    metrics: Sequence[str],
    reference: np.ndarray | None,
    ref_labelled: dict[str, float] | None,
    latency_batch_sizes: Sequence[int] = (),
    warmup: int = 10,
    iterations: int = 50,
    max_seconds: float | None = None,
    on_batch: ProgressFn | None = None,
    task: TaskSpec = CLASSIFICATION,
    hooks: Sequence[str] = (),
    outputs: VariantOutputs | None = None,
    output_axis: int = 0,
    valid: np.ndarray | None = None,
    reference_others: OtherArrays | None = None,
    other_positions: np.ndarray | None = None,
    other_axes: Mapping[str, int] | None = None,
) -> tuple[EvalResult, VariantOutputs]:
    """Accuracy and latency of one opened runner. Returns the result and its outputs (for the reference).

    `outputs`: the variant's outputs on `dataset` computed elsewhere (`sharded_outputs`); the runner then only
    measures latency. `max_seconds`: each batch size's latency budget (`measure_latency`). `valid`: the positions
    that count (evaluate.valid_mask). `reference_others`: the reference's other outputs (`other_outputs`), which
    this variant's are compared with, at `other_positions` [N, T] where they are [N, T, ...] (`other_outputs`).
    """
    classify = task.task == "classification"
    if outputs is None:
        collector = OtherCollector(output, output_axis, other_axes)
        out = run_outputs(runner, dataset, output, batch_size, on_batch, classify=classify, output_axis=output_axis,
                          others=collector)
        outputs = VariantOutputs(out, collector.result())
    else:
        out = outputs.judged
        if classify and _is_classifier(out):
            dataset.check_label_range(int(out.shape[1]), output)
    bad = int(out.size - np.count_nonzero(np.isfinite(out)))
    if bad:
        log.warning("%s: %d of %d output values are NaN or Inf, so its accuracy numbers are not comparable (an FP16 "
                    "model: an activation or intermediate above 65504 overflows, or a constant under 6e-8 is 0 there; "
                    "the build's warnings name those it found).", runner.name, bad, out.size)
    values = accuracy_metrics(out, reference, dataset.labels, metrics, ref_labelled, task, hooks, valid,
                              outputs.by_name(output),
                              None if reference is None else _by_name(output, reference, reference_others))
    if (reference is not None and out.dtype.kind == "f" and out.shape == reference.shape
            and np.array_equal(out, reference)):
        values = {**values, IDENTICAL_KEY: 1.0}  # whatever metrics were asked for: `collapse` says it
    others = compare_others(outputs.others, reference_others, other_positions) if reference_others is not None else {}
    warn_nonfinite(runner.name, others)
    worst = worst_db(others)
    if worst is not None or all_identical(others):
        values = {**values, OTHER_KEY: M.finite_or_none(worst[1]) if worst is not None else None}
    lat = []
    for bs in latency_batch_sizes:
        if dataset.max_batch is not None and bs > dataset.max_batch:
            log.warning("latency at batch %d skipped for %s: the model takes at most %d sample(s) per run (a fixed "
                        "leading input dimension)", bs, runner.name, dataset.max_batch)
            continue
        feeds = latency_feeds(dataset, bs)
        lat.append(measure_latency(runner, feeds, bs, warmup, iterations, max_seconds))
    classes = int(out.shape[1]) if _is_classifier(out) and task.task == "classification" else None
    return EvalResult(variant=runner.name, num_samples=dataset.num_samples, metrics=values, latency=tuple(lat),
                      num_classes=classes, other_outputs=others, other_outputs_skipped=outputs.others.skipped), outputs


# --------------------------------------------------------------------------------------------- sharded


def accuracy_threads(configured: int | None) -> int:
    """onnxruntime intra-op threads for the passes whose outputs are scored: `configured`
    (build.backends.onnxruntime.threads), else 1 in every process. onnxruntime's float GEMM on a weight it
    cannot prepack (a Q/DQ model's dequantized weight) blocks its sums by each thread's share of the output
    columns, so its last bits depend on the thread count; one count everywhere keeps the scored numbers the same
    with any number of workers on any machine (the workers give the parallelism). Latency is measured with
    `configured` (None: onnxruntime's default, every core), as a deployment runs."""
    return configured or 1


def with_sessions_checked(variants: Sequence[Variant]) -> list[Variant]:
    """Each onnxruntime variant's session created first in a child process (all at once): where onnxruntime crashes
    the process creating it (onnxruntime 1.32 segfaults in a graph optimizer on quantpipe's FP16 model of a
    transformer), the variant runs at the highest optimization level that does not, which the log and its details
    say; where every level crashes, it is skipped with the reason. A crash then costs that variant, not the run
    and its report."""
    import concurrent.futures

    from quantpipe.backends.onnxruntime import survivable_optimization

    ort = [v for v in variants if v.ran and v.backend in ("onnxruntime", "modelopt") and v.artifact]
    if not ort:
        return list(variants)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(ort)) as pool:
        found = dict(zip([v.name for v in ort], pool.map(lambda v: survivable_optimization(
            v.artifact, v.name, v.device), ort), strict=True))
    out = []
    for v in variants:
        level, crash = found.get(v.name, ("all", None))
        if crash is None:
            out.append(v)
        elif level is None:
            log.error("onnxruntime crashes (%s) creating the session of %s at every optimization level: it is "
                      "skipped (a gate rule on it fails). Try another onnxruntime version.", crash, v.name)
            out.append(dataclasses.replace(v, skipped=f"onnxruntime crashes ({crash}) creating its session"))
        else:
            log.warning("onnxruntime crashes (%s) creating the session of %s at its default optimization level: it "
                        "is evaluated at level '%s' (checked in a child process; its latency is that level's)",
                        crash, v.name, level)
            out.append(dataclasses.replace(v, details={**v.details, ORT_OPTIMIZATION_KEY: level}))
    return out


def open_runner(v: Variant, threads: int | None) -> Any:
    """The Runner of a built variant (not yet entered). `threads`: onnxruntime intra-op threads (None: its own)."""
    if v.backend in ("onnxruntime", "modelopt"):  # ModelOpt's variants are ONNX models, run like quantpipe's
        from quantpipe.backends.onnxruntime import OrtRunner

        return OrtRunner(v.artifact or "", v.name, device=v.device, threads=threads,
                         optimization=v.details.get(ORT_OPTIMIZATION_KEY, "all"))
    from quantpipe.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(v.artifact or "", v.name, source_sha256=v.details.get("source_sha256"))


@dataclasses.dataclass(frozen=True)
class OutputsJob:
    """One worker's share of evaluation: one variant on one shard of the data (whole batches, in order)."""

    variant: Variant
    dataset: Dataset
    output: str
    batch_size: int
    threads: int | None
    output_axis: int = 0
    other_axes: Mapping[str, int] | None = None


def outputs_job(job: OutputsJob) -> VariantOutputs:
    """Run in a worker: the variant's outputs on its shard, batched exactly as one process batches them."""
    collector = OtherCollector(job.output, job.output_axis, job.other_axes)
    with open_runner(job.variant, job.threads) as runner:
        out = run_outputs(runner, job.dataset, job.output, job.batch_size, classify=False, output_axis=job.output_axis,
                          others=collector)
    return VariantOutputs(out, collector.result())


def shardable(v: Variant, executor: Executor) -> bool:
    """Whether workers can compute this variant's outputs: CPU variants always, GPU ones when each worker has a GPU."""
    return v.device == "cpu" or executor.gpus > 0


def sharded_outputs(
    executor: Executor,
    variants: Sequence[Variant],
    dataset: Dataset,
    *,
    output: str,
    batch_size: int,
    threads: int | None,
    on_samples: Callable[[int], None] | None = None,
    shards: int | None = None,
    output_axis: int = 0,
    other_axes: Mapping[str, int] | None = None,
) -> dict[str, VariantOutputs]:
    """variant name -> its outputs on every sample of `dataset`, computed as variants x shards on the workers
    and concatenated in order: the same arrays as `run_outputs` in one process (the shards hold whole batches).

    Every shard must finish (a failing one raises its error; WorkerError when its worker keeps dying).
    `shards`: how many to cut the data into (default: one per worker).
    """
    bounds = shard_bounds(dataset.batch_bounds(batch_size), shards or executor.workers)
    shard_sets = [dataset.subset(lo, hi) for lo, hi in bounds]
    jobs = [OutputsJob(v, shard, output, batch_size, threads, output_axis, other_axes)
            for v in variants for shard in shard_sets]
    log.info("evaluate: %d variant(s) x %d shard(s) on %d %s worker(s)", len(variants), len(shard_sets),
             executor.workers, executor.engine)
    results = executor.map(outputs_job, jobs,
                           on_result=None if on_samples is None else lambda i, out: on_samples(int(out.judged.shape[0])))
    outs = {}
    for k, v in enumerate(variants):
        parts = results[k * len(shard_sets):(k + 1) * len(shard_sets)]
        out = stack_outputs([p.judged for p in parts], v.name, output)
        if out.shape[0] != dataset.num_samples:  # never numbers from a partial shard set
            raise EvaluationError(f"variant {v.name}: the shards returned {out.shape[0]} of {dataset.num_samples} "
                                  f"outputs; no metric is computed from part of the data.")
        outs[v.name] = VariantOutputs(out, OtherArrays.concat([p.others for p in parts]))
    return outs
