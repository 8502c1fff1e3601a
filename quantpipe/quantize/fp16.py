"""The FP16 model: every node in FP16 except those FP16 cannot hold, with Casts where precisions meet."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from quantpipe.config import DEFAULT_FP16_BLOCKLIST, Fp16Config
from quantpipe.externaldata import tensor_value
from quantpipe.onnxgraph import (
    FLOAT,
    FLOAT16,
    Graph,
    Names,
    attr,
    constant_node_value,
    decomposed_layernorm_nodes,
    load_onnx,
    name_nodes,
    save_onnx,
    topological_order,
)
from quantpipe.quantize.types import FloatNode

__all__ = ["FP16_MAX", "Fp16Report", "OutOfRangeValue", "build_fp16_model", "write_fp16_model"]

log = logging.getLogger(__name__)

FP16_MAX = 65504.0


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
            v = constant_node_value(n)
            if v is not None:
                types[n.output[0]] = FLOAT if v.dtype == np.float32 else types.get(n.output[0], -1)
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


def _beyond_fp16(g: Graph, names: Iterable[str]) -> str | None:
    """The first constant among `names` with a finite value beyond FP16's range, or None."""
    for name in names:
        v = g.value(name) if name and g.is_constant(name) else None
        if v is not None and v.dtype.kind == "f" and v.size and np.any(np.isfinite(v) & (np.abs(v) > FP16_MAX)):
            return name
    return None


#: FP16's smallest positive (subnormal) value: a nonzero constant below it is 0 in FP16.
FP16_TINY = 2.0**-24
#: The most elements a constant has to be taken for an epsilon (a weight with a few tiny values is no guard).
EPSILON_SIZE = 16
#: Readers whose result an epsilon guards: x + eps before a log, a division or a root.
_GUARDED_OPS = frozenset({"Log", "Div", "Sqrt", "Reciprocal", "Pow"})


def _epsilon(g: Graph, names: Iterable[str]) -> tuple[str, float] | None:
    """The first small constant among `names` holding a nonzero value FP16 rounds to 0 (x + 1e-10 before a log:
    in FP16 the log of 0, -inf, and NaN after it; basic-pitch's whole output was NaN, found probing), or None."""
    for name in names:
        n = g.elements(name) if name else None  # from the dims: a weight is not read to be ruled out
        v = g.value(name) if n is not None and 0 < n <= EPSILON_SIZE else None
        if v is None or v.dtype.kind != "f" or not 0 < v.size <= EPSILON_SIZE:
            continue
        tiny = np.isfinite(v) & (v != 0) & (np.abs(v) < FP16_TINY)
        if np.any(tiny):
            return name, float(np.max(np.abs(v[tiny])))
    return None


def _kept_fp32(m: Any, g: Graph, types: Mapping[str, int], options: Fp16Config,
               overflow: Mapping[str, float] | None = None) -> tuple[set[str], list[FloatNode]]:
    """The nodes that stay FP32 (by op type, name, pattern, domain, subgraph, out-of-range parameters, a tensor
    `overflow` names (calibrated |x| above 65504) read or written, and float Constants an FP32 node reads), and the
    report's entries for those that touch float tensors."""
    import onnx

    keep_ops = frozenset(options.keep_fp32_ops if options.keep_fp32_ops is not None else DEFAULT_FP16_BLOCKLIST)
    keep_nodes = frozenset(options.keep_fp32_nodes)
    ln_nodes = decomposed_layernorm_nodes(g)
    kept: list[FloatNode] = []
    fp32_nodes: set[str] = set()
    for node in m.graph.node:
        reason = ""
        if node.op_type in keep_ops:
            reason = f"op type {node.op_type} kept in FP32"
        elif node.name in keep_nodes:
            reason = "kept in FP32 on request"
        elif node.name in ln_nodes:
            reason = "part of a decomposed LayerNorm (Pow / mean of squares overflow FP16)"
        elif node.domain not in ("", "ai.onnx"):
            reason = f"custom domain '{node.domain}' (FP16 support unknown)"
        elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            reason = "has a subgraph"
        elif any(o in g.subgraph_refs for o in node.output):
            # A subgraph (kept FP32 whole) reads this tensor by name from the outer scope: FP16 there would give
            # it another type than it was written for (the checker refuses the model).
            reason = "its output is read inside a subgraph, which stays FP32"
        elif node.op_type in _NORM_OPS and (big := _beyond_fp16(g, node.input[1:])):
            # A clamped running variance (Paddle exports hold ~1e8) would rescale every output of the channel.
            reason = f"its parameter '{big}' holds values beyond FP16's range"
        elif overflow and (hot := next((t for t in [*node.output, *node.input] if t in overflow), None)):
            # In FP16 that tensor is inf, and so is everything computed from it (an L2 norm's sum of squares).
            reason = f"'{hot}' reaches {overflow[hot]:.3g} on the calibration data, beyond FP16's 65504"
        elif eps := _epsilon(g, node.input):
            reason = f"its constant '{eps[0]}' ({eps[1]:.3g}) is 0 in FP16, an epsilon that guards what reads it"
        elif guard := next((p for t in node.input if node.op_type in _GUARDED_OPS
                            and (p := g.producer.get(t)) is not None and _epsilon(g, p.input)), None):
            # x + eps stays FP32; so must the log / division / root it guards: cast back to FP16 it would be x again.
            reason = f"reads '{guard.output[0]}', which holds an epsilon FP16 rounds to 0"
        if reason:
            fp32_nodes.add(node.name)
            if any(types.get(t) == FLOAT for t in list(node.input) + list(node.output)):
                kept.append(FloatNode(node.name, node.op_type, reason))

    # A float Constant read by an FP32 node stays FP32 (FP16 readers get a Cast): converting it would
    # round or clamp a value the FP32 node was kept in FP32 to see exactly (Resize scales, masks).
    for node in m.graph.node:
        if node.op_type == "Constant" and node.name not in fp32_nodes and node.output:
            readers = g.consumers.get(node.output[0], [])
            if any(r.name in fp32_nodes or j in _FP32_ONLY_INPUTS.get(r.op_type, ()) for r, j in readers) \
                    or node.output[0] in g.output_names:
                fp32_nodes.add(node.name)
    return fp32_nodes, kept


