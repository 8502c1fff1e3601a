"""`engine: local`: a pool of worker processes on this machine (concurrent.futures, `spawn` start method).

Each worker takes a slot number when it starts: it names the worker in the log lines it sends to the lead
(workers never draw progress bars or write to the terminal themselves; their log records travel through a
queue and are printed by the lead's handlers as "[worker 3] ..."), and, when the work is on GPUs, picks its GPU
(`CUDA_VISIBLE_DEVICES`, one GPU per worker). `spawn`, not `fork`: onnxruntime's and CUDA's threads do not
survive a fork, and every platform has it.

A worker that dies (killed, out of memory, a crash in native code) breaks the whole pool in concurrent.futures:
the pool is started again and the unfinished items resubmitted, at most `retries` times each; then WorkerError.
"""

from __future__ import annotations

import concurrent.futures
import logging
import logging.handlers
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from quantpipe.config import ExecutionConfig
from quantpipe.errors import WorkerError
from quantpipe.execution.base import DEFAULT_MIN_SHARD_MB, OnResult, usable_cores
from quantpipe.execution.stash import StashBook, Stashed, stash_file

__all__ = ["LocalPool", "DEFAULT_RETRIES"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_RETRIES: int = ExecutionConfig.model_fields["retries"].default
"""Times an item is resubmitted after the worker running it died."""

#: Libraries that size their own thread pools from the core count; each worker gets its share instead.
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_init(slots: Any, log_queue: Any, level: int, gpu_ids: Sequence[str], threads: int) -> None:
    """Runs once in each new worker: its slot, its GPU, its thread budget, and its logging to the lead."""
    slot = slots.get()
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[slot % len(gpu_ids)]
    for key in _THREAD_ENV:
        os.environ[key] = str(threads)
    handler = logging.handlers.QueueHandler(log_queue)
    # QueueHandler.prepare() formats the record into its message: the prefix travels with it.
    handler.setFormatter(logging.Formatter(f"[worker {slot}] %(message)s"))
    root = logging.getLogger("quantpipe")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _ToLead(logging.Handler):
    """In the lead: hand a worker's record to the logger it was emitted on, so the lead's handlers print it."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


class LocalPool:
    """A pool of `workers` processes; see the module docstring.

    Args:
        workers: processes (>= 2; `InProcess` is the one-worker executor).
        gpus: GPU ids to spread the workers over, one per worker (empty: CPU work).
        retries: resubmissions of an item whose worker died.
        min_shard_mb: the least work a shard is given (`plan_shards`).
    """

    engine = "local"

    def __init__(self, workers: int, *, gpu_ids: Sequence[str] = (), retries: int = DEFAULT_RETRIES,
                 min_shard_mb: float = DEFAULT_MIN_SHARD_MB) -> None:
        if workers < 2:
            raise ValueError("LocalPool needs at least 2 workers; use InProcess for one")
        self.workers = workers
        self.min_shard_mb = min_shard_mb
        self.gpu_ids = tuple(gpu_ids)
        self.gpus = len(self.gpu_ids)
        self.retries = retries
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._log_queue: Any = None
        self._listener: logging.handlers.QueueListener | None = None
        self._stash_dir: str | None = None
        self._stashed = StashBook()

    @property
    def threads_per_worker(self) -> int | None:
        return max(1, usable_cores() // self.workers)

    @property
    def started(self) -> bool:
        """Whether the worker processes run (they start on the first `map`)."""
        return self._pool is not None

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            if self._listener is None:
                self._log_queue = self._ctx.Queue()
                self._listener = logging.handlers.QueueListener(self._log_queue, _ToLead())
                self._listener.start()
            slots = self._ctx.Queue()
            for i in range(self.workers):
                slots.put(i)
            level = logging.getLogger("quantpipe").getEffectiveLevel()
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=self._ctx, initializer=_worker_init,
                initargs=(slots, self._log_queue, level, self.gpu_ids, self.threads_per_worker or 1),
            )
        return self._pool

    def _drop_pool(self, *, stop: bool = False) -> None:
        """Let the pool go; with `stop`, its worker processes are terminated too. Without it, a share still running
        in a worker would hold the command at exit until it finished (290 s after a DeepLabV3 worker's error, found
        probing): an error or Ctrl-C stops the rest of the work."""
        if self._pool is not None:
            # The stdlib's pool has no public way to stop its workers before Python 3.14 (terminate_workers).
            workers = list((getattr(self._pool, "_processes", None) or {}).values()) if stop else []
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers:
                if proc.is_alive():
                    proc.terminate()
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_result: OnResult | None = None) -> list[R]:
        results: dict[int, R] = {}
        died = [0] * len(items)
        while len(results) < len(items):
            pending = [i for i in range(len(items)) if i not in results]
            try:
                self._run(fn, items, pending, results, on_result)
            except BrokenProcessPool as err:
                self._drop_pool()
                unfinished = [i for i in pending if i not in results]
                for i in unfinished:
                    died[i] += 1
                if max(died[i] for i in unfinished) > self.retries:
                    raise WorkerError(
                        f"a worker process died {max(died)} times while running {getattr(fn, '__name__', fn)} "
                        f"({len(unfinished)} of {len(items)} shard(s) unfinished; last: {err}). No result is reported "
                        f"from a partial set of shards. Look for a crash or the out-of-memory killer in the system log "
                        f"(dmesg); fewer workers (execution.workers, --workers) need less memory."
                    ) from err
                log.warning("a worker process died (%s); starting the pool again for %d unfinished shard(s)",
                            err, len(unfinished))
            except BaseException:
                self._drop_pool(stop=True)  # an error or Ctrl-C: stop the rest of the work, leave nothing running
                raise
        return [results[i] for i in range(len(items))]

    def _run(self, fn: Callable[[T], R], items: Sequence[T], pending: Sequence[int], results: dict[int, R],
             on_result: OnResult | None) -> None:
        pool = self._start()
        futures = {pool.submit(fn, items[i]): i for i in pending}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()  # a worker's exception is raised here, as itself
            if on_result is not None:
                on_result(i, results[i])

    def stash(self, value: Any) -> Stashed:
        """Write the pickled value once to this pool's temporary folder, named by its sha256; workers read it
        once each (`execution.stash`). The folder goes with `close`."""
        return self._stashed.stash(value, self._put)

    def _put(self, data: bytes, digest: str) -> Stashed:
        if self._stash_dir is None:
            self._stash_dir = tempfile.mkdtemp(prefix="quantpipe-stash-")
        return stash_file(self._stash_dir, data, digest)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._stash_dir is not None:
            shutil.rmtree(self._stash_dir, ignore_errors=True)
            self._stash_dir = None
            self._stashed.clear()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
            self._log_queue.close()
            self._log_queue = None

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
