"""Migration from TensorRT <= 10: a calibration cache written by TensorRT 5-10, trtexec, Polygraphy or TAO
turned into the explicit Q/DQ model TensorRT 11 builds (it removed implicit calibration and the caches).

`read_legacy_cache` reads a cache (`calibration.cache.read_trt_cache`, the one reader of TensorRT's format;
TAO's calibration JSON through `read_tao_json`) and matches its
entries against a model: the tensors quantpipe's placement quantizes that the cache holds (their scales are
used exactly), those it lacks, entries naming a tensor the placement leaves alone (TensorRT caches every
tensor of its network) and entries naming no tensor of the model (TensorRT's own `(Unnamed Layer* 3)
[Shuffle]_output` tensors, or another model's names: ignored and listed). A cache in which fewer than half
of the entries name a tensor of the model was written for another model and is refused (StaleArtifactError,
exit 2).

`migrate_cache` writes the Q/DQ model through quantpipe's placement (`quantize.write.write_qdq_model`) with
every scale the cache holds bit for bit: TensorRT's scale s is float32 and amax = s * 127 is exact in float64,
so the writer's float32(amax / 127) is s again. Rewrites that would change an activation's scale (the
non-negative shift, split activations, smoothing) are turned off and listed. The tensors the cache lacks are
calibrated from data when data is given (with the method closest to the cache's calibrator,
`calibration.cache.ALGORITHM_METHODS`), else their nodes stay in float. Weights are computed from the model
as always: a TensorRT cache holds activation scales only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from quantpipe.calibration.cache import ALGORITHM_METHODS, TrtCache, read_tao_json, read_trt_cache
from quantpipe.errors import CalibrationError, DataError, StaleArtifactError
from quantpipe.int8 import INT8_MAX
from quantpipe.onnxgraph import Graph, load_onnx, named_copy
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import plan_qdq

__all__ = [
    "MIGRATION_FILE",
    "MIN_MATCHED_FRACTION",
    "CacheMatch",
    "Migration",
    "exact_scale_options",
    "match_cache",
    "merge_amax",
    "migrate_cache",
    "read_legacy_cache",
    "tensors_to_quantize",
]

MIGRATION_FILE = "from_cache.json"
"""Where the pipeline records `Migration.to_json()`, beside the calibration files."""
MIN_MATCHED_FRACTION = 0.5
"""A cache in which fewer of the entries name a tensor of the model was written for another model."""


@dataclasses.dataclass(frozen=True)
class CacheMatch:
    """A TensorRT cache read against a model: what it gives, what it lacks, what it holds for nothing."""

    cache_path: str
    cache: TrtCache
    """The cache as read: its header, TensorRT version ('' for TAO's JSON), calibrator and every entry."""
    scales: Mapping[str, float]
    """Tensor the placement quantizes -> the cache's float32 scale, exactly."""
    missing: tuple[str, ...]
    """Tensors the placement quantizes that the cache has no entry for."""
    unused: tuple[str, ...]
    """Entries naming a tensor of the model that the placement does not quantize (kept out of the model)."""
    unknown: tuple[str, ...]
    """Entries naming no tensor of the model (ignored)."""

    @property
    def amax(self) -> dict[str, float]:
        """Tensor -> scale * 127 (TensorRT's definition; exact in float64)."""
        return {k: v * INT8_MAX for k, v in self.scales.items()}

    @property
    def method(self) -> str:
        """The quantpipe method closest to the cache's calibrator (for the tensors it lacks)."""
        return ALGORITHM_METHODS[self.cache.algorithm]


@dataclasses.dataclass(frozen=True)
class Migration:
    """What `migrate_cache` (or the pipeline's `calibration.from_cache`) did with a legacy cache."""

    match: CacheMatch
    amax: Mapping[str, float]
    """Every activation range the Q/DQ model is written with (the cache's, then calibrated ones)."""
    calibrated: tuple[str, ...]
    """Tensors the cache lacks, calibrated from data (`match.method`)."""
    left_float: tuple[str, ...]
    """Tensors the cache lacks with no data to calibrate them: the nodes reading them stay in float."""
    disabled: tuple[str, ...]
    """Rewrites turned off because they would change a scale the cache fixes."""

    def lines(self) -> list[str]:
        """One fact per line, for the console and the logs."""
        m, c = self.match, self.match.cache
        made = f"TensorRT {c.trt_version}, {c.algorithm}" if c.trt_version else "TAO's QAT scales"
        out = [f"cache {m.cache_path}: {made} ({c.header}); "
               f"{len(m.scales)} of the {len(m.scales) + len(m.missing)} tensors quantpipe quantizes take its scales exactly"]
        if self.calibrated:
            out.append(f"{len(self.calibrated)} tensor(s) the cache lacks were calibrated from the data ({m.method}): "
                       + _names(self.calibrated))
        if self.left_float:
            out.append(f"{len(self.left_float)} tensor(s) the cache lacks were left in float (no calibration data given; "
                       f"pass --data to calibrate them): " + _names(self.left_float))
        if m.unknown:
            out.append(f"{len(m.unknown)} cache entr{'y names' if len(m.unknown) == 1 else 'ies name'} no tensor of "
                       f"the model (ignored): " + _names(m.unknown))
        if m.unused:
            out.append(f"{len(m.unused)} cache entries name tensors quantpipe's placement does not quantize (not used)")
        if self.disabled:
            out.append("turned off to keep the cache's scales exact: " + ", ".join(self.disabled))
        return out

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON record (the pipeline writes it beside the calibration files)."""
        m, c = self.match, self.match.cache
        return {"cache": m.cache_path, "header": c.header, "trt_version": c.trt_version, "algorithm": c.algorithm,
                "from_cache": sorted(m.scales), "calibrated": list(self.calibrated), "method": m.method,
                "left_float": list(self.left_float), "unused": list(m.unused), "ignored": list(m.unknown),
                "disabled": list(self.disabled)}


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tensors_to_quantize(model: Any, options: QuantizeOptions = QuantizeOptions()) -> list[str]:
    """The activations / graph inputs quantpipe's placement puts Q/DQ on, given a range for every one."""
    m = named_copy(model)
    g = Graph(m.graph)
    every = {i.name: 1.0 for i in m.graph.input}  # graph inputs first, then in node order
    every.update({o: 1.0 for n in m.graph.node for o in n.output if o})
    plan = plan_qdq(g, every, options, options.per_channel)
    by_name = {n.name: n for n in m.graph.node}
    order = {name: i for i, name in enumerate(every)}
    return sorted({by_name[node].input[idx] for node, idx in plan.acts}, key=lambda t: order.get(t, len(order)))


def match_cache(cache: TrtCache, model: Any, *, cache_path: str | os.PathLike[str] = "",
                options: QuantizeOptions = QuantizeOptions()) -> CacheMatch:
    """Match a parsed cache against a model (see the module docstring).

    Raises:
        StaleArtifactError: the cache is empty, or fewer than MIN_MATCHED_FRACTION of its entries name a
            tensor of the model (a cache written for another model).
        DataError: the header names a calibrator quantpipe does not know.
    """
    where = os.fspath(cache_path) or "the cache"
    if cache.algorithm not in ALGORITHM_METHODS:
        raise DataError(
            f"{where}: header {cache.header!r} names the calibrator {cache.algorithm!r}; quantpipe reads caches of "
            f"{', '.join(ALGORITHM_METHODS)}. Check that the file is a TensorRT calibration cache.")
    tensors = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output if o}
    if not cache.scales:
        raise StaleArtifactError(f"{where} holds no tensor scales (only the header {cache.header!r}); it cannot "
                                 f"quantize anything. Point --from-cache (or calibration.from_cache) at the cache TensorRT wrote for this model.")
    named = [t for t in cache.scales if t in tensors]
    if len(named) < MIN_MATCHED_FRACTION * len(cache.scales):
        unknown = [t for t in cache.scales if t not in tensors]
        raise StaleArtifactError(
            f"{where} was not written for this model: only {len(named)} of "
            f"its {len(cache.scales)} entries name a tensor of the model (e.g. the cache has {_names(unknown, 3)}; "
            f"the model's tensors are like {_names(sorted(tensors), 3)}). Use the cache TensorRT wrote for this "
            f"exact ONNX export, or calibrate afresh (without --from-cache / calibration.from_cache).")
    needed = tensors_to_quantize(model, options)
    needed_set = set(needed)
    return CacheMatch(
        cache_path=where, cache=cache,
        scales={t: cache.scales[t] for t in needed if t in cache.scales},
        missing=tuple(t for t in needed if t not in cache.scales),
        unused=tuple(t for t in named if t not in needed_set),
        unknown=tuple(t for t in cache.scales if t not in tensors),
    )


