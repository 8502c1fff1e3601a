"""ONNX Runtime runner: the FP32 reference and the FP16 / INT8 ONNX variants, on CPU or CUDA.

On CUDA (onnxruntime-gpu) latency is measured twice: end to end with host arrays (what a caller
waits for) and with inputs and outputs bound on the device through IOBinding (compute alone).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.backends.base import Runner, Timings
from quantpipe.errors import EvaluationError, MissingDependencyError

__all__ = ["OrtRunner", "resolve_device", "providers_for", "cuda_available", "OPTIMIZATION_LEVELS", "crash_opening",
           "survivable_optimization"]

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def cuda_available() -> bool:
    """True when onnxruntime offers the CUDA execution provider (onnxruntime-gpu installed)."""
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers()


def resolve_device(device: str) -> tuple[str, str | None]:
    """'auto' | 'cpu' | 'cuda' -> (device to use, a one-line notice or None).

    Raises MissingDependencyError for an explicit 'cuda' that onnxruntime cannot provide.
    """
    if device == "cpu":
        return "cpu", None
    if cuda_available():
        return "cuda", None
    if device == "cuda":
        raise MissingDependencyError(
            "onnxruntime's CUDA execution provider is not available (onnxruntime-gpu is not installed or sees no GPU). "
            "Install it with: pip install 'quantpipe[gpu]' (onnxruntime-gpu), or set device: cpu."
        )
    return "cpu", "onnxruntime CUDA execution provider not available; running on CPU (pip install 'quantpipe[gpu]' for CUDA)."


def providers_for(device: str) -> list[str]:
    """Execution providers for a resolved device."""
    return [CUDA_EP, CPU_EP] if device == "cuda" else [CPU_EP]


#: onnxruntime's graph optimization levels, highest (its default) first: where creating a variant's session crashes
#: the process at one, the next is tried (`survivable_optimization`).
OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disabled")
_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
           "disabled": "ORT_DISABLE_ALL"}
#: What the child process of `crash_opening` runs (argv: model, variant, device, level).
CHILD_CODE = ("import sys\nfrom quantpipe.backends.onnxruntime import OrtRunner\n"
              "OrtRunner(sys.argv[1], sys.argv[2], device=sys.argv[3], optimization=sys.argv[4]).__enter__()\n")


def crash_opening(model_path: str | Path, name: str, device: str, optimization: str = "all") -> str | None:
    """Create the variant's session in a child process, as `OrtRunner` does: the name of the signal that killed it
    when onnxruntime crashed the process (a segfault in a graph optimizer), else None (an exception there is left
    for the run to raise and report)."""
    proc = subprocess.run([sys.executable, "-c", CHILD_CODE, str(model_path), name, device, optimization],
                          capture_output=True, check=False)
    if proc.returncode >= 0:
        return None
    try:
        return signal.Signals(-proc.returncode).name
    except ValueError:
        return f"signal {-proc.returncode}"


def survivable_optimization(model_path: str | Path, name: str, device: str) -> tuple[str | None, str | None]:
    """(the highest optimization level at which creating the variant's session does not crash the process, or None
    when every level does; the signal of the first crash, or None when the default level opened)."""
    first = None
    for level in OPTIMIZATION_LEVELS:
        crash = crash_opening(model_path, name, device, level)
        if crash is None:
            return level, first
        first = first or crash
    return None, first


class OrtRunner(Runner):
    """Runs an ONNX model with onnxruntime (CPU or CUDA execution provider). `optimization`: onnxruntime's graph
    optimization level (`OPTIMIZATION_LEVELS`; its default, "all", unless that crashes on the model)."""

    def __init__(self, model_path: str | Path, name: str, *, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all") -> None:
        self.model_path = Path(model_path)
        self.name = name
        self.device = device
        self.threads = threads
        self.optimization = optimization
        self._session: object | None = None

    def __enter__(self) -> OrtRunner:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Without this, onnxruntime's CPU session rewrites int8 Q/DQ into uint8 kernels that saturate on
        # CPUs without VNNI (EfficientNet-Lite0 INT8: 0.44 vs 0.86 agreement); harmless for float models.
        from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG

        for key, value in ORT_INT8_SESSION_CONFIG.items():
            opts.add_session_config_entry(key, value)
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.optimization])
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers_for(self.device))
        except Exception as err:
            raise EvaluationError(f"onnxruntime could not load variant {self.name} from {self.model_path}: {err}") from err
        return self

    def __exit__(self, *exc: object) -> None:
        self._session = None

    @property
    def session(self) -> Any:  # an onnxruntime.InferenceSession (onnxruntime is imported when a runner opens)
        if self._session is None:
            raise RuntimeError(f"runner {self.name} is not open; use it as a context manager")
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(None, dict(feeds))
        except Exception as err:
            raise EvaluationError(f"onnxruntime failed to run variant {self.name}: {err}") from err
        return dict(zip(self.output_names, outs, strict=True))

    def measure(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int) -> Timings:
        sess = self.session
        feeds = dict(feeds)
        for _ in range(warmup):
            sess.run(None, feeds)
        total = np.empty(iterations)
        for i in range(iterations):
            t0 = time.perf_counter()
            sess.run(None, feeds)  # returns host arrays: on CUDA this includes the copies and a sync
            total[i] = (time.perf_counter() - t0) * 1e3
        if self.device != "cuda":
            return Timings(total=total, timer="perf_counter")
        return Timings(total=total, timer="perf_counter", compute=self._measure_bound(feeds, warmup, iterations))

    def _measure_bound(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int) -> np.ndarray:
        """Device-resident inputs/outputs through IOBinding: times the compute without host copies."""
        import onnxruntime as ort

        sess = self.session
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", 0))
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        for _ in range(max(warmup, 1)):
            sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        out = np.empty(iterations)
        for i in range(iterations):
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            out[i] = (time.perf_counter() - t0) * 1e3
        return out

