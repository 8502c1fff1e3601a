"""The part of a graph that a change reaches, as a model of its own: the searches run only that part for a
candidate, fed with the unchanged tensors from one run of the whole model.

In a session without graph optimizations (`ort_session(optimize=False)`) onnxruntime runs each node as written,
so a node given the same inputs computes the same bits whether its inputs come from the graph or from a feed:
the downstream model's outputs equal the whole model's, bit for bit (tests/unit/test_downstream.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.onnxgraph import subgraph_references

__all__ = ["Cut", "NodeIndex", "changed_nodes", "constant_tensors", "cut_below"]


class Cut:
    """The nodes of a model that tensors `changed` reach, the tensors they read from the rest (`feeds`) and the
    model outputs they compute (`outputs`); `model(dtypes)` builds the downstream model."""

    def __init__(self, model: Any, nodes: list[Any], feeds: list[str], outputs: list[str]) -> None:
        self.source, self.nodes, self.feeds, self.outputs = model, nodes, feeds, outputs

    def model(self, dtypes: Mapping[str, np.dtype], shapes: Mapping[str, Any] | None = None) -> Any:
        """The downstream model; `dtypes` gives each feed's element type (as the whole model's run returned it),
        `shapes` the ValueInfoProto of tensors whose shape is known (onnx shape inference of the whole model),
        declared on the part's inputs."""
        import onnx
        from onnx import helper

        src = self.source
        m = onnx.ModelProto()
        m.ir_version = src.ir_version
        m.opset_import.extend(src.opset_import)
        g = m.graph
        g.name = f"{src.graph.name}_downstream"
        g.node.extend(self.nodes)
        read = {i for n in self.nodes for i in n.input if i} | _subgraph_reads(self.nodes)
        g.initializer.extend(t for t in src.graph.initializer if t.name in read and t.name not in self.feeds)
        # The shapes the whole model declares or infers.
        known = {v.name: v for v in [*(shapes or {}).values(), *src.graph.input, *src.graph.value_info]}
        for name in self.feeds:
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name]))
            v = known.get(name)
            if v is not None and v.type.tensor_type.elem_type == elem:
                g.input.append(v)
            else:
                g.input.append(helper.make_tensor_value_info(name, elem, None))
        inside = {o for n in self.nodes for o in n.output}
        g.value_info.extend(v for v in src.graph.value_info if v.name in inside)
        by_name = {o.name: o for o in src.graph.output}
        g.output.extend(by_name[o] for o in self.outputs)
        return m


def cut_below(model: Any, changed: Iterable[str], outputs: Sequence[str] | None = None, *,
              nodes: Iterable[str] = (), base: Any | None = None, base_constants: set[str] | None = None) -> Cut:
    """The nodes reached from the tensors `changed` (graph inputs or node outputs: their readers, their readers'
    readers, ...) and from the nodes named `nodes` (and theirs), in graph order, with the tensors they read from
    outside (`Cut.feeds`) and the model outputs (among `outputs`, default all) they compute.

    With `base` (the model whose run gives the feeds), no tensor that is a constant in either graph is fed
    (`constant_tensors`): its producer joins the part, with everything that reads it, until none is left.
    `base_constants`: `constant_tensors(base)`, when the caller cuts many models against one base (computed once).
    """
    g = model.graph
    producer = {o: k for k, n in enumerate(g.node) for o in n.output if o}
    readers: dict[str, list[int]] = {}
    for k, n in enumerate(g.node):
        for i in {*n.input, *_subgraph_reads([n])}:
            readers.setdefault(i, []).append(k)
    initializers = {t.name for t in g.initializer}
    inputs = {i.name for i in g.input}
    seeds = set(nodes)
    pending = [k for k, n in enumerate(g.node) if n.name in seeds] + [k for t in changed for k in readers.get(t, [])]
    inside: set[int] = set()
    constants = None
    if base is not None:
        constants = constant_tensors(model) | (constant_tensors(base) if base_constants is None else base_constants)
    while pending:
        while pending:  # downstream closure: every reader of a tensor the part computes
            k = pending.pop()
            if k not in inside:
                inside.add(k)
                pending += [r for o in g.node[k].output if o for r in readers.get(o, [])]
        for k in sorted(inside):  # constants are not fed: their producer joins
            for i in g.node[k].input:
                p = producer.get(i)
                if p is not None and p not in inside and (constants is not None and i in constants):
                    pending.append(p)
    found = [g.node[k] for k in sorted(inside)]
    produced = {o for n in found for o in n.output if o}
    # Tensors of this graph the cut reads from outside it (a subgraph's own names are not among them).
    outside = (inputs | set(producer)) - produced - initializers
    read: list[str] = []
    for n in found:
        for i in [*n.input, *sorted(_subgraph_reads([n]))]:
            if i in outside and i not in read:
                read.append(i)
    # A Constant node's output is copied in, not fed (alone: its other readers stay out): fed as a graph input, an
    # index or axes tensor leaves onnxruntime's shape inference without its value (a legacy torch export's Resize
    # sizes from Shape / Gather / Unsqueeze: "Number of elements of input 'sizes' (0)", found probing DeepLabV3).
    held = {producer[i] for i in read if i in producer and g.node[producer[i]].op_type == "Constant"}
    if held:
        found = [g.node[k] for k in sorted(inside | held)]
        read = [i for i in read if producer.get(i) not in held]
    wanted = [o.name for o in g.output] if outputs is None else list(outputs)
    return Cut(model, found, read, [o for o in wanted if o in produced])


def constant_tensors(model: Any) -> set[str]:
    """Tensors of `model` computed from constants alone (initializers, Constant nodes and what only reads them:
    a quantized weight's DequantizeLinear, a Reshape's shape). `cut_below` never feeds one: onnxruntime takes a
    constant weight as one (`ortsession.fold_weight_dequantize` folds a quantized weight into one, and a
    Gemm / MatMul prepacks it), while a fed tensor is a graph input it computes on otherwise (the last bits of a
    GEMM on 16 threads differ)."""
    constant = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # graph order is topological
        if n.op_type == "Constant" or (n.input and all(i in constant for i in n.input if i)):
            constant.update(o for o in n.output if o)
    return constant


def _subgraph_reads(nodes: Iterable[Any]) -> set[str]:
    """Names the nodes' subgraphs (If / Loop bodies) read (a superset of their outer-scope reads)."""
    from onnx import AttributeProto, helper

    nested = [n for n in nodes if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in n.attribute)]
    if not nested:
        return set()
    one = helper.make_graph([], "reads", [], [])
    one.node.extend(nested)
    return subgraph_references(one)


class NodeIndex:
    """A base model's nodes and initializers by name (serialized once), to compare many candidates with it."""

    def __init__(self, base: Any) -> None:
        self.nodes = {n.name: n.SerializeToString() for n in base.graph.node}
        self.inits = {t.name: t for t in base.graph.initializer}


def changed_nodes(model: Any, base: Any) -> set[str]:
    """Names of the nodes of `model` that `base` (a model, or its `NodeIndex`) does not hold as they are (new, or
    another op, inputs, outputs or attributes), and of those that read an initializer whose value differs from
    `base`'s."""
    index = base if isinstance(base, NodeIndex) else NodeIndex(base)
    inits = index.inits
    # Message equality compares the fields (name, dims, type, data) without serializing the weights again.
    differ = {t.name for t in model.graph.initializer if t.name not in inits or inits[t.name] != t}
    return {n.name for n in model.graph.node
            if index.nodes.get(n.name) != n.SerializeToString() or any(i in differ for i in n.input)}
