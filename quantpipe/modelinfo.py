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

Q/DQ models from other tools read the same way. NVIDIA ModelOpt (`modelopt.onnx.quantization`, through ONNX
Runtime's QDQ quantizer with `AddQDQPairToWeight` and `DedicatedQDQPair`) keeps weights in float behind a
QuantizeLinear -> DequantizeLinear pair (per output channel), gives every consumer its own pair, writes FP16
scales when its `high_precision_dtype` is fp16, stores int8 weights behind a lone DequantizeLinear after its
`qdq_to_dq`, and writes INT4 / FP8 Q/DQ as TensorRT custom ops in the `trt` domain (`TRT_INT4QuantizeLinear`
...). All of these count as Q/DQ here; a node reading only dequantized inputs computes in the quantized type
(int8, fp8 or int4, from the zero point's or the custom op's type).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from onnx import TensorProto

from quantpipe.onnxgraph import QDQ_OPS, QUANTIZED_OPS, RECURRENT_OPS, Graph, node_subgraphs
from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG

__all__ = ["PRECISIONS", "QdqSummary", "ModelPrecision", "WeightShare", "describe_precision", "int8_run_lines",
           "precision_lines", "qdq_role", "weight_share", "weight_share_line", "mostly_float_warning"]

PRECISIONS = ("fp32", "fp16", "int8", "fp8", "int4", "other")
"""The columns of `ModelPrecision.by_op`, in display order."""
_QUANTIZED = ("int8", "fp8", "int4")
_FLOAT_TYPES: dict[int, str] = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "fp16",
                TensorProto.DOUBLE: "fp32"}
_QDQ_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft", "trt"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
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
    weight_quantize: int = 0
    """QuantizeLinear nodes on float weights: weights kept in float behind a Q -> DQ pair (ModelOpt's layout)."""
    scale_types: tuple[str, ...] = ()
    """Element types of the scales (float32, float16 ...)."""
    quantized_types: tuple[str, ...] = ()
    """What the Q/DQ nodes quantize to (int8, uint8, int4, float8e4m3fn ...)."""


@dataclasses.dataclass(frozen=True)
class WeightShare:
    """A model's weight values (stored tensors of 2 axes or more that a node computes with: a lookup table only
    Gather reads, an embedding, is left out) stored quantized and in float."""

    quantized: int
    """Values stored in an integer type behind a DequantizeLinear, or in float behind a QuantizeLinear."""
    in_float: int
    float_by_op: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """The float values by the op type that reads them (LSTM, Conv ...), the largest first."""

    @property
    def fraction(self) -> float | None:
        """The quantized share of the weight values; None for a model without weights."""
        total = self.quantized + self.in_float
        return self.quantized / total if total else None


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
    quantized_layers: tuple[str, ...] = ()
    """Compute nodes in a quantized precision (int8, fp8, int4), by name, in graph order."""
    custom_ops: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """'domain::op' -> count, for ops outside the standard ONNX / ONNX Runtime domains (e.g. `trt::`)."""
    weights: WeightShare | None = None

    @property
    def integer_ops(self) -> dict[str, int]:
        """ONNX Runtime's integer operators (QOperator format, dynamic quantization) by op type: not Q/DQ."""
        return {op: sum(c.values()) for op, c in self.by_op.items() if op in INTEGER_OPS}

    @property
    def kind(self) -> str:
        """One word for the whole model: int8 (Q/DQ), int8 (integer operators), fp16, fp32 or mixed."""
        if self.integer_ops:
            return "int8 (onnxruntime integer operators, not Q/DQ)"
        if self.qdq.quantize or self.qdq.dequantize:
            used = [p for p in _QUANTIZED if self.totals.get(p)]
            return f"{'/'.join(used) or 'int8'} (Q/DQ)"
        used = [p for p in ("fp32", "fp16") if self.totals.get(p)]
        return used[0] if len(used) == 1 else "mixed fp16/fp32" if used else "no float compute"


def _elem_types(model: Any) -> dict[str, int]:
    types = {}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for i in model.graph.initializer:
        types[i.name] = i.data_type
    return types


INTEGER_OPS = (QUANTIZED_OPS - QDQ_OPS) | frozenset({
    "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearConcat", "QGemm", "DynamicQuantizeMatMul"})
"""ONNX Runtime's integer operators (standard and com.microsoft): a model quantized without Q/DQ pairs. The ones
quantpipe refuses as input (`onnxgraph.QUANTIZED_OPS` without Q/DQ) and the contrib ops beside them."""


