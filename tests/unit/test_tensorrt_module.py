"""quantpipe.backends.tensorrt without TensorRT: version dispatch, refusals, skip reasons, and the build
path driven against a fake `tensorrt` module that has only the names each version really has (a name the
10.x -> 11.x migration guide removed raises AttributeError on the fake 11.x, as it would on the real one).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantpipe.backends.tensorrt import runner as trt_runner
from quantpipe.backends.tensorrt import version as trt_version
from quantpipe.backends.tensorrt.build import build_engine
from quantpipe.backends.tensorrt.calibrator import CalibrationInput
from quantpipe.backends.tensorrt.metadata import (
    GpuInfo,
    check_engine_metadata,
    metadata_path_for,
    read_engine_metadata,
)
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
from quantpipe.backends.tensorrt.runner import TensorRTRunner
from quantpipe.backends.tensorrt.version import api_for_version, require_tensorrt, tensorrt_status
from quantpipe.errors import (
    EXIT_MISSING_DEPENDENCY,
    BuildError,
    CalibrationError,
    MissingDependencyError,
    StaleArtifactError,
)
from quantpipe.fsutil import sha256_file

GPU = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


# --------------------------------------------------------------------------------------------------
# tiny ONNX models
# --------------------------------------------------------------------------------------------------


def _save(tmp_path: Path, name: str, nodes: list[Any], inits: list[Any], batch: str | int = "N") -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    model = helper.make_model(helper.make_graph(nodes, name, [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _w() -> Any:
    return helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())


def fp32_model(tmp_path: Path, batch: str | int = "N") -> Path:
    return _save(tmp_path, "fp32", [helper.make_node("MatMul", ["x", "w"], ["y"])], [_w()], batch)


def qdq_model(tmp_path: Path) -> Path:
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    z = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("MatMul", ["xd", "w"], ["y"]),
    ]
    return _save(tmp_path, "qdq", nodes, [_w(), s, z])


def fp16_model(tmp_path: Path) -> Path:
    w16 = helper.make_tensor("w", TensorProto.FLOAT16, [4, 3], np.arange(12, dtype=np.float16).view(np.uint16).tolist())
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "w"], ["y16"]),
        helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
    ]
    return _save(tmp_path, "fp16", nodes, [w16])


# --------------------------------------------------------------------------------------------------
# a fake tensorrt module, per major version
# --------------------------------------------------------------------------------------------------


class _Enum:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def _enum(cls_name: str, **members: int) -> type:
    return type(cls_name, (), {k: _Enum(k, v) for k, v in members.items()})


def make_fake_trt(version: str, record: dict[str, Any]) -> types.ModuleType:
    major = int(version.split(".")[0])
    m = types.ModuleType("tensorrt")
    m.__version__ = version  # type: ignore[attr-defined]

    flags = {"TF32": 6, "REFIT": 3}
    if major <= 10:
        flags.update(FP16=0, INT8=1)  # weak-typing flags: removed in 11.x
    m.BuilderFlag = _enum("BuilderFlag", **flags)  # type: ignore[attr-defined]
    net_flags = {"STRONGLY_TYPED": 1}
    if major <= 10:
        net_flags["EXPLICIT_BATCH"] = 0
    m.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", **net_flags)  # type: ignore[attr-defined]
    m.MemoryPoolType = _enum("MemoryPoolType", WORKSPACE=0)  # type: ignore[attr-defined]

    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    class ILogger:
        def __init__(self) -> None:
            record["logger_init"] = True

    ILogger.Severity = Severity  # type: ignore[attr-defined]
    m.ILogger = ILogger  # type: ignore[attr-defined]

    class Dims(tuple):  # noqa: SLOT001 - a tuple with TensorRT's constructor
        def __new__(cls, shape: list[int]) -> Dims:
            return super().__new__(cls, shape)

    m.Dims = Dims  # type: ignore[attr-defined]

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name, self.shape = name, Dims(list(shape))

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[Tensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            record["parsed"] = path
            model = onnx.load(path)
            inits = {i.name for i in model.graph.initializer}
            for vi in model.graph.input:
                if vi.name in inits:
                    continue
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(vi.name, dims))
            return True

        num_errors = 0

    m.OnnxParser = OnnxParser  # type: ignore[attr-defined]

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return b"TIMING:" + str(record.get("builds", 0)).encode()

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, Any, Any]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    allowed = {"flags", "cleared", "pool", "profiles", "timing_cache"}
    if major <= 10:
        allowed |= {"int8_calibrator", "calibration_profile"}

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.cleared: list[str] = []
            self.profiles: list[Profile] = []
            self.timing_cache: TimingCache | None = None

        def __setattr__(self, name: str, value: Any) -> None:
            if name not in allowed:  # like the real 11.x binding: no int8_calibrator attribute
                raise AttributeError(f"'IBuilderConfig' object has no attribute '{name}'")
            object.__setattr__(self, name, value)

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pool = size

        def set_flag(self, flag: _Enum) -> None:
            self.flags.append(flag.name)

        def clear_flag(self, flag: _Enum) -> None:
            self.cleared.append(flag.name)

        def add_optimization_profile(self, p: Profile) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            record.setdefault("timing_cache_inputs", []).append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            assert self.timing_cache is not None
            return self.timing_cache

    if major <= 10:
        def set_calibration_profile(self: Config, p: Profile) -> bool:
            self.calibration_profile = p
            return True

        Config.set_calibration_profile = set_calibration_profile  # type: ignore[attr-defined]

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            record["network_flags"] = flags
            record["network"] = Network(flags)
            return record["network"]

        def create_builder_config(self) -> Config:
            record["config"] = Config()
            return record["config"]

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            record["builds"] = record.get("builds", 0) + 1
            calib = getattr(config, "int8_calibrator", None)
            if calib is not None:  # what TensorRT does with a calibrator: cache first, else pull batches
                names = [t.name for t in network.inputs]
                record["batch_size"] = calib.get_batch_size()
                cache = calib.read_calibration_cache()
                record["served_cache"] = cache
                batches = 0
                if cache is None:
                    while calib.get_batch(names):
                        batches += 1
                    calib.write_calibration_cache(memoryview(b"TRT-100000-EntropyCalibration2\nx: 3c23d70a\ny: 3d4ccccd\n"))
                record["batches"] = batches
            return b"ENGINE:" + ",".join(config.flags).encode()

    m.Builder = Builder  # type: ignore[attr-defined]

    if major <= 10:
        class _Calib:
            def __init__(self) -> None:
                record["calibrator_base_init"] = next(c.__name__ for c in type(self).__mro__ if c.__name__.startswith("IInt8"))

        m.IInt8Calibrator = _Calib  # type: ignore[attr-defined]
        m.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (_Calib,), {})  # type: ignore[attr-defined]
        m.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (_Calib,), {})  # type: ignore[attr-defined]
    return m


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install a fake tensorrt of a given version: fake_trt("10.13.0") -> record dict."""

    def install(version: str) -> dict[str, Any]:
        record: dict[str, Any] = {}
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version, record))
        return record

    yield install


