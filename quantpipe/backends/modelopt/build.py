"""ModelOpt's variants in the build stage: `modelopt-int8`, `modelopt-int8-qpscales`, `modelopt-fp16`, each an ONNX
model that ModelOpt's interpreter writes (see `worker`), evaluated with onnxruntime like quantpipe's own.

Reused from `<workspace>/modelopt/` while the model, the calibration data, the `build.backends.modelopt` section,
ModelOpt's version and (for `int8-qpscales`) quantpipe's scales are unchanged and every file is still what was
written (sha256, `workspace.reusable`). Where ModelOpt is not set up, the variants are skipped with the reason and
the command; `required: true` makes that exit 3.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe import __version__
from quantpipe.artifacts import Variant
from quantpipe.backends.modelopt.env import ModeloptEnv, find_modelopt
from quantpipe.config import MODELOPT_VARIANTS, PipelineConfig, variant_name
from quantpipe.data import Dataset
from quantpipe.errors import BuildError, DataError, MissingDependencyError
from quantpipe.fsutil import atomic_path, atomic_write_json
from quantpipe.inputs import LoadedInputs
from quantpipe.workspace import Progress, Workspace, reusable, write_manifest

__all__ = ["WORKER", "build_modelopt_variants", "modelopt_skip", "run_worker", "write_calibration_npz"]

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("worker.py")
"""The script ModelOpt's interpreter runs (it imports nothing of quantpipe)."""
QPSCALES_CACHE = "quantpipe_scales.cache"
_STDERR_TAIL = 12


def _precision(v: str) -> str:
    return "fp16" if v == "fp16" else "int8"


def modelopt_skip(cfg: PipelineConfig) -> tuple[ModeloptEnv, str | None]:
    """The ModelOpt interpreter, and why the variants cannot be built (None when they can).

    Raises:
        MissingDependencyError: ModelOpt is not available and `required: true` (exit 3).
    """
    mo = cfg.build.backends.modelopt
    env = find_modelopt(mo.python)
    if env.available:
        return env, None
    if mo.required:
        raise MissingDependencyError(
            f"build.backends.modelopt.required is true, but {env.reason}. Set it up with `{env.command}` (a venv of its "
            f"own under your cache), point build.backends.modelopt.python at an interpreter with nvidia-modelopt[onnx], "
            f"or set required: false to report the ModelOpt variants as skipped."
        )
    return env, env.reason or f"ModelOpt is not available; run `{env.command}`"


