"""ONNX graph queries and edits shared by the quantizer and the FP16 writer: loading and atomic saving,
node naming, a read-only index of a graph (`Graph`), constants, attributes, fresh names, topological order.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import BuildError, ModelError
from quantpipe.externaldata import (
    BASEPATH,
    check_external_data,
    drop_entry,
    entry,
    external_bytes,
    external_data_files,
    external_tensors,
    has_external_data,
    in_memory_bytes,
    set_entry,
    tensor_value,
    write_external,
)

__all__ = [
    "FLOAT", "FLOAT16", "Graph", "LARGE_MODEL_BYTES", "Names", "QDQ_OPS", "QUANTIZED_OPS", "RECURRENT_OPS",
    "UNCACHED_EXTERNAL_BYTES",
    "add_initializer", "attr", "constant_node_value", "decomposed_layernorm_nodes", "depthwise_convs",
    "drop_unused_initializers",
    "expose_outputs", "linear_front_end", "load_onnx", "model_sha256", "model_size_bytes", "name_nodes", "named_copy",
    "node_subgraphs",
    "NAME_CHARS", "opset_of", "reaching", "save_onnx", "short_name", "subgraph_references", "tensor_outputs",
    "topological_order",
    "weights_as_inputs",
]

log = logging.getLogger(__name__)

#: The explicit-quantization pair: a model with them is a Q/DQ model.
QDQ_OPS: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops that mean a model is already quantized (quantpipe calibrates and quantizes FP32 models only).
QUANTIZED_OPS: frozenset[str] = QDQ_OPS | frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                                                     "DynamicQuantizeLinear", "QLinearAdd", "MatMulIntegerToFloat"})
FLOAT = 1  # TensorProto.FLOAT
FLOAT16 = 10  # TensorProto.FLOAT16
LARGE_MODEL_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin for the graph itself
#: An external tensor at least this large is read from its file each time `Graph.value` is asked for it (from
#: the page cache, after the first time) instead of being kept: a 2.4 GB model's weights would all stay alive.
UNCACHED_EXTERNAL_BYTES = 64 << 20


def load_onnx(path: str | os.PathLike[str], *, external_data: bool = False, weights_listed: bool = False) -> Any:
    """Load an ONNX model, or raise ModelError saying what is wrong.

    With `external_data=False` tensors stored in external files stay references to them (the proto holds the
    graph only, whatever the model's size): for reading the graph, checking it (by path) and sessions that
    read the weights from the model's folder (`ortsession.ort_session(base_dir=...)`); `tensor_value` reads one
    such tensor. Either way a missing or short external-data file is a ModelError naming it. Weights also listed
    as graph inputs are read as weights (`weights_as_inputs`; `weights_listed=True` leaves that to the caller).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path} does not exist. Check model.path in pipeline.yaml (relative to the YAML "
                         f"file) or --model: the path of an FP32 .onnx file.")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # protobuf and onnx raise many types; all mean "not a readable model"
        raise ModelError(
            f"model {path} is not a valid ONNX file ({type(err).__name__}: {err}). If it uses external data, keep "
            f"the .data file beside it; otherwise export it again (torch.onnx.export, tf2onnx ...) and check it with "
            f"`python -c \"import onnx; onnx.checker.check_model('{path}')\"`."
        ) from err
    check_external_data(model, path)
    if not weights_listed:  # `weights_as_inputs`, unless the caller wants to say what it drops
        weights_as_inputs(model)
    if not external_data:
        for t in external_tensors(model):  # each reference says which folder it is relative to (copies keep it)
            set_entry(t, BASEPATH, os.fspath(path.parent.resolve()))
    elif has_external_data(model):
        try:
            load_external_data_for_model(model, os.fspath(path.parent))
        except Exception as err:  # a file that changed under us, or a location onnx refuses
            raise ModelError(f"model {path}: its external data cannot be read ({type(err).__name__}: {err}). Keep the "
                             f"files its tensors name beside the model, unchanged since it was saved.") from err
    return model


