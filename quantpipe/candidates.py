"""Search candidates evaluated in shares on the run's workers (issue 18): the sensitivity's one-layer-at-a-time
runs, the fallback's ranking and its trials within a step.

A candidate is the Q/DQ model of the FP32 `model` built with a few `QuantizeOptions` fields changed (`only_nodes`
for a layer quantized alone, `keep_float_nodes` for a keep-set). A share is a contiguous run of candidates and
everything needed to build and run them (picklable: the models travel as serialized protos, the feeds as numpy
arrays); a worker builds its candidates, and the base model they are compared with, itself, so the lead ships
recipes, not models. Within a share the candidates run through `reference.run_candidates` in groups of
`CANDIDATES_PER_RUN`, each group reusing one run of the base model, exactly as one process runs them.

Why the outputs are identical to one process: each candidate's output is what its own session computes on the
same feeds (`run_candidates` computes the same bits whatever the group; tests/unit/test_reference.py), the
models are built by the same deterministic code from the same arguments, and the shares come back in order.
tests/unit/test_candidates.py checks it with local workers and on a real Ray cluster.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.errors import WorkerError
from quantpipe.execution import Executor, model_mb, plan_shards
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.reference import CANDIDATES_PER_RUN, run_candidates

__all__ = ["FP32_BASE", "CandidateShare", "run_share", "run_shared", "share_count"]

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
            outs += [run_candidates(m, [m], share.feeds, share.output, threads=share.threads)[0] for m in models]
        else:
            outs += run_candidates(base, models, share.feeds, share.output, threads=share.threads)
    return outs


def share_count(executor: Executor | None, candidates: int, feeds: Sequence[Mapping[str, np.ndarray]],
                model: Any) -> int:
    """How many shares the candidates are cut into: 1 (this process) unless each share holds at least
    `execution.min_shard_mb` of work (candidates x samples x model MB; `execution.plan_shards`)."""
    samples = sum(int(next(iter(f.values())).shape[0]) for f in feeds if f)
    return plan_shards(executor, items=candidates, work_mb=candidates * samples * model_mb(model))


def run_shared(executor: Executor | None, share: CandidateShare, *, shares: int | None = None) -> list[np.ndarray]:
    """`run_share(share)`, its candidates cut into `shares` contiguous shares (default: `share_count`) run on the
    executor's workers; the outputs in the candidates' order, the same arrays as in one process."""
    n = len(share.changes)
    if shares is None:
        shares = share_count(executor, n, share.feeds, share.model)
    if executor is None or shares < 2 or n < 2:
        return run_share(share)
    shares = min(shares, n)
    cuts = [round(n * k / shares) for k in range(shares + 1)]
    threads = executor.threads_per_worker
    items = [dataclasses.replace(share, changes=share.changes[lo:hi], threads=threads)
             for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo]
    log.debug("%d candidate(s) in %d share(s) on %d %s worker(s)", n, len(items), executor.workers, executor.engine)
    parts = executor.map(run_share, items)
    outs = [o for part in parts for o in part]
    if len(outs) != n:  # never a search step decided on part of its candidates
        raise WorkerError(f"the workers returned {len(outs)} of {n} search candidates' outputs; no choice is made "
                          f"on part of them. Run again, or with execution.workers: 1.")
    return outs
