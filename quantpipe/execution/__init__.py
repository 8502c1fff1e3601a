"""One execution layer for every stage: `execution:` in pipeline.yaml (`--workers`, `--engine`, `--ray-address`).

`make_executor(cfg.execution)` gives an `Executor` whose `map(fn, items)` runs a module-level function over
picklable items and returns the results in order:

- `workers: 1` -> `InProcess`: no pool, the stage's own single-process code path;
- `engine: local` -> `LocalPool`: worker processes on this machine (`spawn`), one per core group, or one per
  GPU with `CUDA_VISIBLE_DEVICES` set per worker;
- `engine: ray` -> `RayPool`: Ray tasks on a cluster (`address`) or on a local instance the run starts and stops.

The stages shard their data with `shard_bounds` (whole batches, in order) and merge what the shards return:
calibration adds histograms (exact: the same cache bytes as one process), evaluation concatenates outputs.
Searches (sensitivity, fallback, split choice, `calibration.use: auto`) pass shares of their independent
candidates to `map` (`quantpipe.candidates`), the model and samples they all read stashed once per worker
(`executor.stash`, `execution.stash`). `plan_shards` keeps small work in this process: a shard must hold
at least `execution.min_shard_mb` of work (samples x model MB), so no pool starts for the bundled example.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from quantpipe.config import ExecutionConfig
from quantpipe.execution.base import (
    Executor,
    InProcess,
    OnResult,
    model_mb,
    plan_shards,
    run_jobs,
    shard_bounds,
    share_threads,
    usable_cores,
)
from quantpipe.execution.local import LocalPool
from quantpipe.execution.ray_engine import RayPool
from quantpipe.execution.stash import Stashed, unstash

__all__ = [
    "Executor", "InProcess", "LocalPool", "RayPool", "OnResult", "make_executor", "shard_bounds", "usable_cores",
    "visible_gpus", "default_workers", "model_mb", "plan_shards", "run_jobs", "share_threads",
    "Stashed", "unstash",
]


def visible_gpus() -> list[str]:
    """The ids of the NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if line_is_gpu(ln))]


def line_is_gpu(line: str) -> bool:
    """A line of `nvidia-smi -L` that names a GPU (not a MIG device under it)."""
    return line.startswith("GPU ")


def default_workers(cfg: ExecutionConfig, *, gpu: bool) -> int:
    """`execution.workers`, or its default: the GPUs when the work runs on CUDA, else the usable cores."""
    if cfg.workers is not None:
        return cfg.workers
    if gpu:
        return max(1, len(visible_gpus()))
    return usable_cores()


def make_executor(cfg: ExecutionConfig, *, gpu: bool = False) -> Executor:
    """The executor `execution:` asks for. `gpu`: the work runs on CUDA (one GPU per worker).

    Nothing starts here: a pool or a Ray instance starts on the first `map` (a fully reused run starts none).
    """
    if cfg.engine == "ray":  # workers default to the cluster's CPUs (GPUs), which Ray tells when first used
        return RayPool(cfg.workers, address=cfg.address, gpu=gpu, retries=cfg.retries, min_shard_mb=cfg.min_shard_mb)
    workers = default_workers(cfg, gpu=gpu)
    gpu_ids = visible_gpus() if gpu else []
    if workers == 1:
        return InProcess()
    return LocalPool(workers, gpu_ids=gpu_ids, retries=cfg.retries, min_shard_mb=cfg.min_shard_mb)
