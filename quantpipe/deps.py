"""The one door to optional heavy dependencies, and a probe of what this machine can run.

`require("tensorrt")` imports lazily and, when the module is missing, raises MissingDependencyError
naming the extra and the pip command. Nothing here runs at import time.
"""

from __future__ import annotations

import importlib
import platform
import re
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Any

from quantpipe.errors import MissingDependencyError

__all__ = ["require", "optional", "probe_env", "doctor_lines", "INSTALL_HINTS"]

#: module -> (extra, pip command, what it is for)
INSTALL_HINTS: dict[str, tuple[str, str, str]] = {
    "tensorrt": ("tensorrt", "pip install 'quantpipe[tensorrt]'  (or: pip install tensorrt)", "TensorRT engines"),
    "cuda": ("gpu", "pip install 'quantpipe[gpu]'  (or: pip install cuda-python)", "device memory for TensorRT"),
    "cuda.bindings": ("gpu", "pip install 'quantpipe[gpu]'  (or: pip install cuda-python)", "device memory for TensorRT"),
    "pycuda": ("gpu", "pip install pycuda", "device memory for TensorRT (alternative to cuda-python)"),
    "cupy": ("gpu", "pip install cupy-cuda12x  (or cupy-cuda13x to match your CUDA)", "GPU histograms"),
    "modelopt": ("modelopt", "quantpipe setup modelopt  (its own venv: ModelOpt pins its own onnxruntime)",
                 "NVIDIA ModelOpt's INT8 / FP16 variants"),
    "matplotlib": ("report", "pip install matplotlib", "plots in report.html"),
    "ray": ("ray", "pip install 'quantpipe[ray]'  (or: pip install ray)", "execution.engine: ray"),
    "torch": ("train", "pip install torch==2.13.0", "re-training the bundled example"),
}


def require(module: str, *, purpose: str | None = None) -> ModuleType:
    """Import `module` or raise MissingDependencyError with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        hint = INSTALL_HINTS.get(module) or INSTALL_HINTS.get(module.split(".")[0])
        extra, cmd, what = hint or ("", f"pip install {module}", module)
        reason = f"{type(err).__name__}: {err}"
        raise MissingDependencyError(
            f"{purpose or what} needs the Python module '{module}', which cannot be imported here ({reason}). "
            f"Install it with: {cmd}"
            + (f" (quantpipe extra '{extra}')." if extra else ".")
        ) from err


def optional(module: str) -> ModuleType | None:
    """Import `module` if it is importable, else None (for features that degrade gracefully)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _import_status(module: str) -> dict[str, Any]:
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # any import-time failure (missing libs too) means "not usable"
        return {"available": False, "version": None, "reason": f"{type(err).__name__}: {err}"}
    return {"available": True, "version": getattr(mod, "__version__", None), "reason": None}


def _nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "reason": "nvidia-smi not found (no NVIDIA driver on this machine)"}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as err:
        return {"available": False, "reason": f"nvidia-smi failed: {err}"}
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpus.append({"name": parts[0], "driver": parts[1], "compute_capability": parts[2], "memory": parts[3]})
    return {"available": bool(gpus), "gpus": gpus, "reason": None if gpus else "nvidia-smi lists no GPU"}


def probe_env() -> dict[str, Any]:
    """What this machine can run: Python, onnxruntime and its providers, GPU, driver, CUDA, TensorRT and why not.

    Each optional piece's entry is {available, version, reason} and, where it is missing, `install`: the
    command that brings it. Cheap enough to call once per run; never raises.
    """
    import numpy
    import onnx
    import onnxruntime

    from quantpipe import __version__

    providers = list(onnxruntime.get_available_providers())
    env: dict[str, Any] = {
        "quantpipe": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": providers,
        "gpu": _nvidia_smi(),
    }
    for mod in ("tensorrt", "cuda.bindings", "pycuda", "cupy"):
        env[mod] = _import_status(mod)
    env["modelopt"] = _modelopt_status()
    try:
        cuda = _probe_cuda(env["gpu"])
        if cuda:
            env["cuda"] = cuda
            if env["gpu"].get("available"):
                env["gpu"]["cuda_version"] = cuda.split(";")[0].removeprefix("driver supports CUDA ").strip()
        _probe_gpu_pieces(env, providers)
    except Exception as err:  # the probe must never break a run; say what went wrong instead
        env["probe_error"] = f"{type(err).__name__}: {err}"
    return env


def _modelopt_status() -> dict[str, Any]:
    """ModelOpt as quantpipe runs it: out of process, from the venv `quantpipe setup modelopt` made (never imported
    here: it patches onnxruntime at import)."""
    from quantpipe.backends.modelopt.env import find_modelopt

    found = find_modelopt()
    return {"available": found.available, "version": found.version, "reason": found.reason, "python": found.python}


