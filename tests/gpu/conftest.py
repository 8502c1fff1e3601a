"""GPU tests: a capability probe decides what can run here and says why the rest is skipped.

The probe runs once per session and is printed in pytest's header, e.g.
`quantpipe GPU probe: GPU: none (nvidia-smi not found) | cuda-python: ... | onnxruntime CUDA EP: ... | tensorrt: ...`;
each fixture below skips its tests with the reason for the piece it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "calib_data" / "digits" / "calib.npz"
DIGITS_EVAL = ROOT / "calib_data" / "digits" / "eval.npz"


@dataclasses.dataclass(frozen=True)
class GpuProbe:
    gpu: str | None
    """Description of device 0 when a GPU is usable, else None."""
    gpu_reason: str | None
    cuda_python: bool
    cuda_python_reason: str | None
    ort_cuda: bool
    ort_cuda_reason: str | None
    tensorrt: bool
    tensorrt_version: str | None
    tensorrt_reason: str | None

    def header(self) -> str:
        parts = [
            f"GPU: {self.gpu}" if self.gpu else f"GPU: none ({self.gpu_reason})",
            "cuda-python: ok" if self.cuda_python else f"cuda-python: no ({self.cuda_python_reason})",
            "onnxruntime CUDA EP: ok" if self.ort_cuda else f"onnxruntime CUDA EP: no ({self.ort_cuda_reason})",
            f"tensorrt: {self.tensorrt_version}" if self.tensorrt else f"tensorrt: no ({self.tensorrt_reason})",
        ]
        return "quantpipe GPU probe: " + " | ".join(parts)


def _probe_cuda_python() -> tuple[bool, str | None, str | None, str | None]:
    """(cuda-python usable, why not, GPU description, why no GPU)."""
    try:
        from quantpipe.backends.tensorrt.metadata import current_gpu
        from quantpipe.cuda import cuda_check, cuda_runtime

        rt = cuda_runtime()
    except Exception as err:
        return False, f"{type(err).__name__}: {err}", None, "cannot ask CUDA without cuda-python"
    try:
        count = int(cuda_check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except Exception as err:
        return True, None, None, f"CUDA sees no device ({err})"
    if count < 1:
        return True, None, None, "CUDA reports 0 devices"
    gpu = current_gpu(0)
    return True, None, f"{gpu.name} (compute {gpu.compute_capability}, {count} device(s))", None


def _probe_ort_cuda() -> tuple[bool, str | None]:
    try:
        import onnxruntime as ort
    except Exception as err:
        return False, f"onnxruntime not importable: {err}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu: ../shared/gpu/)"
    if not DIGITS_MODEL.is_file():
        return True, None
    try:  # the provider is listed even when its CUDA libraries fail to load: a session tells the truth
        sess = ort.InferenceSession(str(DIGITS_MODEL), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as err:
        return False, f"a CUDA session failed: {err}"
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return False, f"onnxruntime fell back to {sess.get_providers()} (CUDA libraries missing?)"
    return True, None


@functools.lru_cache(maxsize=1)
def probe() -> GpuProbe:
    cuda_ok, cuda_reason, gpu, gpu_reason = _probe_cuda_python()
    if gpu is None and not cuda_ok:
        import shutil

        gpu_reason = "nvidia-smi not found, and no cuda-python to ask" if shutil.which("nvidia-smi") is None else gpu_reason
    ort_ok, ort_reason = _probe_ort_cuda()
    from quantpipe.backends.tensorrt.version import tensorrt_status

    trt_ok, trt_version, trt_reason = tensorrt_status()
    return GpuProbe(gpu, gpu_reason, cuda_ok, cuda_reason, ort_ok, ort_reason, trt_ok, trt_version, trt_reason)


def pytest_report_header(config: pytest.Config) -> str:
    return probe().header()


@pytest.fixture(scope="session")
def gpu_probe() -> GpuProbe:
    return probe()


@pytest.fixture(scope="session")
def cuda_rt(gpu_probe: GpuProbe) -> Any:
    """cuda-python's runtime module, on a machine with a GPU; else skip saying which is missing."""
    if not gpu_probe.cuda_python:
        pytest.skip(f"needs cuda-python: {gpu_probe.cuda_python_reason}")
    if gpu_probe.gpu is None:
        pytest.skip(f"needs an NVIDIA GPU: {gpu_probe.gpu_reason}")
    from quantpipe.cuda import cuda_runtime

    return cuda_runtime()


@pytest.fixture(scope="session")
def ort_cuda(gpu_probe: GpuProbe) -> None:
    """Skip unless onnxruntime's CUDA execution provider really runs here."""
    if not gpu_probe.ort_cuda:
        pytest.skip(f"needs onnxruntime-gpu with a working CUDAExecutionProvider: {gpu_probe.ort_cuda_reason}")


@pytest.fixture(scope="session")
def trt_version(gpu_probe: GpuProbe) -> str:
    """The installed TensorRT version, on a machine with a GPU; else skip saying why."""
    if not gpu_probe.tensorrt or gpu_probe.tensorrt_version is None:
        pytest.skip(f"needs TensorRT: {gpu_probe.tensorrt_reason}")
    if gpu_probe.gpu is None:
        pytest.skip(f"needs an NVIDIA GPU for TensorRT: {gpu_probe.gpu_reason}")
    return gpu_probe.tensorrt_version


@pytest.fixture(scope="session")
def digits() -> dict[str, Path]:
    """The bundled example (model, calibration and evaluation data); skip if it is not there."""
    missing = [p for p in (DIGITS_MODEL, DIGITS_CALIB, DIGITS_EVAL) if not p.is_file()]
    if missing:
        pytest.skip(f"bundled example missing: {[str(p.relative_to(ROOT)) for p in missing]}")
    return {"model": DIGITS_MODEL, "calib": DIGITS_CALIB, "eval": DIGITS_EVAL}


@pytest.fixture(scope="session")
def bench_gpu() -> Any:
    """benchmarks/gpu.py as a module (the tests check calibration with the code the benchmark records with)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantpipe_benchmarks_gpu", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(Path(__file__).resolve().parent):
            item.add_marker(pytest.mark.gpu)