def qdq_role(node: Any) -> str | None:
    """'q' for a quantize node, 'dq' for a dequantize node (ONNX, ONNX Runtime's contrib and TensorRT's `trt::`
    custom Q/DQ ops such as TRT_INT4DequantizeLinear), else None."""
    if node.domain not in _QDQ_DOMAINS or node.op_type == "DynamicQuantizeLinear":  # ORT's dynamic quantization
        return None
    if node.op_type.endswith("DequantizeLinear"):
        return "dq"
    return "q" if node.op_type.endswith("QuantizeLinear") else None


def _type_name(data_type: int) -> str:
    """TensorProto element type -> numpy-style name: float32, float16, int8, int4, float8e4m3fn ..."""
    name = TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _quantized_type(node: Any, const_types: Mapping[str, int]) -> str:
    """What a Q/DQ node quantizes to: its zero point's type, else its custom op's name, else ONNX's uint8 default."""
    if len(node.input) > 2 and node.input[2] in const_types:
        return _type_name(const_types[node.input[2]])
    op = node.op_type.upper()
    for key, name in (("INT4", "int4"), ("FP8", "float8e4m3fn"), ("INT8", "int8")):
        if key in op:
            return name
    attr = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    return _type_name(attr) if attr else "uint8"


def _precision_of(quantized_type: str) -> str:
    return "int4" if "int4" in quantized_type else "fp8" if "float8" in quantized_type else "int8"


def _node_precision(node: Any, dq_outputs: Mapping[str, str], quant_outputs: Mapping[str, str], g: Graph,
                    types: Mapping[str, int]) -> str:
    data_inputs = [i for i in node.input if i and not g.is_constant(i)]
    if any(i in dq_outputs for i in data_inputs) and all(i in dq_outputs or i in quant_outputs for i in data_inputs):
        got = {dq_outputs.get(i) or quant_outputs[i] for i in data_inputs}
        return next(p for p in ("int4", "fp8", "int8") if p in got)  # the narrowest input decides the kernel
    for o in node.output:
        if types.get(o) in _FLOAT_TYPES:
            return _FLOAT_TYPES[types[o]]
    return "other"


