"""TensorRT calibration caches and their JSON sidecars; stale caches are refused (histograms.npz: histfile.py).

The cache is TensorRT's own text format (NVIDIA/TensorRT samples/sampleINT8/README.md, "Calibration
file"): a header `TRT-<version>-<algorithm>`, then one `tensor: <hex>` line per tensor, the hex being
the big-endian IEEE-754 float32 of the scale (scale = amax / 127). TensorRT reads a cache only when
its header names the calibrator in use: `minmax` caches say `MinMaxCalibration`; entropy, percentile,
mse and best caches say `EntropyCalibration2`, so an IInt8EntropyCalibrator2 serves any of them (the
sidecar records the real method). Only graph inputs and activations go into the cache (TensorRT
quantizes weights itself); weights are in the sidecar.

All-zero tensors have amax 0, and TensorRT needs a positive scale: every amax is written as at least
MIN_AMAX = 2**-14 (scale ~4.8e-7), small against any real activation yet a normal float32 whose
reciprocal is finite (and non-zero even in float16).

The sidecar `<cache stem>.json` holds, per tensor, amax, scale, kind, method and a histogram summary,
plus the fingerprint (model sha256, data fingerprint, method and parameters, bins, versions) that
`load_cache` checks: a cache made from other inputs raises StaleArtifactError naming what changed.
Every file is written atomically; the sidecar, which holds the cache's sha256, is written last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.config import CalibrationConfig
from quantpipe.errors import CalibrationError, StaleArtifactError
from quantpipe.fsutil import atomic_write_json, atomic_write_text, sha256_file
from quantpipe.int8 import INT8_MAX

__all__ = [
    "DEFAULT_TRT_VERSION",
    "MIN_AMAX",
    "CACHE_ALGORITHMS",
    "ALGORITHM_METHODS",
    "TrtCache",
    "LoadedCache",
    "trt_algorithm",
    "encode_trt_version",
    "decode_trt_version",
    "amax_to_scale",
    "scale_to_hex",
    "write_trt_cache",
    "read_trt_cache",
    "read_tao_json",
    "TAO_JSON_HEADER",
    "sidecar_path",
    "make_fingerprint",
    "write_sidecar",
    "load_cache",
]

DEFAULT_TRT_VERSION: str = CalibrationConfig.model_fields["trt_version"].default
MIN_AMAX = 2.0**-14

CACHE_ALGORITHMS: dict[str, str] = {
    "entropy": "EntropyCalibration2",
    "minmax": "MinMaxCalibration",
    "percentile": "EntropyCalibration2",
    "mse": "EntropyCalibration2",
    "best": "EntropyCalibration2",
}
"""Header algorithm per method: the TensorRT calibrator that will read the cache."""

ALGORITHM_METHODS: dict[str, str] = {
    "EntropyCalibration2": "entropy",
    "EntropyCalibration": "entropy",
    "MinMaxCalibration": "minmax",
    "LegacyCalibration": "percentile",
}
"""The quantpipe method closest to each TensorRT calibrator a cache header can name (TensorRT 5 to 10,
trtexec, Polygraphy and TAO write the same format): what `quantpipe quantize --from-cache` calibrates the
tensors a cache lacks with. IInt8EntropyCalibrator (v1) differs from v2 in details quantpipe does not model;
IInt8LegacyCalibrator's quantile / regression cutoff is closest to a percentile range."""

_HEADER_RE = re.compile(r"^TRT-(\d+)-([A-Za-z0-9_]+)$")
_LINE_RE = re.compile(r"^(.*):\s*([0-9a-fA-F]{1,8})$")
SIDECAR_FORMAT = "quantpipe.calibration"
SIDECAR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrtCache:
    """A parsed TensorRT calibration cache."""

    header: str
    trt_version: str
    """Dotted version decoded from the header (e.g. '10.13.0'; the header holds '101300')."""
    algorithm: str
    """e.g. 'EntropyCalibration2' or 'MinMaxCalibration'."""
    scales: dict[str, float]
    """tensor -> scale, exactly the float32 in the file."""

    @property
    def amax(self) -> dict[str, float]:
        """tensor -> scale * 127."""
        return {k: v * INT8_MAX for k, v in self.scales.items()}


