"""Which activations to split (`split_activations: auto`): simulate each candidate's rounding, then try the
noisiest for real and keep a split only where it measurably lifts the output SQNR."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.data import sample_count
from quantpipe.execution import Executor, model_mb, run_jobs
from quantpipe.int8 import INT8_MAX
from quantpipe.metrics import SquaredSums
from quantpipe.onnxgraph import Graph, expose_outputs, named_copy, tensor_outputs
from quantpipe.ortsession import ort_session
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.fake_quant import RoundedPart, output_error, output_signal, output_weights, pooled
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.rewrites.split import split_candidate

__all__ = ["choose_splits", "trial_noise"]

log = logging.getLogger(__name__)


def _roundings(model: Any, amax: Mapping[str, float], options: QuantizeOptions) -> dict[str, tuple[float, float]]:
    """Each splittable activation of `model`, by name, -> the centre and step of its int8 rounding (with the shift,
    when on)."""
    g = Graph(model.graph)
    out = {}
    for t in sorted(g.producer):
        if t in amax and math.isfinite(amax[t]) and amax[t] > 0:
            found = split_candidate(g, t, options)
            if found is not None:
                a = min(float(amax[t]), found[3])
                out[t] = (a / 2, a / (2 * INT8_MAX)) if options.shift_nonnegative else (0.0, a / INT8_MAX)
    return out


@dataclasses.dataclass
class _Samples:
    """The calibration samples the search runs on, the FP32 outputs, their energy and each candidate's noise."""

    feeds: list[dict[str, np.ndarray]]
    refs: list[list[np.ndarray]]
    signal: float
    noise: dict[str, float]
    count: int
    weights: list[np.ndarray | None]
    """Per graph output, from the first batch (`fake_quant.output_weights`)."""

    def db(self, n: float) -> float:
        return 10 * math.log10(self.signal / n) if n > 0 else math.inf


def _simulate(m: Any, roundings: Mapping[str, tuple[float, float]], calibration_data: Any, outputs: list[str], *,
              batch_size: int, max_samples: int) -> _Samples:
    """Run the FP32 model (the reference), then each tensor's rounding alone (`roundings`: tensor -> centre, step).

    A rounding changes only what its tensor reaches: each one runs that part alone (`fake_quant.RoundedPart`), fed
    with the tensors it reads from the reference run, which computes the bits of the whole model with only that
    tensor rounded (no graph optimizations: every node runs as written).

    Memory: the reference run's tensors of every batch are kept (they are `max_samples` samples' worth whatever
    the batch size), each part's session lives only while its tensor is measured, and a tensor is dropped after
    the last part that reads it. Holding every part's session at once cost more than the tensors (EfficientNet-Lite0,
    32 samples: 32 sessions, 1.4 GB on top of 0.77 GB of tensors). Each part runs on the same batches, and each
    tensor's noise adds up over the batches in order."""
    parts = {t: RoundedPart(m, t, outputs, (f"__qp_split_switch_{i}", f"__qp_split_switch_{i}_c",
                                            f"__qp_split_switch_{i}_s"))
             for i, t in enumerate(roundings)}
    inputs = {i.name for i in m.graph.input}
    exposed = sorted({f for p in parts.values() for f in p.feeds if f not in inputs} - set(outputs))
    sess = ort_session(expose_outputs(m, exposed), optimize=False)
    s = _Samples([], [], 0.0, dict.fromkeys(roundings, 0.0), 0, [])
    sums = SquaredSums()
    known: list[dict[str, np.ndarray]] = []  # per batch: every tensor a part may read
    for feeds in calibration_data.head_feeds(batch_size, max_samples):
        run = sess.run([*outputs, *exposed], feeds)
        ref = run[: len(outputs)]
        known.append({**dict(zip(outputs, ref, strict=True)), **dict(zip(exposed, run[len(outputs):], strict=True)),
                      **feeds})
        del run  # `known` holds them: dropping one there frees it
        if not s.refs:
            s.weights = output_weights(ref)
        s.feeds.append(feeds)
        s.refs.append(ref)
        s.signal += output_signal(ref, sums, s.weights)
        s.count += sample_count(feeds)
    del sess
    if not known:
        return s
    last_reader = {f: t for t in roundings for f in parts[t].feeds}
    for t, (centre, step) in roundings.items():
        part = parts[t]
        for have, ref in zip(known, s.refs, strict=True):
            got = dict(zip(part.outputs, part.run(have, 1.0, centre, step), strict=True))
            s.noise[t] += output_error([got.get(o, r) for o, r in zip(outputs, ref, strict=True)], ref, sums, s.weights)
        part.session = None
        for f in part.feeds:
            if last_reader[f] == t:
                for have in known:
                    have.pop(f, None)
    return s


