"""What the rewrites ask of a node: the bounds of a Relu / Clip, the bias a Conv / Gemm can absorb a constant
through, and how much each output moves when the whole input moves by 1."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, attr

__all__ = ["bias_slot", "clip_bounds", "input_sums"]


def clip_bounds(g: Graph, node: Any) -> tuple[float, float] | None:
    """(min, max) of a Relu or Clip node with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    bounds = [-math.inf, math.inf]
    for k in (1, 2):
        if len(node.input) > k and node.input[k]:
            v = g.value(node.input[k])
            if v is None or v.size != 1:
                return None
            bounds[k - 1] = float(v.reshape(()))
    for a in node.attribute:  # opset < 11
        if a.name in ("min", "max"):
            bounds[0 if a.name == "min" else 1] = float(a.f)
    return bounds[0], bounds[1]


def bias_slot(g: Graph, node: Any) -> tuple[int, float, np.ndarray] | None:
    """A Conv / Gemm whose outputs can absorb a constant through its bias: (outputs, bias scale, bias)."""
    w = g.value(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    if node.op_type == "Conv":
        n_out, scale = w.shape[0], 1.0
    elif node.op_type == "Gemm" and not attr(node, "transA", 0) and w.ndim == 2:
        n_out, scale = (w.shape[0] if attr(node, "transB", 0) else w.shape[1]), float(attr(node, "beta", 1.0))
    else:
        return None
    b = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(n_out, np.float32)
    if b is None or b.shape != (n_out,) or scale == 0.0:
        return None
    return n_out, scale, b


def input_sums(g: Graph, node: Any, weight: np.ndarray | None = None) -> np.ndarray | None:
    """Per output of a Conv / Gemm: how much it moves when every element of its input 0 moves by 1.
    `weight`: the values the node will compute with (its int8 weight dequantized) instead of its float weight."""
    w = g.value(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.dtype != np.float32:
        return None
    if weight is not None:
        if weight.shape != w.shape:
            return None
        w = weight
    if node.op_type == "Conv":
        if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return None
        return w.astype(np.float64).reshape(w.shape[0], -1).sum(axis=1)
    if node.op_type == "Gemm" and not attr(node, "transA", 0) and w.ndim == 2:
        return w.astype(np.float64).sum(axis=1 if attr(node, "transB", 0) else 0) * float(attr(node, "alpha", 1.0))
    return None
