"""SmoothQuant: activation outlier channels moved into the weights of the MatMul / Gemm that read them."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, Names, add_initializer, attr, drop_unused_initializers
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.types import ChannelStats

__all__ = ["smooth_inputs"]


def smooth_inputs(m: Any, g: Graph, opts: QuantizeOptions, stats: dict[str, ChannelStats], amax: dict[str, float],
            sentinels: Mapping[str, str]) -> list[str]:
    """SmoothQuant: x W = (x / s)(s W) with s_j = max|x_j|^a / max|W_j|^(1-a), for inputs with outlier channels.

    Transformer activations (LayerNorm outputs, GELU outputs) have a few channels 10-30x larger than the
    rest; one per-tensor INT8 scale then leaves the other channels a handful of levels. Dividing the
    channels by s (an explicit Mul, which TensorRT fuses as a pointwise op) and multiplying the weight
    rows by s is exact in float and moves the range problem into the weights, which are per channel.
    The smoothed tensor's amax is the largest smoothed channel range on the calibration data.
    Reference: Xiao et al., "SmoothQuant", ICML 2023.
    """
    from onnx import helper

    alpha = float(opts.smooth_alpha or 0.0)
    groups: dict[str, list[tuple[Any, np.ndarray]]] = collections.defaultdict(list)
    for node in g.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.op_type in opts.keep_float_ops:
            continue
        x, w = node.input[0], node.input[1]
        if g.is_constant(x) or not g.is_constant(w) or x in sentinels:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        val = g.value(w)
        if val is None or val.dtype != np.float32 or val.ndim != 2:
            continue
        groups[x].append((node, val))
    names = Names(m.graph)
    new_nodes: dict[str, Any] = {}
    smoothed: list[str] = []
    for x, consumers in groups.items():
        st = stats.get(x)
        if st is None or st.axis not in (-1,) or x not in amax:
            continue
        a = np.asarray(st.absmax, dtype=np.float64)
        live = a[a > 0]
        if live.size == 0 or float(live.max()) < opts.smooth_min_spread * float(np.median(live)):
            continue
        rows = []
        for node, w in consumers:
            trans = node.op_type == "Gemm" and attr(node, "transB", 0)
            rows.append(np.abs(w).max(axis=0 if trans else 1))
        wmax = np.max(rows, axis=0).astype(np.float64)
        if wmax.shape != a.shape:
            continue
        s = np.where((a > 0) & (wmax > 0), np.power(np.maximum(a, 1e-12), alpha)
                     / np.power(np.maximum(wmax, 1e-12), 1.0 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4)
        inv = add_initializer(m.graph, names, f"{x}_smooth_inv", (1.0 / s).astype(np.float32))
        xs = names.fresh(f"{x}_smoothed")
        mul = helper.make_node("Mul", [x, inv], [xs], name=names.fresh(f"{x}_Smooth"))
        new_nodes[x] = mul
        for node, w in consumers:
            trans = node.op_type == "Gemm" and attr(node, "transB", 0)
            scaled = w.astype(np.float64) * (s[None, :] if trans else s[:, None])
            node.input[1] = add_initializer(m.graph, names, f"{node.input[1]}_smoothed", scaled.astype(np.float32))
            node.input[0] = xs
        stats[xs] = ChannelStats(xs, -1, a / s, np.asarray(st.mean) / s, st.num_samples)
        amax[xs] = float(np.max(a / s))
        smoothed.append(x)
    if new_nodes:
        nodes = list(m.graph.node)
        del m.graph.node[:]
        for x in [x for x in new_nodes if x not in g.producer]:  # graph inputs: their Mul goes first
            m.graph.node.append(new_nodes[x])
        for node in nodes:
            m.graph.node.append(node)
            for o in node.output:
                if o in new_nodes:
                    m.graph.node.append(new_nodes[o])
        drop_unused_initializers(m.graph, g)
    return smoothed
