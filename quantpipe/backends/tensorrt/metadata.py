"""The GPU an engine is built for, and the metadata JSON written beside every engine.

TensorRT engines hold kernels chosen for one GPU model and one TensorRT release; the metadata (TensorRT
version, GPU, compute capability, source model hash, build options) lets a runner refuse an engine built
for another machine before deserializing it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantpipe.artifacts import Precision
from quantpipe.cuda import cuda_check, cuda_runtime
from quantpipe.errors import StaleArtifactError
from quantpipe.fsutil import atomic_write_json

__all__ = [
    "ENGINE_METADATA_VERSION",
    "EngineInfo",
    "GpuInfo",
    "check_engine_metadata",
    "current_gpu",
    "metadata_path_for",
    "read_engine_metadata",
    "write_engine_metadata",
]

ENGINE_METADATA_VERSION = 1


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


def write_engine_metadata(info: EngineInfo) -> None:
    """Write `info` (plus `format` and `created`) atomically to its `metadata_path`, beside the engine."""
    meta = {"format": ENGINE_METADATA_VERSION, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    meta.update(_jsonable(dataclasses.asdict(info)))
    atomic_write_json(info.metadata_path, meta)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