class _Rewrite:
    """The state of one conversion: each tensor's current element type, the Casts made so far (one per tensor
    and direction), the out-of-range constants and the count of values that underflow to 0."""

    def __init__(self, graph: Any, types: Mapping[str, int]) -> None:
        self.names = Names(graph)
        self.cur: dict[str, int] = dict(types)
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[Any] = []
        self.out_of_range: list[OutOfRangeValue] = []
        self.underflow = 0

    def half(self, arr: np.ndarray, name: str) -> np.ndarray:
        half, tiny = _to_fp16(arr, name, self.out_of_range)
        self.underflow += tiny
        return half

    def cast_to(self, src: str, to: int) -> str:
        from onnx import helper

        key = (src, to)
        if key not in self.casts:
            out = self.names.fresh(f"{src}_to_{'fp16' if to == FLOAT16 else 'fp32'}")
            self.new_nodes.append(helper.make_node("Cast", [src], [out], to=to, name=self.names.fresh(f"{out}_Cast")))
            self.casts[key] = out
            self.cur[out] = to
        return self.casts[key]


def _convert_initializers(graph: Any, g: Graph, fp32_nodes: set[str], rw: _Rewrite) -> dict[str, str]:
    """Float initializers converted where an FP16 node reads them; one read by FP32 nodes too keeps its FP32
    value and gets an FP16 twin. Returns name -> FP16 twin."""
    from onnx import numpy_helper

    init_fp16: dict[str, str] = {}
    new_inits: list[Any] = []
    for t in list(graph.initializer):
        if t.data_type != FLOAT or t.name in g.input_names:
            continue
        readers = g.consumers.get(t.name, [])
        fp16_readers = [n for n, j in readers if n.name not in fp32_nodes
                        and j not in _FP32_ONLY_INPUTS.get(n.op_type, ())]
        arr = tensor_value(t)  # an external weight is read from the model's folder
        if not fp16_readers:
            if np.any(np.isfinite(arr) & (np.abs(arr) > FP16_MAX)):
                rw.out_of_range.append(OutOfRangeValue(t.name, float(np.max(np.abs(arr[np.isfinite(arr)]))),
                                                       int(np.sum(np.abs(arr) > FP16_MAX)),
                                                       "kept in FP32 (read only by FP32 nodes)"))
            continue
        half = rw.half(arr, t.name)
        fp32_readers = len(readers) > len(fp16_readers) or t.name in g.output_names or t.name in g.subgraph_refs
        if fp32_readers:
            name16 = rw.names.fresh(f"{t.name}_fp16")
            new_inits.append(numpy_helper.from_array(half, name16))
            init_fp16[t.name] = name16
        else:
            t.CopyFrom(numpy_helper.from_array(half, t.name))
            rw.cur[t.name] = FLOAT16
    graph.initializer.extend(new_inits)
    for name, n16 in init_fp16.items():
        rw.cur[n16] = FLOAT16
        rw.cur[name] = FLOAT
    return init_fp16


