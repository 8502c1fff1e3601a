"""The load stage: read and check the FP32 ONNX model, its inputs and outputs.

`load_model_spec` rejects files that are not ONNX, models that fail the checker, and models whose float
tensors are not FP32 (quantpipe calibrates FP32 models; an FP16 or already-quantized model is a user error
there). `read_model_spec` describes any valid model, whatever its precision (`quantpipe inspect`).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantpipe.artifacts import ModelSpec, TensorInfo
from quantpipe.datafiles import DYNAMIC_AXES_HINT
from quantpipe.errors import ModelError
from quantpipe.onnxgraph import (
    QUANTIZED_OPS,
    load_onnx,
    model_sha256,
    model_size_bytes,
    node_subgraphs,
    weights_as_inputs,
)

__all__ = ["load_model_spec", "read_model_spec", "tensor_info", "apply_input_overrides"]

log = logging.getLogger(__name__)

_NON_FP32_FLOATS = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}


def tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    """ValueInfoProto -> TensorInfo (symbolic or unknown dims kept as str / None)."""
    tt = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "unknown"
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(value.name, dtype, tuple(dims))


def _check_fp32(model: onnx.ModelProto, path: Path) -> None:
    bad: list[str] = []
    quant = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if quant:
        raise ModelError(
            f"model {path} is already quantized (it contains {', '.join(quant)}). quantpipe starts from the FP32 model: "
            f"pass the original FP32 export."
        )
    for vi in list(model.graph.input) + list(model.graph.output):
        et = vi.type.tensor_type.elem_type
        if et in _NON_FP32_FLOATS:
            bad.append(f"{'input' if vi in model.graph.input else 'output'} '{vi.name}' is {_NON_FP32_FLOATS[et]}")
    for init in model.graph.initializer:
        if init.data_type in _NON_FP32_FLOATS:
            bad.append(f"initializer '{init.name}' is {_NON_FP32_FLOATS[init.data_type]}")
        if len(bad) > 6:
            break
    if bad:
        shown = "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
        raise ModelError(
            f"model {path} is not an FP32 model: {shown}. quantpipe calibrates and converts FP32 models; export "
            f"the model in float32 (e.g. model.float() before torch.onnx.export), or, for a model shipped in FP16, "
            f"write its FP32 copy with `quantpipe prepare MODEL OUT --to-fp32` (every FP16 value is exact in FP32)."
        )


def load_model_spec(path: str | Path) -> tuple[ModelSpec, onnx.ModelProto]:
    """Load, check and describe the FP32 model the pipeline starts from. Returns the spec and the
    (shape-inferred) proto; a model that is not FP32, or has no inputs, is a ModelError."""
    path = Path(path)
    spec, inferred = read_model_spec(path, before_inference=lambda model: _check_fp32(model, path))
    if not spec.inputs:
        raise ModelError(f"model {path} has no graph inputs; quantpipe needs inputs to feed the calibration data to.")
    return spec, inferred


def read_model_spec(
    path: str | Path, *, before_inference: Callable[[onnx.ModelProto], None] | None = None
) -> tuple[ModelSpec, onnx.ModelProto]:
    """Load, check (ONNX checker) and describe any valid ONNX model, FP32, FP16 or Q/DQ (`quantpipe inspect`).

    `before_inference` sees the checked model before shape inference (the FP32 checks of `load_model_spec`).
    """
    path = Path(path)
    # The graph only: weights in external files stay there (a > 2 GB model cannot be one protobuf), and the
    # checker reads the model by path, external data included.
    model = load_onnx(path, external_data=False, weights_listed=True)
    listed = weights_as_inputs(model)
    if listed:
        log.info("%s lists %d weight(s) as graph inputs too (keep_initializers_as_inputs): quantpipe reads them as "
                 "weights, as TensorRT does", path.name, len(listed))
    try:
        onnx.checker.check_model(os.fspath(path))
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fix = ("`quantpipe prepare MODEL OUT` writes its nodes in order (onnxruntime runs them as they are; the checker "
               "does not)") if "topologically sorted" in first else "fix or re-export the model"
        raise ModelError(f"model {path} fails the ONNX checker: {first}. {fix[0].upper() + fix[1:]}.") from err
    if before_inference is not None:
        before_inference(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as err:  # shape inference is a help, not a requirement
        log.warning("shape inference failed on %s (%s); continuing with declared shapes", path, err)
        inferred = model
    init_names = {i.name for i in inferred.graph.initializer}
    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = collections.Counter(n.op_type for n in inferred.graph.node)
    spec = ModelSpec(
        path=str(path),
        sha256=model_sha256(path),
        opset=int(opset),
        ir_version=int(inferred.ir_version),
        producer=f"{inferred.producer_name} {inferred.producer_version}".strip(),
        inputs=tuple(tensor_info(v) for v in inferred.graph.input if v.name not in init_names),
        outputs=tuple(tensor_info(v) for v in inferred.graph.output),
        op_counts=_by_count(ops),
        num_parameters=_parameter_count(inferred.graph),
        size_bytes=model_size_bytes(path),
        subgraph_op_counts=_by_count(_subgraph_ops(inferred.graph)),
    )
    return spec, inferred


def apply_input_overrides(inputs: tuple[TensorInfo, ...], overrides: Mapping[str, object]) -> tuple[TensorInfo, ...]:
    """Apply pipeline.yaml `model.inputs` shapes/dtypes over what the model declares.

    `overrides` maps input name -> config.InputSpec. Unknown names are a ModelError naming the real inputs.
    """
    by_name = {t.name: t for t in inputs}
    for name in overrides:
        if name not in by_name:
            raise ModelError(
                f"pipeline.yaml model.inputs names '{name}', but the model's inputs are {sorted(by_name)}. "
                f"Use the model's input names (see `quantpipe inspect MODEL`)."
            )
    out = []
    for t in inputs:
        spec = overrides.get(t.name)
        shape = getattr(spec, "shape", None)
        dtype = getattr(spec, "dtype", None)
        if shape is not None:
            _check_override(t, list(shape))
        out.append(TensorInfo(t.name, dtype or t.dtype, tuple(shape) if shape is not None else t.shape))
    return tuple(out)


def _check_override(t: TensorInfo, shape: list[int | str]) -> None:
    """model.inputs.<name>.shape describes the data (its checks, TensorRT's profiles); it does not change the model,
    which onnxruntime runs as declared. A size the model fixes, overridden with another (or a free axis), failed in
    calibration with exit 4 (CenterFace declares [10, 3, 32, 32] and runs any size, found probing): refused here."""
    if t.shape is None or len(shape) != len(t.shape):
        return
    for axis, (want, dim) in enumerate(zip(shape, t.shape, strict=True)):
        if axis and isinstance(dim, int) and dim > 0 and want != dim:
            raise ModelError(
                f"pipeline.yaml model.inputs.{t.name}.shape is {shape}, but the model fixes axis {axis} of input "
                f"'{t.name}' at {dim} ({_shape_text(t.shape)}): the override describes the data and TensorRT's "
                f"profiles, it does not change the model, and ONNX Runtime runs the model as declared. "
                + DYNAMIC_AXES_HINT)


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _by_count(ops: collections.Counter[str]) -> dict[str, int]:
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def _subgraph_ops(graph: onnx.GraphProto) -> collections.Counter[str]:
    """The op types of the nodes inside `graph`'s subgraphs (If branches, Loop and Scan bodies), nested ones too."""
    ops: collections.Counter[str] = collections.Counter()
    for sub in (g for n in graph.node for g in node_subgraphs(n)):
        ops.update(n.op_type for n in sub.node)
        ops.update(_subgraph_ops(sub))
    return ops


def _parameter_count(graph: onnx.GraphProto) -> int:
    """Elements of the graph's initializers and of its Constant nodes' tensors (Paddle exports, among others, keep
    every weight in a Constant node), subgraphs (If, Loop, Scan branches) included."""
    tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant"
                                     for a in n.attribute if a.name == "value" and a.HasField("t"))]
    subgraphs = [g for n in graph.node for g in node_subgraphs(n)]
    return int(sum(int(np.prod(t.dims)) if t.dims else 1 for t in tensors)) + sum(map(_parameter_count, subgraphs))
