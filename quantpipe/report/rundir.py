"""What a run directory holds, read back: results.json, the calibration sidecars, the latest-run pointer,
and the completion record that makes a run a run.

A run is committed last: `quantpipe run` writes every file into a hidden staging folder beside it, writes
`complete.json` (the list of the run's files) and only then renames the folder into place; `latest`
only ever points at a committed run, and `report` / `gate --run` refuse a folder without the record.

`reports/<run-id>/results.json` is the contract between the stages that measure and the stages that
judge and show (report, gate), so it is validated on the way in: a wrong schema version or a
garbled file is a DataError (exit 2) that says which file and what to do, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.artifacts import RESULTS_SCHEMA_VERSION, RunResults, from_jsonable
from quantpipe.errors import DataError, WriteError
from quantpipe.fsutil import atomic_write_json, atomic_write_text, owner_tag

__all__ = [
    "COMPLETE_FILE",
    "RESULTS_FILE",
    "LATEST",
    "commit_run",
    "mark_rewriting",
    "require_complete",
    "staging_dir",
    "from_run",
    "in_run",
    "write_complete",
    "TensorHistogram",
    "load_results",
    "update_latest",
    "resolve_latest",
    "warn_if_other_pipeline",
    "load_histograms",
    "load_thresholds",
]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
LATEST = "latest"
HISTOGRAMS_FILE = "histograms.npz"
COMPLETE_FILE = "complete.json"


def load_results(run_dir: str | os.PathLike[str]) -> RunResults:
    """Read and validate `<run_dir>/results.json` (or a results.json path given directly).

    Raises:
        DataError: the file is missing, is not JSON, has another schema version, or does not
            match the schema.
    """
    path = Path(run_dir)
    if path.is_dir() or not path.suffix:
        path = path / RESULTS_FILE
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {path.parent} is not a quantpipe run directory. "
            f"Pass a folder written by `quantpipe run` or `quantpipe evaluate` (reports/<run-id>)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not a text file ({err}). Re-run `quantpipe evaluate` to rewrite it.") from err
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the file is damaged. "
            f"Re-run `quantpipe evaluate` to rewrite it."
        ) from err
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, expected an object with the run's results.")
    version = data.get("schema_version")
    if version != RESULTS_SCHEMA_VERSION:
        found = "no schema_version" if version is None else f"schema_version {version!r}"
        raise DataError(
            f"{path} has {found}; this quantpipe reads schema_version {RESULTS_SCHEMA_VERSION}. "
            f"Re-run the pipeline with this version, or read it with the quantpipe version that wrote it "
            f"({data.get('tool_version', 'unknown')})."
        )
    from pydantic import ValidationError

    try:
        return from_jsonable(RunResults, data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()[:5]
        )
        more = f" (and {err.error_count() - 5} more)" if err.error_count() > 5 else ""
        raise DataError(f"{path} does not match the results schema: {problems}{more}. Re-run `quantpipe evaluate`.") from err


# --------------------------------------------------------------------------- committing a run


def staging_dir(report_root: str | os.PathLike[str], run_id: str) -> Path:
    """Where a run is written before it is committed: hidden, beside its final place (same file system,
    so the commit is one rename), and per process (two runs never share one; one left by a run killed outright is
    removed by the next run, fsutil.remove_orphans)."""
    return Path(report_root) / f".{run_id}.{owner_tag()}.partial"


def from_run(path: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> str:
    """`path` as results.json records it: relative to the run folder (`../../model.onnx` for a file outside it), so
    a project moved or copied whole still finds its files; absolute only where no relative path exists (another
    drive)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def in_run(recorded: str, run_dir: str | os.PathLike[str]) -> Path:
    """Where a path results.json records is: relative ones from the run folder (from_run), absolute ones as written
    (older runs recorded the model and the pipeline file so)."""
    return Path(recorded) if Path(recorded).is_absolute() else Path(run_dir) / recorded


def write_complete(run_dir: str | os.PathLike[str], stage: str, *, state: str = "complete") -> Path:
    """Write the completion record of `run_dir`: its state, the last stage written, every file it holds."""
    run = Path(run_dir)
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != COMPLETE_FILE)
    return atomic_write_json(run / COMPLETE_FILE, {"state": state, "stage": stage, "files": files})


def commit_run(staging: Path, run_dir: Path, *, stage: str) -> Path:
    """Record the staged run complete, then rename it into place (atomic: readers see all of it or nothing)."""
    write_complete(staging, stage)
    try:
        os.rename(staging, run_dir)  # replaces nothing but an empty folder
    except OSError as err:
        raise WriteError(
            f"cannot move the finished run {staging} to {run_dir}: {err.strerror or err}. "
            f"Another run with that name may have finished meanwhile; choose another report.run_id."
        ) from err
    return run_dir


def mark_rewriting(run_dir: str | os.PathLike[str], stage: str) -> None:
    """`quantpipe report` rewrites a committed run in place: until it records the run complete again,
    `gate --run` refuses it (files may be a mix of old and new)."""
    write_complete(run_dir, stage, state="rewriting")