def _probe_cuda(gpu: dict[str, Any]) -> str | None:
    """The CUDA versions as one line, from cuda-python, else from nvidia-smi's banner."""
    parts: list[str] = []
    rt = optional("cuda.bindings.runtime") or optional("cuda.cudart")
    if rt is not None:
        try:
            err, drv = rt.cudaDriverGetVersion()
            if int(getattr(err, "value", err)) == 0 and drv:
                parts.append(f"driver supports CUDA {drv // 1000}.{(drv % 1000) // 10}")
            err, run = rt.cudaRuntimeGetVersion()
            if int(getattr(err, "value", err)) == 0 and run:
                parts.append(f"runtime {run // 1000}.{(run % 1000) // 10} (cuda-python)")
        except Exception:  # a broken CUDA install reads as "unknown", the GPU entry says more
            parts = []
    if not parts and gpu.get("available"):
        exe = shutil.which("nvidia-smi")
        try:
            banner = subprocess.run([exe or "nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        except (subprocess.SubprocessError, OSError):
            banner = ""
        m = re.search(r"CUDA Version:\s*([0-9.]+)", banner)
        if m:
            parts.append(f"driver supports CUDA {m.group(1)}")
    return "; ".join(parts) or None


def _probe_gpu_pieces(env: dict[str, Any], providers: list[str]) -> None:
    """TensorRT's supported-version check, cuda-python's old layout, onnxruntime's CUDA provider, install commands."""
    from quantpipe.backends.tensorrt.version import tensorrt_status

    ok, version, reason = tensorrt_status()
    env["tensorrt"] = {"available": ok, "version": version, "reason": reason}
    if not env["cuda.bindings"]["available"]:  # cuda-python < 12.6 has the runtime as cuda.cudart
        old = _import_status("cuda.cudart")
        if old["available"]:
            cuda_mod = optional("cuda")
            env["cuda.bindings"] = {**old, "version": getattr(cuda_mod, "__version__", None), "layout": "cuda.cudart"}
    has_gpu = bool(env["gpu"].get("available"))
    cuda_ep = "CUDAExecutionProvider" in providers
    env["onnxruntime_cuda"] = {
        "available": cuda_ep,
        "version": env["onnxruntime"] if cuda_ep else None,
        "reason": None if cuda_ep else (
            "onnxruntime has no CUDAExecutionProvider (the CPU-only onnxruntime package is installed)"
            if has_gpu else "no NVIDIA GPU, so no onnxruntime CUDA execution provider"
        ),
    }
    cuda_major = str(env["gpu"].get("cuda_version", "12")).split(".")[0] or "12"
    install = {
        "tensorrt": INSTALL_HINTS["tensorrt"][1],
        "cuda.bindings": INSTALL_HINTS["cuda.bindings"][1],
        "pycuda": INSTALL_HINTS["pycuda"][1],
        "cupy": f"pip install cupy-cuda{cuda_major}x",
        "modelopt": INSTALL_HINTS["modelopt"][1],
        "onnxruntime_cuda": "pip uninstall -y onnxruntime && pip install 'quantpipe[gpu]'  (onnxruntime-gpu)",
    }
    for key, cmd in install.items():
        if not env[key]["available"]:
            env[key]["install"] = cmd
    if not has_gpu:
        env["gpu"]["install"] = "install an NVIDIA GPU driver (https://www.nvidia.com/drivers); TensorRT and CUDA need one"


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def doctor_lines(env: dict[str, Any]) -> list[tuple[bool, str]]:
    """`quantpipe doctor` as (ok, text) lines: what is there, and the command for what is missing."""
    lines: list[tuple[bool, str]] = [
        (True, f"quantpipe {env['quantpipe']} on Python {env['python']} ({env['platform']}, {env['cpu_count']} CPU cores)"),
        (True, f"onnx {env['onnx']}, onnxruntime {env['onnxruntime']}: providers {', '.join(env['onnxruntime_providers'])}"),
    ]
    cuda_ep = "CUDAExecutionProvider" in env["onnxruntime_providers"]
    lines.append((cuda_ep, "onnxruntime CUDA execution provider available" if cuda_ep
                  else "onnxruntime CUDA execution provider missing: pip install 'quantpipe[gpu]' (onnxruntime-gpu; uninstall onnxruntime first)"))
    gpu = env["gpu"]
    if gpu.get("available"):
        for g in gpu["gpus"]:
            lines.append((True, f"GPU: {g['name']} (compute capability {g['compute_capability']}, {g['memory']}), driver {g['driver']}"))
    else:
        lines.append((False, f"no GPU: {gpu.get('reason')}. TensorRT and CUDA paths need an NVIDIA GPU with its driver."))
    for mod, label in (("tensorrt", "TensorRT"), ("cuda.bindings", "cuda-python"), ("pycuda", "pycuda"), ("cupy", "CuPy"), ("modelopt", "ModelOpt")):
        st = env.get(mod, {})
        if st.get("available"):
            where = f" (in {st['python']})" if st.get("python") else ""
            lines.append((True, f"{label} {st.get('version') or ''}".rstrip() + where))
        else:
            hint = INSTALL_HINTS.get(mod) or INSTALL_HINTS.get(mod.split(".")[0])
            cmd = hint[1] if hint else f"pip install {mod}"
            state = "not available" if mod == "modelopt" else "not importable"  # ModelOpt is never imported here
            lines.append((False, f"{label} {state} ({st.get('reason')}); install: {cmd}"))
    return lines
