"""Writes the INT8 Q/DQ model (explicit quantization, the way TensorRT wants it) and the FP16 model.

Q/DQ placement follows TensorRT's "Q/DQ layer placement recommendations" (developer guide, explicit
quantization): quantize the *inputs* of the weighted ops (Conv, ConvTranspose, Gemm, MatMul) and
never their outputs, so TensorRT fuses DQ -> op -> (next Q) into one INT8 kernel; quantize the skip
input of a residual Add that follows a Conv, so TensorRT fuses the Add into the Conv's epilogue; leave
numerically sensitive ops (Softmax, LayerNormalization and its decomposed form, normalising
reductions, Resize ...) in float. Weights are stored as int8 initializers followed by a
DequantizeLinear (symmetric, zero point 0, one scale per output channel); activations get a
QuantizeLinear/DequantizeLinear pair with one scale per tensor, scale = amax / 127.

Two traps are guarded explicitly: attention masks written as huge constants (`Where(mask, 0,
-3.4e38)`) never get a Q/DQ and never give a tensor its scale, and models below opset 13 (where
DequantizeLinear has no `axis`) are upgraded or fall back to per-tensor weights, never written invalid.

With per-channel statistics of the calibration data (`collect_channel_stats`), two exact-in-float
corrections run before quantizing: SmoothQuant-style smoothing of MatMul/Gemm inputs with outlier
channels (transformers' LayerNorm and GELU outputs) and bias correction of the quantized weights'
mean error (depthwise convolutions). On ONNX Runtime CPU run the result with
`ORT_INT8_SESSION_CONFIG` (see `ort_session` for why).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import BuildError, ModelError

__all__ = [
    "QUANTIZABLE_OPS",
    "DEFAULT_FLOAT_OPS",
    "DEFAULT_FP16_BLOCKLIST",
    "FP16_MAX",
    "QuantizedNode",
    "FloatNode",
    "QuantizeOptions",
    "QuantizeReport",
    "OutOfRangeValue",
    "Fp16Report",
    "build_qdq_model",
    "write_qdq_model",
    "quantize_model",
    "build_fp16_model",
    "write_fp16_model",
    "load_onnx",
    "save_onnx",
    "name_nodes",
    "ChannelStats",
    "collect_channel_stats",
    "with_calibration_data",
    "tensor_offsets",
    "expose_outputs",
    "ort_session",
    "ORT_INT8_SESSION_CONFIG",
]

log = logging.getLogger(__name__)

#: Weighted ops whose inputs get Q/DQ (TensorRT runs them in INT8 when both inputs are quantized).
QUANTIZABLE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

#: Op types kept in float: numerically sensitive (normalisation, exponentials, divisions), or where an
#: INT8 grid is wrong by construction (Resize coordinates). Q/DQ is never placed on their inputs.
DEFAULT_FLOAT_OPS: frozenset[str] = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization",
    "MeanVarianceNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "Softmax", "LogSoftmax", "Hardmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "Resize", "Upsample", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Gelu", "Div",
    "TopK", "NonMaxSuppression", "RoiAlign", "GridSample",
})

#: Op types kept in FP32 by the FP16 converter: coordinate / index arithmetic that FP16 cannot hold
#: exactly (Resize, Range), ops whose output type comes from an attribute (random generators,
#: EyeLike), and squaring / exponentials that overflow FP16 at moderate inputs (Pow(x, 2) overflows
#: for |x| > 256, which is why a decomposed LayerNorm is also kept in FP32 by pattern).
DEFAULT_FP16_BLOCKLIST: frozenset[str] = frozenset({
    "Resize", "Upsample", "Range", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Multinomial", "Bernoulli", "EyeLike", "NonMaxSuppression", "RoiAlign", "GridSample", "Pow",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "Einsum", "STFT", "DFT",
})

FP16_MAX = 65504.0
#: A constant at least this large (or infinite) is a sentinel (attention mask "-inf", -3.4e38, -1e9),
#: not data: tensors it flows into are never quantized.
_SENTINEL_ABS = 1e8
#: A calibrated amax this large can only come from such sentinels; it would turn every real value to 0.
_AMAX_LIMIT = 1e8
#: Ops through which a sentinel does not reach the output values (or that end the masked path).
_TAINT_STOPS = frozenset({
    "Softmax", "LogSoftmax", "Hardmax", "Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero",
})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                      "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "MatMulIntegerToFloat"})
_FLOAT = 1  # TensorProto.FLOAT
_FLOAT16 = 10  # TensorProto.FLOAT16
_LARGE_MODEL_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin for the graph itself


# --------------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class QuantizedNode:
    """A node whose inputs got Q/DQ: which inputs, and the weight's per-channel axis (None: per tensor)."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    weight_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class FloatNode:
    """A node left in float, and why."""

    name: str
    op_type: str
    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel absmax and mean of one activation on the calibration data (channel = `axis`)."""

    tensor: str
    axis: int
    absmax: np.ndarray
    mean: np.ndarray
    num_samples: int


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How `build_qdq_model` places Q/DQ (CLI and pipeline.yaml map onto these)."""

    per_channel: bool = True
    keep_float_nodes: frozenset[str] = frozenset()
    keep_float_ops: frozenset[str] = DEFAULT_FLOAT_OPS
    quantize_residual_add: bool = True
    quantize_activation_matmul: bool = True
    """Quantize MatMuls whose both inputs are activations (attention Q.K^T and P.V): TensorRT's INT8 MHA
    fusion needs them; turn off to keep attention in float."""
    weight_amax_override: Mapping[str, float | Sequence[float]] | None = None
    """Weight tensor name -> amax (a float: per tensor; a sequence: per channel) instead of max |w|."""
    only_nodes: frozenset[str] | None = None
    """Quantize only these nodes (sensitivity analysis); None: every eligible node."""
    channel_stats: Mapping[str, ChannelStats] | None = None
    """Per-channel statistics of the quantized nodes' inputs on the calibration data (`collect_channel_stats`);
    they enable smoothing and bias correction. None: neither is applied."""
    smooth_alpha: float | None = 0.7
    """SmoothQuant migration strength for MatMul / Gemm inputs with outlier channels (None: off)."""
    smooth_min_spread: float = 4.0
    """Smooth an activation only when its largest channel range exceeds the median one by this factor."""
    bias_correction: bool = True
    """Fold the mean output error of the quantized weights (E[(Wq - W) x]) into the float bias."""
    shift_nonnegative: bool = True
    """Post-ReLU / ReLU6 activations of a Conv / Gemm (never negative) are shifted by -amax/2 before their
    symmetric int8 Q/DQ where every reader can take it back: the shift is folded into the producer's and the
    readers' biases (a padded Conv reader reads an explicit Pad with the shifted zero; a residual Add reader is
    balanced through its other branch's conv bias): the same float function, twice the int8 resolution."""
    weight_rounding: str = "nearest"
    """'gptq': weight codes chosen against the layer's inputs on the calibration data (`quantpipe.gptq`);
    'nearest': round to nearest. GPTQ needs `weight_codes` (filled by `with_calibration_data`); without them
    every weight is rounded to nearest."""
    weight_codes: Mapping[str, Any] | None = None
    """Weight name -> `quantpipe.gptq.WeightCodes` (precomputed GPTQ codes); used where they match the weight."""
    split_activations: Mapping[str, int] | str | None = None
    """Activation -> pieces: a post-ReLU / ReLU6 activation of a Conv read by Convs is quantized as K pieces of
    range amax/K (`_split_activations`; K times the resolution, all INT8). 'auto': `with_calibration_data` picks
    the activations whose rounding noise dominates the output (`choose_splits`). None: off."""


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """What `write_qdq_model` did: the nodes it quantized, those it left float and why."""

    model_path: str | None
    output_path: str | None
    opset_before: int
    opset_after: int
    per_channel: bool
    quantized_nodes: tuple[QuantizedNode, ...]
    kept_float: tuple[FloatNode, ...]
    """Quantizable nodes left in float (with the reason) and numerically sensitive nodes kept in float."""
    num_quantizable: int
    """Nodes that would be quantized with nothing kept in float on request (the fallback's denominator)."""
    warnings: tuple[str, ...] = ()
    smoothed_tensors: tuple[str, ...] = ()
    """Activations whose per-channel outliers were moved into the weights (SmoothQuant) before quantizing."""
    bias_corrected: tuple[str, ...] = ()
    """Nodes whose float bias absorbs the mean error of their quantized weights (bias correction)."""
    gptq_rounded: tuple[str, ...] = ()
    """Weights whose int8 codes GPTQ chose (the others are rounded to nearest)."""
    shifted_tensors: tuple[str, ...] = ()
    """Non-negative activations quantized around the middle of their range (`QuantizeOptions.shift_nonnegative`)."""
    split_tensors: tuple[tuple[str, int], ...] = ()
    """Activations quantized in pieces (`QuantizeOptions.split_activations`): (tensor, pieces)."""

    @property
    def quantized_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.quantized_nodes)


@dataclasses.dataclass(frozen=True)
class OutOfRangeValue:
    """A constant with values FP16 cannot hold, and what the converter did with it."""

    tensor: str
    max_abs: float
    count: int
    action: str


