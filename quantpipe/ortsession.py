"""ONNX Runtime sessions for in-memory models: the CPU session the quantizer, the fallback and the
sensitivity analysis run, the int8 session config, and FP32 passes over a dataset.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantpipe.onnxgraph import LARGE_MODEL_BYTES

__all__ = ["ORT_INT8_SESSION_CONFIG", "fp32_batches", "ort_session", "require_ort"]


def ort_session(model: Any, *, int8: bool = False, optimize: bool = True, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for an in-memory model (through a temp file when it is > 2 GB).

    `int8=True` sets `session.qdqisint8allowed`: without it, onnxruntime on x86 rewrites int8 Q/DQ pairs
    to uint8 and runs U8S8 kernels whose VPMADDUBSW instruction saturates on CPUs without VNNI (AVX2),
    which wrecks accuracy (EfficientNet-Lite0: 0.69 instead of 0.81 top-1 agreement on the open set).
    `optimize=False` runs the graph as written (the exact Q/DQ semantics): onnxruntime's fusions can make
    an exposed intermediate tensor of a Q/DQ model hold something else than the float graph computes.
    """
    ort = require_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    for k, v in (ORT_INT8_SESSION_CONFIG.items() if int8 else ()):
        opts.add_session_config_entry(k, v)
    if model.ByteSize() < LARGE_MODEL_BYTES:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="quantpipe-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        import onnx

        onnx.save_model(model, os.fspath(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


#: Session config for running quantpipe's int8 Q/DQ models on onnxruntime CPU (see `ort_session`).
ORT_INT8_SESSION_CONFIG: dict[str, str] = {"session.qdqisint8allowed": "1"}


def require_ort() -> Any:
    from quantpipe.deps import require

    return require("onnxruntime", purpose="running the model to collect statistics")



def fp32_batches(sess: Any, dataset: Any, *, batch_size: int, max_samples: int | None = None
                 ) -> Iterable[tuple[dict[str, Any], int]]:
    """Run `sess` over `dataset` batch by batch, stopping after `max_samples`: yields (every output by name,
    with the batch's inputs merged in; samples in the batch)."""
    names = [o.name for o in sess.get_outputs()]
    seen = 0
    for batch in dataset.batches(batch_size):
        feeds = dict(batch.feeds)
        if max_samples is not None:
            feeds = {k: v[: max_samples - seen] for k, v in feeds.items()}
        res = dict(zip(names, sess.run(None, feeds), strict=True))
        res.update(feeds)
        n = next(iter(feeds.values())).shape[0]
        yield res, n
        seen += n
        if max_samples is not None and seen >= max_samples:
            return
