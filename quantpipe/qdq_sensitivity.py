"""Per-layer sensitivity of a Q/DQ model quantpipe did not write (ModelOpt's `modelopt-int8` variants): which of
its quantized layers cost accuracy, judged on the model as it is, since its scales and placement are not
quantpipe's to rebuild.

A *quantized node* is a node (not a Q/DQ node) that reads a DequantizeLinear output; *its Q/DQ pairs* are the
DequantizeLinear nodes it reads (and the QuantizeLinear before each). Per quantized node:

- *accumulated SQNR*: its output in the Q/DQ model against the same tensor of the FP32 model (where the Q/DQ model
  kept the tensor's name), both run unoptimized with the tensor exposed;
- *one layer at a time*: the model output when only this node reads through its Q/DQ pairs and every other
  node reads the float tensor instead (the Quantize's float input; a weight stored as int8 behind a lone
  DequantizeLinear is read dequantized, so its rounding stays: the file holds no float copy). The candidates run
  through `reference.run_candidates` against the model with no pair kept (only what a candidate changes runs).
  `one_at_a_time=N` measures the N nodes with the lowest accumulated SQNR.

Rows are `LayerSensitivity`, sorted as `sensitivity.layer_sensitivity` sorts quantpipe's: measured nodes by the
output metric, worst first (ties by output SQNR), then the others by accumulated SQNR.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.artifacts import LayerSensitivity
from quantpipe.errors import EvaluationError
from quantpipe.metrics import SquaredSums, finite_or_none, sqnr_from_sums
from quantpipe.onnxgraph import Graph, attr, depthwise_convs, expose_outputs, load_onnx, name_nodes, tensor_outputs
from quantpipe.ortsession import ort_session
from quantpipe.reference import CANDIDATES_PER_RUN, COUNTED_SCORES, first_samples, run_candidates, run_output, score
from quantpipe.sensitivity import tie_said, worst_first
from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

__all__ = ["keep_only_pairs", "qdq_layer_sensitivity", "quantized_nodes"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def quantized_nodes(model: Any) -> list[str]:
    """Names of the nodes that read a DequantizeLinear output, in graph order (Q/DQ nodes themselves excluded)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type not in _QDQ and any(i in dq_out for i in n.input)]


