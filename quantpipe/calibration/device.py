"""Calibration outputs on the CUDA execution provider: kept on the device through IOBinding.

Seen as CuPy arrays when CuPy is importable (histogram.py bins them on the device), else copied to the host;
the exact integer binning makes the histograms the same either way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DeviceOutputs"]

log = logging.getLogger(__name__)


class DeviceOutputs:
    """IOBinding on the CUDA execution provider: outputs stay on the device, seen as CuPy arrays if possible."""

    def __init__(self, session: Any, output_names: Sequence[str]) -> None:
        from quantpipe import deps

        self.session = session
        self.output_names = list(output_names)
        self.cupy: Any = deps.optional("cupy")
        if self.cupy is None:
            log.info("CuPy is not importable: CUDA outputs are histogrammed on the host")

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[tuple[str, Any]]:
        io = self.session.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.output_names:
            io.bind_output(name, "cuda")
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()  # CuPy reads them on its own stream
        values = io.get_outputs()
        out: list[tuple[str, Any]] = []
        for name, value in zip(self.output_names, values, strict=True):
            view = self._as_cupy(value) if self.cupy is not None else None
            out.append((name, view if view is not None else value.numpy()))
        return out

    def _as_cupy(self, value: Any) -> Any:
        """A CuPy view of an OrtValue's device memory (kept alive by the view), or None to copy instead."""
        cp: Any = self.cupy
        try:
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
                value.data_type()
            )
            if dtype is None or value.device_name().lower() != "cuda":
                return None
            shape = tuple(value.shape())
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            mem = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, value)
            return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))
        except Exception as err:  # any mismatch in this optional path: fall back to the host copy
            log.debug("CuPy view of a CUDA output failed (%s); copying to the host", err)
            return None
