"""ONNX Runtime sessions for in-memory models: the CPU session the quantizer, the fallback and the
sensitivity analysis run, the int8 session config, and FP32 passes over a dataset.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantpipe.errors import BuildError
from quantpipe.externaldata import external_folders, in_memory_bytes, strip_basepath, write_external
from quantpipe.onnxgraph import LARGE_MODEL_BYTES

__all__ = ["EXTERNAL_FOLDER_KEY", "ORT_INT8_SESSION_CONFIG", "fp32_batches", "ort_session", "require_ort"]

#: onnxruntime's session option for the folder external data is read from when a model comes as bytes.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def ort_session(model: Any, *, int8: bool = False, optimize: bool = True, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for an in-memory model (weights still in external files are read
    from there; through a temp file when the proto itself holds > ~1.8 GB).

    `int8=True` sets `session.qdqisint8allowed`: without it, onnxruntime on x86 rewrites int8 Q/DQ pairs
    to uint8 and runs U8S8 kernels whose VPMADDUBSW instruction saturates on CPUs without VNNI (AVX2),
    which wrecks accuracy (EfficientNet-Lite0: 0.69 instead of 0.81 top-1 agreement on the open set).
    `optimize=False` runs the graph as written (the exact Q/DQ semantics): onnxruntime's fusions can make
    an exposed intermediate tensor of a Q/DQ model hold something else than the float graph computes.
    """
    ort = require_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No CPU arena: it keeps the largest run's memory for the session's life (the range search's instrumented
    # EfficientNet-Lite0 at 32 samples: 1.74 GB peak with it, 0.90 GB without; no slower on this machine). These
    # are analysis sessions, not the ones latency is measured on; allocation never changes the results.
    opts.enable_cpu_mem_arena = False
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    for k, v in (ORT_INT8_SESSION_CONFIG.items() if int8 else ()):
        opts.add_session_config_entry(k, v)
    return _session(ort, model, opts)


def _session(ort: Any, model: Any, opts: Any) -> Any:
    """Serialise only what the proto holds: weights still in the model's external files are read by onnxruntime
    from their folder (no copy of a large model per session); a proto that holds > ~1.8 GB itself goes
    through a temporary file with external data."""
    folders = external_folders(model)
    if len(folders) > 1:
        raise BuildError(f"an in-memory model references external data in several folders ({sorted(folders)}); "
                         f"this is a quantpipe bug, please report it.")
    providers = ["CPUExecutionProvider"]
    if in_memory_bytes(model) < LARGE_MODEL_BYTES:
        if folders:
            opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, next(iter(folders)))
        return ort.InferenceSession(strip_basepath(model).SerializeToString(), opts, providers=providers)
    import onnx

    with tempfile.TemporaryDirectory(prefix="quantpipe-ort-") as tmp:
        # onnxruntime reads external data only from the model's own folder (it refuses links out of it): every
        # weight goes into the temporary file, streamed tensor by tensor from the proto or the files it names.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = Path(tmp) / "model.onnx"
        write_external(copy, path)
        del copy
        return ort.InferenceSession(os.fspath(path), opts, providers=providers)


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