@dataclasses.dataclass(frozen=True)
class LoadedCache:
    """A cache whose sidecar fingerprint matched: its scales and the sidecar's per-tensor amax."""

    cache: TrtCache
    amax: dict[str, float]
    """Every tensor of the sidecar (inputs, activations and weights), as calibrated (not floored)."""
    sidecar: dict[str, Any]
    cache_path: Path
    json_path: Path


# -------------------------------------------------------------------------------------------- format


def trt_algorithm(method: str) -> str:
    """The cache-header algorithm for a quantpipe method."""
    try:
        return CACHE_ALGORITHMS[method]
    except KeyError:
        from quantpipe.errors import ConfigError

        raise ConfigError(f"unknown calibration method {method!r}; valid methods are {', '.join(CACHE_ALGORITHMS)}.") from None


def encode_trt_version(version: str) -> str:
    """'10.13.0' -> '101300', '8.6.1.6' -> '8601' (NV_TENSORRT_VERSION: major*10000 + minor*100 + patch
    from TensorRT 10, major*1000 + minor*100 + patch before); an already encoded '8601' is kept."""
    v = version.strip()
    if v.isdigit():
        return v
    m = re.match(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
    if not m:
        from quantpipe.errors import ConfigError

        raise ConfigError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR.PATCH (e.g. '10.13.0').")
    major, minor, patch = (int(g) if g else 0 for g in m.groups())
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def decode_trt_version(code: str) -> str:
    """'101300' -> '10.13.0', '8601' -> '8.6.1' (inverse of encode_trt_version)."""
    n = int(code)
    if n >= 100000:
        return f"{n // 10000}.{(n // 100) % 100}.{n % 100}"
    return f"{n // 1000}.{(n // 100) % 10}.{n % 100}"


def amax_to_scale(amax: float) -> float:
    """float32(max(amax, MIN_AMAX) / 127), as a Python float (round-trips: scale * 127 / 127 == scale)."""
    a = float(amax)
    if not math.isfinite(a):
        raise CalibrationError(f"amax {amax!r} is not finite; a TensorRT scale must be a positive finite float32.")
    scale = max(a, MIN_AMAX) / INT8_MAX
    if scale > float(np.finfo(np.float32).max):  # float32 would round it to inf, which TensorRT cannot use
        raise CalibrationError(f"amax {amax!r} is beyond the float32 range; a TensorRT scale must be a positive finite float32.")
    return float(np.float32(scale))


def scale_to_hex(scale: float) -> str:
    """Big-endian float32 bits as 8 lowercase hex digits (TensorRT's cache encoding)."""
    return struct.pack(">f", scale).hex()


def _hex_to_scale(text: str) -> float:
    return float(struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0])


