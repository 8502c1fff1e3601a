"""quantpipe: FP32 ONNX -> calibrated INT8 / FP16 models and TensorRT engines, evaluated and gated.

Importing the package imports nothing heavy; the public API loads its stages lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_config", "run_pipeline"]

if TYPE_CHECKING:
    from quantpipe.config import load_config
    from quantpipe.pipeline import run_pipeline


def __getattr__(name: str) -> Any:
    if name == "load_config":
        from quantpipe.config import load_config

        return load_config
    if name == "run_pipeline":
        from quantpipe.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(f"module 'quantpipe' has no attribute {name!r}")
