"""Split activations: a sensitive post-ReLU activation quantized in K pieces of range amax/K (all INT8)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, Names, add_initializer, drop_unused_initializers
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.rewrites.patterns import bias_slot, clip_bounds
from quantpipe.quantize.types import ChannelStats
from quantpipe.quantize.weights import WeightCodes, codes_for, weight_fingerprint

__all__ = ["split_activations", "split_candidate"]

log = logging.getLogger(__name__)


def split_candidate(g: Graph, t: str, opts: QuantizeOptions) -> tuple[Any, Any, list[Any], float] | None:
    """(producer Conv, Relu/Clip, Conv readers, upper bound) when `t` = Relu/Clip(0, hi)(Conv(...)) can be
    split (`split_activations`), else None."""
    act = g.producer.get(t)
    if act is None or t in g.output_names or t in g.subgraph_refs:
        return None
    bounds = clip_bounds(g, act)
    if bounds is None or bounds[0] != 0.0:
        return None
    z = act.input[0]
    prod = g.producer.get(z)
    if prod is None or prod.op_type != "Conv" or len(g.consumers.get(z, [])) != 1 or z in g.output_names \
            or z in g.subgraph_refs or bias_slot(g, prod) is None:
        return None
    readers = []
    for reader, j in g.consumers.get(t, []):
        w = g.value(reader.input[1]) if reader.op_type == "Conv" and len(reader.input) > 1 else None
        if j != 0 or w is None or w.dtype != np.float32 or reader.name in opts.keep_float_nodes \
                or reader.op_type in opts.keep_float_ops \
                or (opts.only_nodes is not None and reader.name not in opts.only_nodes):
            return None
        readers.append(reader)
    return (prod, act, readers, bounds[1]) if readers else None


def split_activations(m: Any, g: Graph, opts: QuantizeOptions, splits: Mapping[str, int], amax: dict[str, float],
                       stats: dict[str, ChannelStats], codes: dict[str, Any] | None = None) -> dict[str, str]:
    """Quantize a sensitive non-negative activation in K pieces of range A/K: K times the int8 resolution.

    t = Clip(0, hi)(Conv(x)) with amax A becomes K channels per channel, t_k = Clip(0, A/K)(Conv(x) - k A/K)
    (the producer's filters repeated, its bias lowered by k A/K), and every Conv reading t reads the K pieces
    with its input weights repeated K times (the same groups): sum_k t_k = min(t, A), which is what the Q/DQ
    of t computed anyway. Each piece is an ordinary int8 tensor with amax A/K, so the layer stays INT8 in
    TensorRT, at the price of K times the tensor's memory traffic and reader input channels. One activation
    of EfficientNet-Lite0 (the stem's ReLU6, read by a depthwise conv) holds most of the model's activation
    noise: this is the tool for such a tensor (`split_activations`, chosen by `choose_splits`).

    GPTQ codes (`codes`, updated in place) of the producer's and readers' weights are repeated with them: the
    copies of one weight keep one code (fitting them apart on the calibration data would lean on the upper
    pieces, which that data rarely fills).

    Returns the split tensors: original name -> new name (the new tensors are new names, so per-tensor
    comparisons with the FP32 model skip them).
    """
    names = Names(m.graph)
    done: dict[str, str] = {}
    for t, k in sorted(splits.items()):
        k = int(k)
        cand = split_candidate(g, t, opts) if k >= 2 else None
        a = amax.get(t)
        if cand is None or a is None or not (a > 0 and math.isfinite(a)):
            continue
        prod, act, readers, hi = cand
        a = min(float(a), hi)
        piece = a / k
        n_out, _scale, bias = bias_slot(g, prod)  # type: ignore[misc]
        w = g.value(prod.input[1])
        assert w is not None
        z_new, t_new = names.fresh(f"{prod.output[0]}_split{k}"), names.fresh(f"{t}_split{k}")
        if len(prod.input) == 2:
            prod.input.append("")
        old_w = prod.input[1]
        prod.input[1] = add_initializer(m.graph, names, f"{prod.input[1]}_split", np.repeat(w, k, axis=0))
        g.remember(prod.input[1], np.repeat(w, k, axis=0))  # a chained split reads it back
        _repeat_codes(codes, old_w, w, prod.input[1], k, axis=0)
        steps = (np.arange(k, dtype=np.float64) * piece)[None, :]
        new_bias = (bias.astype(np.float64)[:, None] - steps).reshape(-1).astype(np.float32)
        prod.input[2] = add_initializer(m.graph, names, f"{prod.name}_bias_split", new_bias)
        g.remember(prod.input[2], new_bias)
        prod.output[0] = z_new
        act.op_type = "Clip"
        del act.input[:]
        act.input.extend([z_new, add_initializer(m.graph, names, f"{act.name}_min", np.array(0.0, np.float32)),
                          add_initializer(m.graph, names, f"{act.name}_max", np.array(piece, np.float32))])
        keep_attrs = [x for x in act.attribute if x.name not in ("min", "max")]
        del act.attribute[:]
        act.attribute.extend(keep_attrs)
        act.output[0] = t_new
        for reader in readers:
            wr = g.value(reader.input[1])
            assert wr is not None
            old_w = reader.input[1]
            reader.input[1] = add_initializer(m.graph, names, f"{reader.input[1]}_split", np.repeat(wr, k, axis=1))
            g.remember(reader.input[1], np.repeat(wr, k, axis=1))
            _repeat_codes(codes, old_w, wr, reader.input[1], k, axis=1)
            reader.input[0] = t_new
        amax[t_new] = piece
        st = stats.get(t)
        if st is not None and st.axis == 1:
            stats[t_new] = ChannelStats(t_new, 1, np.minimum(np.repeat(st.absmax, k), piece),
                                        np.repeat(np.asarray(st.mean) / k, k), st.num_samples)
        done[t] = t_new
        log.debug("split %s into %d pieces of range %.4g (readers: %s)", t, k, piece, ", ".join(r.name for r in readers))
    if done:
        # Inferred shapes of the renamed tensors no longer hold; drop any stale entries.
        keep = [v for v in m.graph.value_info if v.name not in done]
        del m.graph.value_info[:]
        m.graph.value_info.extend(keep)
        drop_unused_initializers(m.graph, Graph(m.graph))
    return done


def _repeat_codes(codes: dict[str, Any] | None, name: str, w: np.ndarray, new_name: str, k: int, axis: int) -> None:
    """GPTQ codes of weight `name` (value `w`), repeated k times along `axis` as the weight was, under `new_name`."""
    if not codes or name not in codes:
        return
    c = codes_for(codes, name, w, codes[name].axis)
    if c is None:
        return
    scale = np.asarray(c.scale)
    if axis == 0 and scale.ndim >= 1 and scale.shape[0] == w.shape[0]:
        scale = np.repeat(scale, k, axis=0)
    new_w = np.repeat(w, k, axis=axis)
    codes[new_name] = WeightCodes(new_name, c.node, c.axis, np.repeat(c.q, k, axis=axis), scale,
                                  weight_fingerprint(new_w))
