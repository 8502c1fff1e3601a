"""SmoothQuant: activation outlier channels moved into the weights of the MatMul / Gemm that read them."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, Names, add_initializer, attr, drop_unused_initializers
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.rewrites.patterns import clip_bounds
from quantpipe.quantize.types import ChannelStats

__all__ = ["smooth_inputs"]


def smooth_inputs(m: Any, g: Graph, opts: QuantizeOptions, stats: dict[str, ChannelStats], amax: dict[str, float],
            sentinels: Mapping[str, str], per_channel: bool = True) -> list[str]:
    """SmoothQuant: x W = (x / s)(s W) with s_j = max|x_j|^a / max|W_j|^(1-a), for inputs with outlier channels.

    Transformer activations (LayerNorm outputs, GELU outputs) have a few channels 10-30x larger than the
    rest; one per-tensor INT8 scale then leaves the other channels a handful of levels. Dividing the
    channels by s (an explicit Mul, which TensorRT fuses as a pointwise op) and multiplying the weight
    rows by s is exact in float and moves the range problem into the weights, which are per channel.
    The smoothed tensor's amax is the largest smoothed channel range on the calibration data.
    Reference: Xiao et al., "SmoothQuant", ICML 2023.

    With `equalize_depthwise`, depthwise Conv inputs are equalized first (`_equalize_depthwise`).
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
    if per_channel and opts.equalize_depthwise is True:  # ("auto" undecided: not)
        smoothed += _equalize_depthwise(m, g, opts, stats, amax, sentinels, names, new_nodes)
    for x, consumers in (groups.items() if opts.smooth_alpha else ()):
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


def _depthwise_multiplier(node: Any, w: np.ndarray, channels: int | None) -> int | None:
    """Output channels per input channel of a depthwise Conv (weight [C*k, 1, ...], group C); None otherwise."""
    group = int(attr(node, "group", 1))
    if w.ndim < 3 or w.shape[1] != 1 or group <= 1 or w.shape[0] % group:
        return None
    if channels is not None and channels != group:
        return None
    return w.shape[0] // group


def _equalize_depthwise(m: Any, g: Graph, opts: QuantizeOptions, stats: dict[str, ChannelStats],
                        amax: dict[str, float], sentinels: Mapping[str, str], names: Any,
                        new_nodes: dict[str, Any]) -> list[str]:
    """Per-channel equalization of depthwise Conv inputs: x * (1/s) before the Q/DQ, filter c times s_c; exact in
    float and free for per-channel int8 weights.

    Depthwise convolutions (group = input channels, one input channel per filter) are equalized fully, whatever
    `smooth_alpha`: with per-channel weight scales, multiplying filter c
    by s_c leaves its int8 codes unchanged, so the whole range imbalance can go into the weights at no cost.
    s_c = max|x_c| / max_j max|x_j| gives every channel the tensor's largest range: a channel whose range is
    small beside the others' (MobileNetV3: a HardSwish channel at 0.4 beside 18, which the unfolded
    BatchNorm after the depthwise conv then multiplies by 20-30) gets the int8 resolution of the largest one
    instead of a handful of levels. Applied where the largest channel range is at least `smooth_min_spread`
    times the smallest live one, and only with per-channel weights.
    """
    from onnx import helper

    groups: dict[str, list[tuple[Any, np.ndarray, int]]] = collections.defaultdict(list)
    for node in g.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.op_type in opts.keep_float_ops:
            continue
        if node.name in opts.keep_float_nodes:
            continue
        x, w = node.input[0], node.input[1]
        if g.is_constant(x) or not g.is_constant(w) or x in sentinels or x in new_nodes:
            continue
        act = g.producer.get(x)
        bounds = clip_bounds(g, act) if act is not None else None
        if opts.shift_nonnegative and bounds is not None and bounds[0] >= 0:
            continue  # a Relu / Clip(>= 0) output: the non-negative shift serves it, and a Mul in front would not
        val = g.value(w)
        st = stats.get(x)
        if val is None or val.dtype != np.float32 or st is None or st.axis != 1:
            continue
        k = _depthwise_multiplier(node, val, len(np.asarray(st.absmax)))
        if k is None:
            continue
        groups[x].append((node, val, k))
    done: list[str] = []
    for x, consumers in groups.items():
        st = stats[x]
        if x not in amax:
            continue
        a = np.asarray(st.absmax, dtype=np.float64)
        live = a[a > 0]
        if live.size == 0 or float(live.max()) < opts.smooth_min_spread * float(live.min()):
            continue
        s = np.where(a > 0, np.clip(a / float(live.max()), 1e-4, 1.0), 1.0)
        spatial = consumers[0][1].ndim - 2  # x is [N, C, spatial...] like the weight [O, 1, spatial...]
        inv = add_initializer(m.graph, names, f"{x}_equalize_inv",
                              (1.0 / s).astype(np.float32).reshape((-1,) + (1,) * spatial))
        xs = names.fresh(f"{x}_equalized")
        new_nodes[x] = helper.make_node("Mul", [x, inv], [xs], name=names.fresh(f"{x}_Equalize"))
        for node, w, k in consumers:
            scale = np.repeat(s, k).reshape((-1,) + (1,) * (w.ndim - 1))
            node.input[1] = add_initializer(m.graph, names, f"{node.input[1]}_equalized",
                                            (w.astype(np.float64) * scale).astype(np.float32))
            node.input[0] = xs
        stats[xs] = ChannelStats(xs, 1, a / s, np.asarray(st.mean) / s, st.num_samples)
        amax[xs] = float(np.max(a / s))
        done.append(x)
    return done
