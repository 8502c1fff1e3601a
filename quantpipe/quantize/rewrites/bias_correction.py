"""Bias correction: the quantized weights' mean output error folded into the float biases."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, Names, add_initializer, attr, drop_unused_initializers
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import Plan
from quantpipe.quantize.types import ChannelStats
from quantpipe.quantize.weights import int8_weight

__all__ = ["correct_biases"]


def correct_biases(m: Any, g: Graph, plan: Plan, opts: QuantizeOptions, stats: Mapping[str, ChannelStats]) -> list[str]:
    """Bias correction: b <- b - E[(Wq - W) x], so quantized weights do not shift each output channel's mean.

    Rounding a kernel's taps rarely cancels, and post-ReLU inputs have a large positive mean, so the
    quantized layer's outputs drift by a per-channel constant. It matters most in depthwise convolutions
    (a few taps, large weights); EfficientNet-Lite0's logits gain ~5 dB of SQNR. Uses the per-channel
    input means from the calibration data. Reference: Nagel et al., "Data-Free Quantization", ICCV 2019.
    """
    names = Names(m.graph)
    done: list[str] = []
    by_name = {n.name: n for n in g.graph.node}
    for (node_name, idx), axis in plan.weights.items():
        node = by_name[node_name]
        if idx != 1 or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        st = stats.get(node.input[0])
        w = g.value(node.input[1])
        if st is None or w is None:
            continue
        q, scale, _ = int8_weight(node.input[1], w, axis, opts)
        bshape = [1] * w.ndim
        if axis is not None:
            bshape[axis] = -1
        dw = q.astype(np.float64) * scale.reshape(bshape).astype(np.float64) - w.astype(np.float64)
        mu = np.asarray(st.mean, dtype=np.float64)
        shift: np.ndarray | None = None
        if node.op_type == "Conv" and st.axis == 1 and w.ndim >= 3:
            group = int(attr(node, "group", 1))
            o, ig = w.shape[0], w.shape[1]
            if mu.size != ig * group or o % group:
                continue
            per_tap = dw.reshape(o, ig, -1).sum(axis=2)  # [O, I/g]
            mu_g = mu.reshape(group, ig)[np.arange(o) // (o // group)]  # each output's input-group means
            shift = (per_tap * mu_g).sum(axis=1)
        elif node.op_type == "Gemm" and w.ndim == 2:
            dwk = dw.T if attr(node, "transB", 0) else dw  # [K, N]
            if dwk.shape[0] != mu.size:
                continue
            shift = float(attr(node, "alpha", 1.0)) * (mu @ dwk)
        elif node.op_type == "MatMul" and w.ndim == 2 and w.shape[0] == mu.size:
            shift = mu @ dw
        if shift is None or not np.all(np.isfinite(shift)):
            continue
        if node.op_type == "MatMul":
            if not _fold_into_following_add(m, g, node, shift, names):
                continue
        else:
            beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
            if len(node.input) > 2 and node.input[2]:
                b = g.value(node.input[2])
                if b is None or b.ndim != 1 or b.shape[0] != shift.shape[0] or beta == 0.0:
                    continue
                newb = b.astype(np.float64) - shift / beta
            else:
                if beta == 0.0:
                    # tf2onnx's projections (Gemm, no C, beta 0): -shift / 0 wrote six biases of +-inf into a BERT,
                    # counted as corrected. Given beta 1 instead, the correction lowered that BERT on its evaluation
                    # words (29.4 -> 28.7 dB, 3 of 200 words read otherwise; +0.9 dB on its calibration words): such a
                    # node is left as it is.
                    continue
                newb = -shift / beta
            if not np.all(np.isfinite(newb.astype(np.float32))):  # never a non-finite constant in the written model
                continue
            if len(node.input) == 2:
                node.input.append("")
            node.input[2] = add_initializer(m.graph, names, f"{node.name}_bias_corrected", newb.astype(np.float32))
        done.append(node_name)
    if done:
        drop_unused_initializers(m.graph, g)
    return done


def _fold_into_following_add(m: Any, g: Graph, node: Any, shift: np.ndarray, names: Names) -> bool:
    """MatMul + Add(bias) as exported by PyTorch: correct the Add's constant when nothing else reads it."""
    users = g.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0][0].op_type != "Add":
        return False
    add, j = users[0]
    other = add.input[1 - j]
    b = g.value(other)
    if b is None or b.dtype != np.float32 or b.shape != shift.shape or len(g.consumers.get(other, [])) != 1:
        return False
    add.input[1 - j] = add_initializer(m.graph, names, f"{add.name}_bias_corrected",
                                            (b.astype(np.float64) - shift).astype(np.float32))
    return True
