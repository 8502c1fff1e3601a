"""Writing the plan into the graph: QuantizeLinear / DequantizeLinear pairs on activations (one scale per
tensor, scale = amax / 127, zero point 0) and int8 weight initializers behind a DequantizeLinear (one scale
per output channel)."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from quantpipe.errors import BuildError
from quantpipe.int8 import INT8_MAX
from quantpipe.onnxgraph import Graph, Names, drop_unused_initializers
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import Plan
from quantpipe.quantize.weights import int8_weight

__all__ = ["apply_plan"]


def apply_plan(model: Any, g: Graph, plan: Plan, opts: QuantizeOptions) -> list[str]:
    """Rewrite the graph in place; returns the weights whose codes came from GPTQ."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = Names(graph)
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
                new_inits.append(numpy_helper.from_array(np.array(a / INT8_MAX, dtype=np.float32), scale))
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
                q, w_scale, from_gptq = int8_weight(src, w, axis, opts)
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
    drop_unused_initializers(graph, g)
    still_used = {i for n in graph.node for i in n.input} | g.output_names | g.subgraph_refs
    dead_consts = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in still_used]
    for n in dead_consts:
        graph.node.remove(n)
    _ = TensorProto  # imported with helper for readers: int8 tensors come from numpy_helper
    return gptq_used
