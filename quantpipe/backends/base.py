"""The Runner protocol: what evaluate sees of any backend.

Builders make artifacts; runners execute them (Polygraphy's loaders vs runners). Evaluate only
calls these methods, so onnxruntime and TensorRT variants are interchangeable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Runner", "Timings"]


@dataclass(frozen=True)
class Timings:
    """Per-iteration wall times in milliseconds from one latency measurement.

    `total` is always set (what a caller of the model waits for). Backends that can time the compute
    apart from host<->device copies (TensorRT with CUDA events) fill the others.
    """

    total: np.ndarray
    timer: str
    compute: np.ndarray | None = None
    h2d: np.ndarray | None = None
    d2h: np.ndarray | None = None


@runtime_checkable
class Runner(Protocol):
    """A loaded, ready-to-run variant.

    Use as a context manager: `__enter__` loads (session, engine, device buffers), `__exit__` frees.
    """

    name: str
    device: str

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; return every graph output by name as host float32/int arrays."""
        ...

    def measure(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int) -> Timings:
        """Warm up, then time `iterations` runs of `feeds` (synchronised; perf_counter or CUDA events)."""
        ...
