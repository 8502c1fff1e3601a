"""Switchable int8 rounding inside an FP32 graph, for the searches that measure one tensor's rounding at a time
(`split_search`, `range_search`): the part of the graph below the tensor (`RoundedPart`), its rounding switched in
by scalar inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.metrics import SquaredSums, channel_axis
from quantpipe.onnxgraph import Graph, topological_order
from quantpipe.ortsession import ort_session
from quantpipe.quantize.downstream import cut_below

__all__ = ["CHANNEL_SPREAD", "RoundedPart", "add_switched_rounding", "output_error", "output_signal", "output_weights",
           "pooled", "reorder"]

CHANNEL_SPREAD = 100.0
"""An output whose channels' RMS (on `metrics.channel_axis`) differ by this factor or more is judged with each channel
against its own signal (`output_weights`). A YOLOv8 head's box rows (pixels, RMS ~141) otherwise drown its class
rows (scores, RMS ~0.01, 2e-8 of the energy), and every search tunes the boxes alone: found probing, the class rows
at 10 dB under a pooled 31 dB, 0.875 of FP32's detections kept."""


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


Weights = Sequence["np.ndarray | None"]
"""Per graph output: channel weights broadcasting against it (`output_weights`), or None (every element alike)."""


def output_weights(ref: Sequence[np.ndarray]) -> list[np.ndarray | None]:
    """The weights `output_error` / `output_signal` apply to each output, from one batch of FP32 outputs: for an
    output whose channels' RMS differ by `CHANNEL_SPREAD` or more, 1 / each channel's RMS, floored at the median
    channel's, so each channel's error counts against its own signal (and a class that hardly ever fires counts as
    much as the median one, not more: at 1 / its own RMS its rounding specks far under any threshold outweighed the
    rest, found on YOLOv8n); None for every other output (the plain squared error, bit for bit as before)."""
    out: list[np.ndarray | None] = []
    for r in ref:
        axis = channel_axis(r.shape) if r.dtype.kind == "f" else None
        if axis is None or r.shape[axis] < 2:
            out.append(None)
            continue
        axes = tuple(k for k in range(r.ndim) if k != axis)
        rms = np.sqrt(np.mean(np.square(r, dtype=np.float64), axis=axes))
        live = rms > 0
        if not live.any() or rms[live].max() < CHANNEL_SPREAD * rms[live].min():
            out.append(None)
            continue
        shape = [1] * r.ndim
        shape[axis] = -1
        out.append((1.0 / np.maximum(rms, np.median(rms))).reshape(shape))
    return out


def output_error(got: Sequence[np.ndarray], ref: Sequence[np.ndarray], sums: SquaredSums | None = None,
                 weights: Weights | None = None) -> float:
    """Squared error summed over the float outputs (each in float64, `metrics.SquaredSums.error`, times its
    `weights` where given; a loop should pass one `sums` for all its calls)."""
    sums = sums or SquaredSums()
    w = weights or [None] * len(ref)
    return sum(sums.error(x, r, scale=s) for x, r, s in zip(got, ref, w, strict=True) if r.dtype.kind == "f")


def output_signal(ref: Sequence[np.ndarray], sums: SquaredSums | None = None, weights: Weights | None = None) -> float:
    """Squared sum of the float outputs (each in float64, times its `weights` where given), the signal
    `output_error` is measured against."""
    sums = sums or SquaredSums()
    w = weights or [None] * len(ref)
    return sum(sums.signal(r, scale=s) for r, s in zip(ref, w, strict=True) if r.dtype.kind == "f")


def pooled(outputs: Sequence[str], weights: Weights | None = None) -> str:
    """What an output SQNR of `output_error` / `output_signal` covers, for a log line: nothing to say for one output
    of one scale; for several, that they are pooled (the report judges model.output alone, which can be far worse);
    where `weights` apply, that each channel counts against its own signal."""
    said = f"all {len(outputs)} graph outputs pooled" if len(outputs) > 1 else ""
    if weights and any(w is not None for w in weights):
        said += ("; " if said else "") + "each channel of " + ", ".join(
            o for o, w in zip(outputs, weights, strict=True) if w is not None) + " against its own signal"
    return f" ({said})" if said else ""


class RoundedPart:
    """The part of an FP32 model below one tensor `t` (`downstream.cut_below`) with t's int8 rounding error switched
    in at t's readers (`add_switched_rounding`; `switch`: the names of its switch, centre and step inputs).

    Run without graph optimizations on the tensors it reads (`feeds`, from a run of the FP32 model) it computes the
    bits of the whole model with only t rounded, for the model `outputs` t reaches (`outputs`; the others equal
    FP32's). The session is made on the first run (the feeds' element types come from it)."""

    def __init__(self, model: Any, t: str, outputs: Sequence[str], switch: tuple[str, str, str]) -> None:
        self.t, self.switch, self.cut = t, switch, cut_below(model, [t], outputs)
        self.feeds, self.outputs = list(self.cut.feeds), list(self.cut.outputs)
        self.session: Any = None

    def run(self, known: Mapping[str, np.ndarray], on: float, centre: float, step: float,
            threads: int | None = None) -> list[np.ndarray]:
        """The outputs (`self.outputs`) with t rounded on the grid of `step` around `centre` (`on` = 1.0) or not
        (0.0), the other tensors from `known`."""
        from onnx import TensorProto, helper

        sw, c, s = self.switch
        if self.session is None:
            m = self.cut.model({f: known[f].dtype for f in self.feeds})
            m.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in self.switch)
            add_switched_rounding(m, Graph(m.graph), self.t, sw, c, s)
            reorder(m)
            self.session = ort_session(m, optimize=False, threads=threads)
        scalars = {sw: on, c: centre, s: step}
        return self.session.run(self.outputs, {**{f: known[f] for f in self.feeds},
                                               **{k: np.array(v, np.float32) for k, v in scalars.items()}})
