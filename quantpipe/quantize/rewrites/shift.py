"""The non-negative shift: post-ReLU activations quantized around the middle of their range, exactly
compensated through the biases of their producer and readers."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, Names, add_initializer, attr, drop_unused_initializers
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import Plan
from quantpipe.quantize.rewrites.patterns import bias_slot, clip_bounds, input_sums
from quantpipe.quantize.types import ChannelStats
from quantpipe.quantize.weights import int8_weight

__all__ = ["OFFSETS_METADATA_KEY", "shift_nonnegative", "tensor_offsets"]


#: Model metadata key of the tensors `shift_nonnegative` moved: JSON {tensor: c}, the value is (FP32 value - c).
OFFSETS_METADATA_KEY = "quantpipe.shifted_tensors"


def _record_offsets(m: Any, offsets: Mapping[str, float]) -> None:
    import json

    merged = {**tensor_offsets(m), **offsets}
    keep = [p for p in m.metadata_props if p.key != OFFSETS_METADATA_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    entry = m.metadata_props.add()
    entry.key, entry.value = OFFSETS_METADATA_KEY, json.dumps(merged, sort_keys=True)


def tensor_offsets(model: Any) -> dict[str, float]:
    """Tensors of a quantpipe Q/DQ model that hold (FP32 value - c), by name -> c (`shift_nonnegative`).
    Compare them with the FP32 model's tensors after adding c back."""
    import json

    for p in model.metadata_props:
        if p.key == OFFSETS_METADATA_KEY:
            return {str(k): float(v) for k, v in json.loads(p.value).items()}
    return {}



#: A reader's correction: ("weights", Conv/Gemm reader, (input sums, its bias slot)) or ("add", the other
#: branch's Conv/Gemm producer, its bias slot).
_Fix = tuple[str, Any, Any]


