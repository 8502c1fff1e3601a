"""quantpipe.backends.tensorrt.plan: build plans per TensorRT version, skip reasons, and the inputs refused before
TensorRT sees them (source models, optimization profiles).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from quantpipe.backends.tensorrt import version as trt_version
from quantpipe.backends.tensorrt.plan import (
    BuildPlan,
    ShapeRange,
    check_profiles,
    check_source_model,
    normalize_profiles,
    plan_build,
    resolve_int8_mode,
    variant_skip_reason,
)
from quantpipe.backends.tensorrt.version import api_for_version
from quantpipe.errors import BuildError, MissingDependencyError
from tests.trt_fakes import fp16_model, fp32_model, qdq_model


def test_int8_mode_resolution() -> None:
    v10, v11 = api_for_version("10.13.0"), api_for_version("11.1.0")
    assert resolve_int8_mode("auto", v10) == "calibrator"
    assert resolve_int8_mode("auto", v11) == "qdq"
    assert resolve_int8_mode("qdq", v10) == "qdq"
    with pytest.raises(BuildError, match="removed implicit INT8 calibration.*int8_mode"):
        resolve_int8_mode("calibrator", v11)


def test_plans_on_tensorrt_11_never_use_weak_typing() -> None:
    v11 = api_for_version("11.0.0")
    plans = [plan_build(p, v11, "auto") for p in ("fp32", "fp16", "int8")]  # type: ignore[arg-type]
    assert [p.source for p in plans] == ["fp32", "fp16", "qdq"]
    for p in plans:
        assert p.strongly_typed and not (p.fp16_flag or p.int8_flag or p.calibrator or p.explicit_batch_flag)


def test_plans_on_tensorrt_10_and_8() -> None:
    v10, v8 = api_for_version("10.13.0"), api_for_version("8.6.1")
    assert plan_build("fp16", v10) == BuildPlan("fp16", "fp32", False, False, True, False, False, None)
    assert plan_build("int8", v10, "calibrator") == BuildPlan("int8", "fp32", False, False, False, True, True, "calibrator")
    assert plan_build("int8", v10, "qdq") == BuildPlan("int8", "qdq", False, False, False, True, False, "qdq")
    assert plan_build("fp32", v8).explicit_batch_flag
    with pytest.raises(BuildError, match="unknown precision"):
        plan_build("int4", v10)  # type: ignore[arg-type]


def test_skip_reasons() -> None:
    missing = (False, None, "tensorrt: not installed (ImportError); install with: pip install x")
    assert variant_skip_reason("fp32", status=missing) == missing[2]
    ok10, ok11 = (True, "10.13.0", None), (True, "11.1.0", None)
    assert variant_skip_reason("fp16", status=ok10, gpu_available=False) == (
        "tensorrt: no NVIDIA GPU visible to CUDA (TensorRT builds and runs engines on a GPU only)"
    )
    assert variant_skip_reason("int8", int8_mode="calibrator", status=ok10, gpu_available=True) is None
    reason = variant_skip_reason("int8", int8_mode="calibrator", status=ok11, gpu_available=True)
    assert reason is not None and reason.startswith("tensorrt 11.1.0:") and "qdq" in reason
    assert variant_skip_reason("int8", int8_mode="auto", status=ok11, gpu_available=True) is None


def test_module_imports_and_reports_without_tensorrt_or_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda"):
        monkeypatch.setitem(sys.modules, name, None)
    reason = variant_skip_reason("fp16")
    assert reason is not None and "not installed" in reason
    with pytest.raises(MissingDependencyError):
        trt_version.trt.Builder  # noqa: B018 - the lazy module imports on first attribute use


def test_source_model_checks(tmp_path: Path) -> None:
    v10, v11 = api_for_version("10.13.0"), api_for_version("11.1.0")
    f32, q, f16 = fp32_model(tmp_path), qdq_model(tmp_path), fp16_model(tmp_path)
    check_source_model(f32, plan_build("fp32", v11))
    check_source_model(f16, plan_build("fp16", v11))
    check_source_model(q, plan_build("int8", v11))
    check_source_model(f32, plan_build("fp16", v10))
    check_source_model(f32, plan_build("int8", v10, "calibrator"))
    with pytest.raises(BuildError, match="no QuantizeLinear/DequantizeLinear.*write_qdq_model"):
        check_source_model(f32, plan_build("int8", v11))
    with pytest.raises(BuildError, match="strongly typed.*write_fp16_model"):
        check_source_model(f32, plan_build("fp16", v11))
    with pytest.raises(BuildError, match="partly INT8|parts in INT8"):
        check_source_model(q, plan_build("fp32", v10))
    with pytest.raises(BuildError, match="does not exist"):
        check_source_model(tmp_path / "nope.onnx", plan_build("fp32", v10))


def test_profiles_normalize_both_forms() -> None:
    a = normalize_profiles({"x": {"min": [1, 4], "opt": [8, 4], "max": [32, 4]}})
    b = normalize_profiles({"x": ([1, 4], [8, 4], [32, 4])})
    assert a == b == {"x": ShapeRange((1, 4), (8, 4), (32, 4))}
    with pytest.raises(BuildError, match="min, opt and max"):
        normalize_profiles({"x": {"min": [1, 4]}})


@pytest.mark.parametrize(
    ("profiles", "match"),
    [
        (None, r"dynamic shape \[-1, 4\].*model.inputs.x.min_shape"),
        ({"x": ([1, 4], [8, 4], [32, 4, 1])}, "rank"),
        ({"x": ([1, 5], [8, 5], [32, 5])}, "axis 1 is fixed at 4"),
        ({"x": ([8, 4], [1, 4], [32, 4])}, "min <= opt <= max"),
        ({"x": ([0, 4], [1, 4], [32, 4])}, ">= 1"),
        ({"x": ([1, 4], [8, 4], [32, 4]), "z": ([1], [1], [1])}, r"inputs the model does not have: \['z'\]"),
    ],
)
def test_profile_errors(profiles: Any, match: str) -> None:
    with pytest.raises(BuildError, match=match):
        check_profiles({"x": (-1, 4), "static": (2, 2)}, profiles)


def test_profiles_only_for_dynamic_inputs() -> None:
    got = check_profiles({"x": (-1, 4), "static": (2, 2)}, {"x": ([1, 4], [8, 4], [32, 4])})
    assert list(got) == ["x"]
