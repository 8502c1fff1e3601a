"""Building one TensorRT engine from an ONNX model: parse, configure, calibrate, serialize, save with metadata.

Every TensorRT builder call is in `build_engine`'s helpers here: the logger that routes TensorRT's
messages to Python logging, the serialized build itself, the timing cache reused between builds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from quantpipe.artifacts import Precision
from quantpipe.backends.tensorrt.calibrator import CalibrationFeed, CalibrationInput, make_calibrator
from quantpipe.backends.tensorrt.metadata import (
    EngineInfo,
    GpuInfo,
    current_gpu,
    metadata_path_for,
    write_engine_metadata,
)
from quantpipe.backends.tensorrt.plan import (
    BuildPlan,
    Int8Mode,
    ShapeRange,
    check_profiles,
    check_source_model,
    plan_build,
)
from quantpipe.backends.tensorrt.version import TrtApi, require_tensorrt, trt
from quantpipe.cuda import DeviceBatcher, make_allocator
from quantpipe.errors import BuildError
from quantpipe.fsutil import atomic_write_bytes, sha256_file

__all__ = ["build_engine", "dims_tuple", "make_logger"]

log = logging.getLogger(__name__)


def make_logger() -> Any:
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
    _check_calibration_input(plan, calibration)
    gpu = gpu or current_gpu()
    source_sha = source_sha256 or sha256_file(onnx_path)
    t0 = time.perf_counter()
    with _calibration_feed(plan, calibration, api) as feed:
        serialized, used_profiles, timing_path = _build_serialized(
            onnx_path, plan, api, feed=feed, calibration=calibration, profiles=profiles,
            workspace_mib=workspace_mib, timing_cache=timing_cache, tf32=tf32,
        )
        calib_summary = _calibration_summary(feed)
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
    write_engine_metadata(info)
    log.info("built %s TensorRT engine %s in %.1f s (%d bytes)", precision, out_path, seconds, len(serialized))
    return info


def _check_calibration_input(plan: BuildPlan, calibration: CalibrationInput | None) -> None:
    """INT8 through the calibrator needs a CalibrationInput; any other plan ignores one (and says so at debug level)."""
    if plan.calibrator and calibration is None:
        raise BuildError(
            "INT8 through TensorRT's calibrator needs a CalibrationInput (quantpipe's cache and/or calibration data); "
            "or set int8_mode to 'qdq' and pass the Q/DQ model"
        )
    if not plan.calibrator and calibration is not None:
        log.debug("calibration input ignored for %s %s engine (not built through the calibrator)", plan.precision, plan.source)


def _calibration_summary(feed: CalibrationFeed | None) -> dict[str, Any] | None:
    """Raise what failed inside TensorRT's calibrator callbacks; else what calibration did (for the metadata)."""
    if feed is None:
        return None
    feed.raise_if_failed()
    return {
        "method": feed.method,
        "cache": str(feed.cache_path) if feed.cache_path else None,
        "used_quantpipe_cache": feed.served_cache,
        "batches_fed": feed.batcher.num_batches if feed.batcher is not None else 0,
        "wrote_cache": str(feed.wrote_cache) if feed.wrote_cache else None,
    }


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
    logger = make_logger()
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
        inputs[tensor.name] = dims_tuple(tensor.shape)
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
        atomic_write_bytes(timing_path, _host_bytes(config.get_timing_cache().serialize()))
    return _host_bytes(serialized), ranges, timing_path


def _host_bytes(memory: trt.IHostMemory) -> bytes:
    """An IHostMemory's bytes. It implements the buffer protocol (pybind11 `def_buffer`), which stubs generated from
    the bindings cannot express (no `__buffer__` before Python 3.12), hence the one ignore."""
    return bytes(memory)  # type: ignore[call-overload]


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (-1 for a dynamic axis)."""
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
