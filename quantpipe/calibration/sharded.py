"""Calibration over several workers: the data set cut into shards of whole batches, one pass per shard, the
shards' histograms added.

Why the result is bit-identical to one process: a histogram's counts are a function of the data alone
(histogram.py: power-of-two ranges, exact integer binning, exact merges), so the sum of the shards' histograms
is the histogram of all the data, whatever the cut; the weights are binned once (by the first shard).
So the caches, sidecars' amax and `histograms.npz` are the same bytes as with `workers: 1`
(tests/unit/execution/test_sharded_calibration.py checks it, with local workers and with Ray).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

from quantpipe.calibration.collect import (
    DEFAULT_MAX_RUN_BYTES,
    CollectedStats,
    PartialStats,
    collect_partial,
    finish_stats,
)
from quantpipe.calibration.histogram import DEFAULT_NUM_BINS
from quantpipe.data import Dataset
from quantpipe.errors import CalibrationError
from quantpipe.execution import Executor, shard_bounds, share_threads

__all__ = ["ShardJob", "collect_shard", "collect_sharded"]

log = logging.getLogger(__name__)

OnBatch = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One worker's share of a calibration pass (picklable: the data shard travels as `Dataset.subset`)."""

    model: str
    dataset: Dataset
    weights: bool
    batch_size: int
    num_bins: int
    tensors: tuple[str, ...] | None
    providers: tuple[str, ...]
    threads: int | None
    max_run_bytes: int | None
    cuda_options: Mapping[str, str] | None


def collect_shard(job: ShardJob) -> PartialStats:
    """Run in a worker: the raw histograms of one shard."""
    return collect_partial(job.model, job.dataset, batch_size=job.batch_size, num_bins=job.num_bins,
                           tensors=job.tensors, providers=job.providers, threads=job.threads,
                           max_run_bytes=job.max_run_bytes, cuda_options=job.cuda_options, weights=job.weights)


def collect_sharded(
    model: str | os.PathLike[str],
    dataset: Dataset,
    executor: Executor,
    *,
    batch_size: int = 32,
    num_bins: int = DEFAULT_NUM_BINS,
    tensors: Sequence[str] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    on_batch: OnBatch | None = None,
    max_run_bytes: int | None = DEFAULT_MAX_RUN_BYTES,
    cuda_options: Mapping[str, str] | None = None,
    shards: int | None = None,
) -> CollectedStats:
    """`collect_histograms` with the data shared out over `executor`'s workers; the same histograms exactly.

    Progress (`on_batch`) advances as shards finish. Every shard must finish: a shard that fails raises
    its error, and a shard whose worker keeps dying raises WorkerError, never a partial histogram.
    `shards`: how many to cut the data into (default: one per worker).
    """
    t0 = time.perf_counter()
    bounds = shard_bounds(dataset.batch_bounds(batch_size), shards or executor.workers)
    threads = share_threads(executor, min(len(bounds), executor.workers))
    jobs = [
        ShardJob(str(model), dataset.subset(lo, hi), i == 0, batch_size, num_bins,
                 None if tensors is None else tuple(tensors), tuple(providers), threads, max_run_bytes,
                 None if cuda_options is None else dict(cuda_options))
        for i, (lo, hi) in enumerate(bounds)
    ]
    log.info("calibrate: %d samples in %d shard(s) on %d %s worker(s)", dataset.num_samples, len(jobs),
             executor.workers, executor.engine)
    done = [0]

    def finished(i: int, part: PartialStats) -> None:
        done[0] += part.num_samples
        if on_batch is not None:
            on_batch(done[0], dataset.num_samples)

    parts = executor.map(collect_shard, jobs, on_result=finished)
    merged = functools.reduce(PartialStats.merge, parts)
    if merged.num_samples != dataset.num_samples:  # never numbers from a partial shard set
        raise CalibrationError(f"calibration shards covered {merged.num_samples} of {dataset.num_samples} samples; "
                               f"no scales are computed from part of the data. Run again, or with execution.workers: 1.")
    return finish_stats(merged, time.perf_counter() - t0)
