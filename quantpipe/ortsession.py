"""ONNX Runtime sessions for in-memory models: the CPU session the quantizer, the fallback and the
sensitivity analysis run, the int8 session config, and FP32 passes over a dataset.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.data import sample_count
from quantpipe.errors import BuildError
from quantpipe.externaldata import external_folders, in_memory_bytes, strip_basepath, write_external
from quantpipe.onnxgraph import LARGE_MODEL_BYTES

__all__ = ["EXTERNAL_FOLDER_KEY", "FOLD_MAX_BYTES", "ORT_INT8_SESSION_CONFIG", "fold_weight_dequantize", "fp32_batches",
           "ort_session", "require_ort"]

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

    Quantized weights are given to onnxruntime as the float constants they dequantize to
    (`fold_weight_dequantize`, the same bits): a Gemm / MatMul whose weight is a DequantizeLinear output is not
    prepacked, and onnxruntime's float GEMM then blocks its K loop by each thread's share of N, so with many
    intra-op threads its last bits depend on the thread count (EfficientNet-Lite0 INT8: identical at 1-8
    threads, 1.9e-6 off at 16). On constants the sums are the same at every thread count, so the searches give
    the same numbers with any number of workers on any machine (tests/unit/test_ortsession.py).
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
    return _session(ort, fold_weight_dequantize(model), opts)


#: The most float32 weight bytes `fold_weight_dequantize` adds to a session's model.
FOLD_MAX_BYTES = 1 << 30


def _elements(t: Any) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def fold_weight_dequantize(model: Any) -> Any:
    """`model` with each DequantizeLinear of constants (a quantized weight: int8 / uint8 values, float32 scale,
    per-tensor or per-axis) replaced by the float32 initializer it computes, bit for bit as onnxruntime's kernel
    computes it (`(int32(q) - zero_point) * scale` in float32). `model` itself is unchanged; a model without
    such a node is returned as is. Weights held in external files, blocked quantization and other types stay
    DequantizeLinear nodes, and so does every weight of a model whose float weights would take more than
    FOLD_MAX_BYTES (memory first: such a model's searches can then differ in the last bits between thread counts
    above 8, README "Parallel execution")."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    ints = {TensorProto.INT8, TensorProto.UINT8}
    outputs = {o.name for o in model.graph.output}

    def foldable(n: Any) -> bool:
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            return False
        if n.output[0] in outputs or any(a.name == "block_size" for a in n.attribute):
            return False
        ts = [inits.get(i) for i in n.input if i]
        if any(t is None or t.data_location == TensorProto.EXTERNAL for t in ts):
            return False
        return ts[0].data_type in ints and ts[1].data_type == TensorProto.FLOAT  # type: ignore[union-attr]

    fold = [n for n in model.graph.node if foldable(n)]
    if not fold or 4 * sum(_elements(inits[n.input[0]]) for n in fold) > FOLD_MAX_BYTES:
        return model
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    folded = {n.output[0] for n in fold}
    keep = [n for n in out.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in folded)]
    values = []
    for n in fold:
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.int32)
        scale = numpy_helper.to_array(inits[n.input[1]])
        zp = (numpy_helper.to_array(inits[n.input[2]]).astype(np.int32) if len(n.input) > 2 and n.input[2]
              else np.zeros_like(scale, dtype=np.int32))
        if scale.ndim == 1 and q.ndim > 1:  # per axis
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        values.append(numpy_helper.from_array((q - zp).astype(np.float32) * scale, n.output[0]))
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(values)  # the int8 ones stay: a subgraph may read them; onnxruntime drops unused
    return out


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
    for feeds in dataset.head_feeds(batch_size, max_samples):
        res = dict(zip(names, sess.run(None, feeds), strict=True))
        res.update(feeds)
        yield res, sample_count(feeds)