def read_legacy_cache(cache_path: str | os.PathLike[str], model: Any,
                      options: QuantizeOptions = QuantizeOptions()) -> CacheMatch:
    """Read a TensorRT <= 10 / trtexec / Polygraphy / TAO calibration cache against a model (path or ModelProto).

    TAO's calibration JSON (`{"tensor_scales": {tensor: amax}}`, `.json` or starting with '{') reads as the
    cache TAO writes from it.

    Raises:
        DataError: no such file, a bad header or a malformed line (with its number).
        StaleArtifactError: a cache written for another model (see `match_cache`).
    """
    try:
        cache = read_tao_json(cache_path) if _is_json(cache_path) else read_trt_cache(cache_path)
    except CalibrationError as err:  # the user's file, not a failed stage: bad input (exit 2)
        raise DataError(f"{err} quantpipe reads the text caches TensorRT 5-10, trtexec, Polygraphy and TAO write "
                        f"('TRT-<version>-<algorithm>', then 'tensor: <hex>' per line); fix or replace the file.") from err
    proto = load_onnx(model) if isinstance(model, str | os.PathLike) else model
    return match_cache(cache, proto, cache_path=cache_path, options=options)


def _is_json(path: str | os.PathLike[str]) -> bool:
    """TAO's calibration JSON rather than a text cache: by suffix, or by a first byte of '{'."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return True
    try:
        with p.open("rb") as fh:
            return fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"
    except OSError:
        return False


def exact_scale_options(options: QuantizeOptions) -> tuple[QuantizeOptions, tuple[str, ...]]:
    """`options` without the rewrites that change an activation's scale; returns what was turned off."""
    off: list[str] = []
    changes: dict[str, Any] = {}
    if options.shift_nonnegative:
        changes["shift_nonnegative"] = False
        off.append("shift_nonnegative (it quantizes post-ReLU tensors on a shifted grid)")
    if options.split_activations != "off":
        changes["split_activations"] = "off"
        off.append("split_activations (it quantizes a tensor in pieces of smaller range)")
    if options.smooth_alpha:
        changes["smooth_alpha"] = None
        off.append("smoothing (it rescales activations by channel)")
    return dataclasses.replace(options, **changes), tuple(off)