def weights_as_inputs(model: Any) -> list[str]:
    """Drop from `model.graph.input` the inputs an initializer of the same name backs (in place); their names.

    Exports made with `keep_initializers_as_inputs` (PyTorch before 1.4, many detectors still shipped, IR < 4 where
    it was the rule) list every weight as a graph input too. The ONNX standard makes such an initializer a default
    a caller may override, so quantpipe took each weight for a runtime input: a Conv reading one got no Q/DQ (no
    calibrated range) and CenterFace's 60 Convs all stayed FP32 in a model called INT8 (found probing). No data
    file feeds them and TensorRT's parser reads them as weights; quantpipe does the same (the IR version rises to
    4, the first that lets an initializer be no input)."""
    inits = {t.name for t in model.graph.initializer}
    dropped = [i.name for i in model.graph.input if i.name in inits]
    if dropped:
        kept = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(int(model.ir_version), 4)
        log.debug("%d weight(s) listed as graph inputs (keep_initializers_as_inputs) read as weights", len(dropped))
    return dropped


def model_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of an ONNX model: its file, and when it keeps weights in external files, those too (a changed
    weight file changes the model). A model without external data hashes as its file alone."""
    from quantpipe.fsutil import sha256_bytes, sha256_file

    path = Path(path)
    digest = sha256_file(path)
    files = external_data_files(load_onnx(path, external_data=False), path)
    if not files:
        return digest
    parts = [digest] + [f"{f.relative_to(path.parent).as_posix()}:{sha256_file(f)}" for f in files]
    return sha256_bytes("\n".join(parts).encode())


def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """An ONNX model's size on disk: its file and its external-data files."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(load_onnx(path), path))


