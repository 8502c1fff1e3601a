"""What a model computes in, for `quantpipe inspect`: precision per op, Q/DQ nodes and their scales, FP16
casts, and what quantpipe recorded in the model's metadata.

Works on any valid ONNX model (FP32, FP16, Q/DQ INT8), read from the graph alone. The precision of a
node is the precision a Q/DQ-aware runtime computes it in:
- int8: it reads a DequantizeLinear output, and each of its other non-constant inputs comes from a
  DequantizeLinear or from an int8 node (the Q/DQ convention: TensorRT and ONNX Runtime fuse DQ -> op -> Q
  into an integer kernel; a residual Add with one Q/DQ input fuses into the int8 Conv that feeds it);
- fp16 / fp32: otherwise, by the element type of its first floating-point output (shape inference);
- other: a node with no floating-point output (Shape, integer arithmetic ...).
QuantizeLinear / DequantizeLinear and Cast nodes convert between precisions; they are counted apart.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from onnx import TensorProto

from quantpipe.onnxgraph import Graph
from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG

__all__ = ["PRECISIONS", "QdqSummary", "ModelPrecision", "describe_precision", "int8_run_lines"]

PRECISIONS = ("fp32", "fp16", "int8", "other")
"""The columns of `ModelPrecision.by_op`, in display order."""
_FLOAT_TYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "fp16",
                TensorProto.DOUBLE: "fp32"}
_CONVERSIONS = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast"})
_METADATA_PREFIX = "quantpipe."


@dataclasses.dataclass(frozen=True)
class QdqSummary:
    """The model's QuantizeLinear / DequantizeLinear nodes and their scales."""

    quantize: int
    dequantize: int
    per_tensor: int
    """Q/DQ nodes with one scale."""
    per_channel: int
    """Q/DQ nodes with a scale per channel (the `axis` attribute)."""
    weight_dequantize: int
    """DequantizeLinear nodes that read a stored (already quantized) weight."""
    weight_scales: tuple[float, float] | None
    """(min, max) of the scales of stored weights (DequantizeLinear of a constant), None without any."""
    activation_scales: tuple[float, float] | None
    """(min, max) of the other Q/DQ scales (activations), None without any."""
    zero_point_types: tuple[str, ...]
    """Element types of the zero points (int8, uint8 ...)."""
    nonzero_zero_points: int
    """Q/DQ nodes whose zero point is not 0 (asymmetric or shifted grids)."""
    zero_point_min: int | None
    zero_point_max: int | None
    """Range of the non-zero zero points (None when every zero point is 0)."""


@dataclasses.dataclass(frozen=True)
class ModelPrecision:
    """How a model computes: nodes per precision, per op type; Q/DQ and casts; quantpipe's metadata."""

    by_op: Mapping[str, Mapping[str, int]]
    """op type -> {precision: node count}, compute nodes only (no Q/DQ, no Cast)."""
    totals: Mapping[str, int]
    """precision -> compute node count."""
    qdq: QdqSummary
    casts_to_fp16: int
    casts_to_fp32: int
    casts_other: int
    quantpipe_metadata: Mapping[str, str]
    """metadata key -> a short description ("12 tensors" for a JSON mapping), for keys quantpipe writes."""

    @property
    def kind(self) -> str:
        """One word for the whole model: int8 (Q/DQ), fp16, fp32 or mixed."""
        if self.qdq.quantize or self.qdq.dequantize:
            return "int8 (Q/DQ)"
        used = [p for p in ("fp32", "fp16") if self.totals.get(p)]
        return used[0] if len(used) == 1 else "mixed fp16/fp32" if used else "no float compute"


def _elem_types(model: Any) -> dict[str, int]:
    types = {}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for i in model.graph.initializer:
        types[i.name] = i.data_type
    return types


def _node_precision(node: Any, dq_outputs: set[str], int8_outputs: set[str], g: Graph,
                    types: Mapping[str, int]) -> str:
    data_inputs = [i for i in node.input if i and not g.is_constant(i)]
    if any(i in dq_outputs for i in data_inputs) and all(i in dq_outputs or i in int8_outputs for i in data_inputs):
        return "int8"
    for o in node.output:
        if types.get(o) in _FLOAT_TYPES:
            return _FLOAT_TYPES[types[o]]
    return "other"


