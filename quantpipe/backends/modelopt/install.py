"""`quantpipe setup modelopt`: a venv of its own for NVIDIA ModelOpt under the user's cache, with the pinned packages,
checked by importing ModelOpt there.

Its own venv because ModelOpt's `[onnx]` extra pins onnx and onnxruntime-gpu, which collide with quantpipe's
onnxruntime in one environment, and it patches onnxruntime at import. The venv is trusted only once
`VERIFIED_FILE` is written, last, after the import check: an interrupted set-up is found incomplete and redone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from quantpipe.backends.modelopt.env import (
    MODELOPT_VERSION,
    REQUIREMENTS,
    SETUP_COMMAND,
    VERIFIED_FILE,
    ModeloptEnv,
    cache_venv,
    probe_interpreter,
    venv_python,
)
from quantpipe.errors import MissingDependencyError

__all__ = ["VERIFY_CODE", "cpu_torch_index", "install_modelopt"]


VERIFY_CODE = (
    "import modelopt, modelopt.onnx.quantization as q, modelopt.onnx.autocast as a; "
    "assert callable(q.quantize) and callable(a.convert_to_mixed_precision); print(modelopt.__version__)"
)
"""What `setup` imports in the new venv: the two entry points the worker calls."""


def _run(cmd: Sequence[str], what: str, on_line: Callable[[str], None]) -> None:
    """Run `cmd`, passing each output line to `on_line`; a failure raises with the output's tail."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as err:
        raise MissingDependencyError(f"{what} failed: {cmd[0]} cannot be run ({err}).") from err
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail = (tail + [line])[-15:]
            on_line(line)
    if proc.wait() != 0:
        raise MissingDependencyError(
            f"{what} failed (exit {proc.returncode}) running `{' '.join(cmd)}`; its last lines: "
            + " | ".join(tail) + f". Fix the cause (network, disk space, Python version) and run `{SETUP_COMMAND}` again."
        )


def cpu_torch_index(choice: str | None) -> str | None:
    """The index to take torch from first: `choice` as given (None or 'off': the indexes pip is configured with).
    Nothing is probed over the network: pass PyTorch's CPU wheel index with `--torch-index` on Linux x86-64 to get the
    +cpu wheel (about 200 MB) where pip's own indexes would bring the CUDA build (about 2.5 GB)."""
    return None if choice in (None, "off") else choice


def install_modelopt(
    *,
    venv: Path | None = None,
    base_python: str = sys.executable,
    torch_index: str | None = None,
    force: bool = False,
    on_line: Callable[[str], None] = lambda line: None,
) -> tuple[ModeloptEnv, float]:
    """Create (or reuse, when verified and not `force`) the ModelOpt venv; return it and the seconds it took.

    Raises:
        MissingDependencyError: the venv could not be made, pip failed, or ModelOpt does not import there.
    """
    start = time.perf_counter()
    venv = venv or cache_venv()
    exe = venv_python(venv)
    if not force and (venv / VERIFIED_FILE).is_file():
        version, reason = probe_interpreter(exe)
        if version is not None:
            on_line(f"ModelOpt {version} is already set up in {venv} (--force reinstalls it)")
            return ModeloptEnv(str(exe), version, "cache"), time.perf_counter() - start
        on_line(f"the venv at {venv} is broken ({reason}); making it again")
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    on_line(f"creating a venv at {venv} (Python {sys.version.split()[0]} from {base_python})")
    _run([base_python, "-m", "venv", str(venv)], "creating the ModelOpt venv", on_line)
    pip = [str(exe), "-m", "pip", "install", "--progress-bar", "off"]
    index = cpu_torch_index(torch_index)
    if index:
        # torch first, its CPU-only build (~200 MB) instead of PyPI's Linux wheel with ~2.5 GB of CUDA libraries
        on_line(f"taking torch from {index}")
        _run([*pip, "--extra-index-url", index, REQUIREMENTS[1]], "installing torch", on_line)
    _run([*pip, *REQUIREMENTS], f"installing nvidia-modelopt {MODELOPT_VERSION}", on_line)
    on_line("checking that ModelOpt imports there")
    proc = subprocess.run([str(exe), "-c", VERIFY_CODE], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise MissingDependencyError(
            f"nvidia-modelopt was installed in {venv} but does not import there: {tail}. Run `{SETUP_COMMAND} --force` "
            f"to reinstall, or point build.backends.modelopt.python at an interpreter where it imports."
        )
    version = proc.stdout.strip().splitlines()[-1]
    seconds = time.perf_counter() - start
    (venv / VERIFIED_FILE).write_text(json.dumps({"modelopt": version, "requirements": list(REQUIREMENTS),
                                                  "setup_seconds": round(seconds, 1)}, indent=1))
    return ModeloptEnv(str(exe), version, "cache"), seconds
