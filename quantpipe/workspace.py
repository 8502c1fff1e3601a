"""The workspace (`<report.dir>/.work/<name>/`) where calibration and build artifacts persist between runs,
each stage folder with a manifest (`stage.json`) of its inputs' fingerprint (model hash, data hash, its config
section, tool version) and of the sha256 of every file the stage wrote: a stage is reused only when its
inputs did not change and its files are still what it wrote, and logs why it re-runs. Manifests store
paths relative to the stage folder, so a moved or copied project works on its own files. Also the `Progress` protocol
the stages report long work through."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from quantpipe.config import PipelineConfig
from quantpipe.fsutil import atomic_write_json, remove_orphans, sha256_file

__all__ = ["NullProgress", "Progress", "Workspace", "advance_to", "earlier_file", "new_run_id", "relative_to", "reusable",
           "write_manifest"]

log = logging.getLogger(__name__)


class Progress(Protocol):
    """How stages report progress on long work (the CLI draws rich progress bars)."""

    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """Context manager yielding `advance(n)`."""
        ...


class NullProgress:
    """Progress that shows nothing (library use, tests)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


def advance_to(advance: Callable[[int], None]) -> Callable[[int, int], None]:
    """An `on_batch(done, total)` callback (done: samples so far) that moves a Progress task's `advance(n)` by the
    samples added since the last call (calling `advance(done)` would count every earlier sample again)."""
    seen = [0]

    def on_batch(done: int, total: int) -> None:
        advance(done - seen[0])
        seen[0] = done

    return on_batch


def new_run_id(report_dir: str | os.PathLike[str] | None = None, now: _dt.datetime | None = None) -> str:
    """A sortable UTC timestamp, e.g. 20261121-142501; where `report_dir` already holds a run of that second, the
    timestamp with -2, -3, ... (a second run started within the same second failed after all its work: found
    testing two runs of a small model back to back)."""
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    run_id, k = stamp, 1
    while report_dir is not None and (Path(report_dir) / run_id).exists():
        k += 1
        run_id = f"{stamp}-{k}"
    return run_id


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Where a pipeline keeps reusable stage artifacts."""

    root: Path

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @classmethod
    def for_config(cls, cfg: PipelineConfig) -> Workspace:
        return cls(Path(cfg.report.dir) / ".work" / cfg.name)

    def remove_orphans(self, report_dir: str | Path) -> list[Path]:
        """Remove what runs killed outright (SIGKILL, the out-of-memory killer) left in `report_dir` and here: their
        staging folders and temporary files, which they could not clean up themselves (fsutil.remove_orphans)."""
        gone = [p for folder in (Path(report_dir), self.calibration, self.models) for p in remove_orphans(folder)]
        if gone:
            log.info("removed %d temporary file(s) or folder(s) left by runs killed outright: %s", len(gone),
                     ", ".join(str(p) for p in gone))
        return gone


# --------------------------------------------------------------------------- fingerprints


def _stage_manifest(folder: Path) -> Path:
    return folder / "stage.json"


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changed.append(key)
    return changed


def _manifest_files(manifest: dict[str, Any]) -> dict[str, str] | str:
    """name -> sha256 of the stage's files, or why the manifest cannot vouch for them."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "the earlier manifest records no content hashes (written by an older quantpipe)"
    for name, digest in files.items():
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts or not isinstance(digest, str):
            return f"the earlier manifest names {name!r}, which is not a file inside the workspace"
    return files


def reusable(folder: Path, fingerprint: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The stored manifest when the stage's inputs did not change and every file it wrote is still
    byte for byte what it wrote (sha256), else None; logs why the stage runs."""
    path = _stage_manifest(folder)
    if not path.is_file():
        log.info("%s: running (no earlier result in %s)", stage, folder)
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.info("%s: running (earlier manifest unreadable)", stage)
        return None
    if not isinstance(manifest, dict):
        log.info("%s: running (earlier manifest unreadable)", stage)
        return None
    changed = _fingerprint_diff(manifest.get("fingerprint") or {}, fingerprint)
    if changed:
        log.info("%s: re-running because %s changed", stage, ", ".join(changed))
        return None
    files = _manifest_files(manifest)
    if isinstance(files, str):
        log.info("%s: re-running because %s", stage, files)
        return None
    for name, digest in sorted(files.items()):
        if not (folder / name).is_file():
            log.info("%s: re-running because %s is missing", stage, name)
            return None
        if sha256_file(folder / name) != digest:
            log.info("%s: re-running because %s changed on disk since it was written", stage, name)
            return None
    log.info("%s: inputs unchanged, reusing %s (%d file(s) verified)", stage, folder, len(files))
    return manifest


def earlier_file(folder: Path, key: str, fingerprint: dict[str, Any]) -> Path | None:
    """A file the stage's last run wrote, for work that depends on less than the whole stage: the one its manifest's
    payload names under `key`, when the payload's `<key>_fingerprint` equals `fingerprint` and the file is still byte
    for byte what was written (sha256 in the manifest); else None."""
    try:
        manifest = json.loads(_stage_manifest(folder).read_text())
        payload, files = manifest["payload"], _manifest_files(manifest)
        name = payload[key]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or isinstance(files, str) or name not in files:
        return None
    if payload.get(f"{key}_fingerprint") != fingerprint or not (folder / name).is_file():
        return None
    return folder / name if sha256_file(folder / name) == files[name] else None


def write_manifest(folder: Path, fingerprint: dict[str, Any], files: list[str], payload: Any) -> None:
    """Record a finished stage: its inputs' fingerprint, the sha256 of each file it wrote (paths relative to
    `folder`) and its payload. Written last, so a stage interrupted before it is simply run again."""
    hashes = {name: sha256_file(folder / name) for name in files}
    atomic_write_json(_stage_manifest(folder), {"fingerprint": fingerprint, "files": hashes, "payload": payload})


def relative_to(path: str | Path, folder: Path) -> str:
    """`path` (inside `folder`) as a POSIX path relative to it: what manifests store, so a moved or copied
    project reads its own files, never the original's."""
    return Path(path).resolve().relative_to(folder.resolve()).as_posix()