def _to_fp16_node(node: Any, rw: _Rewrite) -> None:
    """An FP16 node's own float payload: a Constant's value, a Cast to float, a ConstantOfShape's value."""
    from onnx import helper, numpy_helper

    if node.op_type == "Constant":
        val = constant_node_value(node)
        if val is not None and val.dtype == np.float32:
            # value / value_float / value_floats all become one FP16 `value` tensor.
            half = rw.half(val, node.output[0])
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(half)))
            rw.cur[node.output[0]] = FLOAT16
        return
    if node.op_type == "Cast" and attr(node, "to", 0) == FLOAT:
        for a in node.attribute:
            if a.name == "to":
                a.i = FLOAT16
    if node.op_type == "ConstantOfShape":
        value = [a for a in node.attribute if a.name == "value"]
        if not value:  # no `value`: the spec's default is a float32 zero, which must become FP16 too
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        for a in value:
            if a.t.data_type == FLOAT:
                half, _ = _to_fp16(tensor_value(a.t), node.output[0], rw.out_of_range)
                a.t.CopyFrom(numpy_helper.from_array(half, a.t.name))
    for o in node.output:
        if rw.cur.get(o) == FLOAT:
            rw.cur[o] = FLOAT16


def _retype_nodes(graph: Any, fp32_nodes: set[str], init_fp16: Mapping[str, str], rw: _Rewrite) -> int:
    """Every node in order, with a Cast on each input whose type differs from the node's precision; returns
    the number of FP16 nodes."""
    num_fp16 = 0
    for node in list(graph.node):
        is16 = node.name not in fp32_nodes
        want = FLOAT16 if is16 else FLOAT
        for j, t in enumerate(node.input):
            if not t:
                continue
            if is16 and t in init_fp16 and j not in _FP32_ONLY_INPUTS.get(node.op_type, ()):
                node.input[j] = init_fp16[t]
                continue
            have = rw.cur.get(t)
            if have not in (FLOAT, FLOAT16):
                continue
            need = FLOAT if j in _FP32_ONLY_INPUTS.get(node.op_type, ()) else want
            if have != need:
                node.input[j] = rw.cast_to(t, need)
        if is16:
            num_fp16 += 1
            _to_fp16_node(node, rw)
        rw.new_nodes.append(node)
    return num_fp16


def _cast_outputs(graph: Any, g: Graph, io_type: int, rw: _Rewrite) -> None:
    """Graph outputs: a Cast under the output's own name where the producer's precision is not the I/O one
    (FP16 producers with keep_io_types, FP32-kept producers without it)."""
    from onnx import helper

    for vi in graph.output:
        t = vi.name
        have = rw.cur.get(t)
        if have not in (FLOAT, FLOAT16) or t in g.input_names:
            continue
        vi.type.tensor_type.elem_type = io_type
        if have == io_type:
            continue
        inner = rw.names.fresh(f"{t}_{'fp16' if have == FLOAT16 else 'fp32'}")
        for n in rw.new_nodes:
            for k, o in enumerate(n.output):
                if o == t:
                    n.output[k] = inner
            for k, i in enumerate(n.input):
                if i == t:
                    n.input[k] = inner
        rw.new_nodes.append(helper.make_node("Cast", [inner], [t], to=io_type, name=rw.names.fresh(f"{t}_Cast_io")))
        rw.casts[(inner, io_type)] = t