@dataclasses.dataclass(frozen=True)
class _Trial:
    """One whole INT8 model to try (picklable: it may run on a worker)."""

    model: Any
    amax: Mapping[str, float]
    options: QuantizeOptions
    splits: dict[str, int]
    feeds: list[dict[str, np.ndarray]]
    refs: list[list[np.ndarray]]
    outputs: list[str]
    weights: list[np.ndarray | None]
    threads: int | None = None


def trial_noise(trial: _Trial) -> float:
    """The output noise of the INT8 model built with `trial.splits` on the search samples (run in a worker or here)."""
    q = build_qdq_model(trial.model, trial.amax, dataclasses.replace(trial.options, split_activations=trial.splits))[0]
    run = ort_session(q, optimize=False, threads=trial.threads)
    sums = SquaredSums()
    return sum(output_error(run.run(trial.outputs, f), r, sums, trial.weights)
               for f, r in zip(trial.feeds, trial.refs, strict=True))


def choose_splits(model: Any, amax: Mapping[str, float], options: QuantizeOptions, calibration_data: Any, *,
                  batch_size: int = 8, max_samples: int = 32, max_tensors: int = 2,
                  max_sqnr_db: float = 30.0, min_gain_db: float = 1.0,
                  executor: Executor | None = None) -> dict[str, int]:
    """The activations worth splitting (`split_activations`): tensor -> pieces.

    Every splittable activation's int8 rounding is simulated alone (weights and other activations in float)
    on up to `max_samples` calibration samples, each on the part of the FP32 model below it (`_simulate`). The
    `max_tensors` noisiest ones whose noise matters (output SQNR with only that tensor rounded below
    `max_sqnr_db`, and at least a tenth of the whole INT8 model's output noise)
    are then tried for real: the whole INT8 model is built with the tensor split in 2 and in 4 pieces and run
    on the same samples. A split is kept when it lifts the model's output SQNR by at least `min_gain_db`, with
    the fewest pieces that come within 0.5 dB of the best. Where the noise is spread over many tensors, comes
    from elsewhere (weights, other activations) or is small, nothing is split. `executor`: a tensor's 2- and
    4-piece models are tried on its workers at once when that is work enough (`execution.run_jobs`).
    """
    m = named_copy(model)
    roundings = _roundings(m, amax, options)
    if not roundings:
        return {}
    cands = list(roundings)
    outputs = tensor_outputs(m)
    s = _simulate(m, roundings, calibration_data, outputs, batch_size=batch_size, max_samples=max_samples)
    if s.signal <= 0.0:
        return {}

    def model_noise(*trials: Mapping[str, int]) -> list[float]:
        jobs = [_Trial(model, amax, options, dict(t), s.feeds, s.refs, outputs, s.weights) for t in trials]
        return run_jobs(executor, trial_noise, jobs, work_mb=len(jobs) * s.count * model_mb(model))

    chosen: dict[str, int] = {}
    current = model_noise(chosen)[0]
    db, noise = s.db, s.noise
    log.info("INT8 model on %d calibration samples: %.1f dB output SQNR%s", s.count, db(current),
             pooled(outputs, s.weights))
    for t in sorted(cands, key=lambda x: -noise[x])[:max_tensors]:
        if db(noise[t]) >= max_sqnr_db or noise[t] < 0.1 * current:
            log.info("activation %s alone: %.1f dB output SQNR (%.0f%% of the model's noise): not split", t,
                     db(noise[t]), 100 * noise[t] / current if current > 0 else 0.0)
            continue
        tried = dict(zip((2, 4), model_noise(*({**chosen, t: k} for k in (2, 4))), strict=True))
        best = min(tried.values())
        k = min(k for k, n in tried.items() if db(n) >= db(best) - 0.5)
        gain = db(tried[k]) - db(current)
        log.info("activation %s alone: %.1f dB output SQNR; split in 2 / 4: %.1f / %.1f dB (model: %.1f dB)%s", t,
                 db(noise[t]), db(tried[2]), db(tried[4]), db(current),
                 f"; split in {k}" if gain >= min_gain_db else "; not split")
        if gain >= min_gain_db:
            chosen[t] = k
            current = tried[k]
    return chosen
