"""Switchable int8 rounding inside an FP32 graph, for the searches that measure one tensor's rounding at a time
(`split_search`, `range_search`): one session, a scalar switch input per tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, topological_order

__all__ = ["add_switched_rounding", "output_error", "reorder"]


def add_switched_rounding(m: Any, g: Graph, t: str, switch: str, centre: str, step: str) -> None:
    """Make every reader of `t` read t + switch * (DQ(Q(t - centre)) - (t - centre)): its int8 rounding error on
    the grid of `step` around `centre` (tensor names: graph inputs or initializers), on when `switch` is 1.

    `switch` must already be a graph input; nodes are appended (call `reorder` once all are added).
    """
    from onnx import helper, numpy_helper

    m.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), f"{switch}_z"))
    nodes = [helper.make_node("Sub", [t, centre], [f"{switch}_m"]),
             helper.make_node("QuantizeLinear", [f"{switch}_m", step, f"{switch}_z"], [f"{switch}_q"]),
             helper.make_node("DequantizeLinear", [f"{switch}_q", step, f"{switch}_z"], [f"{switch}_d"]),
             helper.make_node("Sub", [f"{switch}_d", f"{switch}_m"], [f"{switch}_e"]),
             helper.make_node("Mul", [f"{switch}_e", switch], [f"{switch}_ge"]),
             helper.make_node("Add", [t, f"{switch}_ge"], [f"{switch}_out"])]
    for reader, j in g.consumers[t]:
        reader.input[j] = f"{switch}_out"
    m.graph.node.extend(nodes)


def reorder(m: Any) -> None:
    """Put the graph's nodes in topological order (after `add_switched_rounding` appended its nodes)."""
    nodes = topological_order(list(m.graph.node), m.graph)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def output_error(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    """Squared error summed over the float outputs (each in float64: sum((x - r)**2), computed in place on one
    copy of x, since a classifier's or a recognizer's output is large and the searches call this thousands of
    times)."""
    def one(x: np.ndarray, r: np.ndarray) -> float:
        d = x.astype(np.float64)
        d -= r
        np.square(d, out=d)
        return float(np.sum(d))

    return sum(one(x, r) for x, r in zip(got, ref, strict=True) if r.dtype.kind == "f")
