"""`calibration.use: auto`: each activation's amax chosen among the calibration methods' candidates by its
measured effect on the model's output, then checked against every single method on the whole INT8 model."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.console import remaining_seconds, remaining_text
from quantpipe.data import sample_count
from quantpipe.errors import BuildError
from quantpipe.execution import Executor, model_mb, plan_shards, run_jobs, share_threads
from quantpipe.int8 import INT8_MAX
from quantpipe.metrics import SquaredSums
from quantpipe.onnxgraph import Graph, expose_outputs, named_copy, tensor_outputs
from quantpipe.ortsession import ort_session
from quantpipe.quantize.build import build_qdq_model, qdq_ready
from quantpipe.quantize.fake_quant import RoundedPart, output_error, output_signal, output_weights, pooled
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import AMAX_LIMIT, plan_qdq
from quantpipe.quantize.rewrites.patterns import clip_bounds
from quantpipe.quantize.write import with_calibration_data

__all__ = ["AUTO_CANDIDATES", "RangeChoice", "alone_share", "choose_ranges", "whole_noise"]

log = logging.getLogger(__name__)

#: The methods whose amax `auto` chooses among, per tensor (ties go to the larger amax).
AUTO_CANDIDATES: tuple[str, ...] = ("entropy", "minmax", "percentile", "mse")
#: Between two neighbouring candidate amax more than this factor apart, their geometric mean is a candidate too, named
#: "between <smaller's method> and <larger's>". An activation whose few outlier channels span 3x its bulk falls
#: between clipping them (entropy) and keeping them (percentile / mse / minmax): YOLOv8n's first SiLU output had
#: 22.6 / 88 / 107 / 241, and about 45 kept the most detections (0.947 of FP32's with only that limit changed, 0.84-0.89
#: at the others; found probing).
BETWEEN_GAP = 2.0
#: The name of the per-tensor choice among the whole-model candidates of the safeguard.
PER_TENSOR = "per-tensor"


@dataclasses.dataclass(frozen=True)
class RangeChoice:
    """What `choose_ranges` chose.

    Attributes:
        amax: tensor -> amax to build the INT8 model with.
        winner: `PER_TENSOR` (the per-tensor choice) or the single method whose whole table won the safeguard.
        model_db: output SQNR (dB) of the whole INT8 model on the search samples, per whole-model candidate.
        per_tensor: tensor -> {"method": chosen method, "noise_db": {method: output SQNR with only this
            tensor quantized at that method's amax}}.
        samples: calibration samples the search ran on. seconds: its wall time.
        channel_stats: the per-channel statistics the search built its models with (`QuantizeOptions.channel_stats`;
            None when smoothing and bias correction are off), for the writer to reuse.
    """

    amax: dict[str, float]
    winner: str
    model_db: dict[str, float]
    per_tensor: dict[str, dict[str, Any]]
    samples: int
    seconds: float
    channel_stats: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def summary(self, top: int = 5) -> dict[str, Any]:
        """Counts per method, and the tensors where the choice mattered most (largest gap, in output SQNR
        with that tensor alone quantized, between the chosen and the worst candidate)."""
        counts: dict[str, int] = {}
        gaps = []
        for t, rec in self.per_tensor.items():
            counts[rec["method"]] = counts.get(rec["method"], 0) + 1
            dbs = [d for d in rec["noise_db"].values() if math.isfinite(d)]
            chosen = rec["noise_db"][rec["method"]]
            gap = (chosen - min(dbs)) if dbs and math.isfinite(chosen) else 0.0
            gaps.append((gap, t, rec))
        gaps.sort(key=lambda x: (-x[0], x[1]))
        return {
            "winner": self.winner, "model_db": {k: round(v, 2) for k, v in self.model_db.items()},
            "per_method": dict(sorted(counts.items())), "samples": self.samples, "seconds": round(self.seconds, 1),
            "mattered_most": [{"tensor": t, "method": r["method"], "gap_db": round(g, 2),
                               "noise_db": {m: round(d, 2) for m, d in r["noise_db"].items()}}
                              for g, t, r in gaps[:top] if g > 0],
        }


def _nonnegative(g: Graph, t: str) -> bool:
    """Produced by Relu or by a Clip with constant bounds and a lower bound >= 0 (the shift's candidates, as
    `rewrites.shift` itself recognises them)."""
    node = g.producer.get(t)
    bounds = clip_bounds(g, node) if node is not None else None
    return bounds is not None and bounds[0] >= 0.0


def _db(signal: float, noise: float) -> float:
    """Output SQNR in dB, capped at 300 (no noise at all) so it stays valid JSON."""
    return min(300.0, 10 * math.log10(signal / noise)) if noise > 0 and signal > 0 else 300.0


def _usable(a: float | None) -> bool:
    return a is not None and math.isfinite(a) and 0.0 < a < AMAX_LIMIT


def _planned_tensors(model: Any, table: Mapping[str, float], options: QuantizeOptions) -> list[str]:
    """The activations (and graph inputs) the quantizer gives a Q/DQ, in graph order."""
    g = Graph(named_copy(model).graph)
    plan = plan_qdq(g, table, options, options.per_channel)
    by_name = {n.name: n for n in g.graph.node}
    return list(dict.fromkeys(by_name[n].input[j] for n, j in plan.acts if n in by_name))


def _candidates(tables: Mapping[str, Mapping[str, float]], t: str) -> dict[float, list[str]]:
    """Distinct usable amax of `t` -> the methods that give it, with the midpoints of wide gaps (`BETWEEN_GAP`)."""
    out: dict[float, list[str]] = {}
    for m in AUTO_CANDIDATES:
        a = tables.get(m, {}).get(t)
        if _usable(a):
            out.setdefault(float(a), []).append(m)  # type: ignore[arg-type]
    found = sorted(out)
    for lo, hi in itertools.pairwise(found):
        if hi > BETWEEN_GAP * lo:  # a float32 value, as the tables' own
            out.setdefault(float(np.float32(math.sqrt(lo * hi))), []).append(f"between {out[lo][0]} and {out[hi][0]}")
    return out


@dataclasses.dataclass(frozen=True)
class _Alone:
    """A share of the alone pass: `share`'s tensors among all `tensors` (each tensor's numbers depend on nothing
    else: the share a tensor falls in changes none of them). Picklable: it may run on a worker."""

    model: Any
    tables: Mapping[str, Mapping[str, float]]
    tensors: tuple[str, ...]
    share: tuple[str, ...]
    options: QuantizeOptions
    feeds: list[dict[str, np.ndarray]]
    refs: list[list[np.ndarray]]
    weights: list[np.ndarray | None]
    """Per graph output (`fake_quant.output_weights`)."""
    threads: int | None = None


#: At most this many tensors' parts are fed from one run of the FP32 model, and only as many (at least one) as
#: keep the FP32 tensors those parts read, held for every search batch while they are measured, within
#: `FRONTIER_BYTES` (measured on the first batch).
TENSORS_PER_RUN = 16
#: A pass that runs longer says how far it got about this often (ViT-S took 369 s without a word, found probing).
PROGRESS_SECONDS = 30.0
#: ... and, once, how to skip it where this much of the pass is estimated left.
LONG_PASS_SECONDS = 300.0
FRONTIER_BYTES = 256 << 20


def _alone_pass(job: _Alone, executor: Executor | None) -> dict[str, dict[str, Any]]:
    """Per tensor: each candidate amax's output noise with only that tensor rounded; the lowest wins. The
    tensors are dealt into shares run on the executor's workers when that is work enough (the same numbers);
    every k-th tensor to a share, since an early tensor's part is most of the model and a late one's little."""
    n = len(job.tensors)
    samples = sum(sample_count(f) for f in job.feeds)
    shares = plan_shards(executor, items=n, work_mb=n * len(AUTO_CANDIDATES) * samples * model_mb(job.model))
    if executor is None or shares < 2:
        return alone_share(job)
    threads = share_threads(executor, min(shares, n))
    jobs = [dataclasses.replace(job, share=job.tensors[k::shares], threads=threads) for k in range(min(shares, n))]
    found = {t: rec for part in executor.map(alone_share, jobs) for t, rec in part.items()}
    return {t: found[t] for t in job.tensors}


def alone_share(job: _Alone) -> dict[str, dict[str, Any]]:
    """One share of the alone pass (`_Alone`), in a worker or here.

    Each tensor's candidates run only the part of the model below it (`fake_quant.RoundedPart`), fed from one run
    of the FP32 model per batch for a group of tensors (`TENSORS_PER_RUN`, fewer where their feeds are large);
    one part's session lives at a time. Exact pruning (the choice is the one measuring everything would make):
    every candidate is measured on the first batch; the lowest there is measured on every batch, and each other
    one stops as soon as its running sum of squared errors (which only grows) already loses to the leader's
    total."""
    out: dict[str, dict[str, Any]] = {}
    pending = list(job.share)
    t0 = said = time.perf_counter()
    hinted = False
    while pending:
        found = _alone_group(job, pending[:TENSORS_PER_RUN])
        out.update(found)
        pending = pending[len(found):]
        if pending and time.perf_counter() - said > PROGRESS_SECONDS:  # a long pass says where it is
            said = time.perf_counter()
            left = remaining_seconds(len(out), len(job.share), said - t0)  # `out` holds one group at least
            # Once, where the pass has long to go: the way to a model in minutes (DNSMOS spent 12 of its 27 min here
            # for no gain on its task, found probing).
            hint = "" if hinted or left is None or left < LONG_PASS_SECONDS else (
                "; `calibration.use: best` (quantize --method best) takes one method for the whole model without "
                "this pass")
            hinted = hinted or bool(hint)
            log.info("auto ranges: %d of %d activations measured (%.0f s, %s)%s", len(out), len(job.share),
                     said - t0, remaining_text(len(out), len(job.share), said - t0), hint)
    return out


def _alone_group(job: _Alone, group: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`alone_share` for the first of `group`'s tensors whose parts' FP32 feeds fit `FRONTIER_BYTES` over every
    batch (at least one tensor; the caller passes the rest again). Each feed is dropped after the last part that
    reads it, and one part's session lives at a time."""
    model, feeds, refs = job.model, job.feeds, job.refs
    g = Graph(model.graph)
    outputs = tensor_outputs(model)
    inputs = {i.name for i in model.graph.input}
    parts = {t: RoundedPart(model, t, outputs, (f"__qp_rs_on_{t}", f"__qp_rs_c_{t}", f"__qp_rs_s_{t}"))
             for t in group}
    read = sorted({f for p in parts.values() for f in p.feeds if f not in inputs})
    known = [dict(f) for f in feeds]
    if read:
        fp32 = ort_session(expose_outputs(model, read), optimize=False, threads=job.threads)
        known[0].update(zip(read, fp32.run(read, feeds[0]), strict=True))
        taken: set[str] = set()
        for k, t in enumerate(group):  # the longest run of tensors whose feeds fit, measured on the first batch
            more = taken | {f for f in parts[t].feeds if f not in inputs}
            if k and sum(known[0][f].nbytes for f in more) * len(feeds) > FRONTIER_BYTES:
                group = group[:k]
                break
            taken = more
        read = sorted(taken)
        for name in set(known[0]) - taken - inputs:
            del known[0][name]
        for have, batch in zip(known[1:], feeds[1:], strict=True):
            if read:  # (an empty list would fetch every output)
                have.update(zip(read, fp32.run(read, batch), strict=True))
        del fp32
    last_reader = {f: t for t in group for f in parts[t].feeds}
    at = {o: k for k, o in enumerate(outputs)}
    sums = SquaredSums()
    signals = np.cumsum([output_signal(r, sums, job.weights) for r in refs])
    sizes = np.cumsum([sample_count(f) for f in feeds])
    out: dict[str, dict[str, Any]] = {}
    for t in group:
        cands = _candidates(job.tables, t)
        shift = job.options.shift_nonnegative and _nonnegative(g, t)
        part = parts[t]

        def err(a: float, i: int, part: RoundedPart = part, shift: bool = shift) -> float:
            centre, step = (a / 2, a / (2 * INT8_MAX)) if shift else (0.0, a / INT8_MAX)
            res = part.run(known[i], 1.0, centre, step, job.threads) if part.outputs else []
            # Outputs t does not reach equal FP32's: they add 0.0, so only the reached ones are summed (in order).
            return output_error(res, [refs[i][at[o]] for o in part.outputs], sums,
                                [job.weights[at[o]] for o in part.outputs])

        noise = {a: err(a, 0) for a in cands}
        done = dict.fromkeys(cands, 0)  # index of the last batch measured
        lead: tuple[float, float] | None = None  # (total noise, -amax) of the best fully measured candidate
        for a in sorted(cands, key=lambda a: (noise[a], -a)):
            while done[a] < len(feeds) - 1 and _within(lead, noise[a], a, or_equal=True):
                done[a] += 1
                noise[a] += err(a, done[a])
            if done[a] == len(feeds) - 1 and _within(lead, noise[a], a, or_equal=False):
                lead = (noise[a], -a)
        assert lead is not None
        win = -lead[1]
        out[t] = {"method": cands[win][0], "amax": win,
                  "noise_db": {meth: _db(float(signals[done[a]]), noise[a]) for a, ms in cands.items() for meth in ms},
                  "pruned": {cands[a][0]: int(sizes[done[a]]) for a in cands if done[a] < len(feeds) - 1}}
        part.session = None
        for name in part.feeds:
            if last_reader[name] == t and name not in inputs:
                for have in known:
                    have.pop(name, None)
    return out


def _within(lead: tuple[float, float] | None, noise: float, a: float, *, or_equal: bool) -> bool:
    """Whether (noise, -a) is below `lead` (no lead yet: True), ties included when `or_equal`."""
    if lead is None:
        return True
    return (noise, -a) <= lead if or_equal else (noise, -a) < lead


@dataclasses.dataclass(frozen=True)
class _Whole:
    """One whole INT8 model of the safeguard (picklable: it may run on a worker)."""

    model: Any
    table: Mapping[str, float]
    options: QuantizeOptions
    feeds: list[dict[str, np.ndarray]]
    refs: list[list[np.ndarray]]
    outputs: list[str]
    weights: list[np.ndarray | None]
    threads: int | None = None


def whole_noise(job: _Whole) -> float:
    """The output noise of the INT8 model built with `job.table` on the search samples (in a worker or here)."""
    run = ort_session(build_qdq_model(job.model, job.table, job.options)[0], optimize=False, threads=job.threads)
    sums = SquaredSums()
    return sum(output_error(run.run(job.outputs, f), r, sums, job.weights)
               for f, r in zip(job.feeds, job.refs, strict=True))


def choose_ranges(model: Any, tables: Mapping[str, Mapping[str, float]], options: QuantizeOptions,
                  calibration_data: Any, *, batch_size: int = 8, max_samples: int = 32,
                  executor: Executor | None = None) -> RangeChoice:
    """Each activation's amax, chosen by its measured effect on the model output (`calibration.use: auto`).

    1. Alone pass: in one instrumented session where scalar inputs switch each planned activation's fake
       quantization on and set its scale, each distinct candidate amax among `AUTO_CANDIDATES` (entropy,
       minmax, percentile, mse; and the geometric mean of two neighbouring ones more than `BETWEEN_GAP` apart) is
       simulated with only that tensor rounded (symmetric, or the non-negative
       shift's centre amax/2 and step amax/254 for Relu / Clip(lo >= 0) outputs when the shift is on); on up to `max_samples` calibration samples,
       the amax with the lowest output noise (squared error of the float outputs vs FP32) wins; ties go to the
       larger amax. A candidate stops being measured once its noise so far already loses (exact: the same
       choice as measuring it on every sample); its `noise_db` is then an upper bound, measured on the samples
       `pruned` gives.
    2. Safeguard: the whole INT8 model is built with that per-tensor choice and with each distinct single
       method's table in `tables` (the candidates and `best` when given) and run on `max_samples` samples; the
       lowest output noise wins. So `auto` is never worse than the best single method on the calibration data
       by this measure.

    `tables` must hold the four candidates (tensor -> amax); tensors no candidate covers keep `best`'s (or
    mse's) amax. `executor`: both passes run on its workers when they are work enough (the same choice).
    """
    t0 = time.perf_counter()
    missing = [m for m in AUTO_CANDIDATES if m not in tables]
    if missing:
        raise BuildError(f"calibration.use: auto chooses among {', '.join(AUTO_CANDIDATES)}, but the tables of "
                         f"{', '.join(missing)} are missing; this is a quantpipe bug, please report it.")
    m0 = qdq_ready(model, options.per_channel)
    opts = dataclasses.replace(options, split_activations="off")
    if opts.channel_stats is None and (opts.smooth_alpha or opts.bias_correction):
        opts = with_calibration_data(m0, dataclasses.replace(opts, weight_rounding="nearest"), calibration_data,
                                     batch_size=batch_size)
    outputs = tensor_outputs(m0)
    ref_sess = ort_session(m0, optimize=False)
    feeds: list[dict[str, np.ndarray]] = []
    refs: list[list[np.ndarray]] = []
    for f in calibration_data.head_feeds(batch_size, max_samples):
        feeds.append(f)
        refs.append(ref_sess.run(outputs, f))
    count = sum(sample_count(f) for f in feeds)
    sums = SquaredSums()
    weights = output_weights(refs[0]) if refs else []
    signal = sum(output_signal(r, sums, weights) for r in refs)
    base = dict(tables.get("best", tables["mse"]))
    tensors = [t for t in _planned_tensors(m0, tables["minmax"], opts) if len(_candidates(tables, t)) > 1]
    total = getattr(calibration_data, "num_samples", count)
    log.info("auto ranges: %d activations with distinct candidates, on the first %d of %d calibration samples%s",
             len(tensors), count, total, ", in file order" if count < total else "")
    per_tensor = (_alone_pass(_Alone(m0, tables, tuple(tensors), tuple(tensors), opts, feeds, refs, weights), executor)
                  if tensors and signal > 0 else {})
    log.info("auto ranges: per-tensor pass done in %.1f s", time.perf_counter() - t0)
    choice = {**base, **{t: float(r["amax"]) for t, r in per_tensor.items()}}
    wholes = {PER_TENSOR: choice, **{k: dict(v) for k, v in tables.items() if k in (*AUTO_CANDIDATES, "best")}}
    model_db: dict[str, float] = {}
    noise: dict[str, float] = {}
    # Equal tables (best is often one method's) run once.
    keys = [tuple(sorted(table.items())) for table in wholes.values()]
    first: dict[tuple[tuple[str, float], ...], Mapping[str, float]] = {}
    for key, table in zip(keys, wholes.values(), strict=True):
        first.setdefault(key, table)
    jobs = [_Whole(m0, table, opts, feeds, refs, outputs, weights) for table in first.values()]
    measured = dict(zip(first, run_jobs(executor, whole_noise, jobs, work_mb=len(jobs) * count * model_mb(m0)),
                        strict=True))
    for name, key in zip(wholes, keys, strict=True):
        noise[name] = measured[key]
        model_db[name] = _db(signal, noise[name])
    winner = min(noise, key=lambda k: (noise[k], k != PER_TENSOR))
    secs = time.perf_counter() - t0
    log.info("auto ranges: whole INT8 model output SQNR%s %s; kept %s (%.1f s)", pooled(outputs, weights),
             ", ".join(f"{k} {v:.1f} dB" for k, v in model_db.items()), winner, secs)
    return RangeChoice(amax=dict(wholes[winner]), winner=winner, model_db=model_db, per_tensor=per_tensor,
                       samples=count, seconds=secs, channel_stats=opts.channel_stats)
