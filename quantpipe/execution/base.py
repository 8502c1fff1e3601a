"""What every execution engine offers: `map(fn, items)` with ordered results, and how work is split.

An `Executor` runs a picklable, module-level function over a list of items and returns the results in the
items' order, whatever order the workers finish in. The stages split their data with `shard_bounds` into
contiguous runs of whole batches, so every worker batches its samples exactly as one process would, and
concatenating the shards' outputs in order gives one process's outputs bit for bit.

`InProcess` is `workers: 1`: no pool, no pickling, the stage's own code path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from quantpipe.config import ExecutionConfig
from quantpipe.execution.stash import Stashed

__all__ = ["DEFAULT_MIN_SHARD_MB", "Executor", "InProcess", "OnResult", "model_mb", "plan_shards", "run_jobs",
           "shard_bounds", "share_threads", "usable_cores"]

DEFAULT_MIN_SHARD_MB: float = ExecutionConfig.model_fields["min_shard_mb"].default
"""The least work (samples x model MB) a shard is given; see `plan_shards`."""

T = TypeVar("T")
R = TypeVar("R")

OnResult = Callable[[int, Any], None]
"""Called in the lead process as each item finishes: (item index, its result)."""


class Executor(Protocol):
    """Runs independent work items on `workers` workers; results come back in the items' order."""

    engine: str
    """'local' or 'ray'."""

    min_shard_mb: float
    """The least work a shard is given (`plan_shards`)."""

    @property
    def workers(self) -> int:
        """How many shards the stages cut their work into (at most this many run at once)."""
        ...

    @property
    def gpus(self) -> int:
        """GPUs the workers use, one each (0: CPU work)."""
        ...

    @property
    def threads_per_worker(self) -> int | None:
        """Intra-op threads each worker should use (None: the library's default, all cores)."""
        ...

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_result: OnResult | None = None) -> list[R]:
        """`[fn(x) for x in items]`, spread over the workers. `fn` must be a module-level function and the
        items picklable. The first error a worker raises is raised here (a QuantpipeError as itself); a
        worker that dies is retried, and if it keeps dying WorkerError says so: never a partial result."""
        ...

    def stash(self, value: Any) -> Stashed:
        """A handle to `value` that items carry instead of the value: each worker reads it once and keeps it
        (`execution.stash`: a file or a Ray object named by the sha256 of the pickled value)."""
        ...

    def close(self) -> None:
        """Stop the workers (and a Ray instance this executor started)."""
        ...


class InProcess:
    """`workers: 1`: the work runs in this process, in order, exactly as without an execution layer."""

    engine = "local"
    workers = 1
    gpus = 0
    min_shard_mb = DEFAULT_MIN_SHARD_MB

    @property
    def threads_per_worker(self) -> int | None:
        return None

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_result: OnResult | None = None) -> list[R]:
        out = []
        for i, item in enumerate(items):
            result = fn(item)
            if on_result is not None:
                on_result(i, result)
            out.append(result)
        return out

    def stash(self, value: Any) -> Stashed:
        return Stashed(digest="", kind="inline", value=value)

    def close(self) -> None:
        return None

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def shard_bounds(batches: Sequence[tuple[int, int]], shards: int) -> list[tuple[int, int]]:
    """Split consecutive batches [(start, stop), ...] into at most `shards` contiguous runs of whole batches,
    as equal in samples as whole batches allow; returns each run's (start, stop) in order.

    The runs cover every sample exactly once, in order; no run is empty; there are min(shards, len(batches)).
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if not batches:
        return []
    n = min(shards, len(batches))
    first, total = batches[0][0], batches[-1][1] - batches[0][0]
    out: list[tuple[int, int]] = []
    k = 0  # index of the next batch not yet in a run
    for run in range(n):
        if run == n - 1:
            end = len(batches)
        else:
            # Cut at the batch whose stop is nearest the ideal boundary, leaving a batch for each later run.
            ideal = first + total * (run + 1) / n
            end = k + 1
            while end < len(batches) - (n - run - 1) and abs(batches[end][1] - ideal) <= abs(batches[end - 1][1] - ideal):
                end += 1
        out.append((batches[k][0], batches[end - 1][1]))
        k = end
    return out


def model_mb(model: Any) -> float:
    """A model's size in MB: an ONNX file (with the `<name>.data` external data quantpipe writes beside it), a
    ModelProto or serialized bytes."""
    if isinstance(model, bytes):
        return len(model) / 1e6
    if hasattr(model, "ByteSize"):
        return float(model.ByteSize()) / 1e6
    path = Path(model)
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size if path.is_file() else 0
    return (size + (data.stat().st_size if data.is_file() else 0)) / 1e6


def plan_shards(executor: Executor | None, *, items: int, work_mb: float) -> int:
    """How many shards to cut `items` work items (batches, candidates) into: at most the executor's workers and
    the items, each shard holding at least `executor.min_shard_mb` of the `work_mb` in all (samples x model
    MB). 1 means: run in this process, start no pool (small work costs more to ship than to do).

    The work is weighed before the workers are counted, so small work never starts a Ray instance to ask.
    """
    if executor is None or items < 2:
        return 1
    floor = max(0.0, float(executor.min_shard_mb))
    by_work = items if floor == 0 else math.floor(work_mb / floor)
    if by_work < 2:
        return 1
    return max(1, min(items, by_work, executor.workers))


def share_threads(executor: Executor, shares: int) -> int | None:
    """onnxruntime intra-op threads for each of `shares` shares that run at once on `executor`: the workers' share of
    the cores, and where fewer shares than workers run, the idle workers' cores too (local CPU workers only: a Ray
    task holds the CPUs it asked for, a GPU worker its GPU). The sensitivity's SQNR runs on 63 images are 2 shares of
    whole batches: on 16 cores each ran on one thread while 14 cores idled. The outputs do not depend on the
    thread count (`ortsession.ort_session` folds the weights; the searches' tests compare worker counts)."""
    per = executor.threads_per_worker
    if per is None or executor.engine != "local" or executor.gpus or shares >= executor.workers:
        return per
    return max(per, usable_cores() // max(1, shares))


def run_jobs(executor: Executor | None, fn: Callable[[T], R], jobs: Sequence[T], *, work_mb: float) -> list[R]:
    """`[fn(j) for j in jobs]`: on the executor's workers when the work fills two shards (`plan_shards`), else in
    this process. Jobs are dataclasses; one with a `threads` field gets the workers' share of the cores there."""
    if plan_shards(executor, items=len(jobs), work_mb=work_mb) < 2:
        return [fn(j) for j in jobs]
    assert executor is not None
    threads = share_threads(executor, min(len(jobs), executor.workers))
    if jobs and dataclasses.is_dataclass(jobs[0]) and any(f.name == "threads" for f in dataclasses.fields(jobs[0])):
        jobs = [dataclasses.replace(j, threads=threads) for j in jobs]  # type: ignore[type-var]
    return executor.map(fn, jobs)