class _Shifter:
    """One pass of the shift over a graph: the state its steps share (fresh names, Pads to insert, offsets)."""

    def __init__(self, m: Any, g: Graph, plan: Plan, stats: dict[str, ChannelStats], opts: QuantizeOptions) -> None:
        self.m, self.g, self.plan, self.stats, self.opts = m, g, plan, stats, opts
        self.names = Names(m.graph)
        by_name = {n.name: n for n in g.graph.node}
        self.entries: dict[str, list[tuple[tuple[str, int], float]]] = collections.defaultdict(list)
        for key, a in plan.acts.items():
            self.entries[by_name[key[0]].input[key[1]]].append((key, a))
        self.planned_inputs = set(self.entries)
        self.insert_before: dict[str, Any] = {}
        self.offsets: dict[str, float] = {}

    def ok_tensor(self, name: str) -> bool:
        g = self.g
        return name not in g.output_names and name not in g.subgraph_refs and name not in self.offsets

    def set_bias(self, node: Any, value: np.ndarray, tag: str) -> None:
        if len(node.input) == 2:
            node.input.append("")
        node.input[2] = add_initializer(self.m.graph, self.names, f"{node.name}_{tag}", value.astype(np.float32))
        self.g.remember(node.input[2], value.astype(np.float32))  # a later tensor's fix may adjust it again

    def candidate(self, t: str) -> tuple[float, Any, Any, tuple[float, float], Any, list[_Fix]] | None:
        """(amax, Relu/Clip, producer, bounds, producer's bias slot, readers' fixes) where `t` can be shifted."""
        g = self.g
        amaxes = {a for _, a in self.entries[t]}
        if len(amaxes) != 1:
            return None
        a = amaxes.pop()
        act = g.producer.get(t)
        if not (a > 0 and math.isfinite(a)) or act is None or not self.ok_tensor(t):
            return None
        bounds = clip_bounds(g, act)
        if bounds is None or bounds[0] < 0:
            return None
        z = act.input[0]
        prod = g.producer.get(z)
        if prod is None or prod.op_type not in ("Conv", "Gemm") or len(g.consumers.get(z, [])) != 1 \
                or not self.ok_tensor(z):
            return None
        p_slot = bias_slot(g, prod)
        fixes = self.reader_fixes(t, prod) if p_slot is not None else None
        return (a, act, prod, bounds, p_slot, fixes) if fixes else None

    def computed_weight(self, reader: Any) -> np.ndarray | None:
        """The weight a reader computes with: its int8 weight dequantized where the plan quantizes it, else None
        (its float weight)."""
        key = (reader.name, 1)
        w = self.g.value(reader.input[1]) if len(reader.input) > 1 else None
        if key not in self.plan.weights or w is None or w.dtype != np.float32:
            return None
        axis = self.plan.weights[key]
        q, scale, _ = int8_weight(reader.input[1], w, axis, self.opts)
        bshape = [1] * w.ndim
        if axis is not None:
            bshape[axis] = -1
        return q.astype(np.float64) * scale.reshape(bshape).astype(np.float64)

    def reader_fixes(self, t: str, prod: Any) -> list[_Fix] | None:
        """How every reader of `t` takes the shift back, or None when one cannot."""
        g = self.g
        fixes: list[_Fix] = []
        for reader, j in g.consumers.get(t, []):
            if reader.op_type in ("Conv", "Gemm") and j == 0:
                sums, slot = input_sums(g, reader, self.computed_weight(reader)), bias_slot(g, reader)
                if sums is None or slot is None or sums.shape != (slot[0],):
                    return None
                fixes.append(("weights", reader, (sums, slot)))
            elif reader.op_type == "Add" and len(reader.input) == 2 and reader.input[0] != reader.input[1]:
                y = reader.input[1 - j]
                py = g.producer.get(y)
                if py is None or py.op_type not in ("Conv", "Gemm") or len(g.consumers.get(y, [])) != 1 \
                        or y in self.planned_inputs or not self.ok_tensor(y) or py is prod:
                    return None
                slot = bias_slot(g, py)
                if slot is None:
                    return None
                fixes.append(("add", py, slot))
            else:
                return None
        return fixes

    def shift_activation(self, act: Any, z: str, bounds: tuple[float, float], c: float) -> None:
        """Relu / Clip(lo, hi) -> Clip(lo - c, hi - c)."""
        lo, hi = bounds
        clip_inputs = [z, add_initializer(self.m.graph, self.names, f"{act.name}_min", np.array(lo - c, np.float32))]
        if math.isfinite(hi):
            clip_inputs.append(add_initializer(self.m.graph, self.names, f"{act.name}_max",
                                               np.array(hi - c, np.float32)))
        act.op_type = "Clip"
        del act.input[:]
        act.input.extend(clip_inputs)
        keep_attrs = [x for x in act.attribute if x.name not in ("min", "max")]
        del act.attribute[:]
        act.attribute.extend(keep_attrs)

    def correct_readers(self, fixes: list[_Fix], c: float) -> None:
        """Each reader's bias takes the shift back. A node can need two corrections (a residual block's second
        conv reads t and feeds the Add that also reads t): they are summed before its bias is written once."""
        deltas: dict[str, list[Any]] = {}
        for kind, node, info in fixes:
            bias, bscale = (info[1][2], info[1][1]) if kind == "weights" else (info[2], info[1])
            d = c * info[0] / bscale if kind == "weights" else np.full(bias.shape, c / bscale)
            if node.name in deltas:
                deltas[node.name][2] = deltas[node.name][2] + d
            else:
                deltas[node.name] = [node, bias.astype(np.float64), d]
            if kind == "add":  # the Add's other branch now carries +c, so the sum is unchanged
                self.offsets[node.output[0]] = self.offsets.get(node.output[0], 0.0) - c
        for node, bias, d in deltas.values():
            self.set_bias(node, bias + d, "bias_shifted")

    def pad_readers(self, t: str, fixes: list[_Fix], c: float) -> None:
        """A zero-padded Conv reader reads an explicit Pad whose value is -c (the shifted zero). The padded
        tensor keeps the unshifted statistics: with its bias corrected by c * sum(int8 weight), the reader computes
        what it computed from the unshifted input, so bias correction's E[(Wq - W) x] is about that input."""
        from onnx import helper

        m, names = self.m, self.names
        st = self.stats.get(t)  # the unshifted statistics, read once: readers may replace stats[t] below
        for kind, node, _info in fixes:
            if kind != "weights":
                continue
            src = t
            pads = list(attr(node, "pads", [])) if node.op_type == "Conv" else []
            if any(pads):
                spatial = len(pads) // 2
                src = names.fresh(f"{t}_padded")
                all_pads = [0, 0] + pads[:spatial] + [0, 0] + pads[spatial:]
                self.insert_before[node.name] = helper.make_node(
                    "Pad", [t, add_initializer(m.graph, names, f"{node.name}_pads", np.array(all_pads, np.int64)),
                            add_initializer(m.graph, names, f"{node.name}_pad_value", np.array(-c, np.float32))],
                    [src], name=names.fresh(f"{node.name}_Pad"), mode="constant")
                node.input[0] = src
                for x in node.attribute:
                    if x.name == "pads":
                        del x.ints[:]
                        x.ints.extend([0] * len(pads))
            if st is not None and src != t:
                self.stats[src] = dataclasses.replace(st, tensor=src)

    def finish(self, done: list[str]) -> None:
        m = self.m
        if self.offsets:
            _record_offsets(m, self.offsets)
        if self.insert_before:
            nodes = list(m.graph.node)
            del m.graph.node[:]
            for n in nodes:
                if n.name in self.insert_before:
                    m.graph.node.append(self.insert_before[n.name])
                m.graph.node.append(n)
        if done:
            drop_unused_initializers(m.graph, Graph(m.graph))