def _const_types(model: Any) -> dict[str, int]:
    out = {i.name: i.data_type for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                out[n.output[0]] = value.data_type
    return out


def _scale_values(g: Graph, name: str) -> np.ndarray | None:
    try:
        value = g.value(name)
    except Exception:  # an element type numpy cannot hold: the scale is still counted, without its range
        return None
    return None if value is None else np.asarray(value, dtype=np.float64).ravel()


def _qdq_summary(model: Any, g: Graph, const_types: Mapping[str, int]) -> QdqSummary:
    qdq = [n for n in model.graph.node if qdq_role(n)]
    weight_q = {n.output[0] for n in qdq if qdq_role(n) == "q" and g.is_constant(n.input[0])}
    scales: dict[str, list[np.ndarray]] = {"weight": [], "activation": []}
    zps, zp_types, scale_types, q_types = [], set(), set(), set()
    per_channel = weights = 0
    for n in qdq:
        stored = qdq_role(n) == "dq" and g.is_constant(n.input[0])
        weights += stored
        is_weight = stored or g.is_constant(n.input[0]) or n.input[0] in weight_q
        q_types.add(_quantized_type(n, const_types))
        if len(n.input) > 1 and n.input[1] in const_types:
            scale_types.add(_type_name(const_types[n.input[1]]))
        scale = _scale_values(g, n.input[1]) if len(n.input) > 1 else None
        if scale is not None and scale.size > 1:
            per_channel += 1
        if scale is not None and scale.size:
            scales["weight" if is_weight else "activation"].append(scale)
        if len(n.input) > 2 and n.input[2] in const_types:
            zp_types.add(_type_name(const_types[n.input[2]]))
            zp = _scale_values(g, n.input[2])
            if zp is not None and np.any(zp != 0):
                zps.append(zp.astype(np.int64))
    all_zps = np.concatenate(zps) if zps else np.zeros(0, dtype=np.int64)
    return QdqSummary(
        quantize=sum(qdq_role(n) == "q" for n in qdq),
        dequantize=sum(qdq_role(n) == "dq" for n in qdq),
        per_tensor=len(qdq) - per_channel, per_channel=per_channel, weight_dequantize=weights,
        weight_scales=_range(scales["weight"]), activation_scales=_range(scales["activation"]),
        zero_point_types=tuple(sorted(zp_types)), nonzero_zero_points=len(zps),
        zero_point_min=int(all_zps.min()) if all_zps.size else None,
        zero_point_max=int(all_zps.max()) if all_zps.size else None,
        weight_quantize=len(weight_q), scale_types=tuple(sorted(scale_types)), quantized_types=tuple(sorted(q_types)),
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
    const_types = _const_types(model)
    dq_outputs = {o: _precision_of(_quantized_type(n, const_types))
                  for n in model.graph.node if qdq_role(n) == "dq" for o in n.output}
    quant_outputs: dict[str, str] = {}
    layers: list[str] = []
    by_op: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    casts: collections.Counter[str] = collections.Counter()
    custom: collections.Counter[str] = collections.Counter()
    for i, n in enumerate(model.graph.node):
        if n.domain not in _STANDARD_DOMAINS:
            custom[f"{n.domain}::{n.op_type}"] += 1
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), 0)
            casts["fp16" if to == TensorProto.FLOAT16 else "fp32" if to == TensorProto.FLOAT else "other"] += 1
        if qdq_role(n) or n.op_type in ("Cast", "Constant"):
            continue
        precision = _node_precision(n, dq_outputs, quant_outputs, g, types)
        if precision in _QUANTIZED:
            quant_outputs.update({o: precision for o in n.output})
            layers.append(n.name or f"{n.op_type}_{i}")
        by_op[n.op_type][precision] += 1
    totals: collections.Counter[str] = collections.Counter()
    for counts in by_op.values():
        totals.update(counts)
    order = sorted(by_op, key=lambda op: (-sum(by_op[op].values()), op))
    return ModelPrecision(
        by_op={op: {p: by_op[op][p] for p in PRECISIONS if by_op[op][p]} for op in order},
        totals={p: totals[p] for p in PRECISIONS if totals[p]},
        qdq=_qdq_summary(model, g, const_types),
        casts_to_fp16=casts["fp16"], casts_to_fp32=casts["fp32"], casts_other=casts["other"],
        quantpipe_metadata=_metadata(model), quantized_layers=tuple(layers), custom_ops=dict(custom),
        weights=weight_share(model),
    )


def weight_share(model: Any) -> WeightShare:
    """How many of `model`'s weight values are stored quantized (WeightShare), read from the graph and the tensors'
    dims alone (external data is not read). Weights that nodes inside subgraphs read count as float under
    'inside If' (the main-graph node holding them; silero VAD's LSTM inside an If: "100 % in int8" where 43 % stayed
    float; found probing)."""
    readers: dict[str, list[tuple[Any, str]]] = collections.defaultdict(list)
    stored: list[tuple[str, Any, int]] = []

    def visit(graph: Any, holder: str) -> None:
        stored.extend((t.name, t.dims, t.data_type) for t in graph.initializer)
        stored.extend((n.output[0], a.t.dims, a.t.data_type) for n in graph.node if n.op_type == "Constant"
                      and n.output for a in n.attribute if a.name == "value" and a.t.dims)
        for n in graph.node:
            for name in n.input:
                readers[name].append((n, holder))
            for sub in node_subgraphs(n):
                visit(sub, holder or f"inside {n.op_type}")

    visit(model.graph, "")
    quantized, floats = 0, collections.Counter[str]()
    for name, dims, dtype in stored:
        users = [u for u, _ in readers.get(name, [])]
        if len(dims) < 2 or not users or all(u.op_type == "Gather" for u in users):
            continue
        size = int(np.prod(dims, dtype=np.int64))
        roles = {qdq_role(u) for u in users}
        if "q" in roles or ("dq" in roles and dtype not in _FLOAT_TYPES):  # float behind a Q, int8 behind a DQ
            quantized += size
        elif dtype in _FLOAT_TYPES:
            first, holder = readers[name][0]
            floats[holder or first.op_type] += size
    return WeightShare(quantized, sum(floats.values()), dict(floats.most_common()))


def weight_share_line(share: WeightShare) -> str | None:
    """'int8 weights: 95 % of 2.1M values; float: LSTM 1.9M, ...' (None for a model without weights)."""
    if share.fraction is None:
        return None
    floats = _float_ops(share)
    return (f"weights stored quantized: {100 * share.fraction:.0f} % of {_count(share.quantized + share.in_float)} values"
            + (f"; in float: {floats}" if floats else ""))