def _qdq_summary(model: Any, g: Graph) -> QdqSummary:
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    scales: dict[str, list[np.ndarray]] = {"weight": [], "activation": []}
    zps, zp_types = [], set()
    per_channel = weights = 0
    for n in qdq:
        is_weight = n.op_type == "DequantizeLinear" and g.is_constant(n.input[0])
        weights += is_weight
        scale = g.value(n.input[1]) if len(n.input) > 1 else None
        if scale is not None and scale.size > 1:
            per_channel += 1
        if scale is not None and scale.size:
            scales["weight" if is_weight else "activation"].append(np.asarray(scale, dtype=np.float64).ravel())
        zp = g.value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None:
            zp_types.add(zp.dtype.name)
            if np.any(zp != 0):
                zps.append(np.asarray(zp, dtype=np.int64).ravel())
    all_zps = np.concatenate(zps) if zps else np.zeros(0, dtype=np.int64)
    return QdqSummary(
        quantize=sum(n.op_type == "QuantizeLinear" for n in qdq),
        dequantize=sum(n.op_type == "DequantizeLinear" for n in qdq),
        per_tensor=len(qdq) - per_channel, per_channel=per_channel, weight_dequantize=weights,
        weight_scales=_range(scales["weight"]), activation_scales=_range(scales["activation"]),
        zero_point_types=tuple(sorted(zp_types)), nonzero_zero_points=len(zps),
        zero_point_min=int(all_zps.min()) if all_zps.size else None,
        zero_point_max=int(all_zps.max()) if all_zps.size else None,
    )


def _range(arrays: list[np.ndarray]) -> tuple[float, float] | None:
    if not arrays:
        return None
    values = np.concatenate(arrays)
    return float(values.min()), float(values.max())


def _metadata(model: Any) -> dict[str, str]:
    out = {}
    for p in model.metadata_props:
        if not p.key.startswith(_METADATA_PREFIX):
            continue
        try:
            value = json.loads(p.value)
        except ValueError:
            value = p.value
        if isinstance(value, Mapping | list):
            out[p.key] = f"{len(value)} tensor{'s' if len(value) != 1 else ''}" if p.key.endswith("_tensors") \
                else f"{len(value)} entr{'ies' if len(value) != 1 else 'y'}"
        else:
            text = str(value)
            out[p.key] = text if len(text) <= 60 else text[:57] + "..."
    return out


def describe_precision(model: Any) -> ModelPrecision:
    """Precision per op, Q/DQ nodes and scales, casts and quantpipe metadata of a (shape-inferred) ONNX model.

    Pass the model after `onnx.shape_inference.infer_shapes` (as `model.read_model_spec` returns it): the
    precision of a float node is read from its output's inferred element type.
    """
    g = Graph(model.graph)  # constants decoded on demand: the scales and zero points, not every weight
    types = _elem_types(model)
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8_outputs: set[str] = set()
    by_op: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    casts = collections.Counter()
    for n in model.graph.node:
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), 0)
            casts["fp16" if to == TensorProto.FLOAT16 else "fp32" if to == TensorProto.FLOAT else "other"] += 1
        if n.op_type in _CONVERSIONS or n.op_type == "Constant":
            continue
        precision = _node_precision(n, dq_outputs, int8_outputs, g, types)
        if precision == "int8":
            int8_outputs.update(n.output)
        by_op[n.op_type][precision] += 1
    totals: collections.Counter[str] = collections.Counter()
    for counts in by_op.values():
        totals.update(counts)
    order = sorted(by_op, key=lambda op: (-sum(by_op[op].values()), op))
    return ModelPrecision(
        by_op={op: {p: by_op[op][p] for p in PRECISIONS if by_op[op][p]} for op in order},
        totals={p: totals[p] for p in PRECISIONS if totals[p]},
        qdq=_qdq_summary(model, g),
        casts_to_fp16=casts["fp16"], casts_to_fp32=casts["fp32"], casts_other=casts["other"],
        quantpipe_metadata=_metadata(model),
    )


def int8_run_lines() -> tuple[str, str]:
    """What a Q/DQ INT8 model is for, and the ONNX Runtime settings that reproduce quantpipe's numbers.

    For whoever takes the file elsewhere: in ONNX Runtime's default CPU session the same model computes
    something else on CPUs without VNNI (uint8 kernels whose VPMADDUBSW saturates; see ortsession.py).
    """
    config = ", ".join(f"{k}={v}" for k, v in ORT_INT8_SESSION_CONFIG.items())
    return (
        "Made for TensorRT: explicit quantization, the Q/DQ scales are the INT8 scales (TensorRT 8.6-10: build "
        "with the INT8 flag, trtexec --int8; 11: as is); no calibrator, no cache.",
        f"On ONNX Runtime CPU set the session config entry {config}: quantpipe's evaluation runs so, at the "
        "default graph optimizations; with optimizations off (ORT_DISABLE_ALL) the Q/DQ arithmetic is exact, "
        "as quantpipe's quantizer measures it. Without it, ONNX Runtime runs uint8 kernels that saturate on "
        "CPUs without VNNI, and the model computes something else.",
    )
