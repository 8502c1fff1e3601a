"""Where Q/DQ goes: the inputs of the weighted ops, the skip input of residual Adds, never a sentinel.

Q/DQ placement follows TensorRT's "Q/DQ layer placement recommendations" (developer guide, explicit
quantization): quantize the *inputs* of the weighted ops (Conv, ConvTranspose, Gemm, MatMul) and
never their outputs, so TensorRT fuses DQ -> op -> (next Q) into one INT8 kernel; quantize the skip
input of a residual Add that follows a Conv, so TensorRT fuses the Add into the Conv's epilogue; leave
numerically sensitive ops (Softmax, LayerNormalization and its decomposed form, normalising
reductions, Resize ...) in float. Attention masks written as huge constants (`Where(mask, 0, -3.4e38)`)
never get a Q/DQ and never give a tensor its scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.onnxgraph import Graph, attr, decomposed_layernorm_nodes
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.types import FloatNode, QuantizedNode

__all__ = ["AMAX_LIMIT", "QUANTIZABLE_OPS", "SENTINEL_ABS", "TAINT_STOPS", "Plan", "plan_qdq", "sentinel_tensors",
           "weight_axis"]

#: Weighted ops whose inputs get Q/DQ (TensorRT runs them in INT8 when both inputs are quantized).
QUANTIZABLE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: A constant at least this large (or infinite) is a sentinel (attention mask "-inf", -3.4e38, -1e9),
#: not data: tensors it flows into are never quantized.
SENTINEL_ABS = 1e8
#: A calibrated amax this large can only come from such sentinels; it would turn every real value to 0.
AMAX_LIMIT = 1e8
#: Ops through which a sentinel does not reach the output values (or that end the masked path).
TAINT_STOPS = frozenset({
    "Softmax", "LogSoftmax", "Hardmax", "Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero",
})

#: Why a node asked to stay in float (options.keep_float_nodes: the config's list, or the accuracy fallback's) did.
KEPT_AS_ASKED = "kept in float as asked (keep_float_nodes, or the accuracy fallback)"


def sentinel_tensors(g: Graph) -> dict[str, str]:
    """Tensors carrying sentinel values (masks of -3.4e38 ...): name -> the constant they come from.

    A sentinel spreads through every op to its outputs, except through the ops in `TAINT_STOPS`
    (Softmax turns the masked scores into ordinary probabilities), through Clip's bounds and through
    Min/Max against it (they return the other operand).
    """
    tainted: dict[str, str] = {}
    for name in list(g.initializers) + list(g.constant_nodes):
        val = g.value(name)
        if val is None or not np.issubdtype(val.dtype, np.floating) or val.size == 0:
            continue
        if not np.all(np.isfinite(val)) or float(np.max(np.abs(val))) >= SENTINEL_ABS:
            tainted[name] = name
    for node in g.graph.node:
        if node.op_type in TAINT_STOPS or node.op_type == "Constant":
            continue
        ins = list(node.input)
        if node.op_type == "Clip":
            ins = ins[:1]
        elif node.op_type in ("Min", "Max"):
            ins = [i for i in ins if not (i in tainted and g.is_constant(i))]
        src = next((tainted[i] for i in ins if i in tainted), None)
        if src is not None:
            for o in node.output:
                tainted[o] = src
    return tainted



@dataclasses.dataclass
class Plan:
    """Where Q/DQ goes: (node, input index) -> activation amax, or -> weight axis (None: per tensor)."""

    acts: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)
    weights: dict[tuple[str, int], int | None] = dataclasses.field(default_factory=dict)
    quantized: list[QuantizedNode] = dataclasses.field(default_factory=list)
    floats: list[FloatNode] = dataclasses.field(default_factory=list)
    eligible: int = 0


def weight_axis(node: Any, idx: int, rank: int) -> int | None:
    """Per-output-channel axis of a constant input, or None where only per-tensor makes sense."""
    op = node.op_type
    if rank < 2:
        return None
    if op == "Conv" and idx == 1:
        return 0  # [O, I/g, k...]
    if op == "ConvTranspose" and idx == 1:
        return 1  # [I, O/g, k...]
    if op == "Gemm" and idx == 1:
        return 0 if attr(node, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    if op == "MatMul" and idx == 1:
        return rank - 1  # [..., K, N]: output channels are the last axis
    return None


def plan_qdq(g: Graph, amax: Mapping[str, float], opts: QuantizeOptions, per_channel: bool) -> Plan:
    plan = Plan()
    sentinels = sentinel_tensors(g)
    ln_nodes = decomposed_layernorm_nodes(g)
    keep_ops = set(opts.keep_float_ops)

    def act_amax(name: str) -> tuple[float | None, str]:
        if name in sentinels:
            return None, f"input '{name}' carries the sentinel constant '{sentinels[name]}' (attention mask)"
        if name not in amax:
            return None, f"no calibration amax for input '{name}'"
        a = float(amax[name])
        if not np.isfinite(a) or a >= AMAX_LIMIT:
            return None, f"calibrated amax {a:.3g} of '{name}' can only come from sentinel values"
        if a <= 0.0:
            return None, f"calibrated amax of '{name}' is {a} (the tensor is constant zero)"
        return a, ""

    for node in g.graph.node:
        op = node.op_type
        if op in keep_ops and op not in QUANTIZABLE_OPS:
            plan.floats.append(FloatNode(node.name, op, "numerically sensitive op kept in float"))
            continue
        if node.name in ln_nodes:
            plan.floats.append(FloatNode(node.name, op, "part of a decomposed LayerNorm kept in float"))
            continue
        if op not in QUANTIZABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if op in keep_ops:
            plan.floats.append(FloatNode(node.name, op, f"op type {op} kept in float by configuration"))
            continue
        idxs = [0, 1]
        if len(node.input) < 2:
            continue
        consts = [g.is_constant(node.input[i]) for i in idxs]
        if all(consts):
            plan.floats.append(FloatNode(node.name, op, "all inputs are constant (fold constants first)"))
            continue
        if op == "MatMul" and not any(consts) and not opts.quantize_activation_matmul:
            plan.floats.append(FloatNode(node.name, op, "activation x activation MatMul left float by option"))
            continue
        acts: dict[int, float] = {}
        weights: dict[int, int | None] = {}
        reason = ""
        for i, is_const in zip(idxs, consts, strict=True):
            name = node.input[i]
            if is_const:
                val = g.value(name)
                if val is None or val.dtype != np.float32:
                    reason = f"constant input '{name}' is not float32"
                    break
                axis = weight_axis(node, i, val.ndim) if per_channel else None
                weights[i] = axis
            else:
                a, why = act_amax(name)
                if a is None:
                    reason = why
                    break
                acts[i] = a
        if reason:
            plan.floats.append(FloatNode(node.name, op, reason))
            continue
        plan.eligible += 1
        if node.name in opts.keep_float_nodes:
            plan.floats.append(FloatNode(node.name, op, KEPT_AS_ASKED))
            continue
        if opts.only_nodes is not None and node.name not in opts.only_nodes:
            continue
        for i, a in acts.items():
            plan.acts[(node.name, i)] = a
        for i, ax in weights.items():
            plan.weights[(node.name, i)] = ax
        waxis = next((ax for ax in weights.values()), None)
        plan.quantized.append(QuantizedNode(node.name, op, tuple(node.input[i] for i in idxs), waxis))

    if opts.quantize_residual_add and "Add" not in keep_ops:
        _plan_residual_adds(g, plan, opts, act_amax, ln_nodes)
    return plan


def _plan_residual_adds(g: Graph, plan: Plan, opts: QuantizeOptions, act_amax: Any, ln_nodes: set[str]) -> None:
    """Q/DQ on the skip input of Adds that join a Conv branch and a skip connection.

    TensorRT fuses Conv + BatchNorm + Add (+ ReLU) into one kernel whose precision is taken from the
    Add's *other* input: quantizing that skip input lets the fused kernel run and write INT8. The Conv
    branch itself is not quantized at the Add (a Q there would split the fusion).
    """
    convs = {"Conv", "ConvTranspose"}
    eligible_convs = {n.name for n in g.graph.node if n.op_type in convs}

    def conv_producer(t: str) -> Any | None:
        p = g.producer.get(t)
        if p is not None and p.op_type == "BatchNormalization":  # unfolded BN sits between Conv and Add
            p = g.producer.get(p.input[0])
        return p if p is not None and p.op_type in convs and p.name in eligible_convs else None

    for node in g.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or node.name in ln_nodes:
            continue
        a, b = node.input
        if g.is_constant(a) or g.is_constant(b) or a == b:
            continue
        pa, pb = conv_producer(a), conv_producer(b)
        if pa is None and pb is None:
            continue
        if pa is not None and pb is not None:
            # Both branches are convolutions: the later one is the branch TensorRT fuses the Add into.
            skip_idx = 0 if g.position[pa.name] < g.position[pb.name] else 1
        else:
            skip_idx = 1 if pa is not None else 0
        skip = node.input[skip_idx]
        amax_v, why = act_amax(skip)
        if amax_v is None:
            plan.floats.append(FloatNode(node.name, "Add", f"residual Add left float: {why}"))
            continue
        plan.eligible += 1
        if node.name in opts.keep_float_nodes:
            plan.floats.append(FloatNode(node.name, "Add", KEPT_AS_ASKED))
            continue
        if opts.only_nodes is not None and node.name not in opts.only_nodes:
            continue
        plan.acts[(node.name, skip_idx)] = amax_v
        plan.quantized.append(QuantizedNode(node.name, "Add", (skip,), None))