def shift_nonnegative(m: Any, g: Graph, plan: Plan, stats: dict[str, ChannelStats],
                      options: QuantizeOptions = QuantizeOptions()) -> list[str]:
    """Quantize non-negative activations around the middle of their range, exactly compensated.

    TensorRT's activations are symmetric int8: a post-ReLU tensor with amax A gets steps of A/127 and never
    uses the negative codes. Rewriting  P -> Relu/Clip(lo >= 0) -> t  (P a Conv or Gemm) as
    P' -> Clip(lo - c, hi - c) -> t' = t - c  with c = A/2 puts t' in [-A/2, A/2]: steps of A/254, the sign
    bit used. P' has bias b - c. Every reader of t must take the shift back exactly, or nothing is done:
    a Conv / Gemm reading it adds c * sum(W) to its bias, W the weight it computes with (int8 dequantized where
    the plan quantizes it, so c times the weights' rounding error never reaches the output: with a wide range c
    is large); a zero-padded Conv reads an explicit Pad with value -c, the shifted zero; a residual Add whose other input comes from a Conv / Gemm adds c to that
    producer's bias. In float the graph computes the same function; -c is an exact int8 code, so the Pad
    commutes with the Q/DQ after it. The shifted tensors are recorded in the model's metadata
    (`tensor_offsets`). Returns the shifted tensors.
    """
    s = _Shifter(m, g, plan, stats, options)
    done: list[str] = []
    for t in sorted(s.entries, key=lambda n: g.position[g.producer[n].name] if n in g.producer else -1):
        found = s.candidate(t)
        if found is None:
            continue
        a, act, prod, bounds, (_n_out, scale, pb), fixes = found
        z = act.input[0]
        c = float(np.float32(a / 2.0))
        s.set_bias(prod, pb.astype(np.float64) - c / scale, "bias_shifted")
        s.shift_activation(act, z, bounds, c)
        s.offsets[z] = s.offsets[t] = c
        s.correct_readers(fixes, c)
        s.pad_readers(t, fixes, c)
        for key, _ in s.entries[t]:
            plan.acts[key] = a - c
        done.append(t)
    s.finish(done)
    return done
