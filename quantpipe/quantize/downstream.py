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

__all__ = ["FLOAT_BARRIERS", "Cut", "NodeIndex", "changed_nodes", "cut_below", "unsafe_to_feed"]


class Cut:
    """The nodes of a model that tensors `changed` reach, the tensors they read from the rest (`feeds`) and the
    model outputs they compute (`outputs`); `model(dtypes)` builds the downstream model."""

    def __init__(self, model: Any, nodes: list[Any], feeds: list[str], outputs: list[str]) -> None:
        self.source, self.nodes, self.feeds, self.outputs = model, nodes, feeds, outputs

    def model(self, dtypes: Mapping[str, np.dtype], shapes: Mapping[str, Any] | None = None) -> Any:
        """The downstream model; `dtypes` gives each feed's element type (as the whole model's run returned it),
        `shapes` the ValueInfoProto of tensors whose shape is known (onnx shape inference of the whole model):
        onnxruntime's graph optimizations depend on the shapes, and the downstream model must be optimized as the
        whole model is for its outputs to be the same bits."""
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
        # The shapes the whole model declares or infers: graph optimizations depend on them.
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
              nodes: Iterable[str] = (), base: Any | None = None, base_unsafe: set[str] | None = None) -> Cut:
    """The nodes reached from the tensors `changed` (graph inputs or node outputs: their readers, their readers'
    readers, ...) and from the nodes named `nodes` (and theirs), in graph order, with the tensors they read from
    outside (`Cut.feeds`) and the model outputs (among `outputs`, default all) they compute.

    With `base` (the model whose run gives the feeds; its graph optimized by onnxruntime, as `model`'s will be),
    only tensors onnxruntime computes alike in both graphs, whatever their readers, are fed (`unsafe_to_feed`);
    another one's producer joins the part, with everything that reads it, until none is left. `base_unsafe`:
    `unsafe_to_feed(base)`, when the caller cuts many models against one base (the same cut, computed once).
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
    unsafe = None
    if base is not None:
        unsafe = unsafe_to_feed(model) | (unsafe_to_feed(base) if base_unsafe is None else base_unsafe)
    while pending:
        while pending:  # downstream closure: every reader of a tensor the part computes
            k = pending.pop()
            if k not in inside:
                inside.add(k)
                pending += [r for o in g.node[k].output if o for r in readers.get(o, [])]
        for k in sorted(inside):  # feeds computed otherwise in `base` or fused into the part: their producer joins
            for i in g.node[k].input:
                p = producer.get(i)
                if p is not None and p not in inside and (unsafe is not None and i in unsafe):
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
    wanted = [o.name for o in g.output] if outputs is None else list(outputs)
    return Cut(model, found, read, [o for o in wanted if o in produced])


def unsafe_to_feed(model: Any) -> set[str]:
    """Tensors of `model` that a part must not be fed from a run of another model where it also computes them
    (both optimized by onnxruntime): `cut_below` joins this set of the candidate and of `base`.

    Safe to feed: graph inputs, int8 tensors out of a QuantizeLinear (the end of a quantized node group: the group
    is fused or not for reasons inside it, and exposing its output leaves it whole), and float tensors that no
    quantization touches in either graph. Not safe: a constant (folded), a dequantized tensor and anything computed
    from one, and anything that flows on into a QuantizeLinear: onnxruntime fuses such ops into int8 kernels,
    moves Q/DQ across pooling and reshapes, drops a Relu that a quantization clamps anyway, each depending on the
    whole chain, and exposing a tensor in it changes what it does.
    """
    g = model.graph
    constant = {t.name for t in g.initializer}
    after_dq: set[str] = set()  # tensors computed from a dequantized tensor
    for n in g.node:  # graph order is topological
        outs = [o for o in n.output if o]
        if n.op_type == "Constant" or (n.input and all(i in constant for i in n.input if i)):
            constant.update(outs)
        if n.op_type == "DequantizeLinear" or (n.op_type != "QuantizeLinear" and any(i in after_dq for i in n.input)):
            after_dq.update(outs)
    before_q: set[str] = set()  # float tensors that flow on into a QuantizeLinear (not across int8 ones)
    for n in reversed(g.node):
        if n.op_type == "QuantizeLinear":
            before_q.update(n.input[:1])
        elif n.op_type != "DequantizeLinear" and any(o in before_q for o in n.output if o):
            if n.op_type in FLOAT_BARRIERS and not any(i in after_dq for i in n.input):
                continue  # its output is computed in float whatever follows: its inputs are not in the chain
            before_q.update(i for i in n.input if i)
    return constant | after_dq | before_q


#: Ops whose inputs a quantization below them never reaches when none of them is dequantized: onnxruntime fuses
#: such an op with a QuantizeLinear only inside a node group fed by DequantizeLinear (QLinearConv, QLinearMatMul,
#: QLinearAdd, QLinearMul); fed in float, it computes in float and its output alone is the chain's start (the
#: Relu / Clip a quantization clamps anyway, and the reshapes and pooling a QuantizeLinear moves across, sit
#: between it and the QuantizeLinear and stay in the chain). Tried first when the searches ran Q/DQ models
#: optimized and reverted (5th-digit differences in the one-layer sensitivity); since Q/DQ candidates run as
#: written (`reference.run_candidates`) no fusion exists to differ, and the golden check finds every number
#: identical.
FLOAT_BARRIERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul"})


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
