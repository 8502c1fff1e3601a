"""TensorRT engines (FP32, FP16, INT8) and the runner that evaluates them. The only module that imports tensorrt.

The installed TensorRT picks the build path:

- **8.6 - 10.x** (weak typing): FP16 and INT8 through builder flags. INT8 either from the explicit Q/DQ
  model quantpipe writes, or through implicit calibration with an `IInt8EntropyCalibrator2` /
  `IInt8MinMaxCalibrator` subclass that feeds batches to device memory and reads quantpipe's own
  calibration cache (so TensorRT skips calibration and uses quantpipe's scales).
- **11.x** (strong typing only; NVIDIA's 10.x -> 11.x migration guide): the precision comes from the
  model. FP16 from the FP16 model, INT8 from the Q/DQ model; the weak-typing names the guide lists as
  removed (BuilderFlag.FP16 / INT8, the IInt8 calibrators, `int8_calibrator`, calibration profiles) are
  never touched on that path.

tensorrt is imported lazily, through `quantpipe.deps.require`, on first use: this module imports (and
reports why TensorRT variants are skipped) on machines without TensorRT, CUDA or a GPU. Every engine is
written atomically with a metadata JSON beside it (TensorRT version, GPU, compute capability, source model
hash, build options); a runner refuses an engine built for another GPU or TensorRT version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from quantpipe.artifacts import Precision
from quantpipe.backends.base import Runner, Timings
from quantpipe.calibration import cache as qcache
from quantpipe.cuda import (
    AllocatorKind,
    BatchSource,
    CudaRuntimeAllocator,
    CudaStream,
    DeviceAllocator,
    DeviceBatcher,
    DeviceBuffer,
    cuda_check,
    cuda_runtime,
    make_allocator,
)
from quantpipe.deps import require
from quantpipe.errors import (
    BuildError,
    CalibrationError,
    EvaluationError,
    MissingDependencyError,
    QuantpipeError,
    StaleArtifactError,
)
from quantpipe.fsutil import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = [
    "MIN_VERSION",
    "ENGINE_METADATA_VERSION",
    "TrtApi",
    "BuildPlan",
    "ShapeRange",
    "GpuInfo",
    "CalibrationInput",
    "CalibrationFeed",
    "EngineInfo",
    "tensorrt_status",
    "require_tensorrt",
    "api_for_version",
    "resolve_int8_mode",
    "plan_build",
    "variant_skip_reason",
    "check_source_model",
    "normalize_profiles",
    "check_profiles",
    "current_gpu",
    "metadata_path_for",
    "read_engine_metadata",
    "check_engine_metadata",
    "make_calibrator",
    "build_engine",
    "TensorRTRunner",
]

log = logging.getLogger(__name__)

#: Oldest TensorRT this module supports: the name-based tensor API (set_tensor_address,
#: execute_async_v3) and memory-pool limits it relies on are complete from 8.6.
MIN_VERSION = (8, 6)
#: First major version this module does not know (its removals are not in the migration guide yet).
UNSUPPORTED_MAJOR = 12
ENGINE_METADATA_VERSION = 1

INSTALL_TENSORRT = "pip install 'quantpipe[tensorrt]'  (or: pip install tensorrt)"

Int8Mode = Literal["auto", "qdq", "calibrator"]
CalibrationMethod = Literal["entropy", "minmax"]
SourceKind = Literal["fp32", "fp16", "qdq"]

#: TensorRT's cache-header name of each implicit-calibration algorithm.
CACHE_ALGORITHM: dict[str, str] = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration"}


class _LazyTensorRT:
    """Stands in for the tensorrt module until an attribute is used; then imports it through deps.require."""

    def __getattr__(self, name: str) -> Any:
        return getattr(require("tensorrt", purpose="TensorRT engines"), name)


if TYPE_CHECKING:  # mypy checks every use below against the tensorrt stubs (tools/trt_stubs.sh)
    import tensorrt as trt
else:
    trt = _LazyTensorRT()


# ==================================================================================================
# What is installed, and what it can do
# ==================================================================================================


def tensorrt_status() -> tuple[bool, str | None, str | None]:
    """(available, version, reason it is not) for the installed TensorRT. Never raises.

    The reason is one line for a skipped variant, e.g. "tensorrt: not installed (...); install with ...".
    """
    try:
        try:
            mod = importlib.import_module("tensorrt")
        except Exception as err:  # missing module, or a wheel whose native libraries fail to load
            return False, None, f"tensorrt: not installed ({type(err).__name__}: {err}); install with: {INSTALL_TENSORRT}"
        version = getattr(mod, "__version__", None)
        if not isinstance(version, str) or not version:
            return False, None, "tensorrt: the module imports but reports no __version__ (a broken install?); reinstall it"
        try:
            api_for_version(version)
        except QuantpipeError as err:
            return False, version, str(err)
        return True, version, None
    except Exception as err:  # pragma: no cover - the promise is "never raises"
        return False, None, f"tensorrt: probing failed ({type(err).__name__}: {err})"


def require_tensorrt() -> TrtApi:
    """The installed TensorRT's API level, or MissingDependencyError (exit 3) saying why and how to fix it."""
    available, version, reason = tensorrt_status()
    if not available or version is None:
        raise MissingDependencyError(reason or "tensorrt: not available")
    return api_for_version(version)