def keep_only_pairs(model: Any, keep: Collection[str]) -> Any:
    """A copy of the Q/DQ `model` where only the nodes named in `keep` read through their Q/DQ pairs; every other
    node reads the float tensor the pair stands for, and pairs nobody reads any more are dropped."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m.graph)
    floats: dict[str, str] = {}  # DequantizeLinear output -> the float tensor it stands for
    for node in m.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            floats[node.output[0]] = q.input[0]
        elif g.is_constant(node.input[0]):
            floats[node.output[0]] = _dequantized(m, g, node)
    for node in m.graph.node:
        if node.op_type in _QDQ or node.name in keep:
            continue
        for j, name in enumerate(node.input):
            if name in floats:
                node.input[j] = floats[name]
    _drop_dead(m)
    return m


def _dequantized(m: Any, g: Graph, dq: Any) -> str:
    """An initializer holding the value of a DequantizeLinear on constants (a weight stored as int8); its name."""
    from onnx import numpy_helper

    x = g.value(dq.input[0])
    scale = g.value(dq.input[1])
    zp = g.value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if x is None or scale is None:
        raise EvaluationError(f"DequantizeLinear '{dq.name}' reads a constant whose value cannot be read; the "
                              "Q/DQ model's per-layer sensitivity needs it.")
    shape = [1] * x.ndim
    if scale.ndim == 1 and x.ndim > 0:
        shape[int(attr(dq, "axis", 1)) % x.ndim] = -1
    zero = np.zeros((), np.float32) if zp is None else zp.astype(np.float32).reshape(shape if zp.ndim else ())
    value = (x.astype(np.float32) - zero) * scale.astype(np.float32).reshape(shape if scale.ndim else ())
    name = f"{dq.output[0]}__qp_float"
    m.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return name


def _drop_dead(m: Any) -> None:
    """Remove the Q/DQ nodes and initializers no node or graph output reads any more."""
    while True:
        read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        dead = [n for n in m.graph.node if n.op_type in _QDQ and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            m.graph.node.remove(n)
    read = {i for n in m.graph.node for i in n.input}
    for t in [t for t in m.graph.initializer if t.name not in read]:
        m.graph.initializer.remove(t)


def qdq_layer_sensitivity(
    model_path: str | os.PathLike[str],
    qdq_model: str | os.PathLike[str],
    eval_dataset: Any,
    *,
    output: str | None = None,
    max_samples: int | None = 64,
    one_at_a_time: bool | int = True,
    metric: str = "sqnr_db",
    batch_size: int = 8,
    task: TaskSpec = CLASSIFICATION,
    output_axis: int = 0,
) -> tuple[LayerSensitivity, ...]:
    """Per-layer sensitivity of `qdq_model` against the FP32 `model_path` on the first `max_samples` samples of
    `eval_dataset` (the module docstring says how); worst first."""
    fp32 = load_onnx(model_path)
    qdq = load_onnx(qdq_model)
    name_nodes(qdq.graph)
    outputs = tensor_outputs(fp32)
    out = output or outputs[0]
    if out not in outputs or out not in {o.name for o in qdq.graph.output}:
        raise EvaluationError(f"output '{out}' is not an output of both {model_path} and {qdq_model}; the "
                              "per-layer sensitivity compares that output.")
    feeds, labels = first_samples(eval_dataset, batch_size, max_samples, needed_by="the per-layer sensitivity needs")
    ref = run_output(ort_session(fp32), feeds, out, output_axis)
    nodes = quantized_nodes(qdq)
    by_name = {n.name: n for n in qdq.graph.node}
    tensors = {n: by_name[n].output[0] for n in nodes if by_name[n].output}
    acc = _accumulated(fp32, qdq, feeds, sorted(set(tensors.values())))
    node_db = {n: acc.get(tensors.get(n, ""), math.nan) for n in nodes}
    count = len(nodes) if one_at_a_time is True else int(one_at_a_time or 0)
    order = sorted(nodes, key=lambda n: (node_db[n] if not math.isnan(node_db[n]) else math.inf))[:max(0, count)]
    measured, tie = _one_at_a_time(qdq, order, feeds, out, ref, labels, metric, task, output_axis)
    depthwise = depthwise_convs(qdq)
    rows = [LayerSensitivity(node=n, op_type=by_name[n].op_type, tensor=tensors.get(n, ""),
                             sqnr_db=finite_or_none(node_db[n]),
                             output_metric=finite_or_none(measured[n]) if n in measured else None,
                             metric_name=metric, output_sqnr_db=tie_said(metric, tie.get(n)),
                             num_samples=int(ref.shape[0]), depthwise=n in depthwise) for n in nodes]
    return worst_first(rows, measured, tie, node_db)


def _accumulated(fp32: Any, qdq: Any, feeds: Sequence[Mapping[str, np.ndarray]], tensors: Sequence[str]
                 ) -> dict[str, float]:
    """SQNR (dB) of each tensor the two models share, Q/DQ run against FP32 run, summed over the batches."""
    in_fp32 = {o for n in fp32.graph.node for o in n.output}
    tensors = [t for t in tensors if t in in_fp32]
    if not tensors:
        return {}
    a_sess = ort_session(expose_outputs(fp32, tensors), optimize=False)
    b_sess = ort_session(expose_outputs(qdq, tensors), int8=True, optimize=False)
    sig = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    sums = SquaredSums()
    for f in feeds:
        for t, x, y in zip(tensors, a_sess.run(tensors, dict(f)), b_sess.run(tensors, dict(f)), strict=True):
            sig[t] += sums.signal(x)
            noise[t] += sums.error(y, x)
    return {t: sqnr_from_sums(sig[t], noise[t]) for t in tensors}


def _one_at_a_time(qdq: Any, nodes: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], output: str,
                   ref: np.ndarray, labels: np.ndarray | None, metric: str, task: TaskSpec, output_axis: int
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """The output metric with only each node's pairs kept, and the output SQNR as tie-break for agreement counts."""
    measured: dict[str, float] = {}
    tie: dict[str, float] = {}
    base = keep_only_pairs(qdq, ())
    valid = task.valid_of(feeds)  # evaluate.valid_mask: the positions that count
    for at in range(0, len(nodes), CANDIDATES_PER_RUN):
        group = nodes[at:at + CANDIDATES_PER_RUN]
        outs = run_candidates(base, [keep_only_pairs(qdq, {n}) for n in group], feeds, output, output_axis=output_axis)
        for n, o in zip(group, outs, strict=True):
            measured[n] = score(metric, o, ref, labels, task, valid)
            tie[n] = score("sqnr_db", o, ref, None, task, valid) if metric in COUNTED_SCORES else 0.0
    return measured, tie