def mostly_float_warning(share: WeightShare, model: str, kept: int = 0) -> str | None:
    """What to say where under half of an INT8 model's weight values are stored quantized (an LSTM's weights stay in
    float: found probing, where the report said only '1 node(s) got Q/DQ'); None otherwise. `kept`: the layers the
    accuracy fallback kept in float, said as a cause."""
    if share.fraction is None or share.fraction >= 0.5:
        return None
    floats = _float_ops(share)
    recurrent = [op for op in share.float_by_op if op in RECURRENT_OPS]
    return (f"INT8 model {model}: only {100 * share.fraction:.0f} % of its {_count(share.quantized + share.in_float)} weight "
            f"values are stored in int8; in float: {floats}"
            + (f" ({'/'.join(recurrent)} weights: quantpipe quantizes the weights of Conv, ConvTranspose, Gemm and "
               f"MatMul, not recurrent layers)" if recurrent else "")
            + (f"; the accuracy fallback kept {kept} layer(s) in float" if kept else "")
            + ". The INT8 variant computes mostly in float: expect little gain in size or speed.")


def _float_ops(share: WeightShare) -> str:
    """'LSTM 1.4M, Conv 18.6k': the four op types holding the most float weight values."""
    return ", ".join(f"{op} {_count(n)}" for op, n in list(share.float_by_op.items())[:4])


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def precision_lines(info: ModelPrecision) -> list[str]:
    """Q/DQ, scales, casts and quantpipe metadata of a `modelinfo.ModelPrecision`, one fact per line."""
    q = info.qdq
    lines = []
    if info.integer_ops:
        lines.append("onnxruntime integer operators (" + ", ".join(f"{op} {n}" for op, n in info.integer_ops.items())
                     + "): quantized by onnxruntime's quantize_dynamic or QOperator format, for onnxruntime only; "
                     "TensorRT does not run them. quantpipe quantizes FP32 models: pass the original FP32 export.")
    if q.quantize or q.dequantize:
        lines.append(f"Q/DQ: {q.quantize} QuantizeLinear, {q.dequantize} DequantizeLinear (of these "
                     f"{q.quantize + q.dequantize}, {q.per_channel} per-channel and {q.per_tensor} per-tensor; "
                     f"{q.weight_dequantize} DequantizeLinear of stored weights"
                     + (f"; {q.weight_quantize} quantize float weights (Q -> DQ pairs)" if q.weight_quantize else "")
                     + f") to {'/'.join(q.quantized_types) or '?'} with {'/'.join(q.scale_types) or '?'} scales")
        if info.quantized_layers:
            names = ", ".join(info.quantized_layers[:8])
            more = len(info.quantized_layers) - 8
            lines.append(f"quantized layers ({len(info.quantized_layers)}): {names}" + (f" and {more} more" if more > 0 else ""))
        for what, rng in (("weight", q.weight_scales), ("activation", q.activation_scales)):
            if rng is not None:
                lines.append(f"{what} scales: min {rng[0]:.4g}, max {rng[1]:.4g}"
                             + (" (a scale of 0 or below: TensorRT refuses the model; onnxruntime divides by it)"
                                if rng[0] <= 0 else ""))
        zero = (f"{q.nonzero_zero_points} Q/DQ node(s) with a non-zero zero point ({q.zero_point_min} .. {q.zero_point_max})"
                if q.nonzero_zero_points else "all 0")
        lines.append(f"zero points: {'/'.join(q.zero_point_types) or 'none'}; {zero}")
    else:
        lines.append("Q/DQ: none")
    casts = [f"{n} to {p}" for p, n in (("fp16", info.casts_to_fp16), ("fp32", info.casts_to_fp32),
                                        ("another type", info.casts_other)) if n]
    lines.append(f"casts: {', '.join(casts) if casts else 'none'}")
    if (q.quantize or q.dequantize) and info.weights is not None and (line := weight_share_line(info.weights)):
        lines.append(line)
    if info.custom_ops:
        lines.append("custom-domain ops: " + ", ".join(f"{op} {n}" for op, n in info.custom_ops.items()))
    meta = ", ".join(f"{k} ({v})" for k, v in info.quantpipe_metadata.items())
    lines.append(f"quantpipe metadata: {meta}" if meta else "quantpipe metadata: none")
    if (q.quantize or q.dequantize) and not info.integer_ops:
        lines.extend(int8_run_lines())
    return lines


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
