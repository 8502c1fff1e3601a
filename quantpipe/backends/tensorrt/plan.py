"""How one engine is built on the installed TensorRT, and the inputs checked before TensorRT sees them.

`plan_build` decides flags, network type and source model per precision and TensorRT version;
`variant_skip_reason` says why a variant cannot be built here; `check_source_model` and `check_profiles`
refuse a model or optimization profiles that cannot give the planned engine. Nothing here imports tensorrt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from quantpipe.artifacts import Precision
from quantpipe.backends.tensorrt.version import TrtApi, api_for_version, tensorrt_status
from quantpipe.cuda import cuda_check, cuda_runtime
from quantpipe.errors import BuildError, ModelError, QuantpipeError
from quantpipe.onnxgraph import QDQ_OPS, load_onnx

__all__ = [
    "BuildPlan",
    "Int8Mode",
    "ShapeRange",
    "SourceKind",
    "check_profiles",
    "check_source_model",
    "normalize_profiles",
    "plan_build",
    "resolve_int8_mode",
    "variant_skip_reason",
]

Int8Mode = Literal["auto", "qdq", "calibrator"]
SourceKind = Literal["fp32", "fp16", "qdq"]


def resolve_int8_mode(mode: Int8Mode, api: TrtApi) -> Literal["qdq", "calibrator"]:
    """`auto` -> implicit calibration on TensorRT <= 10, the Q/DQ model on >= 11; `calibrator` on 11 is an error."""
    if mode == "auto":
        return "calibrator" if api.has_calibrators else "qdq"
    if mode == "calibrator" and not api.has_calibrators:
        raise BuildError(
            f"TensorRT {api.version} removed implicit INT8 calibration (IInt8 calibrators, BuilderFlag.INT8): INT8 "
            f"engines come only from a Q/DQ model there. Set build.backends.tensorrt.int8_mode to 'qdq' or 'auto'."
        )
    if mode not in ("qdq", "calibrator"):
        raise BuildError(f"unknown TensorRT int8_mode {mode!r}; expected auto, qdq or calibrator")
    return mode


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """How one engine is built on one TensorRT version (decided without touching TensorRT)."""

    precision: Precision
    source: SourceKind
    """Which model to parse: the FP32 model, the FP16 model or the Q/DQ INT8 model."""
    strongly_typed: bool
    explicit_batch_flag: bool
    fp16_flag: bool
    int8_flag: bool
    calibrator: bool
    int8_mode: Literal["qdq", "calibrator"] | None


def plan_build(precision: Precision, api: TrtApi, int8_mode: Int8Mode = "auto") -> BuildPlan:
    """Flags, network type and source model for `precision` on `api`."""
    if precision not in ("fp32", "fp16", "int8"):
        raise BuildError(f"unknown precision {precision!r}; expected fp32, fp16 or int8")
    mode = resolve_int8_mode(int8_mode, api) if precision == "int8" else None
    if api.strongly_typed_only:
        # TensorRT >= 11: every network is strongly typed; the precision is the model's own.
        source: SourceKind = "qdq" if precision == "int8" else ("fp16" if precision == "fp16" else "fp32")
        return BuildPlan(precision, source, True, False, False, False, False, mode)
    if precision == "fp32":
        return BuildPlan(precision, "fp32", False, api.explicit_batch_flag, False, False, False, None)
    if precision == "fp16":
        return BuildPlan(precision, "fp32", False, api.explicit_batch_flag, True, False, False, None)
    if mode == "qdq":
        # Weakly typed explicit quantization: the Q/DQ nodes place INT8, the INT8 flag lets TensorRT use it.
        return BuildPlan(precision, "qdq", False, api.explicit_batch_flag, False, True, False, mode)
    return BuildPlan(precision, "fp32", False, api.explicit_batch_flag, False, True, True, mode)


def variant_skip_reason(
    precision: Precision,
    *,
    int8_mode: Int8Mode = "auto",
    status: tuple[bool, str | None, str | None] | None = None,
    gpu_available: bool | None = None,
) -> str | None:
    """Why a TensorRT variant of `precision` cannot be built on this machine, or None when it can.

    `status` defaults to `tensorrt_status()`; `gpu_available` to whether cuda-python sees a GPU.
    The pipeline reports the variant as skipped with this reason (or exits 3 when TensorRT is required).
    """
    available, version, reason = status if status is not None else tensorrt_status()
    if not available or version is None:
        return reason or "tensorrt: not available"
    if gpu_available is None:
        gpu_available = _gpu_visible()
    if not gpu_available:
        return "tensorrt: no NVIDIA GPU visible to CUDA (TensorRT builds and runs engines on a GPU only)"
    try:
        plan_build(precision, api_for_version(version), int8_mode)
    except QuantpipeError as err:
        return f"tensorrt {version}: {err}"
    return None


def _gpu_visible() -> bool:
    try:
        rt = cuda_runtime()
        count = cuda_check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        return int(count) > 0
    except Exception:  # no cuda-python, no driver, no device: all mean "no GPU for TensorRT"
        return False


# ==================================================================================================
# Inputs checked before TensorRT sees them
# ==================================================================================================

def check_source_model(onnx_path: str | Path, plan: BuildPlan) -> None:
    """Refuse a model that cannot give the planned engine (BuildError saying which model to pass).

    Strongly typed networks take their precision from the model, so the FP16 engine needs a model with
    float16 tensors and the INT8 engine one with Q/DQ nodes; an FP32/FP16 engine from a Q/DQ model
    would be partly INT8.
    """
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise BuildError(f"TensorRT build: model {path} does not exist")
    try:
        model = load_onnx(path)  # the graph only: weights in external files stay there (TensorRT parses by path)
    except ModelError as err:
        raise BuildError(f"TensorRT build: cannot read ONNX model {path}: {err}") from err
    graph = model.graph
    has_qdq = any(n.op_type in QDQ_OPS for n in graph.node)
    f16 = onnx.TensorProto.FLOAT16
    has_fp16 = (
        any(t.data_type == f16 for t in graph.initializer)
        or any(v.type.tensor_type.elem_type == f16 for v in [*graph.input, *graph.output, *graph.value_info])
        or any(n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in graph.node)
    )
    if plan.source == "qdq" and not has_qdq:
        raise BuildError(
            f"the INT8 TensorRT engine is built from the explicit Q/DQ model, but {path} has no QuantizeLinear/"
            f"DequantizeLinear nodes. Pass the model written by quantpipe.quantize.write_qdq_model."
        )
    if plan.source == "fp16" and not has_fp16:
        raise BuildError(
            f"TensorRT builds strongly typed networks here, so an FP16 engine needs a model whose tensors are float16; "
            f"{path} has none. Pass the FP16 model (quantpipe.quantize.write_fp16_model), not the FP32 one."
        )
    if plan.source in ("fp32", "fp16") and plan.precision != "int8" and has_qdq:
        raise BuildError(
            f"{path} holds Q/DQ nodes, so a {plan.precision.upper()} engine built from it would run parts in INT8. "
            f"Pass the FP32 model."
        )


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """One input's optimization-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def normalize_profiles(profiles: Mapping[str, Any] | None) -> dict[str, ShapeRange]:
    """{input: {"min": [...], "opt": [...], "max": [...]}} or {input: (min, opt, max)} -> ShapeRange per input."""
    out: dict[str, ShapeRange] = {}
    for name, spec in (profiles or {}).items():
        if isinstance(spec, ShapeRange):
            out[name] = spec
            continue
        try:
            if isinstance(spec, Mapping):
                parts = (spec["min"], spec["opt"], spec["max"])
            else:
                parts = tuple(spec)
                if len(parts) != 3:
                    raise ValueError("need exactly three shapes")
            lo, mid, hi = (tuple(int(d) for d in p) for p in parts)
        except (KeyError, TypeError, ValueError) as err:
            raise BuildError(
                f"optimization profile for input '{name}' must give min, opt and max shapes (lists of ints), got {spec!r} ({err})"
            ) from err
        out[name] = ShapeRange(lo, mid, hi)
    return out