@dataclasses.dataclass(frozen=True)
class Fp16Report:
    """What `write_fp16_model` did."""

    model_path: str | None
    output_path: str | None
    io_kept_fp32: bool
    num_fp16_nodes: int
    kept_fp32: tuple[FloatNode, ...]
    out_of_range: tuple[OutOfRangeValue, ...]
    """Initializers / constants with |x| > 65504 (clamped to +-65504 where converted, else kept FP32)."""
    activation_overflow: tuple[tuple[str, float], ...]
    """(tensor, calibrated amax) for activations whose amax exceeds 65504: they overflow in FP16."""
    underflow_values: int
    """Non-zero constant values smaller than FP16's smallest subnormal (2^-24) that become 0."""
    num_casts: int
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- model I/O


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """Load an ONNX model with its external data, or raise ModelError saying what is wrong."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path} does not exist. Pass the path of an FP32 .onnx file.")
    try:
        return onnx.load(os.fspath(path), load_external_data=True)
    except Exception as err:  # protobuf and onnx raise many types; all mean "not a readable model"
        raise ModelError(
            f"model {path} could not be read as ONNX ({type(err).__name__}: {err}). If it uses external data, "
            f"keep the .data file beside it; otherwise export the model again."
        ) from err


def save_onnx(model: Any, out_path: str | os.PathLike[str], *, check: bool = True,
              reference: Any | None = None) -> list[str]:
    """Check `model` and write it atomically (external data when it is too large for one protobuf).

    The checker runs with full_check (strict shape inference). When the FP32 `reference` model fails
    the same full check, the output is held to the plain check instead, and a warning says so.
    Returns the warnings.
    """
    import onnx

    warnings: list[str] = []
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > _LARGE_MODEL_BYTES
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / out_path.name
        data_name = out_path.name + ".data"
        if large:
            onnx.save_model(model, os.fspath(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, os.fspath(tmp))
        if check:
            warnings += _check_written(tmp, large, reference)
        # The data file goes first: the model file, which is what a later run trusts, appears last.
        if large and (Path(tmp_dir) / data_name).exists():
            os.replace(Path(tmp_dir) / data_name, out_path.parent / data_name)
        os.replace(tmp, out_path)
    return warnings


def _check_written(path: Path, large: bool, reference: Any | None) -> list[str]:
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
        return []
    except Exception as err:  # ValidationError, InferenceError ...
        full_err = err
    if reference is not None:
        try:
            ref = reference if not large else None
            if ref is not None:
                onnx.checker.check_model(ref, full_check=True)
        except Exception:  # the FP32 model fails the strict check too: not something we introduced
            try:
                onnx.checker.check_model(os.fspath(path))
            except Exception as err2:
                raise BuildError(f"the model written to {path.name} fails the ONNX checker: {err2}") from err2
            return [f"the FP32 model already fails onnx's full (strict shape inference) check, so the output was "
                    f"held to the plain check ({type(full_err).__name__}: {str(full_err)[:200]})"]
    raise BuildError(
        f"the model written to {path.name} fails onnx.checker.check_model(full_check=True): {full_err}. "
        f"This is a quantpipe bug; please report it with the model's op list (`quantpipe inspect`)."
    ) from full_err


def _opset(model: Any) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def name_nodes(graph: Any) -> None:
    """Give every unnamed node a stable unique name (op type + index), so reports and keep-lists can name it."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


# --------------------------------------------------------------------------- graph helpers


class _Graph:
    """Read-only index of a graph: producers, consumers, constants (initializers and Constant nodes)."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.input_names = {i.name for i in graph.input}
        self.output_names = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer if t.name not in self.input_names}
        self.producer: dict[str, Any] = {}
        self.position: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[Any, int]]] = collections.defaultdict(list)
        self.constant_nodes: dict[str, Any] = {}
        for i, node in enumerate(graph.node):
            self.position[node.name] = i
            for o in node.output:
                self.producer[o] = node
            for j, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, j))
            if node.op_type == "Constant" and node.output:
                self.constant_nodes[node.output[0]] = node
        self.subgraph_refs = _subgraph_references(graph)
        self._np = numpy_helper
        self._cache: dict[str, np.ndarray | None] = {}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def remember(self, name: str, value: np.ndarray) -> None:
        """Index a constant added to the graph after this index was built (a rewrite that reads it back)."""
        self._cache[name] = value

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of `name` (initializer or Constant node), or None."""
        if name in self._cache:
            return self._cache[name]
        val: np.ndarray | None = None
        if name in self.initializers:
            val = self._np.to_array(self.initializers[name])
        elif name in self.constant_nodes:
            val = _constant_node_value(self.constant_nodes[name])
        self._cache[name] = val
        return val


def _constant_node_value(node: Any) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
        if attr.name in ("sparse_value",):
            return np.asarray(helper.get_attribute_value(attr))
    return None


def _subgraph_references(graph: Any) -> set[str]:
    """Names that nodes inside subgraphs (If / Loop / Scan bodies) read from the enclosing scopes."""
    from onnx import AttributeProto

    refs: set[str] = set()

    def visit(g: Any) -> None:
        for node in g.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs) \
                    if attr.type == AttributeProto.GRAPHS else []
                for sub in subs:
                    refs.update(n for sn in sub.node for n in sn.input if n)
                    visit(sub)

    visit(graph)
    return refs


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _sentinel_tensors(g: _Graph) -> dict[str, str]:
    """Tensors carrying sentinel values (masks of -3.4e38 ...): name -> the constant they come from.

    A sentinel spreads through every op to its outputs, except through the ops in `_TAINT_STOPS`
    (Softmax turns the masked scores into ordinary probabilities), through Clip's bounds and through
    Min/Max against it (they return the other operand).
    """
    tainted: dict[str, str] = {}
    for name in list(g.initializers) + list(g.constant_nodes):
        val = g.value(name)
        if val is None or not np.issubdtype(val.dtype, np.floating) or val.size == 0:
            continue
        if not np.all(np.isfinite(val)) or float(np.max(np.abs(val))) >= _SENTINEL_ABS:
            tainted[name] = name
    for node in g.graph.node:
        if node.op_type in _TAINT_STOPS or node.op_type == "Constant":
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


def _decomposed_layernorm_nodes(g: _Graph) -> set[str]:
    """Node names forming a decomposed LayerNorm: ReduceMean, Sub, Pow|Mul, ReduceMean, Add, Sqrt, Div|Reciprocal."""
    found: set[str] = set()

    def consumers(t: str, op: str) -> list[Any]:
        return [n for n, _ in g.consumers.get(t, []) if n.op_type == op]

    for r1 in g.graph.node:
        if r1.op_type != "ReduceMean" or not r1.input:
            continue
        x = r1.input[0]
        for sub in consumers(r1.output[0], "Sub"):
            if x not in sub.input:
                continue
            d = sub.output[0]
            squares = consumers(d, "Pow") + [m for m in consumers(d, "Mul") if list(m.input) == [d, d]]
            for sq in squares:
                for r2 in consumers(sq.output[0], "ReduceMean"):
                    for add in consumers(r2.output[0], "Add"):
                        for sqrt in consumers(add.output[0], "Sqrt"):
                            tail = consumers(sqrt.output[0], "Div") + consumers(sqrt.output[0], "Reciprocal")
                            if tail:
                                found.update(n.name for n in (r1, sub, sq, r2, add, sqrt, *tail))
    return found


# --------------------------------------------------------------------------- placement


@dataclasses.dataclass
class _Plan:
    """Where Q/DQ goes: (node, input index) -> activation amax, or -> weight axis (None: per tensor)."""

    acts: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)
    weights: dict[tuple[str, int], int | None] = dataclasses.field(default_factory=dict)
    quantized: list[QuantizedNode] = dataclasses.field(default_factory=list)
    floats: list[FloatNode] = dataclasses.field(default_factory=list)
    eligible: int = 0


