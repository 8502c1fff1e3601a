"""Stand-ins for the TensorRT unit tests (tests/unit/backends/): tiny ONNX models, engine metadata, and a fake
`tensorrt` module per major version that has only the names that version really has (a name the 10.x -> 11.x
migration guide removed raises AttributeError on the fake 11.x, as it would on the real one).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantpipe.backends.tensorrt.metadata import GpuInfo

__all__ = ["GPU", "META", "PROFILES", "calib_data", "fp16_model", "fp32_model", "make_fake_trt", "qdq_model"]

GPU = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")

#: Metadata of an engine built on GPU with TensorRT 10.13.0.35.
META = {
    "format": 1, "tensorrt_version": "10.13.0.35", "gpu_name": GPU.name, "compute_capability": "9.0",
    "source_sha256": "a" * 64, "engine_sha256": "b" * 64,
}

#: One dynamic-batch profile for input x of the tiny models.
PROFILES = {"x": {"min": [1, 4], "opt": [4, 4], "max": [8, 4]}}


# --------------------------------------------------------------------------------------------------
# tiny ONNX models, calibration data
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


def calib_data(tmp_path: Path, n: int = 10) -> Any:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.data import open_dataset

    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32))
    return open_dataset(tmp_path / "calib.npz", [TensorInfo("x", "float32", (None, 4))])


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
    # Kept whole (over 80 lines): one table of what a TensorRT major version has; the fake classes close over
    # `major` and `record` and refer to each other (Builder makes Network, Config, Profile), as the real API does.
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