def merge_amax(match: CacheMatch, calibrated: Mapping[str, float] | None,
               disabled: tuple[str, ...] = ()) -> Migration:
    """The cache's ranges, then the calibrated ranges of the tensors it lacks (None: no data, left float)."""
    amax = match.amax
    got: list[str] = []
    left: list[str] = []
    for t in match.missing:
        if calibrated is not None and t in calibrated:
            amax[t] = float(calibrated[t])
            got.append(t)
        else:
            left.append(t)
    return Migration(match=match, amax=amax, calibrated=tuple(got), left_float=tuple(left), disabled=disabled)


def migrate_cache(
    model_path: str | os.PathLike[str],
    cache_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: QuantizeOptions = QuantizeOptions(),
    *,
    calibration_data: Any | None = None,
    batch_size: int = 32,
    percentile: float | None = None,
    device: str = "auto",
    method: str | None = None,
    on_batch: Any | None = None,
) -> tuple[Any, Migration]:
    """Write the TensorRT 11 Q/DQ model of `model_path` with a legacy cache's scales; (QuantizeReport, Migration).

    Args:
        calibration_data: a `Dataset` to calibrate the tensors the cache lacks (and, as in `write_qdq_model`,
            per-channel statistics for bias correction and GPTQ codes); None leaves those tensors in float.
        method: calibration method for the missing tensors (default: the one closest to the cache's calibrator).
    """
    from quantpipe.calibration import calibrate_tables_in_memory
    from quantpipe.calibration.methods import DEFAULT_PERCENTILE
    from quantpipe.quantize.write import write_qdq_model

    options, disabled = exact_scale_options(options)
    match = read_legacy_cache(cache_path, model_path, options)
    calibrated = None
    if calibration_data is not None and match.missing:
        use = method or match.method
        calibrated = calibrate_tables_in_memory(
            model_path, calibration_data, methods=[use], batch_size=batch_size,
            percentile=DEFAULT_PERCENTILE if percentile is None else percentile, device=device,
            on_batch=on_batch)[use]
    migration = merge_amax(match, calibrated, disabled)
    report = write_qdq_model(model_path, migration.amax, out_path, options, calibration_data=calibration_data,
                             batch_size=batch_size)
    return report, migration