def _weight_axis(node: Any, idx: int, rank: int) -> int | None:
    """Per-output-channel axis of a constant input, or None where only per-tensor makes sense."""
    op = node.op_type
    if rank < 2:
        return None
    if op == "Conv" and idx == 1:
        return 0  # [O, I/g, k...]
    if op == "ConvTranspose" and idx == 1:
        return 1  # [I, O/g, k...]
    if op == "Gemm" and idx == 1:
        return 0 if _attr(node, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    if op == "MatMul" and idx == 1:
        return rank - 1  # [..., K, N]: output channels are the last axis
    return None


def _plan_qdq(g: _Graph, amax: Mapping[str, float], opts: QuantizeOptions, per_channel: bool) -> _Plan:
    plan = _Plan()
    sentinels = _sentinel_tensors(g)
    ln_nodes = _decomposed_layernorm_nodes(g)
    keep_ops = set(opts.keep_float_ops)

    def act_amax(name: str) -> tuple[float | None, str]:
        if name in sentinels:
            return None, f"input '{name}' carries the sentinel constant '{sentinels[name]}' (attention mask)"
        if name not in amax:
            return None, f"no calibration amax for input '{name}'"
        a = float(amax[name])
        if not np.isfinite(a) or a >= _AMAX_LIMIT:
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
                axis = _weight_axis(node, i, val.ndim) if per_channel else None
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
            plan.floats.append(FloatNode(node.name, op, "kept in float on request"))
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


def _plan_residual_adds(g: _Graph, plan: _Plan, opts: QuantizeOptions, act_amax: Any, ln_nodes: set[str]) -> None:
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
            plan.floats.append(FloatNode(node.name, "Add", "kept in float on request"))
            continue
        if opts.only_nodes is not None and node.name not in opts.only_nodes:
            continue
        plan.acts[(node.name, skip_idx)] = amax_v
        plan.quantized.append(QuantizedNode(node.name, "Add", (skip,), None))


# --------------------------------------------------------------------------- rewriting


def _quantize_weight(w: np.ndarray, axis: int | None, override: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127] (TensorRT's weight range); returns (int8 values, float32 scale)."""
    if axis is None:
        amax = np.asarray(np.max(np.abs(w)) if w.size else 0.0, dtype=np.float64)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=other).astype(np.float64)
    if override is not None:
        ov = np.asarray(override, dtype=np.float64)
        if ov.size != amax.size:
            raise BuildError(
                f"weight amax override has {ov.size} value(s) but the weight needs {amax.size} "
                f"({'per channel on axis ' + str(axis) if axis is not None else 'per tensor'}). Give one value "
                f"per output channel, or a single float with per_channel=False."
            )
        amax = ov.reshape(amax.shape)
    # An all-zero channel quantizes to zeros whatever its scale; 1.0 keeps the scale positive (TensorRT needs it).
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    bshape = [1] * w.ndim
    if axis is not None:
        bshape[axis] = -1
    q = np.clip(np.rint(w.astype(np.float64) / scale.reshape(bshape)), -127, 127).astype(np.int8)
    return q, scale


def _weight_q(src: str, w: np.ndarray, axis: int | None, opts: QuantizeOptions) -> tuple[np.ndarray, np.ndarray, bool]:
    """(int8 codes, scale, from GPTQ?) for weight `src`: GPTQ's codes where computed for this very value."""
    from quantpipe.gptq import codes_for

    override = (opts.weight_amax_override or {}).get(src)
    if override is None and opts.weight_rounding == "gptq":
        c = codes_for(opts.weight_codes, src, w, axis)
        if c is not None:
            return c.q, c.scale, True
    q, scale = _quantize_weight(w, axis, override)
    return q, scale, False


class _Names:
    def __init__(self, graph: Any) -> None:
        self.used = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
        for n in graph.node:
            self.used.update(n.output)
            self.used.update(n.input)
            self.used.add(n.name)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name


def _apply_plan(model: Any, g: _Graph, plan: _Plan, opts: QuantizeOptions) -> list[str]:
    """Rewrite the graph in place; returns the weights whose codes came from GPTQ."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = _Names(graph)
    new_inits: list[Any] = []
    before: dict[str, list[Any]] = collections.defaultdict(list)  # node name -> Q/DQ nodes to insert before it
    act_dq: dict[tuple[str, float], str] = {}
    w_dq: dict[tuple[str, int | None], str] = {}
    by_name = {n.name: n for n in graph.node}
    gptq_used: list[str] = []

    # Process in node order so every Q/DQ pair is inserted before its first consumer.
    keys = sorted(set(plan.acts) | set(plan.weights), key=lambda k: (g.position[k[0]], k[1]))
    for node_name, idx in keys:
        node = by_name[node_name]
        src = node.input[idx]
        if (node_name, idx) in plan.acts:
            a = plan.acts[(node_name, idx)]
            key = (src, a)
            if key not in act_dq:
                base = src.replace(":", "_")
                scale = names.fresh(f"{base}_scale")
                zp = names.fresh(f"{base}_zero_point")
                q_out = names.fresh(f"{base}_quantized")
                dq_out = names.fresh(f"{base}_dequantized")
                new_inits.append(numpy_helper.from_array(np.array(a / 127.0, dtype=np.float32), scale))
                new_inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp))
                before[node_name].append(helper.make_node("QuantizeLinear", [src, scale, zp], [q_out],
                                                          name=names.fresh(f"{base}_QuantizeLinear")))
                before[node_name].append(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                                                          name=names.fresh(f"{base}_DequantizeLinear")))
                act_dq[key] = dq_out
            node.input[idx] = act_dq[key]
        else:
            axis = plan.weights[(node_name, idx)]
            key_w = (src, axis)
            if key_w not in w_dq:
                w = g.value(src)
                if w is None:  # planned only for constants; a miss is a bug, not a user error
                    raise BuildError(f"internal error: weight '{src}' of {node_name} has no constant value")
                q, w_scale, from_gptq = _weight_q(src, w, axis, opts)
                if from_gptq:
                    gptq_used.append(src)
                base = src.replace(":", "_")
                q_name = names.fresh(f"{base}_int8")
                s_name = names.fresh(f"{base}_scale")
                z_name = names.fresh(f"{base}_zero_point")
                dq_out = names.fresh(f"{base}_dequantized")
                shape = w_scale.shape if axis is not None else ()
                new_inits.append(numpy_helper.from_array(q, q_name))
                new_inits.append(numpy_helper.from_array(w_scale.reshape(shape), s_name))
                new_inits.append(numpy_helper.from_array(np.zeros(shape, dtype=np.int8), z_name))
                dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                                      name=names.fresh(f"{base}_DequantizeLinear"))
                if axis is not None:
                    dq.attribute.append(helper.make_attribute("axis", axis))
                before[node_name].append(dq)
                w_dq[key_w] = dq_out
            node.input[idx] = w_dq[key_w]

    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        graph.node.extend(before.get(node.name, []))
        graph.node.append(node)
    graph.initializer.extend(new_inits)

    # Drop float weights (initializers and Constant nodes) nothing reads any more: the int8 copy replaces them.
    still_used = {i for n in graph.node for i in n.input} | g.output_names | g.subgraph_refs
    keep_inits = [t for t in graph.initializer if t.name in still_used or t.name in g.input_names]
    if len(keep_inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep_inits)
    dead_consts = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in still_used]
    for n in dead_consts:
        graph.node.remove(n)
    _ = TensorProto  # imported with helper for readers: int8 tensors come from numpy_helper
    return gptq_used


# --------------------------------------------------------------------------- data-driven corrections


def ort_session(model: Any, *, int8: bool = False, optimize: bool = True, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for an in-memory model (through a temp file when it is > 2 GB).

    `int8=True` sets `session.qdqisint8allowed`: without it, onnxruntime on x86 rewrites int8 Q/DQ pairs
    to uint8 and runs U8S8 kernels whose VPMADDUBSW instruction saturates on CPUs without VNNI (AVX2),
    which wrecks accuracy (EfficientNet-Lite0: 0.69 instead of 0.81 top-1 agreement on the open set).
    `optimize=False` runs the graph as written (the exact Q/DQ semantics): onnxruntime's fusions can make
    an exposed intermediate tensor of a Q/DQ model hold something else than the float graph computes.
    """
    ort = _require_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    for k, v in (ORT_INT8_SESSION_CONFIG.items() if int8 else ()):
        opts.add_session_config_entry(k, v)
    if model.ByteSize() < _LARGE_MODEL_BYTES:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="quantpipe-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        import onnx

        onnx.save_model(model, os.fspath(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


#: Session config for running quantpipe's int8 Q/DQ models on onnxruntime CPU (see `ort_session`).
ORT_INT8_SESSION_CONFIG: dict[str, str] = {"session.qdqisint8allowed": "1"}


def _require_ort() -> Any:
    from quantpipe.deps import require

    return require("onnxruntime", purpose="running the model to collect statistics")


def expose_outputs(model: Any, names: Iterable[str]) -> Any:
    """A copy of `model` whose graph also outputs the (float) tensors `names`."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, _FLOAT, None))
            have.add(n)
    return m


def _stat_targets(g: _Graph) -> dict[str, int]:
    """Non-constant inputs of the quantizable nodes -> the channel axis their consumer contracts over."""
    out: dict[str, int] = {}
    for node in g.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        x = node.input[0]
        if not x or g.is_constant(x):
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            out.setdefault(x, 1)
        elif node.op_type == "Gemm" and not _attr(node, "transA", 0) or node.op_type == "MatMul" and g.is_constant(node.input[1]):
            out.setdefault(x, -1)
    return out


def fp32_batches(sess: Any, dataset: Any, *, batch_size: int, max_samples: int | None = None
                 ) -> Iterable[tuple[dict[str, Any], int]]:
    """Run `sess` over `dataset` batch by batch, stopping after `max_samples`: yields (every output by name,
    with the batch's inputs merged in; samples in the batch)."""
    names = [o.name for o in sess.get_outputs()]
    seen = 0
    for batch in dataset.batches(batch_size):
        feeds = dict(batch.feeds)
        if max_samples is not None:
            feeds = {k: v[: max_samples - seen] for k, v in feeds.items()}
        res = dict(zip(names, sess.run(None, feeds), strict=True))
        res.update(feeds)
        n = next(iter(feeds.values())).shape[0]
        yield res, n
        seen += n
        if max_samples is not None and seen >= max_samples:
            return


def collect_channel_stats(model: Any, dataset: Any, *, batch_size: int = 8, max_samples: int | None = None,
                          tensors: Mapping[str, int] | None = None) -> dict[str, ChannelStats]:
    """Per-channel absmax and mean of the quantizable nodes' activation inputs over `dataset` (FP32 run).

    Args:
        model: FP32 ModelProto or path.
        dataset: a `quantpipe.data.Dataset` (the calibration split).
        batch_size: samples per run.
        max_samples: stop after this many samples (None: all).
        tensors: tensor -> channel axis to collect (default: every quantizable node's activation input).
    """
    if not hasattr(model, "graph"):
        model = load_onnx(model)
    m = _named_copy(model)
    g = _Graph(m.graph)
    targets = dict(tensors) if tensors is not None else _stat_targets(g)
    if not targets:
        return {}
    sess = ort_session(expose_outputs(m, targets))
    acc: dict[str, list[Any]] = {}
    seen = 0
    for res, n in fp32_batches(sess, dataset, batch_size=batch_size, max_samples=max_samples):
        seen += n
        for name, axis in targets.items():
            v = np.asarray(res[name], dtype=np.float64)
            ax = axis % v.ndim
            flat = np.moveaxis(v, ax, -1).reshape(-1, v.shape[ax])
            cur = acc.get(name)
            if cur is None:
                acc[name] = [np.abs(flat).max(axis=0), flat.sum(axis=0), flat.shape[0]]
            else:
                cur[0] = np.maximum(cur[0], np.abs(flat).max(axis=0))
                cur[1] = cur[1] + flat.sum(axis=0)
                cur[2] += flat.shape[0]
    return {name: ChannelStats(name, targets[name], a[0], a[1] / max(a[2], 1), seen) for name, a in acc.items()}


def _named_copy(model: Any) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m.graph)
    return m


def _replace_initializer(graph: Any, names: _Names, base: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    name = names.fresh(base)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name


def _smooth(m: Any, g: _Graph, opts: QuantizeOptions, stats: dict[str, ChannelStats], amax: dict[str, float],
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
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            continue
        val = g.value(w)
        if val is None or val.dtype != np.float32 or val.ndim != 2:
            continue
        groups[x].append((node, val))
    names = _Names(m.graph)
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
            trans = node.op_type == "Gemm" and _attr(node, "transB", 0)
            rows.append(np.abs(w).max(axis=0 if trans else 1))
        wmax = np.max(rows, axis=0).astype(np.float64)
        if wmax.shape != a.shape:
            continue
        s = np.where((a > 0) & (wmax > 0), np.power(np.maximum(a, 1e-12), alpha)
                     / np.power(np.maximum(wmax, 1e-12), 1.0 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4)
        inv = _replace_initializer(m.graph, names, f"{x}_smooth_inv", (1.0 / s).astype(np.float32))
        xs = names.fresh(f"{x}_smoothed")
        mul = helper.make_node("Mul", [x, inv], [xs], name=names.fresh(f"{x}_Smooth"))
        new_nodes[x] = mul
        for node, w in consumers:
            trans = node.op_type == "Gemm" and _attr(node, "transB", 0)
            scaled = w.astype(np.float64) * (s[None, :] if trans else s[:, None])
            node.input[1] = _replace_initializer(m.graph, names, f"{node.input[1]}_smoothed", scaled.astype(np.float32))
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
        _drop_unused_initializers(m.graph, g)
    return smoothed


def _drop_unused_initializers(graph: Any, g: _Graph) -> None:
    used = {i for n in graph.node for i in n.input} | g.output_names | g.subgraph_refs | g.input_names
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


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


def _clip_bounds(g: _Graph, node: Any) -> tuple[float, float] | None:
    """(min, max) of a Relu or Clip node with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    bounds = [-math.inf, math.inf]
    for k in (1, 2):
        if len(node.input) > k and node.input[k]:
            v = g.value(node.input[k])
            if v is None or v.size != 1:
                return None
            bounds[k - 1] = float(v.reshape(()))
    for a in node.attribute:  # opset < 11
        if a.name in ("min", "max"):
            bounds[0 if a.name == "min" else 1] = float(a.f)
    return bounds[0], bounds[1]


def _bias_slot(g: _Graph, node: Any) -> tuple[int, float, np.ndarray] | None:
    """A Conv / Gemm whose outputs can absorb a constant through its bias: (outputs, bias scale, bias)."""
    w = g.value(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    if node.op_type == "Conv":
        n_out, scale = w.shape[0], 1.0
    elif node.op_type == "Gemm" and not _attr(node, "transA", 0) and w.ndim == 2:
        n_out, scale = (w.shape[0] if _attr(node, "transB", 0) else w.shape[1]), float(_attr(node, "beta", 1.0))
    else:
        return None
    b = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(n_out, np.float32)
    if b is None or b.shape != (n_out,) or scale == 0.0:
        return None
    return n_out, scale, b


def _input_sums(g: _Graph, node: Any) -> np.ndarray | None:
    """Per output of a Conv / Gemm: how much it moves when every element of its input 0 moves by 1."""
    w = g.value(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.dtype != np.float32:
        return None
    if node.op_type == "Conv":
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return None
        return w.astype(np.float64).reshape(w.shape[0], -1).sum(axis=1)
    if node.op_type == "Gemm" and not _attr(node, "transA", 0) and w.ndim == 2:
        return w.astype(np.float64).sum(axis=1 if _attr(node, "transB", 0) else 0) * float(_attr(node, "alpha", 1.0))
    return None


def _shift_nonnegative(m: Any, g: _Graph, plan: _Plan, stats: dict[str, ChannelStats]) -> list[str]:
    """Quantize non-negative activations around the middle of their range, exactly compensated.

    TensorRT's activations are symmetric int8: a post-ReLU tensor with amax A gets steps of A/127 and never
    uses the negative codes. Rewriting  P -> Relu/Clip(lo >= 0) -> t  (P a Conv or Gemm) as
    P' -> Clip(lo - c, hi - c) -> t' = t - c  with c = A/2 puts t' in [-A/2, A/2]: steps of A/254, the sign
    bit used. P' has bias b - c. Every reader of t must take the shift back exactly, or nothing is done:
    a Conv / Gemm reading it adds c * sum(W) to its bias (a zero-padded Conv reads an explicit Pad with value
    -c, the shifted zero, instead); a residual Add whose other input comes from a Conv / Gemm adds c to that
    producer's bias. In float the graph computes the same function; -c is an exact int8 code, so the Pad
    commutes with the Q/DQ after it. The shifted tensors are recorded in the model's metadata
    (`tensor_offsets`).
    """
    from onnx import helper

    names = _Names(m.graph)
    by_name = {n.name: n for n in g.graph.node}
    entries: dict[str, list[tuple[tuple[str, int], float]]] = collections.defaultdict(list)
    for key, a in plan.acts.items():
        entries[by_name[key[0]].input[key[1]]].append((key, a))
    planned_inputs = set(entries)
    insert_before: dict[str, Any] = {}
    offsets: dict[str, float] = {}
    done: list[str] = []

    def set_bias(node: Any, value: np.ndarray, tag: str) -> None:
        if len(node.input) == 2:
            node.input.append("")
        node.input[2] = _replace_initializer(m.graph, names, f"{node.name}_{tag}", value.astype(np.float32))
        g.remember(node.input[2], value.astype(np.float32))  # a later tensor's fix may adjust it again

    def ok_tensor(name: str) -> bool:
        return name not in g.output_names and name not in g.subgraph_refs and name not in offsets

    for t in sorted(entries, key=lambda n: g.position[g.producer[n].name] if n in g.producer else -1):
        amaxes = {a for _, a in entries[t]}
        if len(amaxes) != 1:
            continue
        a = amaxes.pop()
        act = g.producer.get(t)
        if not (a > 0 and math.isfinite(a)) or act is None or not ok_tensor(t):
            continue
        bounds = _clip_bounds(g, act)
        if bounds is None or bounds[0] < 0:
            continue
        z = act.input[0]
        prod = g.producer.get(z)
        if prod is None or prod.op_type not in ("Conv", "Gemm") or len(g.consumers.get(z, [])) != 1 or not ok_tensor(z):
            continue
        p_slot = _bias_slot(g, prod)
        if p_slot is None:
            continue
        # Every reader must be able to take the shift back.
        fixes: list[tuple[str, Any, Any]] = []
        for reader, j in g.consumers.get(t, []):
            if reader.op_type in ("Conv", "Gemm") and j == 0:
                sums, slot = _input_sums(g, reader), _bias_slot(g, reader)
                if sums is None or slot is None or sums.shape != (slot[0],):
                    break
                fixes.append(("weights", reader, (sums, slot)))
            elif reader.op_type == "Add" and len(reader.input) == 2 and reader.input[0] != reader.input[1]:
                y = reader.input[1 - j]
                py = g.producer.get(y)
                if py is None or py.op_type not in ("Conv", "Gemm") or len(g.consumers.get(y, [])) != 1 \
                        or y in planned_inputs or not ok_tensor(y) or py is prod:
                    break
                slot = _bias_slot(g, py)
                if slot is None:
                    break
                fixes.append(("add", py, slot))
            else:
                break
        else:
            if not fixes:
                continue
            c = float(np.float32(a / 2.0))
            n_out, scale, pb = p_slot
            set_bias(prod, pb.astype(np.float64) - c / scale, "bias_shifted")
            # Relu / Clip(lo, hi) -> Clip(lo - c, hi - c)
            lo, hi = bounds
            clip_inputs = [z, _replace_initializer(m.graph, names, f"{act.name}_min", np.array(lo - c, np.float32))]
            if math.isfinite(hi):
                clip_inputs.append(_replace_initializer(m.graph, names, f"{act.name}_max",
                                                        np.array(hi - c, np.float32)))
            act.op_type = "Clip"
            del act.input[:]
            act.input.extend(clip_inputs)
            keep_attrs = [x for x in act.attribute if x.name not in ("min", "max")]
            del act.attribute[:]
            act.attribute.extend(keep_attrs)
            offsets[z] = offsets[t] = c
            # A node can need two corrections (a residual block's second conv reads t and feeds the Add that
            # also reads t): sum them before writing its bias once.
            deltas: dict[str, list[Any]] = {}
            for kind, node, info in fixes:
                bias, bscale = (info[1][2], info[1][1]) if kind == "weights" else (info[2], info[1])
                d = c * info[0] / bscale if kind == "weights" else np.full(bias.shape, c / bscale)
                if node.name in deltas:
                    deltas[node.name][2] = deltas[node.name][2] + d
                else:
                    deltas[node.name] = [node, bias.astype(np.float64), d]
                if kind == "add":  # the Add's other branch now carries +c, so the sum is unchanged
                    offsets[node.output[0]] = offsets.get(node.output[0], 0.0) - c
            for node, bias, d in deltas.values():
                set_bias(node, bias + d, "bias_shifted")
            st = stats.get(t)  # the unshifted statistics, read once: readers may replace stats[t] below
            for kind, node, _info in fixes:
                if kind != "weights":
                    continue
                src = t
                pads = list(_attr(node, "pads", [])) if node.op_type == "Conv" else []
                if any(pads):
                    spatial = len(pads) // 2
                    src = names.fresh(f"{t}_padded")
                    all_pads = [0, 0] + pads[:spatial] + [0, 0] + pads[spatial:]
                    insert_before[node.name] = helper.make_node(
                        "Pad", [t, _replace_initializer(m.graph, names, f"{node.name}_pads", np.array(all_pads, np.int64)),
                                _replace_initializer(m.graph, names, f"{node.name}_pad_value", np.array(-c, np.float32))],
                        [src], name=names.fresh(f"{node.name}_Pad"), mode="constant")
                    node.input[0] = src
                    for x in node.attribute:
                        if x.name == "pads":
                            del x.ints[:]
                            x.ints.extend([0] * len(pads))
                if st is not None:
                    stats[src] = ChannelStats(src, st.axis, np.maximum(np.abs(st.absmax - c), c),
                                              np.asarray(st.mean) - c, st.num_samples)
            for key, _ in entries[t]:
                plan.acts[key] = a - c
            done.append(t)
    if offsets:
        _record_offsets(m, offsets)
    if insert_before:
        nodes = list(m.graph.node)
        del m.graph.node[:]
        for n in nodes:
            if n.name in insert_before:
                m.graph.node.append(insert_before[n.name])
            m.graph.node.append(n)
    if done:
        _drop_unused_initializers(m.graph, _Graph(m.graph))
    return done


def _split_candidate(g: _Graph, t: str, opts: QuantizeOptions) -> tuple[Any, Any, list[Any], float] | None:
    """(producer Conv, Relu/Clip, Conv readers, upper bound) when `t` = Relu/Clip(0, hi)(Conv(...)) can be
    split (`_split_activations`), else None."""
    act = g.producer.get(t)
    if act is None or t in g.output_names or t in g.subgraph_refs:
        return None
    bounds = _clip_bounds(g, act)
    if bounds is None or bounds[0] != 0.0:
        return None
    z = act.input[0]
    prod = g.producer.get(z)
    if prod is None or prod.op_type != "Conv" or len(g.consumers.get(z, [])) != 1 or z in g.output_names \
            or z in g.subgraph_refs or _bias_slot(g, prod) is None:
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


def _split_activations(m: Any, g: _Graph, opts: QuantizeOptions, splits: Mapping[str, int], amax: dict[str, float],
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
    names = _Names(m.graph)
    done: dict[str, str] = {}
    for t, k in sorted(splits.items()):
        k = int(k)
        cand = _split_candidate(g, t, opts) if k >= 2 else None
        a = amax.get(t)
        if cand is None or a is None or not (a > 0 and math.isfinite(a)):
            continue
        prod, act, readers, hi = cand
        a = min(float(a), hi)
        piece = a / k
        n_out, _scale, bias = _bias_slot(g, prod)  # type: ignore[misc]
        w = g.value(prod.input[1])
        assert w is not None
        z_new, t_new = names.fresh(f"{prod.output[0]}_split{k}"), names.fresh(f"{t}_split{k}")
        if len(prod.input) == 2:
            prod.input.append("")
        old_w = prod.input[1]
        prod.input[1] = _replace_initializer(m.graph, names, f"{prod.input[1]}_split", np.repeat(w, k, axis=0))
        g.remember(prod.input[1], np.repeat(w, k, axis=0))  # a chained split reads it back
        _repeat_codes(codes, old_w, w, prod.input[1], k, axis=0)
        steps = (np.arange(k, dtype=np.float64) * piece)[None, :]
        new_bias = (bias.astype(np.float64)[:, None] - steps).reshape(-1).astype(np.float32)
        prod.input[2] = _replace_initializer(m.graph, names, f"{prod.name}_bias_split", new_bias)
        g.remember(prod.input[2], new_bias)
        prod.output[0] = z_new
        act.op_type = "Clip"
        del act.input[:]
        act.input.extend([z_new, _replace_initializer(m.graph, names, f"{act.name}_min", np.array(0.0, np.float32)),
                          _replace_initializer(m.graph, names, f"{act.name}_max", np.array(piece, np.float32))])
        keep_attrs = [x for x in act.attribute if x.name not in ("min", "max")]
        del act.attribute[:]
        act.attribute.extend(keep_attrs)
        act.output[0] = t_new
        for reader in readers:
            wr = g.value(reader.input[1])
            assert wr is not None
            old_w = reader.input[1]
            reader.input[1] = _replace_initializer(m.graph, names, f"{reader.input[1]}_split", np.repeat(wr, k, axis=1))
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
        _drop_unused_initializers(m.graph, _Graph(m.graph))
    return done


def _repeat_codes(codes: dict[str, Any] | None, name: str, w: np.ndarray, new_name: str, k: int, axis: int) -> None:
    """GPTQ codes of weight `name` (value `w`), repeated k times along `axis` as the weight was, under `new_name`."""
    from quantpipe.gptq import WeightCodes, codes_for, weight_fingerprint

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


def choose_splits(model: Any, amax: Mapping[str, float], options: QuantizeOptions, calibration_data: Any, *,
                  batch_size: int = 8, max_samples: int = 32, max_tensors: int = 2,
                  max_sqnr_db: float = 30.0, min_gain_db: float = 1.0) -> dict[str, int]:
    """The activations worth splitting (`_split_activations`): tensor -> pieces.

    Every splittable activation's int8 rounding is simulated alone (weights and other activations in float)
    on up to `max_samples` calibration samples, in one instrumented session where a scalar input switches
    each tensor's fake quantization on. The `max_tensors` noisiest ones whose noise matters (output SQNR with
    only that tensor rounded below `max_sqnr_db`, and at least a tenth of the whole INT8 model's output noise)
    are then tried for real: the whole INT8 model is built with the tensor split in 2 and in 4 pieces and run
    on the same samples. A split is kept when it lifts the model's output SQNR by at least `min_gain_db`, with
    the fewest pieces that come within 0.5 dB of the best. Where the noise is spread over many tensors, comes
    from elsewhere (weights, other activations) or is small, nothing is split.
    """
    from onnx import TensorProto, helper, numpy_helper

    m = _named_copy(model)
    g = _Graph(m.graph)
    cands = {t: c for t in sorted(g.producer) if t in amax and math.isfinite(amax[t]) and amax[t] > 0
             and (c := _split_candidate(g, t, options)) is not None}
    if not cands:
        return {}
    outputs = [o.name for o in m.graph.output]
    switches = {}
    for i, (t, (_prod, _act, _readers, hi)) in enumerate(cands.items()):
        a = min(float(amax[t]), hi)
        c, step = (a / 2, a / 254) if options.shift_nonnegative else (0.0, a / 127)
        sw = f"__qp_split_switch_{i}"
        switches[t] = sw
        m.graph.input.append(helper.make_tensor_value_info(sw, TensorProto.FLOAT, []))
        m.graph.initializer.extend([numpy_helper.from_array(np.array(c, np.float32), f"{sw}_c"),
                                    numpy_helper.from_array(np.array(step, np.float32), f"{sw}_s"),
                                    numpy_helper.from_array(np.array(0, np.int8), f"{sw}_z")])
        fq = [helper.make_node("Sub", [t, f"{sw}_c"], [f"{sw}_m"]),
              helper.make_node("QuantizeLinear", [f"{sw}_m", f"{sw}_s", f"{sw}_z"], [f"{sw}_q"]),
              helper.make_node("DequantizeLinear", [f"{sw}_q", f"{sw}_s", f"{sw}_z"], [f"{sw}_d"]),
              helper.make_node("Sub", [f"{sw}_d", f"{sw}_m"], [f"{sw}_e"]),
              helper.make_node("Mul", [f"{sw}_e", sw], [f"{sw}_ge"]),
              helper.make_node("Add", [t, f"{sw}_ge"], [f"{sw}_out"])]
        for reader, j in g.consumers[t]:
            reader.input[j] = f"{sw}_out"
        m.graph.node.extend(fq)
    nodes = _topological(list(m.graph.node), m.graph)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    sess = ort_session(m, optimize=False)
    off = {sw: np.array(0.0, np.float32) for sw in switches.values()}

    def err(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
        return sum(float(np.sum(np.square(x.astype(np.float64) - r))) for x, r in zip(got, ref, strict=True)
                   if r.dtype.kind == "f")

    feeds_list: list[dict[str, np.ndarray]] = []
    refs: list[list[np.ndarray]] = []
    sig = 0.0
    noise = dict.fromkeys(cands, 0.0)
    seen = 0
    for batch in calibration_data.batches(batch_size):
        feeds = {k: v[: max_samples - seen] for k, v in batch.feeds.items()}
        ref = sess.run(outputs, {**feeds, **off})
        feeds_list.append(feeds)
        refs.append(ref)
        sig += sum(float(np.sum(np.square(r, dtype=np.float64))) for r in ref if r.dtype.kind == "f")
        for t, sw in switches.items():
            noise[t] += err(sess.run(outputs, {**feeds, **off, sw: np.array(1.0, np.float32)}), ref)
        seen += next(iter(feeds.values())).shape[0]
        if seen >= max_samples:
            break
    if sig <= 0.0:
        return {}

    def model_noise(splits: Mapping[str, int]) -> float:
        q = build_qdq_model(model, amax, dataclasses.replace(options, split_activations=dict(splits)))[0]
        run = ort_session(q, optimize=False)
        return sum(err(run.run(outputs, f), r) for f, r in zip(feeds_list, refs, strict=True))

    def db(n: float) -> float:
        return 10 * math.log10(sig / n) if n > 0 else math.inf

    chosen: dict[str, int] = {}
    current = model_noise(chosen)
    log.info("INT8 model on %d calibration samples: %.1f dB output SQNR", seen, db(current))
    for t in sorted(cands, key=lambda x: -noise[x])[:max_tensors]:
        if db(noise[t]) >= max_sqnr_db or noise[t] < 0.1 * current:
            log.info("activation %s alone: %.1f dB output SQNR (%.0f%% of the model's noise): not split", t,
                     db(noise[t]), 100 * noise[t] / current if current > 0 else 0.0)
            continue
        tried = {k: model_noise({**chosen, t: k}) for k in (2, 4)}
        best = min(tried.values())
        k = min(k for k, n in tried.items() if db(n) >= db(best) - 0.5)
        gain = db(tried[k]) - db(current)
        log.info("activation %s alone: %.1f dB output SQNR; split in 2 / 4: %.1f / %.1f dB (model: %.1f dB)%s", t,
                 db(noise[t]), db(tried[2]), db(tried[4]), db(current),
                 f"; split in {k}" if gain >= min_gain_db else "; not split")
        if gain >= min_gain_db:
            chosen[t] = k
            current = tried[k]
    return chosen


def _bias_correct(m: Any, g: _Graph, plan: _Plan, opts: QuantizeOptions, stats: Mapping[str, ChannelStats]) -> list[str]:
    """Bias correction: b <- b - E[(Wq - W) x], so quantized weights do not shift each output channel's mean.

    Rounding a kernel's taps rarely cancels, and post-ReLU inputs have a large positive mean, so the
    quantized layer's outputs drift by a per-channel constant. It matters most in depthwise convolutions
    (a few taps, large weights); EfficientNet-Lite0's logits gain ~5 dB of SQNR. Uses the per-channel
    input means from the calibration data. Reference: Nagel et al., "Data-Free Quantization", ICCV 2019.
    """
    names = _Names(m.graph)
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
        q, scale, _ = _weight_q(node.input[1], w, axis, opts)
        bshape = [1] * w.ndim
        if axis is not None:
            bshape[axis] = -1
        dw = q.astype(np.float64) * scale.reshape(bshape).astype(np.float64) - w.astype(np.float64)
        mu = np.asarray(st.mean, dtype=np.float64)
        shift: np.ndarray | None = None
        if node.op_type == "Conv" and st.axis == 1 and w.ndim >= 3:
            group = int(_attr(node, "group", 1))
            o, ig = w.shape[0], w.shape[1]
            if mu.size != ig * group or o % group:
                continue
            per_tap = dw.reshape(o, ig, -1).sum(axis=2)  # [O, I/g]
            mu_g = mu.reshape(group, ig)[np.arange(o) // (o // group)]  # each output's input-group means
            shift = (per_tap * mu_g).sum(axis=1)
        elif node.op_type == "Gemm" and w.ndim == 2:
            dwk = dw.T if _attr(node, "transB", 0) else dw  # [K, N]
            if dwk.shape[0] != mu.size:
                continue
            shift = float(_attr(node, "alpha", 1.0)) * (mu @ dwk)
        elif node.op_type == "MatMul" and w.ndim == 2 and w.shape[0] == mu.size:
            shift = mu @ dw
        if shift is None or not np.all(np.isfinite(shift)):
            continue
        if node.op_type == "MatMul":
            if not _fold_into_following_add(m, g, node, shift, names):
                continue
        else:
            beta = float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
            if len(node.input) > 2 and node.input[2]:
                b = g.value(node.input[2])
                if b is None or b.ndim != 1 or b.shape[0] != shift.shape[0] or beta == 0.0:
                    continue
                newb = b.astype(np.float64) - shift / beta
            else:
                newb = -shift / beta
                if len(node.input) == 2:
                    node.input.append("")
            node.input[2] = _replace_initializer(m.graph, names, f"{node.name}_bias_corrected", newb.astype(np.float32))
        done.append(node_name)
    if done:
        _drop_unused_initializers(m.graph, g)
    return done


def _fold_into_following_add(m: Any, g: _Graph, node: Any, shift: np.ndarray, names: _Names) -> bool:
    """MatMul + Add(bias) as exported by PyTorch: correct the Add's constant when nothing else reads it."""
    users = g.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0][0].op_type != "Add":
        return False
    add, j = users[0]
    other = add.input[1 - j]
    b = g.value(other)
    if b is None or b.dtype != np.float32 or b.shape != shift.shape or len(g.consumers.get(other, [])) != 1:
        return False
    add.input[1 - j] = _replace_initializer(m.graph, names, f"{add.name}_bias_corrected",
                                            (b.astype(np.float64) - shift).astype(np.float32))
    return True


def _prepare_opset(model: Any, per_channel: bool) -> tuple[Any, int, bool, list[str]]:
    """Bring the model to opset >= 13 where possible; returns (model, opset, per_channel, warnings)."""
    import onnx
    from onnx import version_converter

    warnings: list[str] = []
    opset = _opset(model)
    if opset >= 13:
        return model, opset, per_channel, warnings
    try:
        converted = version_converter.convert_version(model, 13)
        onnx.checker.check_model(converted)
        log.info("upgraded the model from opset %d to 13 for per-channel DequantizeLinear", opset)
        warnings.append(f"model upgraded from opset {opset} to 13 (per-channel DequantizeLinear needs opset 13)")
        return converted, 13, per_channel, warnings
    except Exception as err:  # the converter raises plain RuntimeError / ValidationError for unsupported ops
        if opset < 10:
            raise ModelError(
                f"the model has opset {opset}: QuantizeLinear/DequantizeLinear need opset 10 or newer, and onnx's "
                f"version converter could not upgrade it ({type(err).__name__}: {err}). Re-export the model with "
                f"opset >= 13."
            ) from err
        warnings.append(
            f"opset {opset} could not be upgraded to 13 ({type(err).__name__}: {str(err)[:160]}); weights are "
            f"quantized per tensor, which opset {opset} supports (expect lower accuracy than per channel)"
        )
        return model, opset, False, warnings


def build_qdq_model(model: Any, amax: Mapping[str, float], options: QuantizeOptions = QuantizeOptions(),
                    *, copy: bool = True) -> tuple[Any, QuantizeReport]:
    """Return the Q/DQ INT8 version of an FP32 ModelProto (in memory) and its report.

    Args:
        model: the FP32 model (not modified when `copy`).
        amax: calibrated absolute range per activation / graph input, by original tensor name.
        options: placement options.
        copy: work on a copy of `model` (False saves memory for large models the caller drops).
    """
    import onnx

    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    else:
        m = model
    present = sorted({n.op_type for n in m.graph.node} & _QDQ_OPS)
    if present:
        raise ModelError(f"the model already contains quantized ops ({', '.join(present)}); quantpipe quantizes "
                         f"FP32 models. Pass the original FP32 export.")
    name_nodes(m.graph)
    opset_before = _opset(m)
    m, opset_after, per_channel, warnings = _prepare_opset(m, options.per_channel)
    name_nodes(m.graph)
    g = _Graph(m.graph)
    amax_all = dict(amax)
    stats = dict(options.channel_stats or {})
    split: dict[str, str] = {}
    if isinstance(options.split_activations, Mapping):
        codes = dict(options.weight_codes or {})
        split = _split_activations(m, g, options, options.split_activations, amax_all, stats, codes)
        if split:
            g = _Graph(m.graph)
            options = dataclasses.replace(options, weight_codes=codes or None)
    elif options.split_activations not in (None, "auto", "off"):
        raise BuildError(f"split_activations must be 'auto', 'off' or a mapping tensor -> pieces, "
                         f"not {options.split_activations!r}.")
    smoothed: list[str] = []
    if stats and options.smooth_alpha:
        smoothed = _smooth(m, g, options, stats, amax_all, _sentinel_tensors(g))
        if smoothed:
            g = _Graph(m.graph)
    plan = _plan_qdq(g, amax_all, options, per_channel)
    shifted: list[str] = []
    if options.shift_nonnegative and opset_after >= 11:
        shifted = _shift_nonnegative(m, g, plan, stats)
        if shifted:
            g = _Graph(m.graph)
    corrected: list[str] = []
    if stats and options.bias_correction:
        corrected = _bias_correct(m, g, plan, options, stats)
        if corrected:
            g = _Graph(m.graph)
    gptq_used = _apply_plan(m, g, plan, options)
    skipped_amax = [f for f in plan.floats if f.op_type in QUANTIZABLE_OPS | {"Add"} and "amax" in f.reason]
    if skipped_amax:
        warnings.append(f"{len(skipped_amax)} quantizable node(s) left float for want of a usable amax, e.g. "
                        f"{skipped_amax[0].name}: {skipped_amax[0].reason}")
    sentinel = [f for f in plan.floats if "sentinel" in f.reason]
    if sentinel:
        warnings.append(f"{len(sentinel)} node(s) left float because their input carries a sentinel (mask) constant")
    report = QuantizeReport(
        model_path=None, output_path=None, opset_before=opset_before, opset_after=opset_after,
        per_channel=per_channel, quantized_nodes=tuple(plan.quantized), kept_float=tuple(plan.floats),
        num_quantizable=plan.eligible, warnings=tuple(warnings), smoothed_tensors=tuple(smoothed),
        bias_corrected=tuple(corrected), gptq_rounded=tuple(gptq_used), shifted_tensors=tuple(shifted),
        split_tensors=tuple((t, int(options.split_activations[t])) for t in split)  # type: ignore[index]
    )
    return m, report


def write_qdq_model(
    model_path: str | os.PathLike[str],
    amax: Mapping[str, float],
    out_path: str | os.PathLike[str],
    *,
    per_channel: bool = True,
    keep_float_nodes: Collection[str] = (),
    keep_float_ops: Collection[str] = DEFAULT_FLOAT_OPS,
    quantize_residual_add: bool = True,
    weight_amax_override: Mapping[str, float | Sequence[float]] | None = None,
    quantize_activation_matmul: bool = True,
    calibration_data: Any | None = None,
    channel_stats: Mapping[str, ChannelStats] | None = None,
    smooth_alpha: float | None = 0.7,
    bias_correction: bool = True,
    weight_rounding: str = "nearest",
    shift_nonnegative: bool = True,
    split_activations: Mapping[str, int] | str | None = None,
    batch_size: int = 8,
) -> QuantizeReport:
    """Write the explicit-quantization (Q/DQ) INT8 model of an FP32 ONNX model, checked, atomically.

    Args:
        model_path: FP32 ONNX model (external data beside it is loaded).
        amax: calibrated amax per activation / graph input (original tensor names).
        out_path: where to write the Q/DQ model (external data `<name>.data` when > ~1.8 GB).
        per_channel: per-output-channel weight scales (opset >= 13; older models are upgraded).
        keep_float_nodes: node names left unquantized (the fallback's keep-list).
        keep_float_ops: op types left unquantized.
        quantize_residual_add: Q/DQ on the skip input of Conv + skip Adds (TensorRT fusion).
        weight_amax_override: weight name -> amax instead of max |w|.
        quantize_activation_matmul: quantize attention's activation x activation MatMuls.
        calibration_data: the calibration `Dataset`; with it, per-channel statistics are collected (one FP32
            pass) for smoothing and bias correction. Without it (and without `channel_stats`) neither runs.
        channel_stats: precomputed `collect_channel_stats` result (skips the pass over `calibration_data`).
        smooth_alpha: SmoothQuant strength for MatMul / Gemm inputs with outlier channels (None: off).
        bias_correction: correct biases for the mean error of the quantized weights.
        weight_rounding: 'gptq' (weight codes fitted to the calibration inputs; needs `calibration_data`) or
            'nearest'.
        shift_nonnegative: quantize post-ReLU inputs of Conv / Gemm around mid-range (exactly compensated).
        split_activations: 'auto' (needs `calibration_data`), None, or tensor -> pieces
            (`QuantizeOptions.split_activations`).
        batch_size: batch size of the statistics pass.

    Raises:
        ModelError: unreadable or already quantized model. BuildError: the result fails the checker.
    """
    options = QuantizeOptions(
        per_channel=per_channel, keep_float_nodes=frozenset(keep_float_nodes), keep_float_ops=frozenset(keep_float_ops),
        quantize_residual_add=quantize_residual_add, weight_amax_override=weight_amax_override,
        quantize_activation_matmul=quantize_activation_matmul, smooth_alpha=smooth_alpha,
        bias_correction=bias_correction, weight_rounding=weight_rounding, channel_stats=channel_stats,
        shift_nonnegative=shift_nonnegative, split_activations=split_activations,
    )
    if calibration_data is not None:
        options = with_calibration_data(load_onnx(model_path), options, calibration_data, batch_size=batch_size,
                                        amax=amax)
    return quantize_model(model_path, amax, out_path, options)


def with_calibration_data(model: Any, options: QuantizeOptions, calibration_data: Any, *,
                          batch_size: int = 8, amax: Mapping[str, float] | None = None) -> QuantizeOptions:
    """`options` with what the calibration data decides filled in, each computed once here so the writer,
    the fallback and the sensitivity analysis share it: per-channel statistics (smoothing, bias correction)
    and GPTQ weight codes (`weight_rounding='gptq'`; given the activations' `amax`, fitted to the
    quantized inputs). Fields already set are kept."""
    if options.weight_rounding not in ("gptq", "nearest"):
        raise BuildError(f"weight_rounding must be 'gptq' or 'nearest', not {options.weight_rounding!r}.")
    m = _named_copy(model)
    if options.channel_stats is None and (options.smooth_alpha or options.bias_correction):
        log.info("collecting per-channel statistics on the calibration data")
        options = dataclasses.replace(options, channel_stats=collect_channel_stats(m, calibration_data,
                                                                                   batch_size=batch_size))
    if options.split_activations == "auto":
        if amax is None:
            raise BuildError("split_activations='auto' needs the calibrated amax.")
        log.info("looking for activations whose rounding noise dominates the output")
        options = dataclasses.replace(options, split_activations=choose_splits(m, amax, options, calibration_data,
                                                                               batch_size=batch_size))
    if options.weight_codes is None and options.weight_rounding == "gptq":
        from quantpipe.gptq import collect_weight_codes

        log.info("fitting GPTQ weight codes on the calibration data")
        # On the unsplit graph: a split activation's weights take these codes repeated (`_split_activations`).
        options = dataclasses.replace(options, weight_codes=collect_weight_codes(
            m, calibration_data, per_channel=options.per_channel, batch_size=batch_size, input_amax=amax))
    return options


def quantize_model(model_path: str | os.PathLike[str], amax: Mapping[str, float], out_path: str | os.PathLike[str],
                   options: QuantizeOptions = QuantizeOptions()) -> QuantizeReport:
    """`quantpipe quantize`'s entry point: FP32 model + amax -> checked Q/DQ model on disk, and its report."""
    src = load_onnx(model_path)
    qdq, report = build_qdq_model(src, amax, options)
    warnings = save_onnx(qdq, out_path, reference=src)
    for w in report.warnings + tuple(warnings):
        log.warning("%s", w)
    return dataclasses.replace(report, model_path=os.fspath(model_path), output_path=os.fspath(out_path),
                               warnings=report.warnings + tuple(warnings))


# --------------------------------------------------------------------------- FP16


#: Inputs that must stay float32 whatever the op's precision (their type is fixed by the op schema).
_FP32_ONLY_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (2,), "Upsample": (1,)}


def _tensor_types(model: Any) -> dict[str, int]:
    """Element type of every tensor the graph names, from ONNX type inference (0 where unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception as err:  # inference can fail on exotic ops; the declared types still help
        log.debug("type inference failed (%s); using declared types only", err)
        inferred = model
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            v = _constant_node_value(n)
            if v is not None:
                types[n.output[0]] = _FLOAT if v.dtype == np.float32 else types.get(n.output[0], -1)
    return types


def _to_fp16(arr: np.ndarray, name: str, out_of_range: list[OutOfRangeValue]) -> tuple[np.ndarray, int]:
    """FP32 -> FP16, clamping |x| > 65504 to +-65504 (reported); returns (array, values that underflow to 0)."""
    finite = np.isfinite(arr)
    big = finite & (np.abs(arr) > FP16_MAX)
    if np.any(big):
        out_of_range.append(OutOfRangeValue(name, float(np.max(np.abs(arr[big]))), int(np.sum(big)),
                                            "clamped to +-65504 in the FP16 model"))
    tiny = int(np.sum((arr != 0) & (np.abs(arr) < 2.0**-24) & finite))
    return np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), tiny


_NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"})


def _beyond_fp16(g: _Graph, names: Iterable[str]) -> str | None:
    """The first constant among `names` with a finite value beyond FP16's range, or None."""
    for name in names:
        v = g.value(name) if name and g.is_constant(name) else None
        if v is not None and v.dtype.kind == "f" and v.size and np.any(np.isfinite(v) & (np.abs(v) > FP16_MAX)):
            return name
    return None


def build_fp16_model(
    model: Any,
    *,
    keep_io_types: bool = True,
    keep_fp32_ops: Collection[str] = DEFAULT_FP16_BLOCKLIST,
    keep_fp32_nodes: Collection[str] = (),
    keep_decomposed_layernorm: bool = True,
    amax: Mapping[str, float] | None = None,
) -> tuple[Any, Fp16Report]:
    """Return the FP16 version of an FP32 ModelProto (a copy) and its report.

    Every node runs in FP16 except the kept ones, which keep FP32 inputs and outputs; Casts are
    inserted wherever a tensor crosses between the two, and at the graph boundary when
    `keep_io_types`. Float constants are converted (|x| > 65504 clamped and reported); a constant read
    only by FP32 nodes stays FP32. Nodes with subgraphs and non-ONNX domains stay FP32 (their FP16
    support cannot be checked here).
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m.graph)
    graph = m.graph
    types = _tensor_types(m)
    g = _Graph(graph)
    names = _Names(graph)
    ln_nodes = _decomposed_layernorm_nodes(g) if keep_decomposed_layernorm else set()
    warnings: list[str] = []
    kept: list[FloatNode] = []
    fp32_nodes: set[str] = set()
    for node in graph.node:
        reason = ""
        if node.op_type in keep_fp32_ops:
            reason = f"op type {node.op_type} kept in FP32"
        elif node.name in keep_fp32_nodes:
            reason = "kept in FP32 on request"
        elif node.name in ln_nodes:
            reason = "part of a decomposed LayerNorm (Pow / mean of squares overflow FP16)"
        elif node.domain not in ("", "ai.onnx"):
            reason = f"custom domain '{node.domain}' (FP16 support unknown)"
        elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            reason = "has a subgraph"
        elif node.op_type in _NORM_OPS and (big := _beyond_fp16(g, node.input[1:])):
            # A clamped running variance (Paddle exports hold ~1e8) would rescale every output of the channel.
            reason = f"its parameter '{big}' holds values beyond FP16's range"
        if reason:
            fp32_nodes.add(node.name)
            if any(types.get(t) == _FLOAT for t in list(node.input) + list(node.output)):
                kept.append(FloatNode(node.name, node.op_type, reason))

    # A float Constant read by an FP32 node stays FP32 (FP16 readers get a Cast): converting it would
    # round or clamp a value the FP32 node was kept in FP32 to see exactly (Resize scales, masks).
    for node in graph.node:
        if node.op_type == "Constant" and node.name not in fp32_nodes and node.output:
            readers = g.consumers.get(node.output[0], [])
            if any(r.name in fp32_nodes or j in _FP32_ONLY_INPUTS.get(r.op_type, ()) for r, j in readers) \
                    or node.output[0] in g.output_names:
                fp32_nodes.add(node.name)

    unknown = sorted({t for n in graph.node for t in list(n.input) + list(n.output) if t and t not in types})
    if unknown:
        warnings.append(f"type inference left {len(unknown)} tensor(s) untyped (e.g. '{unknown[0]}'); they are "
                        f"treated as non-float")

    out_of_range: list[OutOfRangeValue] = []
    underflow = 0
    # Float constants: converted where an FP16 node reads them; an FP32 reader keeps (or gets) an FP32 copy.
    cur: dict[str, int] = dict(types)  # current element type of each tensor as we rewrite
    init_fp16: dict[str, str] = {}
    new_inits: list[Any] = []
    fp32_only_reads: set[str] = set()
    for node in graph.node:
        for i in _FP32_ONLY_INPUTS.get(node.op_type, ()):
            if i < len(node.input):
                fp32_only_reads.add(node.input[i])
    for t in list(graph.initializer):
        if t.data_type != _FLOAT or t.name in g.input_names:
            continue
        readers = g.consumers.get(t.name, [])
        fp16_readers = [n for n, j in readers if n.name not in fp32_nodes
                        and j not in _FP32_ONLY_INPUTS.get(n.op_type, ())]
        arr = numpy_helper.to_array(t)
        if not fp16_readers:
            if np.any(np.isfinite(arr) & (np.abs(arr) > FP16_MAX)):
                out_of_range.append(OutOfRangeValue(t.name, float(np.max(np.abs(arr[np.isfinite(arr)]))),
                                                    int(np.sum(np.abs(arr) > FP16_MAX)), "kept in FP32 (read only by FP32 nodes)"))
            continue
        half, tiny = _to_fp16(arr, t.name, out_of_range)
        underflow += tiny
        fp32_readers = len(readers) > len(fp16_readers) or t.name in g.output_names or t.name in g.subgraph_refs
        if fp32_readers:
            name16 = names.fresh(f"{t.name}_fp16")
            new_inits.append(numpy_helper.from_array(half, name16))
            init_fp16[t.name] = name16
        else:
            t.CopyFrom(numpy_helper.from_array(half, t.name))
            cur[t.name] = _FLOAT16
    graph.initializer.extend(new_inits)
    for name, n16 in init_fp16.items():
        cur[n16] = _FLOAT16
        cur[name] = _FLOAT

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[Any] = []
    num_fp16 = 0

    def cast_to(src: str, to: int) -> str:
        key = (src, to)
        if key not in casts:
            out = names.fresh(f"{src}_to_{'fp16' if to == _FLOAT16 else 'fp32'}")
            new_nodes.append(helper.make_node("Cast", [src], [out], to=to, name=names.fresh(f"{out}_Cast")))
            casts[key] = out
            cur[out] = to
        return casts[key]

    # Graph inputs: with keep_io_types they stay FP32 and readers get Casts; otherwise they become FP16.
    if not keep_io_types:
        for vi in graph.input:
            if vi.type.tensor_type.elem_type == _FLOAT and vi.name not in g.initializers:
                vi.type.tensor_type.elem_type = _FLOAT16
                cur[vi.name] = _FLOAT16

    for node in list(graph.node):
        is16 = node.name not in fp32_nodes
        want = _FLOAT16 if is16 else _FLOAT
        for j, t in enumerate(node.input):
            if not t:
                continue
            if is16 and t in init_fp16 and j not in _FP32_ONLY_INPUTS.get(node.op_type, ()):
                node.input[j] = init_fp16[t]
                continue
            have = cur.get(t)
            if have not in (_FLOAT, _FLOAT16):
                continue
            need = _FLOAT if j in _FP32_ONLY_INPUTS.get(node.op_type, ()) else want
            if have != need:
                node.input[j] = cast_to(t, need)
        if is16:
            num_fp16 += 1
            if node.op_type == "Constant":
                val = _constant_node_value(node)
                if val is not None and val.dtype == np.float32:
                    # value / value_float / value_floats all become one FP16 `value` tensor.
                    half, tiny = _to_fp16(val, node.output[0], out_of_range)
                    underflow += tiny
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(half)))
                    cur[node.output[0]] = _FLOAT16
                new_nodes.append(node)
                continue
            if node.op_type == "Cast" and _attr(node, "to", 0) == _FLOAT:
                for a in node.attribute:
                    if a.name == "to":
                        a.i = _FLOAT16
            if node.op_type == "ConstantOfShape":
                value = [a for a in node.attribute if a.name == "value"]
                if not value:  # no `value`: the spec's default is a float32 zero, which must become FP16 too
                    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(
                        np.zeros(1, np.float16))))
                for a in value:
                    if a.t.data_type == _FLOAT:
                        half, _ = _to_fp16(numpy_helper.to_array(a.t), node.output[0], out_of_range)
                        a.t.CopyFrom(numpy_helper.from_array(half, a.t.name))
            for o in node.output:
                if cur.get(o) == _FLOAT:
                    cur[o] = _FLOAT16
        new_nodes.append(node)

    # Graph outputs: a Cast under the output's own name where the producer's precision is not the I/O one
    # (FP16 producers with keep_io_types, FP32-kept producers without it).
    io_type = _FLOAT if keep_io_types else _FLOAT16
    for vi in graph.output:
        t = vi.name
        have = cur.get(t)
        if have not in (_FLOAT, _FLOAT16) or t in g.input_names:
            continue
        vi.type.tensor_type.elem_type = io_type
        if have == io_type:
            continue
        inner = names.fresh(f"{t}_{'fp16' if have == _FLOAT16 else 'fp32'}")
        for n in new_nodes:
            for k, o in enumerate(n.output):
                if o == t:
                    n.output[k] = inner
            for k, i in enumerate(n.input):
                if i == t:
                    n.input[k] = inner
        new_nodes.append(helper.make_node("Cast", [inner], [t], to=io_type, name=names.fresh(f"{t}_Cast_io")))
        casts[(inner, io_type)] = t

    del graph.node[:]
    graph.node.extend(_topological(new_nodes, graph))
    # Inferred value_info of converted tensors would now state the wrong type; ORT re-infers it.
    del graph.value_info[:]

    overflow: list[tuple[str, float]] = []
    if amax:
        overflow = sorted(((k, float(v)) for k, v in amax.items() if np.isfinite(v) and abs(float(v)) > FP16_MAX),
                          key=lambda kv: -kv[1])
        if overflow:
            warnings.append(f"{len(overflow)} activation(s) have a calibrated amax above 65504 and overflow in FP16, "
                            f"e.g. '{overflow[0][0]}' ({overflow[0][1]:.3g}): keep their producers in FP32")
    if out_of_range:
        warnings.append(f"{len(out_of_range)} constant(s) hold values beyond FP16's range, e.g. "
                        f"'{out_of_range[0].tensor}' (max |x| {out_of_range[0].max_abs:.3g}): "
                        f"{out_of_range[0].action}")
    report = Fp16Report(
        model_path=None, output_path=None, io_kept_fp32=keep_io_types, num_fp16_nodes=num_fp16,
        kept_fp32=tuple(kept), out_of_range=tuple(out_of_range), activation_overflow=tuple(overflow),
        underflow_values=underflow, num_casts=len(casts), warnings=tuple(warnings),
    )
    return m, report


def _topological(nodes: Sequence[Any], graph: Any) -> list[Any]:
    """Order nodes so every input is produced before it is read (stable: original order where possible)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    deps: list[set[int]] = []
    for n in nodes:
        reads = set(n.input) | _node_subgraph_reads(n)
        deps.append({produced_by[t] for t in reads if t and t in produced_by and t not in available})
    order: list[Any] = []
    done: set[int] = set()
    pending = list(range(len(nodes)))
    while pending:
        rest = []
        progressed = False
        for i in pending:
            if deps[i] <= done:
                order.append(nodes[i])
                done.add(i)
                progressed = True
            else:
                rest.append(i)
        if not progressed:
            raise BuildError("the converted graph has a cycle; this is a quantpipe bug, please report it")
        pending = rest
    return order


def _node_subgraph_reads(node: Any) -> set[str]:
    from onnx import AttributeProto

    out: set[str] = set()
    for a in node.attribute:
        subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for s in subs:
            out |= {i for n in s.node for i in n.input if i}
    return out


def write_fp16_model(
    model_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    keep_io_types: bool = True,
    keep_fp32_ops: Collection[str] = DEFAULT_FP16_BLOCKLIST,
    keep_fp32_nodes: Collection[str] = (),
    amax: Mapping[str, float] | None = None,
) -> Fp16Report:
    """Write the FP16 version of an FP32 ONNX model, checked, atomically.

    Args:
        model_path: FP32 ONNX model.
        out_path: destination.
        keep_io_types: keep graph inputs / outputs FP32 (Casts at the boundary).
        keep_fp32_ops: op types kept in FP32.
        keep_fp32_nodes: node names kept in FP32.
        amax: optional calibrated amax per tensor, to report activations that overflow FP16.
    """
    src = load_onnx(model_path)
    fp16, report = build_fp16_model(src, keep_io_types=keep_io_types, keep_fp32_ops=frozenset(keep_fp32_ops),
                                    keep_fp32_nodes=frozenset(keep_fp32_nodes), amax=amax)
    warnings = save_onnx(fp16, out_path, reference=src)
    for w in report.warnings + tuple(warnings):
        log.warning("%s", w)
    return dataclasses.replace(report, model_path=os.fspath(model_path), output_path=os.fspath(out_path),
                               warnings=report.warnings + tuple(warnings))
