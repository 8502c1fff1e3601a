"""`engine: ray`: the same work as Ray tasks, on an existing cluster or on a Ray instance this run starts.

- `address` given (`auto`, `ray://host:port`, `host:port`): connect to that cluster and leave it running.
- no `address`: start a local Ray instance (this machine's cores, loopback only, no dashboard) and stop it
  when the run ends. A Ray instance already initialised in this process (a test's, a notebook's) is used
  as it is and left running.

Large values every item reads (a search step's model and samples) are put into the object store once per content
(`stash`) and the items carry the reference; each worker process reads such a value once (`execution.stash`).
Each item goes into Ray's object store (`ray.put`) and runs as one task asking for `threads_per_worker`
CPUs (and one GPU when the work is on GPUs), so Ray never runs more tasks at once than the resources allow;
`workers` is how many shards the stages cut their data into. A task whose worker dies is retried by Ray
(`max_retries`); an exception raised by quantpipe in a task is raised here as itself, so exit codes hold.
Workers' log output reaches the driver through Ray's log forwarding (prefixed with the task and pid).

On a remote cluster the model file must be readable at the same path on every node (a shared file system);
the data shards travel through the object store (lazily read `.npz` members and folder samples as file
references: keep those on the shared file system too).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from quantpipe.deps import require
from quantpipe.errors import QuantpipeError, WorkerError
from quantpipe.execution.base import DEFAULT_MIN_SHARD_MB, OnResult, usable_cores
from quantpipe.execution.local import DEFAULT_RETRIES
from quantpipe.execution.stash import StashBook, Stashed

__all__ = ["RayPool", "LOOPBACK_ENV", "run_logged"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Ray advertises (and binds) a local instance on the machine's network address unless this is "0" when ray
#: is first imported; a run's own instance needs no network, so quantpipe keeps it on 127.0.0.1.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def run_logged(fn: Callable[[T], R], level: int, item: T) -> R:
    """A Ray task: `fn(item)`, with quantpipe's log records at the driver's level written to the worker's stderr,
    which Ray forwards to the driver (prefixed with the task and its pid)."""
    root = logging.getLogger("quantpipe")
    if not any(getattr(h, "quantpipe_ray", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler.quantpipe_ray = True  # type: ignore[attr-defined]
        root.handlers[:] = [handler]
        root.propagate = False
    root.setLevel(level)
    return fn(item)


class RayPool:
    """Work items as Ray tasks; see the module docstring.

    Args:
        workers: shards the stages cut their work into (and tasks in flight); None: the cluster's CPUs (its GPUs
            with `gpu`), read when the cluster is first used.
        address: the cluster to connect to; None starts a local instance for this run.
        gpu: the work runs on CUDA: one GPU per task (Ray places the tasks on GPUs it has).
        retries: Ray's `max_retries` for a task whose worker died.
        min_shard_mb: the least work a shard is given (`plan_shards`).
    """

    engine = "ray"

    def __init__(self, workers: int | None, *, address: str | None = None, gpu: bool = False,
                 retries: int = DEFAULT_RETRIES, min_shard_mb: float = DEFAULT_MIN_SHARD_MB) -> None:
        self._workers = workers
        self.min_shard_mb = min_shard_mb
        self._gpu = gpu
        self._gpus = 0
        self.retries = retries
        self.address = address
        self._started = False
        self._cpus: int | None = None
        self._stashed = StashBook()

    @property
    def workers(self) -> int:
        if self._workers is None:
            self._ray()
        assert self._workers is not None
        return self._workers

    @property
    def gpus(self) -> int:
        """GPUs on the cluster the tasks use, one each (0: CPU work)."""
        if self._gpu:
            self._ray()
        return self._gpus

    def _ray(self) -> Any:
        """The ray module, connected (on first use: a run whose stages are all reused starts no Ray)."""
        if self.address is None and "ray" not in sys.modules:
            os.environ.setdefault(LOOPBACK_ENV, "0")
        ray = require("ray", purpose="execution.engine: ray")
        if not ray.is_initialized():
            self._connect(ray)
        if self._cpus is None:
            resources = ray.cluster_resources()
            cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
            self._gpus = gpus if self._gpu else 0
            if self._workers is None:
                self._workers = max(1, self._gpus or cpus)
            self._cpus = max(1, cpus // self._workers)
            log.info("Ray: %d worker(s), %d CPU(s) each%s", self._workers, self._cpus,
                     ", one GPU each" if self._gpus else "")
        return ray

    def _connect(self, ray: Any) -> None:
        if self.address is None:
            log.info("starting a local Ray instance (%d CPUs, loopback only) for this run", usable_cores())
            ray.init(num_cpus=usable_cores(), include_dashboard=False, configure_logging=False, log_to_driver=True)
            self._started = True
            return
        log.info("connecting to the Ray cluster at %s", self.address)
        try:
            ray.init(address=self.address, configure_logging=False, log_to_driver=True)
        except Exception as err:  # ConnectionError, ValueError, RuntimeError: Ray's own words say why
            raise WorkerError(
                f"cannot connect to the Ray cluster at execution.address '{self.address}' ({err}). Check that the "
                f"cluster runs (`ray status` on its head node) and the address; or leave address out to start a "
                f"local Ray instance for the run."
            ) from err

    @property
    def threads_per_worker(self) -> int | None:
        self._ray()
        return self._cpus

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_result: OnResult | None = None) -> list[R]:
        ray = self._ray()
        level = logging.getLogger("quantpipe").getEffectiveLevel()
        task = ray.remote(run_logged).options(num_cpus=self._cpus, num_gpus=1 if self._gpus else 0,
                                      max_retries=self.retries, retry_exceptions=False)
        refs = [task.remote(fn, level, ray.put(item)) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        waiting = list(refs)
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                i = index[done[0]]
                results[i] = self._get(ray, done[0], fn)
                if on_result is not None:
                    on_result(i, results[i])
        except BaseException:
            for ref in waiting:  # an error or Ctrl-C: stop the rest of the work
                ray.cancel(ref, force=True)
            raise
        return [results[i] for i in range(len(items))]

    def _get(self, ray: Any, ref: Any, fn: Callable[..., Any]) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, QuantpipeError):
                raise cause from err
            if isinstance(cause, Exception):
                raise cause from err
            raise WorkerError(f"a Ray task running {getattr(fn, '__name__', fn)} failed: {err}") from err
        except ray.exceptions.RayError as err:  # a worker or node died more often than max_retries, ...
            raise WorkerError(
                f"a Ray task running {getattr(fn, '__name__', fn)} could not be completed after {self.retries} "
                f"retries ({type(err).__name__}: {err}). No result is reported from a partial set of shards. "
                f"Check the cluster (`ray status`, the workers' logs); fewer workers need less memory per node."
            ) from err

    def stash(self, value: Any) -> Stashed:
        """Put the pickled value into the object store once per content (sha256) and run; tasks carry the
        reference and each worker process reads it once (`execution.stash`)."""
        ray = self._ray()
        return self._stashed.stash(value, lambda data, digest: Stashed(digest=digest, kind="ray", where=ray.put(data),
                                                                      size=len(data)))

    def close(self) -> None:
        self._stashed.clear()  # the references go: Ray frees the objects
        if self._started:
            ray = require("ray", purpose="execution.engine: ray")
            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