# --------------------------------------------------------------------------------------------------
# version dispatch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "weak", "explicit_batch"),
    [("8.6.1.6", True, True), ("10.0.1", True, False), ("10.13.0.35", True, False), ("11.1.0", False, False)],
)
def test_api_for_supported_versions(version: str, weak: bool, explicit_batch: bool) -> None:
    api = api_for_version(version)
    assert (api.weak_typing, api.explicit_batch_flag, api.has_calibrators) == (weak, explicit_batch, weak)


@pytest.mark.parametrize(("version", "match"), [("8.5.3", "needs 8.6"), ("12.0.0", "supports 8.6 - 11"), ("dev", "cannot read")])
def test_api_for_unsupported_versions(version: str, match: str) -> None:
    with pytest.raises(MissingDependencyError, match=match) as info:
        api_for_version(version)
    assert info.value.exit_code == EXIT_MISSING_DEPENDENCY


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


# --------------------------------------------------------------------------------------------------
# status, requirement, skip reasons
# --------------------------------------------------------------------------------------------------


def test_status_without_tensorrt_never_raises_and_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    available, version, reason = tensorrt_status()
    assert (available, version) == (False, None)
    assert reason is not None and reason.startswith("tensorrt: not installed") and "pip install" in reason
    with pytest.raises(MissingDependencyError, match="not installed") as info:
        require_tensorrt()
    assert info.value.exit_code == EXIT_MISSING_DEPENDENCY