def write_calibration_npz(ds: Dataset, path: Path, batch_size: int) -> int:
    """quantpipe's calibration samples as one .npz of stacked arrays (ModelOpt's `calibration_data`); the count."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.batches(batch_size):
        for name, arr in batch.feeds.items():
            parts.setdefault(name, []).append(np.asarray(arr))
    try:
        stacked = {k: np.concatenate(v, axis=ds.batch_axes.get(k, 0)) for k, v in parts.items()}
    except ValueError as err:
        raise DataError(
            f"ModelOpt needs calibration samples of one shape per input, and {ds.path} holds several ({err}). Give "
            f"data.calibration samples of one shape, or disable build.backends.modelopt."
        ) from err
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **stacked)  # type: ignore[arg-type]  # numpy's stub reads the first keyword as allow_pickle
    return ds.num_samples


def run_worker(python: str, jobs: Sequence[Mapping[str, Any]], folder: Path, name: str,
               timeout: float | None = None) -> list[dict[str, Any]]:
    """Run the worker on `jobs` with ModelOpt's interpreter (one process); return each job's report (what it did,
    its time, the process's peak RSS so far).

    Raises:
        BuildError: the worker failed or a report is missing; the message holds the tail of its output.
    """
    job_path = folder / f".{name}.job.json"
    atomic_write_json(job_path, {"jobs": [dict(j) for j in jobs]})
    try:
        proc = subprocess.run([python, str(WORKER), str(job_path)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"{name}: ModelOpt's interpreter {python} could not be run ({type(err).__name__}: {err}). "
                         f"Check build.backends.modelopt.python, or run `quantpipe setup modelopt --force`.") from err
    finally:
        job_path.unlink(missing_ok=True)
    missing = [j for j in jobs if not Path(j["report"]).is_file()]
    if proc.returncode != 0 or missing:
        lines = [ln for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        job = missing[0] if missing else jobs[0]
        raise BuildError(
            f"{name}: ModelOpt failed on {job['model']} (exit {proc.returncode}, mode {job['mode']}); the last lines of "
            f"its output: {' | '.join(lines[-_STDERR_TAIL:]) or 'none'}. Fix the cause above, drop '{job['mode']}' from "
            f"build.backends.modelopt.variants, or disable build.backends.modelopt."
        )
    return [json.loads(Path(j["report"]).read_text(encoding="utf-8")) for j in jobs]


def _fingerprint(cfg: PipelineConfig, li: LoadedInputs, env: ModeloptEnv, scales_sha: str) -> dict[str, Any]:
    section = cfg.build.backends.modelopt.model_dump(mode="json", exclude={"python", "required"})
    return {"model_sha256": li.spec.sha256, "calib_data": li.calib.fingerprint, "modelopt": env.version,
            "section": json.dumps(section, sort_keys=True), "scales": scales_sha, "quantpipe": __version__}


def build_modelopt_variants(
    cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, amax: Mapping[str, float], progress: Progress
) -> list[Variant]:
    """Build (or reuse) ModelOpt's variants; skipped ones carry the reason and the set-up command."""
    from quantpipe.calibration.cache import write_trt_cache
    from quantpipe.fsutil import sha256_file

    mo = cfg.build.backends.modelopt
    wanted = [v for v in MODELOPT_VARIANTS if v in mo.variants]
    env, reason = modelopt_skip(cfg)
    if reason is not None:
        log.info("%s: skipped (%s)", ", ".join(variant_name("modelopt", v) for v in wanted), reason)
        return [Variant(variant_name("modelopt", v), "modelopt", _precision(v), "cpu", skipped=reason)  # type: ignore[arg-type]
                for v in wanted]
    folder = ws.root / "modelopt"
    folder.mkdir(parents=True, exist_ok=True)
    scales_sha = ""
    if "int8-qpscales" in wanted:
        # The scales quantpipe's INT8 model uses (`calibration.use`), as a TensorRT cache ModelOpt imports.
        write_trt_cache(folder / QPSCALES_CACHE, dict(sorted(amax.items())), method="entropy", trt_version=cfg.calibration.trt_version)
        scales_sha = sha256_file(folder / QPSCALES_CACHE)
    fp = _fingerprint(cfg, li, env, scales_sha)
    manifest = reusable(folder, fp, "build (modelopt)")
    if manifest is None:
        reports = _run_all(cfg, folder, li, env, wanted, progress)
        files = [f"modelopt-{v}.onnx" for v in wanted] + [f"modelopt-{v}.json" for v in wanted] + ([QPSCALES_CACHE] if scales_sha else [])
        write_manifest(folder, fp, files, {"reports": reports, "python": env.python})
    else:
        reports = manifest["payload"]["reports"]
    out = []
    for v in wanted:
        path = folder / f"modelopt-{v}.onnx"
        out.append(Variant(variant_name("modelopt", v), "modelopt", _precision(v), "cpu", artifact=str(path),  # type: ignore[arg-type]
                           size_bytes=path.stat().st_size, details={"modelopt": reports[v]}))
    return out


def _run_all(cfg: PipelineConfig, folder: Path, li: LoadedInputs, env: ModeloptEnv, wanted: Sequence[str],
             progress: Progress) -> dict[str, Any]:
    mo = cfg.build.backends.modelopt
    npz = folder / "calibration.npz"
    assert env.python is not None
    reports: dict[str, Any] = {}
    for v in wanted:  # what an earlier, different run left must not pass for this run's output
        (folder / f"modelopt-{v}.onnx").unlink(missing_ok=True)
        (folder / f"modelopt-{v}.json").unlink(missing_ok=True)
    try:
        write_calibration_npz(li.calib, npz, cfg.data.batch_size)
        jobs = [{"mode": v, "model": str(Path(li.spec.path).resolve()), "calibration_data": str(npz),
                 "calibration_method": mo.calibration_method, "calibration_cache": str(folder / QPSCALES_CACHE),
                 "output": str(folder / f"modelopt-{v}.onnx"), "report": str(folder / f"modelopt-{v}.json")} for v in wanted]
        with progress.task(f"building ModelOpt {env.version} variants ({', '.join(wanted)})", None):
            for v, doc in zip(wanted, run_worker(env.python, jobs, folder, "modelopt"), strict=True):
                reports[v] = doc
                log.info("%s: built by ModelOpt %s in %.1f s (worker's peak RSS so far %.0f MiB)",
                         variant_name("modelopt", v), env.version, doc["seconds"], doc["peak_rss_bytes"] / 2**20)
    finally:
        npz.unlink(missing_ok=True)  # a copy of the user's data, only needed while ModelOpt runs
    return reports