def build_fp16_model(model: Any, options: Fp16Config = Fp16Config(), *,
                     amax: Mapping[str, float] | None = None) -> tuple[Any, Fp16Report]:
    """Return the FP16 version of an FP32 ModelProto (a copy) and its report.

    Every node runs in FP16 except the kept ones, which keep FP32 inputs and outputs; Casts are
    inserted wherever a tensor crosses between the two, and at the graph boundary when
    `options.keep_io_types`. Float constants are converted (|x| > 65504 clamped and reported); a constant read
    only by FP32 nodes stays FP32. Nodes with subgraphs and non-ONNX domains stay FP32 (their FP16
    support cannot be checked here). `amax` (calibrated, optional) names the activations that overflow FP16.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m.graph)
    graph = m.graph
    types = _tensor_types(m)
    g = Graph(graph)
    rw = _Rewrite(graph, types)
    warnings: list[str] = []
    overflow = {k: float(v) for k, v in (amax or {}).items() if np.isfinite(v) and abs(float(v)) > FP16_MAX}
    fp32_nodes, kept = _kept_fp32(m, g, types, options, overflow)
    unknown = sorted({t for n in graph.node for t in list(n.input) + list(n.output) if t and t not in types})
    if unknown:
        warnings.append(f"type inference left {len(unknown)} tensor(s) untyped (e.g. '{unknown[0]}'); they are "
                        f"treated as non-float")
    init_fp16 = _convert_initializers(graph, g, fp32_nodes, rw)
    # Graph inputs: with keep_io_types they stay FP32 and readers get Casts; otherwise they become FP16.
    if not options.keep_io_types:
        for vi in graph.input:
            if vi.type.tensor_type.elem_type == FLOAT and vi.name not in g.initializers \
                    and vi.name not in g.subgraph_refs:
                vi.type.tensor_type.elem_type = FLOAT16
                rw.cur[vi.name] = FLOAT16
    num_fp16 = _retype_nodes(graph, fp32_nodes, init_fp16, rw)
    _cast_outputs(graph, g, FLOAT if options.keep_io_types else FLOAT16, rw)
    del graph.node[:]
    graph.node.extend(topological_order(rw.new_nodes, graph))
    # Inferred value_info of converted tensors would now state the wrong type; ORT re-infers it.
    del graph.value_info[:]

    ranked = tuple(sorted(overflow.items(), key=lambda kv: -abs(kv[1])))  # the largest first
    if ranked:
        warnings.append(f"{len(ranked)} activation(s) have a calibrated amax above 65504 and would overflow in "
                        f"FP16, e.g. '{ranked[0][0]}' ({ranked[0][1]:.3g}): the nodes that write or read them stay FP32")
    whole = [k for k in kept if k.reason == "has a subgraph"]
    if whole:
        warnings.append(f"{len(whole)} node(s) with subgraphs (If / Loop / Scan, e.g. '{whole[0].name}') stay FP32 "
                        f"with everything inside them: what those branches compute is not converted to FP16")
    if rw.out_of_range:
        first = rw.out_of_range[0]
        warnings.append(f"{len(rw.out_of_range)} constant(s) hold values beyond FP16's range, e.g. "
                        f"'{first.tensor}' (max |x| {first.max_abs:.3g}): {first.action}")
    report = Fp16Report(
        model_path=None, output_path=None, io_kept_fp32=options.keep_io_types, num_fp16_nodes=num_fp16,
        kept_fp32=tuple(kept), out_of_range=tuple(rw.out_of_range),
        activation_overflow=ranked,
        underflow_values=rw.underflow, num_casts=len(rw.casts), warnings=tuple(warnings),
    )
    return m, report


def fp32_ranges(model_path: str | os.PathLike[str], dataset: Any, batch_size: int = 32) -> dict[str, float]:
    """Each activation's largest magnitude in FP32 over `dataset` (one pass, minmax's amax): which activations
    overflow FP16's 65504. A pipeline that builds FP16 without INT8 calibrates nothing, and an FP16 model whose
    activation reached 71349 was written and passed (onnxruntime's CPU runs FP16 Conv in FP32; found probing)."""
    from quantpipe.calibration import calibrate_in_memory  # here: calibration imports no quantize module

    log.info("measuring the FP32 activations' ranges on %d calibration sample(s): which ones overflow FP16",
             getattr(dataset, "num_samples", 0))
    return calibrate_in_memory(model_path, dataset, method="minmax", batch_size=batch_size)


def write_fp16_model(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     options: Fp16Config = Fp16Config(), *, amax: Mapping[str, float] | None = None,
                     calibration_data: Any | None = None, batch_size: int = 32) -> Fp16Report:
    """Write the FP16 version of an FP32 ONNX model (`build_fp16_model`), checked, atomically. Without `amax`, the
    activations' ranges are measured on `calibration_data` (a `Dataset`) where it is given (`fp32_ranges`)."""
    if not amax and calibration_data is not None:
        amax = fp32_ranges(model_path, calibration_data, batch_size)
    src = load_onnx(model_path)
    fp16, report = build_fp16_model(src, options, amax=amax)
    warnings = save_onnx(fp16, out_path, reference=src)
    for w in report.warnings + tuple(warnings):
        log.warning("%s", w)
    return dataclasses.replace(report, model_path=os.fspath(model_path), output_path=os.fspath(out_path),
                               warnings=report.warnings + tuple(warnings))