def test_status_with_too_old_or_broken_tensorrt(fake_trt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_trt("8.5.3.1")
    available, version, reason = tensorrt_status()
    assert not available and version == "8.5.3.1" and reason is not None and "8.6" in reason
    broken = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", broken)
    available, version, reason = tensorrt_status()
    assert not available and reason is not None and "__version__" in reason


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


def test_lazy_tensorrt_error_is_the_one_deps_require_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    # version.py cannot import quantpipe.deps (deps imports it), so it words the error itself: keep them equal.
    from quantpipe.deps import require

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as lazy:
        trt_version.trt.Builder  # noqa: B018
    with pytest.raises(MissingDependencyError) as door:
        require("tensorrt", purpose="TensorRT engines")
    assert str(lazy.value) == str(door.value) and "pip install 'quantpipe[tensorrt]'" in str(lazy.value)


# --------------------------------------------------------------------------------------------------
# inputs refused before TensorRT sees them
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# engine metadata
# --------------------------------------------------------------------------------------------------

META = {
    "format": 1, "tensorrt_version": "10.13.0.35", "gpu_name": GPU.name, "compute_capability": "9.0",
    "source_sha256": "a" * 64, "engine_sha256": "b" * 64,
}


def test_metadata_accepts_the_same_machine() -> None:
    check_engine_metadata(META, engine_path="e.engine", tensorrt_version="10.13.0.35", gpu=GPU,
                          source_sha256="a" * 64, engine_sha256="b" * 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tensorrt_version": "10.3.0"}, r"built with TensorRT 10.13.0.35 on NVIDIA H100.*has TensorRT 10.3.0.*Rebuild"),
        ({"gpu": GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")}, r"built for .*compute 9.0.*A100.*compute 8.0.*specific to the GPU"),
        ({"gpu": GpuInfo("NVIDIA H200", "9.0")}, "specific to the GPU model"),
        ({"source_sha256": "c" * 64}, "built from a model with sha256 aaaaaaaaaaaa"),
        ({"engine_sha256": "d" * 64}, "does not match its metadata"),
    ],
)
def test_metadata_refuses_other_tensorrt_gpu_or_model(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"tensorrt_version": "10.13.0.35", "gpu": GPU}
    args.update(kwargs)
    with pytest.raises(StaleArtifactError, match=match):
        check_engine_metadata(META, engine_path="e.engine", **args)


def test_missing_or_foreign_metadata_is_stale(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(StaleArtifactError, match="no metadata file m.engine.json"):
        read_engine_metadata(engine)
    metadata_path_for(engine).write_text(json.dumps({"format": 99}))
    with pytest.raises(StaleArtifactError, match="format 1"):
        read_engine_metadata(engine)


def test_runner_refuses_an_engine_from_another_gpu(tmp_path: Path, fake_trt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_trt("10.13.0.35")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"ENGINE")
    meta = dict(META, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    metadata_path_for(engine).write_text(json.dumps(meta))
    monkeypatch.setattr(trt_runner, "current_gpu", lambda device=0: GPU)
    with pytest.raises(StaleArtifactError, match="A100"), TensorRTRunner(engine, "trt_fp32"):
        pass


# --------------------------------------------------------------------------------------------------
# build_engine against the fakes
# --------------------------------------------------------------------------------------------------

PROFILES = {"x": {"min": [1, 4], "opt": [4, 4], "max": [8, 4]}}


def test_build_fp16_on_10_uses_the_builder_flag_and_writes_metadata(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("10.13.0.35")
    out = tmp_path / "engines" / "m_fp16.engine"
    info = build_engine(fp32_model(tmp_path), out, precision="fp16", profiles=PROFILES, workspace_mib=256,
                        timing_cache=tmp_path / "timing.cache", gpu=GPU, tf32=False)
    assert rec["network_flags"] == 0
    assert rec["config"].flags == ["FP16"] and rec["config"].cleared == ["TF32"]
    assert rec["config"].pool == 256 << 20
    assert rec["config"].profiles[0].shapes == {"x": ((1, 4), (4, 4), (8, 4))}
    assert out.read_bytes() == b"ENGINE:FP16"
    meta = read_engine_metadata(out)
    assert meta["tensorrt_version"] == "10.13.0.35" and meta["gpu_name"] == GPU.name
    assert meta["compute_capability"] == "9.0" and meta["precision"] == "fp16"
    assert meta["source_sha256"] == info.source_sha256 and len(info.source_sha256) == 64
    assert meta["options"]["profiles"]["x"]["opt"] == [4, 4] and meta["options"]["workspace_mib"] == 256
    check_engine_metadata(meta, engine_path=out, tensorrt_version="10.13.0.35", gpu=GPU,
                          engine_sha256=sha256_file(out))


def test_timing_cache_is_reused_between_builds(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("10.13.0.35")
    cache = tmp_path / "timing.cache"
    model = fp32_model(tmp_path)
    build_engine(model, tmp_path / "a.engine", precision="fp32", profiles=PROFILES, timing_cache=cache, gpu=GPU)
    assert cache.read_bytes() == b"TIMING:1"
    build_engine(model, tmp_path / "b.engine", precision="fp16", profiles=PROFILES, timing_cache=cache, gpu=GPU)
    assert rec["timing_cache_inputs"] == [b"", b"TIMING:1"]


def test_build_on_8_6_sets_explicit_batch(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("8.6.1.6")
    build_engine(fp32_model(tmp_path, batch=2), tmp_path / "m.engine", precision="fp32", gpu=GPU)
    assert rec["network_flags"] == 1 << 0


def test_build_on_11_is_strongly_typed_and_touches_no_removed_name(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("11.1.0")
    info = build_engine(fp16_model(tmp_path), tmp_path / "f16.engine", precision="fp16", profiles=PROFILES, gpu=GPU)
    assert rec["network_flags"] == 1 << 1 and rec["config"].flags == []
    assert info.strongly_typed and read_engine_metadata(info.path)["options"]["source_kind"] == "fp16"
    info = build_engine(qdq_model(tmp_path), tmp_path / "i8.engine", precision="int8", profiles=PROFILES, gpu=GPU)
    assert info.int8_mode == "qdq" and rec["config"].flags == []
    with pytest.raises(BuildError, match="removed implicit INT8 calibration"):
        build_engine(fp32_model(tmp_path), tmp_path / "x.engine", precision="int8", int8_mode="calibrator", gpu=GPU)
    with pytest.raises(BuildError, match="write_fp16_model"):
        build_engine(fp32_model(tmp_path), tmp_path / "x.engine", precision="fp16", profiles=PROFILES, gpu=GPU)
    assert not (tmp_path / "x.engine").exists()


def test_dynamic_input_without_profile_is_refused(tmp_path: Path, fake_trt: Any) -> None:
    fake_trt("10.13.0.35")
    with pytest.raises(BuildError, match="min_shape, opt_shape and max_shape"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="fp32", gpu=GPU)
    assert not (tmp_path / "m.engine").exists()


def test_calibrator_int8_needs_cache_or_data(tmp_path: Path, fake_trt: Any) -> None:
    fake_trt("10.13.0.35")
    with pytest.raises(BuildError, match="needs a CalibrationInput"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU)
    with pytest.raises(CalibrationError, match="neither was given"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(cache_path=tmp_path / "missing.cache"))


# --------------------------------------------------------------------------------------------------
# implicit calibration (TensorRT <= 10): the calibrator classes, quantpipe's cache, device batches
# --------------------------------------------------------------------------------------------------


def _calib_data(tmp_path: Path, n: int = 10) -> Any:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.data import open_dataset

    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32))
    return open_dataset(tmp_path / "calib.npz", [TensorInfo("x", "float32", (None, 4))])


def test_calibrator_feeds_device_batches_then_writes_the_cache_through_quantpipe(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import read_trt_cache
    from quantpipe.cuda import HostAllocator

    rec = fake_trt("10.13.0.35")
    alloc = HostAllocator()
    cache = tmp_path / "entropy.cache"
    calib = CalibrationInput(method="entropy", cache_path=cache, dataset=_calib_data(tmp_path), allocator=alloc)
    info = build_engine(fp32_model(tmp_path), tmp_path / "i8.engine", precision="int8", calibration=calib,
                        profiles=PROFILES, gpu=GPU)
    # opt shape [4, 4]: 10 samples give two full batches; the trailing 2 cannot be fed at TensorRT's fixed shape
    assert rec["batch_size"] == 4 and rec["batches"] == 2 and rec["served_cache"] is None
    assert rec["calibrator_base_init"] == "IInt8EntropyCalibrator2"
    assert rec["config"].flags == ["INT8"] and rec["config"].calibration_profile is rec["config"].profiles[0]
    assert alloc.num_allocs == 1 and alloc.live_bytes == 0  # one buffer for input x, freed after the build
    written = read_trt_cache(cache)  # TensorRT's result, re-written by quantpipe's cache module
    assert written.header == "TRT-101300-EntropyCalibration2"
    assert written.scales == pytest.approx({"x": 0.01, "y": 0.05}, rel=1e-6)
    summary = info.options["calibration"]
    assert summary == {"method": "entropy", "cache": str(cache), "used_quantpipe_cache": False, "batches_fed": 2,
                       "wrote_cache": str(cache)}


def test_quantpipe_cache_lets_tensorrt_skip_calibration(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import write_trt_cache

    rec = fake_trt("10.13.0.35")
    cache = write_trt_cache(tmp_path / "minmax.cache", {"x": 2.54, "y": 12.7}, method="minmax", trt_version="8.6.1")
    info = build_engine(fp32_model(tmp_path), tmp_path / "i8.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                        calibration=CalibrationInput(method="minmax", cache_path=cache))
    assert rec["calibrator_base_init"] == "IInt8MinMaxCalibrator" and rec["batches"] == 0
    served = rec["served_cache"].decode().splitlines()
    # the header is rewritten for the installed TensorRT; the scales (amax / 127) are quantpipe's, bit for bit
    assert served[0] == "TRT-101300-MinMaxCalibration"
    assert served[1:] == ["x: 3ca3d70a", "y: 3dcccccd"]
    assert info.options["calibration"]["used_quantpipe_cache"] and info.options["calibration"]["batches_fed"] == 0
    assert cache.read_text().startswith("TRT-8601-MinMaxCalibration")  # quantpipe's file is left as it was


def test_cache_for_another_method_is_not_used(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import write_trt_cache
    from quantpipe.cuda import HostAllocator
    from quantpipe.errors import CalibrationError

    rec = fake_trt("10.13.0.35")
    cache = write_trt_cache(tmp_path / "q.cache", {"x": 1.0}, method="minmax")
    with pytest.raises(CalibrationError, match="neither was given"):
        build_engine(fp32_model(tmp_path), tmp_path / "a.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(method="entropy", cache_path=cache))
    build_engine(fp32_model(tmp_path), tmp_path / "b.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                 calibration=CalibrationInput(method="entropy", cache_path=cache, dataset=_calib_data(tmp_path),
                                              allocator=HostAllocator(), write_cache=False))
    assert rec["served_cache"] is None and rec["batches"] == 2
    assert cache.read_text().startswith("TRT-101300-MinMaxCalibration")  # not overwritten (write_cache=False)


def test_stale_quantpipe_cache_is_refused(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import make_fingerprint, write_sidecar, write_trt_cache

    fake_trt("10.13.0.35")
    fp = make_fingerprint(model_sha256="a" * 64, data_fingerprint="d1", method="entropy", percentile=99.99,
                          num_bins=2048, trt_version="10.13.0")
    cache = write_trt_cache(tmp_path / "entropy.cache", {"x": 1.0}, method="entropy")
    write_sidecar(cache, method="entropy", fingerprint=fp, tensors={"x": {"amax": 1.0}})
    other = dict(fp, data_fingerprint="d2")
    with pytest.raises(StaleArtifactError, match="calibration data changed"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(cache_path=cache, fingerprint=other))


def test_errors_inside_tensorrt_callbacks_are_raised_after_the_build(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.cuda import HostAllocator
    from quantpipe.data import open_dataset
    from quantpipe.errors import CalibrationError

    fake_trt("10.13.0.35")
    np.savez(tmp_path / "wrong.npz", z=np.zeros((8, 4), np.float32))  # no array for input 'x'
    wrong = open_dataset(tmp_path / "wrong.npz", [TensorInfo("z", "float32", (None, 4))])
    alloc = HostAllocator()
    with pytest.raises(CalibrationError, match="asked for calibration input 'x'"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(dataset=wrong, allocator=alloc))
    assert not (tmp_path / "m.engine").exists() and alloc.live_bytes == 0