def check_profiles(network_inputs: Mapping[str, Sequence[int]], profiles: Mapping[str, Any] | None) -> dict[str, ShapeRange]:
    """Check profiles against the network's input shapes (-1 = dynamic); return one range per dynamic input.

    Every dynamic input needs a profile; static dimensions must match; min <= opt <= max.
    """
    ranges = normalize_profiles(profiles)
    unknown = sorted(set(ranges) - set(network_inputs))
    if unknown:
        raise BuildError(f"optimization profiles name inputs the model does not have: {unknown} (inputs: {sorted(network_inputs)})")
    out: dict[str, ShapeRange] = {}
    for name, dims in network_inputs.items():
        dims = tuple(int(d) for d in dims)
        dynamic = any(d < 0 for d in dims)
        r = ranges.get(name)
        if r is None:
            if dynamic:
                raise BuildError(
                    f"input '{name}' has dynamic shape {list(dims)}: TensorRT needs its min/opt/max shapes. Set "
                    f"model.inputs.{name}.min_shape, opt_shape and max_shape in pipeline.yaml."
                )
            continue
        for label, shape in (("min", r.min), ("opt", r.opt), ("max", r.max)):
            if len(shape) != len(dims):
                raise BuildError(f"profile {label} shape {list(shape)} for input '{name}' has rank {len(shape)}; the input has rank {len(dims)} {list(dims)}")
            for axis, (want, got) in enumerate(zip(dims, shape, strict=True)):
                if got < 1:
                    raise BuildError(f"profile {label} shape {list(shape)} for input '{name}': axis {axis} must be >= 1")
                if want >= 0 and got != want:
                    raise BuildError(f"profile {label} shape {list(shape)} for input '{name}': axis {axis} is fixed at {want} in the model")
        if not all(a <= b <= c for a, b, c in zip(r.min, r.opt, r.max, strict=True)):
            raise BuildError(f"profile for input '{name}' needs min <= opt <= max on every axis, got min {list(r.min)}, opt {list(r.opt)}, max {list(r.max)}")
        out[name] = r
    return out