def write_trt_cache(
    path: str | os.PathLike[str],
    amax: Mapping[str, float],
    *,
    method: str,
    trt_version: str = DEFAULT_TRT_VERSION,
) -> Path:
    """Write a TensorRT calibration cache for `amax` (tensor -> amax), atomically; return the path."""
    header = f"TRT-{encode_trt_version(trt_version)}-{trt_algorithm(method)}"
    lines = [header]
    for name, value in amax.items():
        if not name or "\n" in name or "\r" in name:
            raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT cache (empty or multi-line).")
        lines.append(f"{name}: {scale_to_hex(amax_to_scale(value))}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def read_trt_cache(path: str | os.PathLike[str]) -> TrtCache:
    """Parse a TensorRT calibration cache (quantpipe's or TensorRT's own); scales are exact float32.

    Reads what TensorRT 5-10 (`TRT-8601-EntropyCalibration2`, `TRT-100300-MinMaxCalibration` ...), trtexec,
    Polygraphy (which saves TensorRT's bytes as they are) and TAO write: the hex is the float32's bits as
    TensorRT prints them, without leading zeros (`0` for a zero scale); Windows line ends are accepted.

    Raises:
        CalibrationError: missing file, bad header or a malformed line (with its number).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a cache saved by a Windows editor starts with a BOM
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration cache {p} does not exist; run `quantpipe calibrate` to create it.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationError(f"calibration cache {p} cannot be read as text ({err}).") from err
    lines = text.split("\n")  # as TensorRT reads it: a tensor name may hold any other line separator (U+2028 ...)
    header = lines[0].strip() if lines else ""
    m = _HEADER_RE.match(header)
    if m is None:
        raise CalibrationError(
            f"{p} is not a TensorRT calibration cache: its first line is {header[:80]!r}, expected "
            f"'TRT-<version>-<algorithm>' (e.g. 'TRT-{encode_trt_version(DEFAULT_TRT_VERSION)}-EntropyCalibration2')."
        )
    scales: dict[str, float] = {}
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip()
        if not line:
            continue
        lm = _LINE_RE.match(line)
        if lm is None:
            raise CalibrationError(f"{p}, line {number}: {line[:80]!r} is not 'tensor: <hex float32 scale>'.")
        scale = _hex_to_scale(lm.group(2))
        if not (math.isfinite(scale) and scale >= 0):
            raise CalibrationError(
                f"{p}, line {number}: tensor {lm.group(1)[:80]!r} has scale {scale!r}; a calibration scale is a finite "
                f"float32 >= 0. The cache is damaged: delete it to recalibrate."
            )
        scales[lm.group(1)] = scale
    return TrtCache(header=header, trt_version=decode_trt_version(m.group(1)), algorithm=m.group(2), scales=scales)


TAO_JSON_HEADER = "TAO calibration JSON (tensor_scales)"


def read_tao_json(path: str | os.PathLike[str]) -> TrtCache:
    """Read the calibration JSON TAO exports beside its cache (`--cal_json_file`, QAT models):
    `{"tensor_scales": {tensor: amax}}`, as the TrtCache TAO writes from it (`cal.bin`: header
    EntropyCalibration2, scale = float32(amax / 127)); it names no TensorRT version (trt_version '').

    Raises:
        CalibrationError: unreadable, not JSON, or no `tensor_scales` mapping of positive finite numbers.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration file {p} does not exist.") from err
    except (OSError, ValueError) as err:
        raise CalibrationError(f"{p} cannot be read as JSON ({err}).") from err
    table = doc.get("tensor_scales") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise CalibrationError(f"{p} is not a TAO calibration JSON: it has no 'tensor_scales' mapping of tensor -> amax.")
    scales: dict[str, float] = {}
    for name, amax in table.items():
        if isinstance(amax, bool) or not isinstance(amax, int | float) or not math.isfinite(amax) or amax < 0:
            raise CalibrationError(f"{p}: tensor_scales[{name!r}] is {amax!r}; an amax is a finite number >= 0.")
        scales[name] = float(np.float32(amax / INT8_MAX))
    return TrtCache(header=TAO_JSON_HEADER, trt_version="", algorithm="EntropyCalibration2", scales=scales)


# ------------------------------------------------------------------------------------------- sidecar


def sidecar_path(cache_path: str | os.PathLike[str]) -> Path:
    """The JSON beside a cache: `entropy.cache` -> `entropy.json`, `OUT` -> `OUT.json`."""
    p = Path(cache_path)
    if p.suffix and p.suffix != ".json":
        return p.with_suffix(".json")
    return p.with_name(p.name + ".json")


def make_fingerprint(
    *,
    model_sha256: str,
    data_fingerprint: str,
    method: str,
    percentile: float,
    num_bins: int,
    trt_version: str,
) -> dict[str, str]:
    """What a cache depends on (batch size is not part of it: scales do not depend on it)."""
    from quantpipe import __version__

    fp = {
        "model_sha256": model_sha256,
        "data_fingerprint": data_fingerprint,
        "method": method,
        "num_bins": str(num_bins),
        "trt_version": encode_trt_version(trt_version),
        "quantpipe_version": __version__,
    }
    if method in ("percentile", "best"):
        fp["percentile"] = f"{percentile:g}"
    return fp


def write_sidecar(
    cache_path: str | os.PathLike[str],
    *,
    method: str,
    fingerprint: Mapping[str, str],
    tensors: Mapping[str, Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `<cache>.json` (after the cache: it records the cache's sha256); return its path."""
    cache = Path(cache_path)
    header = read_trt_cache(cache).header
    doc: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "method": method,
        "cache": cache.name,
        "cache_sha256": sha256_file(cache),
        "trt_header": header,
        "fingerprint": dict(fingerprint),
        "tensors": {name: dict(info) for name, info in tensors.items()},
    }
    if extra:
        doc.update(extra)
    path = sidecar_path(cache)
    atomic_write_json(path, doc)
    return path


_FIELD_WORDS = {
    "model_sha256": "the model changed (sha256 {old} -> {new})",
    "data_fingerprint": "the calibration data changed (fingerprint {old} -> {new})",
    "method": "the method changed ({old} -> {new})",
    "percentile": "the percentile changed ({old} -> {new})",
    "num_bins": "the histogram bin count changed ({old} -> {new})",
    "trt_version": "the target TensorRT version changed (header version {old} -> {new})",
    "quantpipe_version": "quantpipe's version changed ({old} -> {new})",
}


def _short(value: str | None) -> str:
    if value is None:
        return "none"
    return value[:12] + "…" if len(value) > 16 and all(c in "0123456789abcdef" for c in value) else value


def _changes(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    out = []
    for key in list(expected) + [k for k in recorded if k not in expected]:
        old, new = recorded.get(key), expected.get(key)
        if old is None and new is None or str(old) == str(new):
            continue
        words = _FIELD_WORDS.get(key, f"{key} changed ({{old}} -> {{new}})")
        out.append(words.format(old=_short(None if old is None else str(old)), new=_short(None if new is None else str(new))))
    return out


def load_cache(cache_path: str | os.PathLike[str], expected_fingerprint: Mapping[str, str]) -> LoadedCache:
    """Read a cache and its sidecar, refusing it unless it was made from the expected inputs.

    Raises:
        CalibrationError: no cache there (or unreadable).
        StaleArtifactError: no or unreadable sidecar, the cache was edited after it was written, or
            the fingerprint differs; the message names every field that changed.
    """
    cache = Path(cache_path)
    trt = read_trt_cache(cache)
    json_path = sidecar_path(cache)
    fix = f"Delete {cache} (and {json_path.name}) or re-run `quantpipe calibrate` to rebuild it."
    try:
        sidecar = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise StaleArtifactError(
            f"calibration cache {cache} has no sidecar {json_path.name}, so what it was made from cannot be checked. {fix}"
        ) from err
    except (OSError, ValueError) as err:
        raise StaleArtifactError(f"the sidecar {json_path} of calibration cache {cache} is unreadable ({err}). {fix}") from err
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise StaleArtifactError(f"{json_path} is not a quantpipe calibration sidecar. {fix}")
    digest = sha256_file(cache)
    if sidecar.get("cache_sha256") != digest:
        raise StaleArtifactError(
            f"calibration cache {cache} is stale: it was modified after it was written "
            f"(sha256 {_short(sidecar.get('cache_sha256'))} recorded, {_short(digest)} now). {fix}"
        )
    changes = _changes(sidecar.get("fingerprint") or {}, expected_fingerprint)
    if changes:
        raise StaleArtifactError(f"calibration cache {cache} is stale: " + "; ".join(changes) + f". {fix}")
    tensors = sidecar.get("tensors") or {}
    amax = {name: float(info["amax"]) for name, info in tensors.items() if isinstance(info, dict) and "amax" in info}
    return LoadedCache(cache=trt, amax=amax, sidecar=sidecar, cache_path=cache, json_path=json_path)
