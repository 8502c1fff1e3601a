"""Search candidates evaluated in shares on the run's workers (issue 18): the sensitivity's one-layer-at-a-time
runs, the fallback's ranking and its trials within a step.

A candidate is the Q/DQ model of the FP32 `model` built with a few `QuantizeOptions` fields changed (`only_nodes`
for a layer quantized alone, `keep_float_nodes` for a keep-set). A worker builds its candidates, and the base
model they are compared with, itself, so the lead ships recipes, not models; and what every share of a step reads
(the FP32 model, the scales and options, the samples) is stashed once (`executor.stash`: a file per content for
local workers, one object-store entry for Ray) and read once per worker process, which keeps it in a cache keyed
by its sha256 and verified on reading (`execution.stash`). A share (`ShareJob`) carries the handles and its own
part: with at least as many candidates as shares, every k-th candidate over all samples (early layers, whose
parts are nearly the whole model, spread over the shares); with more workers than candidates, one candidate over
a slice of whole batches (`split`), so a greedy step of 12 trials still fills 16 workers. Within a share the
candidates run through `reference.run_candidates` in groups of `CANDIDATES_PER_RUN`, each group reusing one run
of the base model, exactly as one process runs them.

Why the outputs are identical to one process: each candidate's output is what its own session computes on the
same feeds, batch by batch (`run_candidates` computes the same bits whatever the group; tests/unit/
test_reference.py), the models are built by the same deterministic code from the same arguments, and `join`
puts each candidate's pieces back in candidate and batch order. tests/unit/execution/test_searches.py checks it
with local workers and on a real Ray cluster.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.data import sample_count
from quantpipe.errors import WorkerError
from quantpipe.execution import Executor, Stashed, model_mb, plan_shards, share_threads, unstash
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.reference import CANDIDATES_PER_RUN, run_candidates

__all__ = ["FP32_BASE", "CandidateShare", "ShareJob", "join", "run_job", "run_share", "run_shared", "share_count",
           "split"]

log = logging.getLogger(__name__)

FP32_BASE = "fp32"
"""`base` value: the candidates are compared with the FP32 model itself (one layer quantized at a time)."""

Changes = Mapping[str, Any]
"""QuantizeOptions fields a candidate changes, e.g. {"only_nodes": frozenset({"conv1"})}."""


@dataclasses.dataclass(frozen=True)
class CandidateShare:
    """One worker's share of a search step's candidates (picklable)."""

    model: Any
    """The FP32 model the candidates are built from (ModelProto)."""
    amax: Mapping[str, float]
    options: QuantizeOptions
    changes: tuple[Changes, ...]
    """Each candidate's option changes, in order."""
    base: Changes | str | None
    """What the candidates run against (`run_candidates`' base): FP32_BASE, a model built with these changes,
    or None (each candidate runs whole)."""
    feeds: tuple[Mapping[str, np.ndarray], ...]
    output: str
    threads: int | None = None
    """onnxruntime intra-op threads (the worker's share of the cores); None: onnxruntime's default."""
    output_axis: int = 0
    """`output`'s batch axis (the outputs come back with it first)."""

    def build(self, changes: Changes) -> Any:
        return build_qdq_model(self.model, self.amax, dataclasses.replace(self.options, **dict(changes)))[0]


def run_share(share: CandidateShare) -> list[np.ndarray]:
    """Run in a worker (or in this process): `share.output` of each candidate over every feed, in order."""
    outs: list[np.ndarray] = []
    for at in range(0, len(share.changes), CANDIDATES_PER_RUN):
        group = share.changes[at:at + CANDIDATES_PER_RUN]
        models = [share.build(c) for c in group]
        if share.base is None or len(models) < 2:
            base = None if share.base != FP32_BASE else share.model
        else:
            base = share.model if share.base == FP32_BASE else share.build(share.base)  # type: ignore[arg-type]
        if base is None:  # run_candidates runs a lone candidate whole; several need a base
            outs += [run_candidates(m, [m], share.feeds, share.output, threads=share.threads,
                                    output_axis=share.output_axis)[0] for m in models]
        else:
            outs += run_candidates(base, models, share.feeds, share.output, threads=share.threads,
                                   output_axis=share.output_axis)
    return outs


def share_count(executor: Executor | None, candidates: int, feeds: Sequence[Mapping[str, np.ndarray]],
                model: Any) -> int:
    """How many shares a step's candidates are cut into: 1 (this process) for a single candidate or when the
    work is small, else up to the workers, each holding at least `execution.min_shard_mb` of work (candidates
    x samples x model MB; `execution.plan_shards`) and at least one candidate's batch: with more workers than
    candidates, the candidates are cut into sample slices too (`split`)."""
    if candidates < 2:
        return 1
    samples = sum(sample_count(f) for f in feeds if f)
    return plan_shards(executor, items=candidates * max(1, len(feeds)),
                       work_mb=candidates * samples * model_mb(model))