def save_onnx(model: Any, out_path: str | os.PathLike[str], *, check: bool = True,
              reference: Any | None = None) -> list[str]:
    """Check `model` and write it atomically (external data `<name>.data` beside it when it is too large for
    one protobuf). Tensors `model` still references in external files (`load_onnx(external_data=False)`) are
    read from there into the written copy; `model` itself is not changed.

    The checker runs with full_check (strict shape inference), by path. When the FP32 `reference` model fails
    the same full check, the output is held to the plain check instead, and a warning says so.
    Returns the warnings.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    warnings: list[str] = []
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    large = in_memory_bytes(model) + external_bytes(model) > LARGE_MODEL_BYTES
    if large or has_external_data(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)  # a copy: the caller's model keeps its own tensors
        model = out
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / out_path.name
        data_name = out_path.name + ".data"
        if large:
            write_external(model, tmp)  # streamed tensor by tensor
        else:
            for t in external_tensors(model):  # small enough for one protobuf: the referenced weights go inside
                base = entry(t, BASEPATH)
                drop_entry(t, BASEPATH)
                load_external_data_for_tensor(t, base)
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
            ref = reference if not large and not has_external_data(reference) else None
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


def opset_of(model: Any) -> int:
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



class Graph:
    """Read-only index of a graph: producers, consumers, constants (initializers and Constant nodes).

    `base_dir`: the model's folder, where constants still stored externally are read from (`load_onnx(path,
    external_data=False)`).
    """

    def __init__(self, graph: Any, base_dir: str | os.PathLike[str] | None = None) -> None:
        self.graph = graph
        self.base_dir = base_dir
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
        self.subgraph_refs = subgraph_references(graph)
        self._cache: dict[str, np.ndarray | None] = {}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def elements(self, name: str) -> int | None:
        """The element count of the constant `name` from its dims, without reading its value; None if no constant."""
        if name in self.initializers:
            return int(np.prod(self.initializers[name].dims, dtype=np.int64))
        node = self.constant_nodes.get(name)
        if node is None:
            return None
        t = next((a.t for a in node.attribute if a.name == "value"), None)
        if t is not None:
            return int(np.prod(t.dims, dtype=np.int64))
        v = self.value(name)  # value_float(s) / value_int(s) / sparse: small, or read as `value` reads it
        return None if v is None else int(v.size)

    def remember(self, name: str, value: np.ndarray) -> None:
        """Index a constant added to the graph after this index was built (a rewrite that reads it back)."""
        self._cache[name] = value

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of `name` (initializer or Constant node), or None."""
        if name in self._cache:
            return self._cache[name]
        val: np.ndarray | None = None
        if name in self.initializers:
            t = self.initializers[name]
            val = tensor_value(t, self.base_dir)
            if t.data_location == 1 and val.nbytes >= UNCACHED_EXTERNAL_BYTES:  # TensorProto.EXTERNAL
                return val  # read again when asked again: a large model's weights are not all held at once
        elif name in self.constant_nodes:
            val = constant_node_value(self.constant_nodes[name], self.base_dir)
        self._cache[name] = val
        return val


def constant_node_value(node: Any, base_dir: str | os.PathLike[str] | None = None) -> np.ndarray | None:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == "value":
            return tensor_value(attr.t, base_dir)
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


def node_subgraphs(node: Any) -> list[Any]:
    """The graphs a node holds in its attributes (an If's branches, a Loop's or Scan's body)."""
    from onnx import AttributeProto

    out: list[Any] = []
    for a in node.attribute:
        out += [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
    return out


def subgraph_references(graph: Any) -> set[str]:
    """Names that nodes inside subgraphs (If / Loop / Scan bodies) read from the enclosing scopes."""
    refs: set[str] = set()

    def visit(g: Any) -> None:
        for node in g.node:
            for sub in node_subgraphs(node):
                refs.update(n for sn in sub.node for n in sn.input if n)
                visit(sub)

    visit(graph)
    return refs


def attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


#: Recurrent layers: quantpipe quantizes none of them (their weights stay float).
RECURRENT_OPS = ("GRU", "LSTM", "RNN")

#: Ops whose output is linear in their inputs (a product or quotient only by a constant: `linear_front_end`).
LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Reshape",
                        "Transpose", "Pad", "Slice", "Concat", "Split", "Squeeze", "Unsqueeze", "Flatten", "Expand",
                        "Identity", "AveragePool"})


def linear_front_end(model: Any) -> set[str]:
    """The nodes the graph's inputs reach through linear ops alone (LINEAR_OPS; Mul, Div, MatMul and Gemm only where
    their other operands are constants): a filter bank or transform in the graph before its first nonlinearity.
    basic-pitch's CQT is 26 Convs there, which INT8 breaks only together (found probing); an image model's is its stem
    Conv, before the activation."""
    static = {i.name for i in model.graph.initializer}  # constants, and what shapes and constants alone compute
    for n in model.graph.node:  # in graph order, which ONNX keeps topological
        if n.op_type in ("Constant", "Shape", "Size") or (n.input and all(not t or t in static for t in n.input)):
            static.update(o for o in n.output if o)
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    linear = {i.name for i in model.graph.input} - static
    seen: set[str] = set()
    todo = list(linear)
    while todo:
        for n in consumers.get(todo.pop(), ()):
            ins = [t for t in n.input if t]
            scaled = n.op_type in ("Mul", "Div", "MatMul", "Gemm")
            # Every operand linear or constant (a SiLU's x * sigmoid(x) is not), and a product of one linear factor.
            if n.name in seen or n.op_type not in LINEAR_OPS or not all(t in linear or t in static for t in ins) \
                    or (scaled and sum(t in linear for t in ins) > 1):
                continue
            seen.add(n.name)
            fresh = [o for o in n.output if o and o not in linear]
            linear.update(fresh)
            todo.extend(fresh)
    return seen


def reaching(model: Any, outputs: Iterable[str]) -> set[str]:
    """The names of the nodes whose results reach any of `outputs` (tensor names) through the graph."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    seen: set[str] = set()
    todo = [producer[t] for t in outputs if t in producer]
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        todo.extend(producer[t] for t in [*n.input, *_node_subgraph_reads(n)] if t in producer)
    return seen


def depthwise_convs(model: Any) -> set[str]:
    """The Convs of `model` with more than one group and one input channel per group (weight [C*k, 1, ...]): the
    depthwise convolutions. A weight whose shape the graph does not say (a DequantizeLinear's output) counts by
    its groups alone."""
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            dims[n.output[0]] = tuple(n.attribute[0].t.dims)
    out = set()
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and int(attr(n, "group", 1)) > 1:
            d = dims.get(n.input[1])
            if d is None or (len(d) > 1 and d[1] == 1):
                out.add(n.name)
    return out


def decomposed_layernorm_nodes(g: Graph) -> set[str]:
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



class Names:
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



def named_copy(model: Any) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m.graph)
    return m


def add_initializer(graph: Any, names: Names, base: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    name = names.fresh(base)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name



def drop_unused_initializers(graph: Any, g: Graph) -> None:
    """Remove the initializers nothing reads, in place (the others keep their order). Deleted one by one: clearing
    the list and extending it with the kept ones would copy every kept tensor, weights included."""
    used = {i for n in graph.node for i in n.input} | g.output_names | g.subgraph_refs | g.input_names
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name not in used:
            del graph.initializer[k]



def topological_order(nodes: Sequence[Any], graph: Any) -> list[Any]:
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
    return {i for s in node_subgraphs(node) for n in s.node for i in n.input if i}


def expose_outputs(model: Any, names: Iterable[str], value_info: Mapping[str, Any] | None = None) -> Any:
    """A copy of `model` whose graph also outputs the tensors `names`, each declared with its element type (from
    `value_info` as given, e.g. the caller's own shape inference with the shapes, then the graph's value_info, else
    ONNX shape inference; float where none tells: a search may expose the integer tensors a cut part reads, e.g. a
    Cast to int64 feeding a shape computation)."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    names = [n for n in dict.fromkeys(names) if n not in have]
    given = {n: v for n in names if (v := (value_info or {}).get(n)) is not None and v.type.tensor_type.elem_type}
    types = _elem_types(m, [n for n in names if n not in given])
    for n in names:
        m.graph.output.append(given[n] if n in given else helper.make_tensor_value_info(n, types.get(n) or FLOAT, None))
    return m


def _elem_types(model: Any, names: Sequence[str]) -> dict[str, int]:
    """The element type of each of `names` the model's graph declares or ONNX shape inference finds (models
    under LARGE_MODEL_BYTES; nothing for a tensor neither knows)."""
    g = model.graph
    known = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output, *g.input)}
    known.update({t.name: t.data_type for t in g.initializer})
    if all(known.get(n) for n in names) or model.ByteSize() >= LARGE_MODEL_BYTES:
        return known
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # an op shape inference does not know: those tensors stay float
        return known
    for v in inferred:
        if not known.get(v.name):
            known[v.name] = v.type.tensor_type.elem_type
    return known


def tensor_outputs(model: Any) -> list[str]:
    """The graph outputs that are tensors, in order: what the searches compare with FP32 (a sequence or map output,
    skl2onnx's ZipMap probabilities, is not a tensor; onnxruntime returns it as Python lists of dicts)."""
    return [o.name for o in model.graph.output if not o.type.HasField("sequence_type") and not o.type.HasField("map_type")]


NAME_CHARS = 60
"""A node's name in the verdict and the log is cut to about this many characters (the sensitivity table has it whole)."""


def short_name(name: str) -> str:
    """A node name as the verdict and the log say it: converters join every fused op's name with ';' (tf2onnx), which
    filled six lines of a verdict for three layers (found probing); the first of them, and the middle of one too long,
    are cut."""
    first, sep, _ = name.partition(";")
    cut = first + ("…" if sep else "")
    if len(cut) > NAME_CHARS:
        half = (NAME_CHARS - 1) // 2
        cut = cut[:half] + "…" + cut[-half:]
    return cut
