"""Output bias correction: the INT8 model's mean error at the model's last biased layer (the logits before a
Softmax / Sigmoid), measured on the calibration data, folded into that layer's float bias."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, Names, add_initializer, attr, drop_unused_initializers

__all__ = ["OutputHead", "apply_output_bias", "find_output_heads", "measure_output_bias"]

#: Ops between a head and a graph output that keep each value's channel (a per-channel constant error stays one).
_PASS_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                       "Transpose"})


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """A node whose output reaches a graph output through `_PASS_OPS` only, with a constant per-channel bias."""

    node: str
    output: str
    bias_input: int
    axis: int
    """The output's channel axis (negative: from the end)."""
    scale: float
    """How much the output moves per unit of bias (Gemm's beta; 1 otherwise)."""


def _head(g: Graph, node: Any) -> OutputHead | None:
    if node.op_type == "Add" and len(node.input) == 2:
        for j in (0, 1):
            b = g.value(node.input[j])
            if b is not None and b.ndim >= 1 and b.dtype == np.float32 and b.size == b.shape[-1] > 1 \
                    and g.value(node.input[1 - j]) is None:
                return OutputHead(node.name, node.output[0], j, -1, 1.0)
        return None
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
        b = g.value(node.input[2])
        if b is None or b.ndim != 1 or b.dtype != np.float32:
            return None
        if node.op_type == "Gemm":
            beta = float(attr(node, "beta", 1.0))
            return OutputHead(node.name, node.output[0], 2, -1, beta) if beta else None
        return OutputHead(node.name, node.output[0], 2, 1, 1.0)
    return None


def find_output_heads(g: Graph) -> list[OutputHead]:
    """Each graph output's head: walking back from it through `_PASS_OPS`, the first other node, if it adds a
    constant per-channel bias (MatMul + Add as exported by PyTorch / Paddle, Gemm, Conv, ConvTranspose)."""
    heads: dict[str, OutputHead] = {}
    for out in g.output_names:
        node = g.producer.get(out)
        while node is not None and node.op_type in _PASS_OPS:
            node = g.producer.get(node.input[0])
        found = _head(g, node) if node is not None else None
        if found is not None:
            heads.setdefault(found.node, found)
    return list(heads.values())


def measure_output_bias(fp32: Any, qdq: Any, heads: list[OutputHead], calibration_data: Any, *,
                        batch_size: int = 8, max_samples: int = 64) -> dict[str, np.ndarray]:
    """Per head, the INT8 model's mean output error per channel (INT8 - FP32) on up to `max_samples` calibration
    samples, the Q/DQ arithmetic exact (onnxruntime, graph optimizations off)."""
    from quantpipe.onnxgraph import expose_outputs
    from quantpipe.ortsession import ort_session

    names = [h.output for h in heads]
    ref = ort_session(expose_outputs(fp32, names), optimize=False)
    q = ort_session(expose_outputs(qdq, names), int8=True, optimize=False)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feeds in calibration_data.head_feeds(batch_size, max_samples):
        for h, a, b in zip(heads, ref.run(names, feeds), q.run(names, feeds), strict=True):
            d = np.moveaxis(b.astype(np.float64) - a.astype(np.float64), h.axis, -1)
            d = d.reshape(-1, d.shape[-1])
            sums[h.node] = sums.get(h.node, 0.0) + d.sum(axis=0)
            counts[h.node] = counts.get(h.node, 0) + d.shape[0]
    return {h.node: sums[h.node] / counts[h.node] for h in heads if counts.get(h.node)}


def apply_output_bias(m: Any, g: Graph, shifts: Mapping[str, np.ndarray]) -> list[str]:
    """Subtract each head's measured mean error from its bias (`QuantizeOptions.output_bias`); returns the heads
    corrected. A head whose bias no longer matches the measured channels is left alone."""
    names = Names(m.graph)
    done: list[str] = []
    by_name = {h.node: h for h in find_output_heads(g)}
    nodes = {n.name: n for n in g.graph.node}
    for name, shift in shifts.items():
        h = by_name.get(name)
        if h is None:
            continue
        node = nodes[name]
        b = g.value(node.input[h.bias_input])
        delta = np.asarray(shift, dtype=np.float64) / h.scale
        if b is None or b.shape[-1] != delta.size or not np.all(np.isfinite(delta)):
            continue
        newb = (b.astype(np.float64) - delta.reshape((1,) * (b.ndim - 1) + (-1,))).astype(np.float32)
        node.input[h.bias_input] = add_initializer(m.graph, names, f"{name}_output_bias", newb)
        done.append(name)
    if done:
        drop_unused_initializers(m.graph, g)
    return done
