"""The workspace (`<report.dir>/.work/<name>/`) where calibration and build artifacts persist between runs,
each stage folder with a manifest of its inputs' fingerprint (model hash, data hash, its config section,
tool version): a stage re-runs only when that changed, and logs what changed. Also the `Progress` protocol
the stages report long work through."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from quantpipe.config import PipelineConfig
from quantpipe.fsutil import atomic_write_json

__all__ = ["NullProgress", "Progress", "Workspace", "new_run_id", "reusable", "write_manifest"]

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


def new_run_id() -> str:
    """A sortable UTC timestamp, e.g. 20261121-142501."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


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


# --------------------------------------------------------------------------- fingerprints


def _stage_manifest(folder: Path) -> Path:
    return folder / "stage.json"


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changed.append(key)
    return changed


def reusable(folder: Path, fingerprint: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The stored manifest when the stage's inputs did not change (and its files exist), else None."""
    path = _stage_manifest(folder)
    if not path.is_file():
        log.info("%s: running (no earlier result in %s)", stage, folder)
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.info("%s: running (earlier manifest unreadable)", stage)
        return None
    changed = _fingerprint_diff(manifest.get("fingerprint", {}), fingerprint)
    if changed:
        log.info("%s: re-running because %s changed", stage, ", ".join(changed))
        return None
    missing = [f for f in manifest.get("files", []) if not (folder / f).exists()]
    if missing:
        log.info("%s: re-running because %s is missing", stage, ", ".join(missing))
        return None
    log.info("%s: inputs unchanged, reusing %s", stage, folder)
    return manifest


def write_manifest(folder: Path, fingerprint: dict[str, Any], files: list[str], payload: Any) -> None:
    atomic_write_json(_stage_manifest(folder), {"fingerprint": fingerprint, "files": files, "payload": payload})