def split(candidates: int, batches: int, shares: int) -> list[tuple[tuple[int, ...], tuple[int, int]]]:
    """Each share's (candidate indices, (first batch, end batch)). With at least as many candidates as shares:
    every `shares`-th candidate over every batch (so a share gets early and late layers alike, whose parts cost
    very differently, and the shares come out even). With fewer: each candidate alone over contiguous slices
    of whole batches, as many as make the work end soonest when `shares` run at once (none if slicing gains nothing). Every (candidate, batch) is in
    exactly one share, and a candidate's slices come in batch order."""
    if candidates < 1 or batches < 1:
        return []
    if shares <= candidates:
        return [(tuple(range(k, candidates, shares)), (0, batches)) for k in range(max(1, shares))]
    # As many slices per candidate as make the last round of shares shortest (rounds x slice length, in whole
    # candidates), the fewest among equals: 12 candidates on 16 workers over 2 batches stay whole (24 halves take
    # as long), over 8 batches run in quarters (48 quarters: 3 rounds of a quarter).
    slices = min(range(1, batches + 1), key=lambda s: (-(-candidates * s // shares) / s, s))
    cuts = [round(batches * k / slices) for k in range(slices + 1)]
    return [((c,), (lo, hi)) for c in range(candidates) for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo]


@dataclasses.dataclass(frozen=True)
class ShareJob:
    """What a worker is sent for one share: handles to what every share of the step reads (the model, the
    scales and options, the samples: each worker reads each of them once, `executor.stash`) and the share's
    own candidates and batches."""

    model: Stashed
    recipe: Stashed
    """(amax, options)."""
    feeds: Stashed
    base: Changes | str | None
    output: str
    changes: tuple[Changes, ...]
    batches: tuple[int, int]
    threads: int | None
    output_axis: int


def run_job(job: ShareJob) -> list[np.ndarray]:
    """Run in a worker: the share's candidates over its batches (`run_share`), the large parts from the
    worker's cache."""
    amax, options = unstash(job.recipe)
    lo, hi = job.batches
    share = CandidateShare(unstash(job.model), amax, options, job.changes, job.base, unstash(job.feeds)[lo:hi],
                           job.output, threads=job.threads, output_axis=job.output_axis)
    return run_share(share)


def run_shared(executor: Executor | None, share: CandidateShare, *, shares: int | None = None) -> list[np.ndarray]:
    """`run_share(share)`, cut into `shares` shares (default: `share_count`; how: `split`) run on the executor's
    workers; the outputs in the candidates' order, each candidate's slices joined in sample order: the same
    arrays as in one process. The model, scales and samples travel once per worker (`executor.stash`)."""
    n = len(share.changes)
    if shares is None:
        shares = share_count(executor, n, share.feeds, share.model)
    if executor is None or shares < 2 or n < 2 or not share.feeds:
        return run_share(share)
    plan = split(n, len(share.feeds), shares)
    model, recipe, feeds = (executor.stash(v) for v in (share.model, (share.amax, share.options), tuple(share.feeds)))
    threads = share_threads(executor, min(len(plan), executor.workers))
    jobs = [ShareJob(model, recipe, feeds, share.base, share.output, tuple(share.changes[c] for c in cands), span,
                     threads, share.output_axis) for cands, span in plan]
    log.debug("%d candidate(s) x %d batch(es) in %d share(s) on %d %s worker(s)", n, len(share.feeds), len(jobs),
              executor.workers, executor.engine)
    return join(plan, executor.map(run_job, jobs), n)


def join(plan: Sequence[tuple[tuple[int, ...], tuple[int, int]]], parts: Sequence[Sequence[np.ndarray]],
         candidates: int) -> list[np.ndarray]:
    """Each candidate's output from the shares' results (`split`'s plan, in order): its slices joined in batch
    order. WorkerError if any piece is missing: a search step is never decided on part of its work."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(candidates)]
    expected = [0] * candidates
    for (cands, _), part in zip(plan, parts, strict=True):
        for c in cands:
            expected[c] += 1
        if len(part) == len(cands):
            for c, out in zip(cands, part, strict=True):
                pieces[c].append(out)
    if not all(expected) or any(len(p) != e for p, e in zip(pieces, expected, strict=True)):
        raise WorkerError(f"the workers returned {sum(map(len, pieces))} of the {sum(expected)} pieces of "
                          f"{candidates} search candidates' outputs; no choice is made on part of them. Run again, "
                          f"or with execution.workers: 1.")
    return [p[0] if len(p) == 1 else np.concatenate(p, axis=0) for p in pieces]
