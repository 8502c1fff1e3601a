"""Which tensors of an ONNX model get a calibration histogram (inputs, float node outputs, weights), found
from the graph and ONNX shape inference; external data need not be loaded."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TensorPlan", "plan_tensors", "float_types", "constant_value", "is_constant"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Which tensors of a model get a histogram, and where their values come from."""

    inputs: tuple[str, ...]
    activations: tuple[str, ...]
    """Node outputs to expose (float, or of unknown type: checked at run time)."""
    weights: tuple[str, ...]
    """Float initializers and Constant-node outputs."""
    relu_from: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Relu output -> its input, for Relus of calibrated inputs/activations (derived, not exposed)."""

    @property
    def kinds(self) -> dict[str, str]:
        out = {n: "input" for n in self.inputs}
        out.update({n: "activation" for n in self.activations})
        out.update({n: "weight" for n in self.weights})
        return out


# ---------------------------------------------------------------------------------------------- plan


def float_types() -> set[int]:
    from onnx import TensorProto

    return {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _elem_types(model: Any) -> dict[str, int]:
    """Element type of every typed value in the graph, after ONNX shape inference where it succeeds.

    Inference runs on a light copy whose initializers are declared as typed inputs without their
    data: element types never depend on weight values, and the copy costs no memory for the weights.
    """
    import onnx

    g = model.graph
    declared = {i.name for i in g.input}
    light_graph = onnx.helper.make_graph(
        list(g.node), g.name,
        list(g.input) + [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                         for t in g.initializer if t.name not in declared],
        list(g.output), value_info=list(g.value_info),
    )
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    inferred = light
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception as err:  # inference is a help, not a requirement: unknown types are checked at run time
        log.debug("ONNX shape inference failed (%s); tensor types are checked at run time instead", err)
    types: dict[str, int] = {}
    ig = inferred.graph
    for vi in list(ig.input) + list(ig.value_info) + list(ig.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def constant_value(node: Any, base_dir: Path) -> np.ndarray | None:
    """The float value of a Constant node, or None when it is not a float tensor."""
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            if attr.t.data_type not in float_types():
                return None
            return numpy_helper.to_array(attr.t, base_dir=str(base_dir))
        if attr.name == "value_float":
            return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
    return None


def is_constant(node: Any) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def plan_tensors(model: Any) -> TensorPlan:
    """Find the tensors that need a scale in an ONNX ModelProto (external data need not be loaded)."""
    floats = float_types()
    g = model.graph
    init_names = {i.name for i in g.initializer}
    types = _elem_types(model)
    inputs = tuple(
        i.name for i in g.input
        if i.name not in init_names and i.type.tensor_type.elem_type in floats
    )
    weights = [i.name for i in g.initializer if i.data_type in floats]
    seen = set(inputs) | set(weights)
    activations: list[str] = []
    for node in g.node:
        constant = is_constant(node)
        for out in node.output:
            if not out or out in seen:
                continue
            seen.add(out)
            if constant:
                if types.get(out, 0) in floats or types.get(out) is None:
                    weights.append(out)
                continue
            if types.get(out) is None or types[out] in floats:
                activations.append(out)
    runtime = set(inputs) | set(activations)
    relu_from = {
        node.output[0]: node.input[0]
        for node in g.node
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx") and node.input and node.output
        and node.input[0] in runtime and node.output[0] in runtime
    }
    relu_from = {out: src for out, src in relu_from.items() if src not in relu_from}  # one level: sources are run
    return TensorPlan(inputs, tuple(activations), tuple(weights), relu_from)
