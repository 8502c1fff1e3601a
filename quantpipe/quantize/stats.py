"""Per-channel statistics of the quantized nodes' activation inputs on the calibration data (one FP32 pass):
what smoothing, the non-negative shift and bias correction read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, attr, expose_outputs, load_onnx, named_copy
from quantpipe.ortsession import fp32_batches, ort_session
from quantpipe.quantize.placement import QUANTIZABLE_OPS
from quantpipe.quantize.types import ChannelStats

__all__ = ["collect_channel_stats"]


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
                          tensors: Mapping[str, int] | None = None) -> dict[str, ChannelStats]:
    """Per-channel absmax and mean of the quantizable nodes' activation inputs over `dataset` (FP32 run).

    Args:
        model: FP32 ModelProto or path.
        dataset: a `quantpipe.data.Dataset` (the calibration split).
        batch_size: samples per run.
        max_samples: stop after this many samples (None: all).
        tensors: tensor -> channel axis to collect (default: every quantizable node's activation input).
    """
    if not hasattr(model, "graph"):
        model = load_onnx(model)
    m = named_copy(model)
    g = Graph(m.graph)
    targets = dict(tensors) if tensors is not None else _stat_targets(g)
    if not targets:
        return {}
    sess = ort_session(expose_outputs(m, targets))
    acc: dict[str, list[Any]] = {}
    seen = 0
    for res, n in fp32_batches(sess, dataset, batch_size=batch_size, max_samples=max_samples):
        seen += n
        for name, axis in targets.items():
            v = np.asarray(res[name], dtype=np.float64)
            ax = axis % v.ndim
            flat = np.moveaxis(v, ax, -1).reshape(-1, v.shape[ax])
            cur = acc.get(name)
            if cur is None:
                acc[name] = [np.abs(flat).max(axis=0), flat.sum(axis=0), flat.shape[0]]
            else:
                cur[0] = np.maximum(cur[0], np.abs(flat).max(axis=0))
                cur[1] = cur[1] + flat.sum(axis=0)
                cur[2] += flat.shape[0]
    return {name: ChannelStats(name, targets[name], a[0], a[1] / max(a[2], 1), seen) for name, a in acc.items()}