def _complete_record(run: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((run / COMPLETE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else None


def require_complete(run_dir: str | os.PathLike[str], *, allow_rewriting: bool = False) -> Path:
    """The run folder, when it was committed and every file it recorded is there; else DataError (exit 2).

    `allow_rewriting`: accept a run whose report files were being rewritten (`quantpipe report` finishes it).
    """
    run = Path(run_dir)
    if run.is_file() and run.name == RESULTS_FILE:
        run = run.parent
    if not (run / RESULTS_FILE).is_file():
        load_results(run)  # the "not a run directory" message
    record = _complete_record(run)
    if record is None:
        raise DataError(
            f"{run} is not a complete run: it has no readable {COMPLETE_FILE}, which quantpipe writes last, once "
            f"every file of a run is there. The run was interrupted, is still being written, or was written by an "
            f"older quantpipe. Run `quantpipe run` again (calibration and build are reused)."
        )
    if record.get("state") != "complete" and not allow_rewriting:
        raise DataError(
            f"{run} is not a complete run: `quantpipe report` was rewriting its report files when it stopped. "
            f"Run `quantpipe report --run {run}` to finish them, then judge it."
        )
    missing = [f for f in record["files"] if not (run / str(f)).is_file()]
    if missing and not allow_rewriting:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(
            f"{run} is not a complete run: {', '.join(map(str, missing[:5]))}{more} recorded in {COMPLETE_FILE} "
            f"is missing. Run `quantpipe run` again (calibration and build are reused)."
        )
    return run


def update_latest(report_root: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> Path:
    """Point `<report_root>/latest` at `run_dir` (relative symlink, replaced atomically); a run that is
    not complete (require_complete) is refused: `latest` only ever points at complete runs.

    Where symlinks cannot be made (Windows without the privilege, some network file systems)
    writes `<report_root>/latest.txt` holding the run directory's name instead. Returns the
    pointer written.
    """
    root, run = Path(report_root), Path(run_dir)
    require_complete(run)
    root.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(run.resolve(), root.resolve())
    link = root / LATEST
    tmp = root / f".{LATEST}.{owner_tag()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        if link.exists() and not link.is_symlink():
            # A copy that followed the links (cp -rL, an archive) made `latest` a folder of an older run: say it, and
            # `resolve_latest` reads latest.txt before it (found probing: `gate` judged the old run, exit 0).
            log.warning("%s is a folder, not a link (a copy that followed links?): it holds an older run; %s.txt "
                        "points at this one. Remove the folder, so that `latest` can be a link again.", link, LATEST)
            raise OSError(f"{link} exists and is not a symlink")
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, link)  # rename over the old link: readers see the old or the new run, never none
    except (OSError, NotImplementedError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.info("cannot make the %s symlink (%s); writing %s.txt instead", link, err, LATEST)
        return atomic_write_text(root / f"{LATEST}.txt", target + "\n")
    with contextlib.suppress(FileNotFoundError):
        (root / f"{LATEST}.txt").unlink()  # a stale pointer from a machine without symlinks
    return link


def warn_if_other_pipeline(results: RunResults, config: str | os.PathLike[str] | None) -> bool:
    """Warn (and return True) where the run being judged was made by a pipeline file of another name than the one
    judging it: two pipelines sharing one report.dir share `latest`, and one's rules judged the other's run with exit 0
    (found probing). A moved project keeps its file names, so it is not warned about."""
    made_by = Path(results.config_path).name if results.config_path else None
    if made_by is None or config is None or Path(config).name == made_by:
        return False
    log.warning("run %s was made by %s, and is judged here with %s's rules (two pipelines sharing one report.dir "
                "share `latest`): pass --run with the run to judge, or give each pipeline its own report.dir.",
                results.run_id, made_by, Path(config).name)
    return True


def resolve_latest(report_root: str | os.PathLike[str]) -> Path | None:
    """The newest run directory under `report_root` (via `latest` or `latest.txt`), or None."""
    root = Path(report_root)
    link = root / LATEST
    txt = root / f"{LATEST}.txt"
    if link.exists() and (link.is_symlink() or not txt.is_file()):  # a `latest` folder beside latest.txt is stale
        return link.resolve()
    if txt.is_file():
        run = root / txt.read_text(encoding="utf-8").strip()
        return run if run.is_dir() else None
    return None


@dataclasses.dataclass(frozen=True)
class TensorHistogram:
    """One tensor's |x| histogram from calibration: `counts[i]` values fell in [edges[i], edges[i+1])."""

    name: str
    counts: np.ndarray
    edges: np.ndarray


def _calibration_file(run_dir: Path, recorded: str, name: str | None = None) -> Path | None:
    """A calibration artifact: where results.json says it is, else beside the results in calibration/."""
    # The run's own copy first: results.json records paths relative to the run folder, and an absolute one
    # (older results) may name another project's file after the folder was copied.
    rec = Path(recorded) if recorded else None
    candidates = [run_dir / rec] if rec is not None and not rec.is_absolute() else []
    base = name or (rec.name if rec is not None else "")
    if base:
        candidates += [run_dir / "calibration" / base, run_dir / base]
    if rec is not None and rec.is_absolute():
        candidates.append(rec)
    return next((c for c in candidates if c.is_file()), None)


def load_histograms(run_dir: str | os.PathLike[str]) -> tuple[dict[str, TensorHistogram], str | None]:
    """The calibration histograms of a run, and None; or {} and the reason there are none."""
    run = Path(run_dir)
    path = _calibration_file(run, "", HISTOGRAMS_FILE)
    if path is None:
        return {}, f"no calibration histograms in this run ({run / 'calibration' / HISTOGRAMS_FILE} does not exist)"
    try:
        raw = _read_histograms(path)
    except Exception as err:  # a damaged optional artifact must not stop the report
        log.warning("cannot read %s: %s", path, err)
        return {}, f"the calibration histograms in {path} could not be read ({type(err).__name__}: {err})"
    if not raw:
        return {}, f"{path} holds no usable histograms"
    return raw, None


def _read_histograms(path: Path) -> dict[str, TensorHistogram]:
    """Parse histograms.npz (quantpipe.calibration.histfile), activations and inputs only: the binned histograms,
    not the exact streaming state. Kind "weight" is left out (weights are not calibrated from data)."""
    with np.load(path, allow_pickle=False) as npz:
        if "format_version" in npz.files:
            return _read_columns(npz)
        return _read_per_tensor(npz)


def _read_columns(npz: Any) -> dict[str, TensorHistogram]:
    """format_version 2: `names`, `kinds`, `num_bins`, `bin_width` per tensor; `counts`, every tensor's bins
    one after the other."""
    version = int(npz["format_version"])
    if version != 2:
        raise ValueError(f"histograms.npz format_version {version} is not one this quantpipe reads (2)")
    names, kinds = npz["names"].tolist(), npz["kinds"].tolist()
    num_bins, widths = npz["num_bins"].tolist(), npz["bin_width"].tolist()
    counts = np.asarray(npz["counts"], dtype=np.float64)
    if not len(names) == len(kinds) == len(num_bins) == len(widths) or counts.size != sum(num_bins):
        raise ValueError("its per-tensor arrays do not agree in length")
    out: dict[str, TensorHistogram] = {}
    start = 0
    for name, kind, n, width in zip(names, kinds, num_bins, widths, strict=True):
        bins, start = counts[start:start + n], start + n
        if kind != "weight" and n and math.isfinite(width):
            out[name] = TensorHistogram(name, bins, np.arange(n + 1, dtype=np.float64) * width)
    return out


def _read_per_tensor(npz: Any) -> dict[str, TensorHistogram]:
    """Format 1 (quantpipe before format_version 2) and other tools' files: per tensor `<name>/counts` with its
    bins given by `<name>/edges`, or `<name>/bin_width` (bins from 0: histograms of |x|), or `<name>/range`
    ([lo, hi]); `<name>/kind` == "weight" entries are left out."""
    out: dict[str, TensorHistogram] = {}
    keys = set(npz.files)
    for key in npz.files:  # the saved order is graph order
        if not key.endswith("/counts"):
            continue
        name = key[: -len("/counts")]
        if f"{name}/kind" in keys and str(npz[f"{name}/kind"]) == "weight":
            continue
        counts = np.asarray(npz[key], dtype=np.float64).reshape(-1)
        n = counts.size
        if f"{name}/edges" in keys:
            edges = np.asarray(npz[f"{name}/edges"], dtype=np.float64).reshape(-1)
        elif f"{name}/bin_width" in keys:
            edges = np.arange(n + 1, dtype=np.float64) * float(npz[f"{name}/bin_width"])
        elif f"{name}/range" in keys:
            lo, hi = (float(x) for x in np.asarray(npz[f"{name}/range"]).reshape(-1)[:2])
            edges = np.linspace(lo, hi, n + 1)
        else:
            continue
        if n and edges.shape == (n + 1,) and np.all(np.isfinite(edges)):
            out[name] = TensorHistogram(name, counts, edges)
    return out


def load_thresholds(results: RunResults, run_dir: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Per calibration method, the amax chosen for each tensor (from the JSON beside each cache)."""
    run = Path(run_dir)
    out: dict[str, dict[str, float]] = {}
    for summary in results.calibration:
        path = _calibration_file(run, summary.json_path)
        if path is None:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("cannot read %s: %s", path, err)
            continue
        amax = _amax_table(data)
        if amax:
            out[summary.method] = amax
    return out


def _amax_table(data: Any) -> dict[str, float]:
    """tensor -> amax from a calibration JSON ({"tensors": {name: {"amax": ...}}} or {name: amax})."""
    tensors = data.get("tensors", data) if isinstance(data, Mapping) else {}
    if isinstance(tensors, list):
        tensors = {t.get("name"): t for t in tensors if isinstance(t, Mapping)}
    out = {}
    for name, entry in tensors.items() if isinstance(tensors, Mapping) else ():
        value = entry.get("amax") if isinstance(entry, Mapping) else entry
        if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            out[str(name)] = float(value)
    return out