@dataclasses.dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT offers, decided from its version alone."""

    version: str
    major: int
    minor: int
    weak_typing: bool
    """BuilderFlag.FP16 / INT8 and the IInt8 calibrators exist (<= 10.x; removed in 11.0)."""
    explicit_batch_flag: bool
    """Networks must be created with NetworkDefinitionCreationFlag.EXPLICIT_BATCH (< 10.0)."""

    @property
    def strongly_typed_only(self) -> bool:
        return not self.weak_typing

    @property
    def has_calibrators(self) -> bool:
        return self.weak_typing


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)")


def api_for_version(version: str) -> TrtApi:
    """The API level of TensorRT `version` ("10.13.0.35", "11.1.0", "8.6.1.post1" ...).

    Raises MissingDependencyError for versions this module does not support.
    """
    m = _VERSION_RE.match(version)
    if m is None:
        raise MissingDependencyError(f"tensorrt: cannot read the version string {version!r}; reinstall TensorRT ({INSTALL_TENSORRT})")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) < MIN_VERSION:
        raise MissingDependencyError(
            f"tensorrt: version {version} is installed; quantpipe needs 8.6 or newer (the name-based tensor API). "
            f"Upgrade with: pip install 'tensorrt>=8.6,<{UNSUPPORTED_MAJOR}'"
        )
    if major >= UNSUPPORTED_MAJOR:
        raise MissingDependencyError(
            f"tensorrt: version {version} is installed; quantpipe supports 8.6 - 11.x (TensorRT {major} may remove "
            f"APIs quantpipe uses). Install a supported one with: pip install 'tensorrt>=8.6,<{UNSUPPORTED_MAJOR}'"
        )
    return TrtApi(version=version, major=major, minor=minor, weak_typing=major <= 10, explicit_batch_flag=major < 10)


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

_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


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
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise BuildError(f"TensorRT build: cannot read ONNX model {path}: {err}") from err
    graph = model.graph
    has_qdq = any(n.op_type in _QDQ_OPS for n in graph.node)
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


# ==================================================================================================
# The GPU, and engine metadata
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built on or run on."""

    name: str
    compute_capability: str
    device: int = 0


def current_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device `device` (through cuda-python)."""
    rt = cuda_runtime()
    prop = cuda_check(rt, rt.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    raw = prop.name
    name = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return GpuInfo(name=name.split("\x00", 1)[0].strip(), compute_capability=f"{prop.major}.{prop.minor}", device=device)


def metadata_path_for(engine_path: str | Path) -> Path:
    """Where an engine's metadata JSON lives: `<engine>.json` beside it."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_engine_metadata(engine_path: str | Path) -> dict[str, Any]:
    """The metadata JSON of an engine; StaleArtifactError when it is missing or unreadable."""
    meta_path = metadata_path_for(engine_path)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as err:
        raise StaleArtifactError(
            f"TensorRT engine {engine_path} has no metadata file {meta_path.name} beside it, so its TensorRT version "
            f"and GPU are unknown. Rebuild it with `quantpipe build` (quantpipe never runs an engine it cannot vouch for)."
        ) from err
    except (OSError, ValueError) as err:
        raise StaleArtifactError(f"metadata {meta_path} of TensorRT engine {engine_path} is unreadable ({err}). Rebuild the engine.") from err
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_METADATA_VERSION:
        raise StaleArtifactError(
            f"metadata {meta_path} is not a quantpipe engine metadata file of format {ENGINE_METADATA_VERSION}. Rebuild the engine."
        )
    return meta


