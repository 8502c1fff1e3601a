"""Where ModelOpt lives: an interpreter of the user's own (pipeline.yaml `build.backends.modelopt.python`), else the
venv `quantpipe setup modelopt` made under the user's cache, else nowhere (its variants are skipped, with the reason
and the command that sets it up).

The probe runs the interpreter for a second and imports nothing heavy (`importlib.util.find_spec`, package metadata):
importing modelopt costs seconds (torch) and patches onnxruntime, so it is only ever imported in the worker and in
`quantpipe setup modelopt`'s check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = [
    "MODELOPT_VERSION",
    "REQUIREMENTS",
    "SETUP_COMMAND",
    "VERIFIED_FILE",
    "ModeloptEnv",
    "cache_venv",
    "find_modelopt",
    "probe_interpreter",
    "venv_python",
]

MODELOPT_VERSION = "0.47.0"
"""The nvidia-modelopt release `quantpipe setup modelopt` installs (and the venv folder is named after)."""
REQUIREMENTS = (f"nvidia-modelopt[onnx]=={MODELOPT_VERSION}", "torch==2.13.0", "onnxscript", "numpy")
"""What the venv gets. torch is ModelOpt's import-time need; on Linux x86-64 pip takes the +cpu wheel where a local
wheelhouse or `--torch-index` offers it (200 MB instead of ~2.5 GB of CUDA wheels)."""
SETUP_COMMAND = "quantpipe setup modelopt"
VERIFIED_FILE = "quantpipe-verified.json"
"""Written into the venv last, after ModelOpt imported there: a venv without it (an interrupted setup) is not used."""

_PROBE = (
    "import importlib.metadata as md, importlib.util as u, json, sys\n"
    "ok = u.find_spec('modelopt') is not None\n"
    "v = md.version('nvidia-modelopt') if ok else None\n"
    "print(json.dumps({'modelopt': v, 'python': sys.version.split()[0], 'executable': sys.executable}))\n"
)


@dataclasses.dataclass(frozen=True)
class ModeloptEnv:
    """An interpreter that can run ModelOpt (`python`), or why there is none (`reason`, with `command`)."""

    python: str | None
    version: str | None
    source: str
    """'config' (pipeline.yaml's python), 'cache' (the setup venv) or 'none'."""
    reason: str | None = None
    command: str = SETUP_COMMAND

    @property
    def available(self) -> bool:
        return self.python is not None


def cache_venv() -> Path:
    """The venv `quantpipe setup modelopt` makes: `$XDG_CACHE_HOME/quantpipe/modelopt-<version>` (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantpipe" / f"modelopt-{MODELOPT_VERSION}"


def venv_python(venv: Path) -> Path:
    """The interpreter inside a venv."""
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def probe_interpreter(python: str | os.PathLike[str], timeout: float = 60.0) -> tuple[str | None, str | None]:
    """(nvidia-modelopt version, None) when `python` runs and has ModelOpt, else (None, why not)."""
    try:
        proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{python} cannot be run ({type(err).__name__}: {err})"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} failed to start ({tail})"
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, f"{python} printed {proc.stdout[-200:]!r} instead of its versions"
    if not info.get("modelopt"):
        return None, f"{python} (Python {info.get('python')}) has no nvidia-modelopt"
    return str(info["modelopt"]), None


def find_modelopt(python: str | os.PathLike[str] | None = None) -> ModeloptEnv:
    """The configured interpreter when given (it must have ModelOpt), else the setup venv, else why neither."""
    if python is not None:
        version, reason = probe_interpreter(python)
        if version is None:
            return ModeloptEnv(None, None, "none", f"build.backends.modelopt.python: {reason}. Install "
                               f"'nvidia-modelopt[onnx]' there, or remove `python` and run `{SETUP_COMMAND}`")
        return ModeloptEnv(str(python), version, "config")
    venv = cache_venv()
    exe = venv_python(venv)
    if not exe.is_file():
        return ModeloptEnv(None, None, "none", f"ModelOpt is not set up (no venv at {venv}); run `{SETUP_COMMAND}`")
    if not (venv / VERIFIED_FILE).is_file():
        return ModeloptEnv(None, None, "none", f"the ModelOpt venv at {venv} is incomplete (its set-up did not "
                           f"finish); run `{SETUP_COMMAND}` again")
    version, reason = probe_interpreter(exe)
    if version is None:
        return ModeloptEnv(None, None, "none", f"the ModelOpt venv at {venv} is broken ({reason}); run "
                           f"`{SETUP_COMMAND} --force`")
    return ModeloptEnv(str(exe), version, "cache")
