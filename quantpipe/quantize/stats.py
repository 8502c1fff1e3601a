"""Per-channel statistics of the quantized nodes' activation inputs on the calibration data (one FP32 pass):
what smoothing, the non-negative shift and bias correction read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.data import sample_rows
from quantpipe.onnxgraph import Graph, attr, expose_outputs, load_onnx, named_copy
from quantpipe.ortsession import ort_session
from quantpipe.quantize.placement import QUANTIZABLE_OPS
from quantpipe.quantize.types import ChannelStats

__all__ = ["MAX_RUN_BYTES", "collect_channel_stats"]

#: Exposed activations of one onnxruntime run of the statistics pass, at most (64 MiB): a batch runs in pieces
#: under it. At one run per batch of 32, EfficientNet-Lite0's pass peaked at 3.1 GB.
MAX_RUN_BYTES = 64 << 20


def _stat_targets(g: Graph) -> dict[str, int]:
    """Non-constant inputs of the quantizable nodes -> the channel axis their consumer contracts over."""
    out: dict[str, int] = {}
    for node in g.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        x = node.input[0]
        if not x or g.is_constant(x):
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            out.setdefault(x, 1)
        elif node.op_type == "Gemm" and not attr(node, "transA", 0) or node.op_type == "MatMul" and g.is_constant(node.input[1]):
            out.setdefault(x, -1)
    return out



def collect_channel_stats(model: Any, dataset: Any, *, batch_size: int = 8, max_samples: int | None = None,
                          tensors: Mapping[str, int] | None = None,
                          max_run_bytes: int = MAX_RUN_BYTES) -> dict[str, ChannelStats]:
    """Per-channel absmax and mean of the quantizable nodes' activation inputs over `dataset` (FP32 run).

    Args:
        model: FP32 ModelProto or path.
        dataset: a `quantpipe.data.Dataset` (the calibration split).
        batch_size: samples per batch (each batch's sums are added to the running total in one step).
        max_samples: stop after this many samples (None: all).
        tensors: tensor -> channel axis to collect (default: every quantizable node's activation input).
        max_run_bytes: a batch is run in pieces whose exposed tensors stay under this; the statistics are
            bit-identical to one run per batch (each batch's sum still runs row by row in sample order).
    """
    if not hasattr(model, "graph"):
        model = load_onnx(model)
    m = named_copy(model)
    g = Graph(m.graph)
    targets = dict(tensors) if tensors is not None else _stat_targets(g)
    if not targets:
        return {}
    sess = ort_session(expose_outputs(m, targets))
    del m, g
    acc: dict[str, list[Any]] = {}
    seen = 0
    sizer = _RunSizer(batch_size, max_run_bytes)
    for batch in dataset.batches(batch_size):
        feeds = batch.feeds if max_samples is None else batch.feeds.rows(0, max_samples - seen)
        n = feeds.size
        for name, (absmax, total, rows) in _batch_stats(sess, feeds, n, targets, sizer).items():
            cur = acc.get(name)
            if cur is None:
                acc[name] = [absmax, total, rows]
            else:
                cur[0] = np.maximum(cur[0], absmax)
                cur[1] = cur[1] + total
                cur[2] += rows
        seen += n
        if max_samples is not None and seen >= max_samples:
            break
    return {name: ChannelStats(name, targets[name], a[0], a[1] / max(a[2], 1), seen) for name, a in acc.items()}


class _RunSizer:
    """Samples per onnxruntime run: one at first, then as many as keep the exposed tensors under the budget."""

    def __init__(self, batch_size: int, max_run_bytes: int) -> None:
        self.batch_size, self.max_run_bytes, self.per_run = batch_size, max_run_bytes, 1

    def measured(self, nbytes: int, samples: int) -> None:
        per_sample = max(1, nbytes // max(samples, 1))
        self.per_run = max(1, min(self.batch_size, self.max_run_bytes // per_sample))


def _batch_stats(sess: Any, feeds: Mapping[str, np.ndarray], n: int, targets: Mapping[str, int], sizer: _RunSizer
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per target: (absmax, sum, rows) of one batch, run in pieces. Each piece's rows continue the batch's
    running sum in order (`[sum; rows].sum(axis=0)` adds a C-contiguous array row by row), so the sum is the one
    of the whole batch in one run (whose [rows, channels] copy is C-contiguous for more than one sample)."""
    fetch = [t for t in targets if t not in feeds]
    out: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    lo = 0
    while lo < n:
        hi = min(n, lo + sizer.per_run)
        piece = sample_rows(feeds, lo, hi)
        res = dict(zip(fetch, sess.run(fetch, piece), strict=True)) if fetch else {}
        sizer.measured(sum(int(getattr(a, "nbytes", 0)) for a in res.values()), hi - lo)
        res.update(piece)
        for name, axis in targets.items():
            v = np.asarray(res.pop(name), dtype=np.float64)
            ax = axis % v.ndim
            flat = np.moveaxis(v, ax, -1).reshape(-1, v.shape[ax])
            if hi - lo < n:  # numpy sums a C-contiguous [rows, channels] row by row (a strided view may go pairwise)
                flat = np.ascontiguousarray(flat)
            del v
            absmax = np.abs(flat).max(axis=0)
            prev = out.get(name)
            if prev is None:
                out[name] = (absmax, flat.sum(axis=0), flat.shape[0])
            else:
                total = np.concatenate([prev[1][None, :], flat]).sum(axis=0)
                out[name] = (np.maximum(prev[0], absmax), total, prev[2] + flat.shape[0])
            del flat
        del res
        lo = hi
    return out