def check_engine_metadata(
    meta: Mapping[str, Any],
    *,
    engine_path: str | Path,
    tensorrt_version: str,
    gpu: GpuInfo,
    source_sha256: str | None = None,
    engine_sha256: str | None = None,
) -> None:
    """Refuse (StaleArtifactError) an engine built for another TensorRT, another GPU, or another model.

    TensorRT engines hold kernels chosen for one GPU model and one TensorRT release: they fail or
    misbehave elsewhere, so quantpipe compares before deserializing.
    """
    where = f"TensorRT engine {engine_path}"
    built_on = f"TensorRT {meta.get('tensorrt_version')} on {meta.get('gpu_name')} (compute {meta.get('compute_capability')})"
    here = f"TensorRT {tensorrt_version} on {gpu.name} (compute {gpu.compute_capability})"
    fix = "Rebuild it here with `quantpipe build` (or delete it and re-run the pipeline)."
    if meta.get("tensorrt_version") != tensorrt_version:
        raise StaleArtifactError(f"{where} was built with {built_on}; this machine has {here}. Engines run only on the TensorRT version that built them. {fix}")
    if meta.get("compute_capability") != gpu.compute_capability or meta.get("gpu_name") != gpu.name:
        raise StaleArtifactError(f"{where} was built for {built_on}; this machine has {here}. Engines are specific to the GPU model. {fix}")
    if source_sha256 is not None and meta.get("source_sha256") != source_sha256:
        raise StaleArtifactError(
            f"{where} was built from a model with sha256 {str(meta.get('source_sha256'))[:12]}..., not the current one "
            f"({source_sha256[:12]}...). {fix}"
        )
    if engine_sha256 is not None and meta.get("engine_sha256") != engine_sha256:
        raise StaleArtifactError(
            f"{where} does not match its metadata (sha256 {engine_sha256[:12]}... vs {str(meta.get('engine_sha256'))[:12]}... "
            f"recorded): it was replaced or cut short. {fix}"
        )


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What `build_engine` made (also the content of the metadata JSON, plus `format` and `created`)."""

    path: str
    metadata_path: str
    precision: Precision
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    source_model: str
    source_sha256: str
    engine_sha256: str
    size_bytes: int
    build_seconds: float
    strongly_typed: bool
    int8_mode: str | None
    options: Mapping[str, Any]
    """workspace_mib, profiles, timing_cache, tf32, calibration (method, cache, batches)."""


# ==================================================================================================
# Implicit INT8 calibration (TensorRT <= 10)
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class CalibrationInput:
    """What implicit INT8 calibration (TensorRT <= 10, int8_mode 'calibrator') needs.

    With `cache_path` pointing at quantpipe's TensorRT cache for `method`, TensorRT reads those scales and
    does not calibrate (no data is copied to the device). With `fingerprint` (what the calibrate stage
    expects: `quantpipe.calibration.cache.make_fingerprint`), the cache and its sidecar are checked first
    and a stale one is refused. Otherwise TensorRT calibrates on `dataset`, and its cache is written to
    `cache_path` (through quantpipe's cache module) when `write_cache`.
    """

    method: CalibrationMethod = "entropy"
    cache_path: Path | None = None
    dataset: BatchSource | None = None
    batch_size: int = 32
    allocator: AllocatorKind | DeviceAllocator = "auto"
    max_batches: int | None = None
    write_cache: bool = True
    fingerprint: Mapping[str, str] | None = None


class CalibrationFeed:
    """The logic behind both TensorRT calibrator classes, with no tensorrt in it.

    TensorRT calls the calibrator from C++ and only prints what a Python override raises, so every
    failure here is kept in `errors`; `build_engine` raises the first one after the build returns.
    """

    def __init__(
        self,
        *,
        method: CalibrationMethod,
        tensorrt_version: str,
        batcher: DeviceBatcher | None = None,
        cache_path: str | Path | None = None,
        write_cache: bool = True,
        fingerprint: Mapping[str, str] | None = None,
    ) -> None:
        if method not in CACHE_ALGORITHM:
            raise CalibrationError(f"TensorRT implicit calibration supports methods {sorted(CACHE_ALGORITHM)}, not {method!r}")
        self.method: CalibrationMethod = method
        self.algorithm = CACHE_ALGORITHM[method]
        self.tensorrt_version = tensorrt_version
        self.batcher = batcher
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.write_cache_enabled = write_cache
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.errors: list[BaseException] = []
        self.served_cache = False
        self.wrote_cache: Path | None = None
        self._cache_bytes: bytes | None = None
        self._loaded = False

    # -- before the build ---------------------------------------------------------------------------

    def load_cache(self) -> bytes | None:
        """Read and check quantpipe's cache now (outside TensorRT's callbacks, so errors raise normally).

        Returns the bytes TensorRT will be given, with the header written for the installed version, or
        None when there is no cache (or one for another method, which TensorRT would ignore): then
        TensorRT calibrates, and `missing_data_error()` says what to do when there is no data either.
        """
        self._loaded = True
        self._cache_bytes = None
        if self.cache_path is not None and self.cache_path.is_file():
            try:
                if self.fingerprint is not None:  # also refuses a stale cache (StaleArtifactError)
                    parsed = qcache.load_cache(self.cache_path, self.fingerprint).cache
                else:
                    parsed = qcache.read_trt_cache(self.cache_path)
            except QuantpipeError:
                raise
            except Exception as err:
                raise CalibrationError(f"calibration cache {self.cache_path} is unreadable ({err}); delete it to recalibrate") from err
            if parsed.algorithm != self.algorithm:
                log.warning(
                    "calibration cache %s holds %s scales but the %s calibrator needs %s; TensorRT will calibrate itself",
                    self.cache_path, parsed.algorithm, self.method, self.algorithm,
                )
            else:
                self._cache_bytes = self._rewrite_for_installed(parsed.amax)
        return self._cache_bytes

    def missing_data_error(self) -> CalibrationError:
        """The error for "TensorRT must calibrate, but there is no data"."""
        where = f" ({self.cache_path} does not exist)" if self.cache_path is not None and not self.cache_path.is_file() else ""
        return CalibrationError(
            f"INT8 through TensorRT's {self.method} calibrator needs quantpipe's calibration cache for that method or "
            f"calibration data; neither was given{where}. Run `quantpipe calibrate` first, or pass the calibration data."
        )

    def _rewrite_for_installed(self, amax: Mapping[str, float]) -> bytes:
        # TensorRT checks the cache header against its own version and algorithm; quantpipe's scales are
        # the same whatever the version, so the header is rewritten for the TensorRT that reads it
        # (scale * 127 / 127 gives back the same float32 scale).
        with tempfile.TemporaryDirectory(prefix="quantpipe-trtcache-") as tmp:
            path = Path(tmp) / "calibration.cache"
            qcache.write_trt_cache(path, amax, method=self.method, trt_version=self.tensorrt_version)
            return path.read_bytes()

    # -- what TensorRT calls ------------------------------------------------------------------------

    def get_batch_size(self) -> int:
        # For explicit-batch networks TensorRT takes the batch from the input shapes; the size returned here
        # must still match the batches fed, which is what the batcher guarantees.
        return self.batcher.batch_size if self.batcher is not None else 1

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        if self.batcher is None:
            return None
        try:
            return self.batcher.next_batch(list(names))
        except BaseException as err:  # never let an exception cross into TensorRT's C++ caller
            self.errors.append(err)
            return None

    def read_cache(self) -> bytes | None:
        try:
            if not self._loaded:
                self.load_cache()
            self.served_cache = self._cache_bytes is not None
            return self._cache_bytes
        except BaseException as err:
            self.errors.append(err)
            return None

    def write_cache(self, data: bytes) -> None:
        if self.served_cache or not self.write_cache_enabled or self.cache_path is None:
            return
        try:
            with tempfile.TemporaryDirectory(prefix="quantpipe-trtcache-") as tmp:
                raw = Path(tmp) / "tensorrt.cache"
                raw.write_bytes(bytes(data))
                parsed = qcache.read_trt_cache(raw)
            qcache.write_trt_cache(self.cache_path, parsed.amax, method=self.method, trt_version=self.tensorrt_version)
            self.wrote_cache = self.cache_path
        except BaseException as err:
            self.errors.append(err)

    # -- after the build ----------------------------------------------------------------------------

    def raise_if_failed(self) -> None:
        if self.errors:
            err = self.errors[0]
            if isinstance(err, QuantpipeError):
                raise err
            raise CalibrationError(f"TensorRT calibration failed in quantpipe's calibrator: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def make_calibrator(feed: CalibrationFeed) -> trt.IInt8Calibrator:
    """A TensorRT calibrator object delegating to `feed`: IInt8EntropyCalibrator2 or IInt8MinMaxCalibrator.

    The subclasses are defined here, after tensorrt is imported, so this module imports without it.
    """
    api = require_tensorrt()
    if not api.has_calibrators:
        raise BuildError(f"TensorRT {api.version} has no IInt8 calibrators (removed in 11.0); build INT8 from the Q/DQ model")

    class _FeedMethods:
        """The calibrator callbacks, shared by both TensorRT base classes (listed first in the MRO, so
        pybind11's override lookup finds them)."""

        feed: CalibrationFeed

        def get_batch_size(self) -> int:
            return self.feed.get_batch_size()

        # The stubs type get_batch as -> list[int]. We return None when the data is exhausted, as TensorRT's
        # documentation and the binding accept (it treats None and [] alike): None cannot be mistaken for a
        # batch with no inputs.
        def get_batch(self, names: list[str]) -> list[int] | None:
            return self.feed.get_batch(names)

        # None means "no cache: calibrate" to the binding (the stubs' Buffer return type allows it).
        def read_calibration_cache(self) -> bytes | None:
            return self.feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            self.feed.write_cache(bytes(cache))

    # ignore[misc]: get_batch may return None, which the stubs (-> list[int]) do not allow; see above.
    class EntropyCalibrator2(_FeedMethods, trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        """quantpipe's entropy calibrator: TensorRT's IInt8EntropyCalibrator2 fed by a CalibrationFeed."""

        def __init__(self, feed: CalibrationFeed) -> None:
            # pybind11 trampolines need the base __init__ called explicitly, or TensorRT crashes later.
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.feed = feed

    class MinMaxCalibrator(_FeedMethods, trt.IInt8MinMaxCalibrator):  # type: ignore[misc]
        """quantpipe's minmax calibrator: TensorRT's IInt8MinMaxCalibrator fed by a CalibrationFeed."""

        def __init__(self, feed: CalibrationFeed) -> None:
            trt.IInt8MinMaxCalibrator.__init__(self)
            self.feed = feed

    calibrator: trt.IInt8Calibrator = EntropyCalibrator2(feed) if feed.method == "entropy" else MinMaxCalibrator(feed)
    return calibrator


# ==================================================================================================
# Building
# ==================================================================================================


def _make_logger() -> Any:
    """A TensorRT ILogger that routes to Python logging and keeps the errors for BuildError messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.INFO:
                log.info("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    precision: Precision,
    calibration: CalibrationInput | None = None,
    profiles: Mapping[str, Any] | None = None,
    workspace_mib: int = 2048,
    timing_cache: str | Path | None = None,
    source_sha256: str | None = None,
    int8_mode: Int8Mode = "auto",
    tf32: bool = True,
    gpu: GpuInfo | None = None,
) -> EngineInfo:
    """Build one TensorRT engine from an ONNX model and save it atomically with its metadata JSON.

    Args:
        onnx_path: the model for this precision (see `plan_build(...).source`): the FP32 model, the FP16
            model (TensorRT >= 11) or the Q/DQ model (INT8 from explicit quantization).
        out_path: where the engine goes; its metadata is written to `metadata_path_for(out_path)`.
        precision: fp32, fp16 or int8.
        calibration: for INT8 through the implicit calibrator (TensorRT <= 10): quantpipe's cache and/or data.
        profiles: min/opt/max shapes per dynamic input, `{name: {"min": [...], "opt": [...], "max": [...]}}`.
        workspace_mib: TensorRT's workspace memory-pool limit.
        timing_cache: a file reused between builds (read if present, rewritten after the build).
        source_sha256: hash recorded in the metadata (default: hashed here from `onnx_path`).
        int8_mode: auto (calibrator on <= 10, qdq on >= 11), qdq or calibrator.
        tf32: allow TF32 for FP32 layers (TensorRT's default); False keeps FP32 math strict.
        gpu: the GPU to record (default: CUDA device 0, read through cuda-python).

    Raises:
        MissingDependencyError: TensorRT (or cuda-python) is missing or unsupported.
        BuildError: the model does not fit the plan, parsing or the build failed.
        CalibrationError: the calibrator failed (no cache and no data, CUDA errors, bad data).
    """
    api = require_tensorrt()
    plan = plan_build(precision, api, int8_mode)
    onnx_path = Path(onnx_path)
    out_path = Path(out_path)
    check_source_model(onnx_path, plan)
    if plan.calibrator and calibration is None:
        raise BuildError(
            "INT8 through TensorRT's calibrator needs a CalibrationInput (quantpipe's cache and/or calibration data); "
            "or set int8_mode to 'qdq' and pass the Q/DQ model"
        )
    if not plan.calibrator and calibration is not None:
        log.debug("calibration input ignored for %s %s engine (not built through the calibrator)", precision, plan.source)
    gpu = gpu or current_gpu()
    source_sha = source_sha256 or sha256_file(onnx_path)
    t0 = time.perf_counter()
    with _calibration_feed(plan, calibration, api) as feed:
        serialized, used_profiles, timing_path = _build_serialized(
            onnx_path, plan, api, feed=feed, calibration=calibration, profiles=profiles,
            workspace_mib=workspace_mib, timing_cache=timing_cache, tf32=tf32,
        )
        calib_summary: dict[str, Any] | None = None
        if feed is not None:
            feed.raise_if_failed()
            calib_summary = {
                "method": feed.method,
                "cache": str(feed.cache_path) if feed.cache_path else None,
                "used_quantpipe_cache": feed.served_cache,
                "batches_fed": feed.batcher.num_batches if feed.batcher is not None else 0,
                "wrote_cache": str(feed.wrote_cache) if feed.wrote_cache else None,
            }
    seconds = time.perf_counter() - t0
    atomic_write_bytes(out_path, serialized)
    info = EngineInfo(
        path=str(out_path),
        metadata_path=str(metadata_path_for(out_path)),
        precision=precision,
        tensorrt_version=api.version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        source_model=str(onnx_path),
        source_sha256=source_sha,
        engine_sha256=sha256_file(out_path),
        size_bytes=len(serialized),
        build_seconds=round(seconds, 3),
        strongly_typed=plan.strongly_typed,
        int8_mode=plan.int8_mode,
        options={
            "workspace_mib": workspace_mib,
            "profiles": {k: dataclasses.asdict(v) for k, v in used_profiles.items()},
            "timing_cache": str(timing_path) if timing_path else None,
            "tf32": tf32,
            "source_kind": plan.source,
            "calibration": calib_summary,
        },
    )
    meta = {"format": ENGINE_METADATA_VERSION, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    meta.update(_jsonable(dataclasses.asdict(info)))
    atomic_write_json(info.metadata_path, meta)
    log.info("built %s TensorRT engine %s in %.1f s (%d bytes)", precision, out_path, seconds, len(serialized))
    return info


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


@contextlib.contextmanager
def _calibration_feed(plan: BuildPlan, calibration: CalibrationInput | None, api: TrtApi) -> Iterator[CalibrationFeed | None]:
    if not plan.calibrator or calibration is None:
        yield None
        return
    feed = CalibrationFeed(
        method=calibration.method, tensorrt_version=api.version, cache_path=calibration.cache_path,
        write_cache=calibration.write_cache, fingerprint=calibration.fingerprint,
    )
    try:
        yield feed
    finally:
        feed.close()


def _attach_batcher(feed: CalibrationFeed, calibration: CalibrationInput, shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Give the feed its device batcher, only when TensorRT will really calibrate (no usable cache)."""
    if calibration.dataset is None:
        return
    batch_size = calibration.batch_size
    if shapes:
        # TensorRT calibrates at one shape per input; its batch axis fixes the batch size.
        batch_size = int(next(iter(shapes.values()))[0])
    allocator = calibration.allocator
    feed.batcher = DeviceBatcher(
        calibration.dataset, batch_size, allocator=make_allocator(allocator) if isinstance(allocator, str) else allocator,
        shapes=shapes, max_batches=calibration.max_batches,
    )


def _build_serialized(
    onnx_path: Path,
    plan: BuildPlan,
    api: TrtApi,
    *,
    feed: CalibrationFeed | None,
    calibration: CalibrationInput | None,
    profiles: Mapping[str, Any] | None,
    workspace_mib: int,
    timing_cache: str | Path | None,
    tf32: bool,
) -> tuple[bytes, dict[str, ShapeRange], Path | None]:
    """Every TensorRT build call, in one place. Returns (engine bytes, profiles used, timing cache path)."""
    logger = _make_logger()
    builder = trt.Builder(logger)
    flags = 0
    if plan.explicit_batch_flag:  # TensorRT < 10 only: implicit batch was still the default there
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed:  # required meaning on 11.x (where it is always on), opt-in on 10.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path}: " + ("; ".join(errors) or "no detail given"))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.int8_flag:
        config.set_flag(trt.BuilderFlag.INT8)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)

    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = _dims(tensor.shape)
    ranges = check_profiles(inputs, profiles)
    profile = None
    if ranges:
        profile = builder.create_optimization_profile()
        for name, r in ranges.items():
            profile.set_shape(name, trt.Dims(list(r.min)), trt.Dims(list(r.opt)), trt.Dims(list(r.max)))
        config.add_optimization_profile(profile)

    timing_path = Path(timing_cache) if timing_cache is not None else None
    cache = _load_timing_cache(config, timing_path)

    if plan.calibrator:
        assert feed is not None and calibration is not None  # guaranteed by build_engine
        # TensorRT calibrates at the calibration profile's opt shape (dynamic inputs) or the static shape.
        cal_shapes = {n: s for n, s in inputs.items() if all(d >= 0 for d in s)}
        cal_shapes.update({n: r.opt for n, r in ranges.items()})
        if feed.load_cache() is None:
            if calibration.dataset is None:
                raise feed.missing_data_error()
            _attach_batcher(feed, calibration, cal_shapes)
        # The binding keeps only a C++ pointer to the calibrator: hold the Python object for the whole build.
        calibrator = make_calibrator(feed)
        config.int8_calibrator = calibrator
        if profile is not None:
            config.set_calibration_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if feed is not None:
        feed.raise_if_failed()
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "TensorRT gave no error message (run with --verbose for its log)"
        raise BuildError(f"TensorRT could not build the {plan.precision} engine from {onnx_path}: {detail}")
    if timing_path is not None and cache is not None:
        atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), ranges, timing_path


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache | None:
    """Reuse the timing cache file when it fits this TensorRT/GPU; start an empty one otherwise."""
    if path is None:
        return None
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log.warning("timing cache %s was made by another TensorRT or GPU; starting a new one (it will be overwritten)", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


# ==================================================================================================
# Running
# ==================================================================================================


class TensorRTRunner(Runner):
    """Runs a TensorRT engine by tensor name (set_tensor_address / execute_async_v3) on one CUDA stream.

    `__enter__` refuses an engine whose metadata names another TensorRT version or GPU (or, with
    `source_sha256`, another source model), then deserializes it. Latency is timed with CUDA events
    after warm-up, host->device copies, compute and device->host copies apart.
    """

    def __init__(
        self,
        engine_path: str | Path,
        name: str | None = None,
        *,
        source_sha256: str | None = None,
        device: int = 0,
    ) -> None:
        self.engine_path = Path(engine_path)
        self.name = name or self.engine_path.stem
        self.device = "cuda"
        self.device_index = device
        self.source_sha256 = source_sha256
        self._rt: Any = None
        self._alloc: CudaRuntimeAllocator | None = None
        self._logger: Any = None
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: CudaStream | None = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._buffers: dict[str, DeviceBuffer] = {}

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> TensorRTRunner:
        api = require_tensorrt()
        meta = read_engine_metadata(self.engine_path)
        gpu = current_gpu(self.device_index)
        check_engine_metadata(
            meta, engine_path=self.engine_path, tensorrt_version=api.version, gpu=gpu,
            source_sha256=self.source_sha256, engine_sha256=sha256_file(self.engine_path),
        )
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self) -> None:
        self._alloc = CudaRuntimeAllocator(self.device_index)
        rt = self._rt = self._alloc.runtime
        self._logger = _make_logger()
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise EvaluationError(
                f"TensorRT could not deserialize {self.engine_path}: " + ("; ".join(self._logger.errors[-3:]) or "no detail")
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = CudaStream(rt, num_events=4)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (self._inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self._outputs).append(name)

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            with contextlib.suppress(QuantpipeError):
                self._stream.close()  # synchronizes first: no copy may still target the buffers freed below
            self._stream = None
        # Release in dependency order: the context uses the engine, the engine the runtime; then the buffers.
        self._context = None
        self._engine = None
        self._runtime = None
        if self._alloc is not None:
            for buf in self._buffers.values():
                with contextlib.suppress(QuantpipeError):
                    self._alloc.free(buf.ptr)
        self._buffers = {}
        self._rt = None

    # -- Runner -------------------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        hosts_in, hosts_out = self._prepare(feeds)
        self._copy_in(hosts_in)
        self._execute()
        self._copy_out(hosts_out)
        self._sync()
        return hosts_out

    def measure(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int) -> Timings:
        if iterations < 1:
            raise EvaluationError(f"latency needs at least one timed iteration, got {iterations}")
        self._need_rt()
        stream = self._stream
        assert stream is not None
        hosts_in, hosts_out = self._prepare(feeds)
        for _ in range(max(warmup, 1)):  # at least one: the first run pays lazy initialisation
            self._copy_in(hosts_in)
            self._execute()
            self._copy_out(hosts_out)
        stream.synchronize()
        total, h2d, compute, d2h = (np.empty(iterations) for _ in range(4))
        for i in range(iterations):
            stream.record(0)
            self._copy_in(hosts_in)
            stream.record(1)
            self._execute()
            stream.record(2)
            self._copy_out(hosts_out)
            stream.record(3)
            stream.wait_event(3)
            h2d[i], compute[i], d2h[i] = stream.elapsed_ms(0, 1), stream.elapsed_ms(1, 2), stream.elapsed_ms(2, 3)
            total[i] = stream.elapsed_ms(0, 3)
        return Timings(total=total, timer="cuda_events", compute=compute, h2d=h2d, d2h=d2h)

    # -- internals ----------------------------------------------------------------------------------

    def _need_rt(self) -> Any:
        if self._rt is None or self._context is None or self._engine is None:
            raise EvaluationError(f"TensorRT runner {self.name} is not open; use it as a context manager")
        return self._rt

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Set input shapes, size device buffers, bind addresses; return the host arrays to copy."""
        self._need_rt()
        engine, context = self._engine, self._context
        assert engine is not None and context is not None
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise EvaluationError(f"TensorRT engine {self.name} needs inputs {missing} (given: {sorted(feeds)})")
        hosts_in: dict[str, np.ndarray] = {}
        for name in self._inputs:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            arr = np.ascontiguousarray(feeds[name], dtype=dtype)
            if not context.set_input_shape(name, tuple(arr.shape)):
                raise EvaluationError(
                    f"TensorRT engine {self.name} rejects input '{name}' of shape {list(arr.shape)}: outside the engine's "
                    f"optimization profile (engine shape {list(_dims(engine.get_tensor_shape(name)))})"
                )
            self._bind(name, arr.nbytes)
            hosts_in[name] = arr
        hosts_out: dict[str, np.ndarray] = {}
        for name in self._outputs:
            shape = _dims(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EvaluationError(f"output '{name}' of engine {self.name} has a data-dependent shape {list(shape)}, which the runner does not support")
            arr = np.empty(shape, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            self._bind(name, arr.nbytes)
            hosts_out[name] = arr
        return hosts_in, hosts_out

    def _bind(self, name: str, nbytes: int) -> None:
        assert self._alloc is not None and self._context is not None
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self._alloc.free(buf.ptr)
                del self._buffers[name]
            buf = DeviceBuffer(self._alloc.alloc(nbytes), max(nbytes, 1))
            self._buffers[name] = buf
        if not self._context.set_tensor_address(name, buf.ptr):
            raise EvaluationError(f"TensorRT refused the device address for tensor '{name}' of engine {self.name}")

    def _copy_in(self, hosts: Mapping[str, np.ndarray]) -> None:
        assert self._stream is not None
        for name, arr in hosts.items():
            self._stream.h2d(self._buffers[name].ptr, arr)

    def _execute(self) -> None:
        assert self._context is not None and self._stream is not None
        if not self._context.execute_async_v3(self._stream.handle):
            raise EvaluationError(f"TensorRT execute_async_v3 failed for engine {self.name}: " + "; ".join(self._logger.errors[-3:]))

    def _copy_out(self, hosts: Mapping[str, np.ndarray]) -> None:
        assert self._stream is not None
        for name, arr in hosts.items():
            self._stream.d2h(arr, self._buffers[name].ptr)

    def _sync(self) -> None:
        assert self._stream is not None
        self._stream.synchronize()
