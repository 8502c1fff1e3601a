"""The calibrate stage: FP32 activations -> streaming histograms -> per-method amax -> TensorRT caches.

`calibrate` is the stage (pipeline and `quantpipe calibrate`): one pass of ONNX Runtime over the data
(collect.py), every method computed from the same histograms (methods.py), and per method a TensorRT
cache plus its JSON sidecar, with one shared histograms.npz (histfile.py). The scales are bit-identical
whatever the batch size (histogram.py explains why).

Files in `out_dir` mode: `<method>.cache`, `<method>.json`, `histograms.npz`.
Files in `cache` mode (`quantpipe calibrate --cache OUT`): OUT (one method) or `<OUT stem>.<method><OUT
suffix>` (several), each with its sidecar (`sidecar_path`: OUT's suffix replaced by .json, or .json
appended when OUT has none), and `<OUT stem>.histograms.npz`.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from quantpipe.artifacts import CalibrationSummary
from quantpipe.calibration.cache import (
    DEFAULT_TRT_VERSION,
    MIN_AMAX,
    LoadedCache,
    TrtCache,
    amax_to_scale,
    load_cache,
    make_fingerprint,
    read_trt_cache,
    sidecar_path,
    write_sidecar,
    write_trt_cache,
)
from quantpipe.calibration.collect import CollectedStats, collect_histograms
from quantpipe.calibration.histfile import histograms_npz, load_histograms, write_histograms
from quantpipe.calibration.histogram import DEFAULT_NUM_BINS, BinnedHistogram, StreamingHistogram
from quantpipe.calibration.methods import (
    BASE_METHODS,
    DEFAULT_PERCENTILE,
    METHODS,
    best_amax,
    check_method,
    compute_all,
    compute_amax,
)
from quantpipe.data import Dataset
from quantpipe.errors import CalibrationError, ConfigError
from quantpipe.execution import Executor, model_mb, plan_shards
from quantpipe.onnxgraph import model_sha256 as onnx_model_sha256

__all__ = [
    "METHODS",
    "BASE_METHODS",
    "method_tables",
    "DEFAULT_TRT_VERSION",
    "DEFAULT_PERCENTILE",
    "DEFAULT_NUM_BINS",
    "HISTOGRAMS_FILE",
    "STAGE_PARTS",
    "MIN_AMAX",
    "StreamingHistogram",
    "BinnedHistogram",
    "CollectedStats",
    "TrtCache",
    "LoadedCache",
    "collect_histograms",
    "compute_amax",
    "compute_all",
    "compute_tables",
    "write_trt_cache",
    "read_trt_cache",
    "load_cache",
    "load_histograms",
    "sidecar_path",
    "make_fingerprint",
    "calibrate",
    "calibrate_to_cache",
    "calibrate_in_memory",
    "calibrate_tables_in_memory",
    "select_amax",
    "amax_to_scale",
]

log = logging.getLogger(__name__)

HISTOGRAMS_FILE = "histograms.npz"
_CPU = ("CPUExecutionProvider",)

OnBatch = Callable[[int, int], None]


def compute_tables(
    stats: CollectedStats, methods: Sequence[str], *, percentile: float = DEFAULT_PERCENTILE,
    known: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(method -> tensor -> amax, tensor -> method `best` chose) for every tensor of `stats`; `known`: the
    `_base_methods` tables of some of them, from `compute_all` (`methods.compute_all` says how they are taken)."""
    base = _base_methods(methods)
    tables = compute_all(stats, base, percentile=percentile, known=known)
    chosen: dict[str, str] = {}
    if "best" in methods:
        best: dict[str, float] = {}
        for name, hist in stats.histograms.items():
            best[name], chosen[name] = best_amax(hist, candidates={m: tables[m][name] for m in base})
        tables["best"] = best
    return {m: tables[m] for m in methods}, chosen


def _base_methods(methods: Sequence[str]) -> list[str]:
    """The single methods whose tables `methods` need (`best` chooses among all of them)."""
    return [m for m in BASE_METHODS if m in methods or "best" in methods]


def _check_methods(methods: Sequence[str] | str, percentile: float) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    out = list(dict.fromkeys(check_method(m) for m in methods))
    if not out:
        raise ConfigError(f"no calibration method given; choose from {', '.join(METHODS)}.")
    if not 0.0 < float(percentile) <= 100.0:
        raise ConfigError(f"calibration percentile must be in (0, 100], got {percentile}.")
    return out


def _paths(
    methods: Sequence[str], out_dir: str | os.PathLike[str] | None, cache: str | os.PathLike[str] | None
) -> tuple[dict[str, Path], Path]:
    """Cache path per method, and the histograms file."""
    if (out_dir is None) == (cache is None):
        raise ConfigError("calibration needs exactly one of out_dir (a folder) or cache (a cache file path).")
    if out_dir is not None:
        d = Path(out_dir)
        return {m: d / f"{m}.cache" for m in methods}, d / HISTOGRAMS_FILE
    c = Path(cache)  # type: ignore[arg-type]
    if c.exists() and c.is_dir():
        raise ConfigError(f"--cache {c} is a folder; give the cache file to write, e.g. {c / 'calibration.cache'}.")
    stem = c.name[: -len(c.suffix)] if c.suffix else c.name
    paths = {methods[0]: c} if len(methods) == 1 else {m: c.with_name(f"{stem}.{m}{c.suffix}") for m in methods}
    return paths, c.with_name(f"{stem}.histograms.npz")


def calibrate(
    model_path: str | os.PathLike[str],
    dataset: Dataset,
    *,
    methods: Sequence[str] = ("entropy",),
    out_dir: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    num_bins: int = DEFAULT_NUM_BINS,
    percentile: float = DEFAULT_PERCENTILE,
    trt_version: str = DEFAULT_TRT_VERSION,
    providers: Sequence[str] = _CPU,
    on_batch: OnBatch | None = None,
    model_sha256: str | None = None,
    threads: int | None = None,
    executor: Executor | None = None,
    timings: dict[str, float] | None = None,
) -> list[CalibrationSummary]:
    """Calibrate once, write a TensorRT cache + JSON per method and the shared histograms.

    Args:
        model_path: FP32 ONNX model.
        dataset: calibration data opened for this model (quantpipe.data.open_dataset).
        methods: any of METHODS; all are computed from the same single pass over the data.
        out_dir: write `<method>.cache`, `<method>.json` and `histograms.npz` here; or
        cache: the cache file to write (see the module docstring for the names of the others).
        batch_size: samples per ONNX Runtime run (the scales do not depend on it).
        num_bins: histogram bins (TensorRT: 2048).
        percentile: for `percentile` (and `best`).
        trt_version: the TensorRT version named in the cache header.
        providers: ONNX Runtime execution providers (CUDA when available and asked for).
        on_batch: progress callback (samples done, total).
        model_sha256: the model's hash if the caller has it (else computed).
        threads: ONNX Runtime and histogram threads (default: the usable cores).
        executor: shard the data pass over its workers (calibration/sharded.py: the same histograms, bit
            for bit); None or one worker: this process.
        timings: when given, filled with the wall seconds of each part (`STAGE_PARTS`, and `total`).

    Returns:
        One CalibrationSummary per method, in the order given.

    Raises:
        ConfigError: unknown method or bad percentile (before any work). ModelError, DataError,
        CalibrationError: from the data pass. Nothing is written unless everything succeeded.
    """
    t0 = time.perf_counter()
    methods = _check_methods(methods, percentile)
    paths, hist_path = _paths(methods, out_dir, cache)
    model = Path(model_path)
    weights: list[concurrent.futures.Future[dict[str, dict[str, float]]]] = []
    stats = _collect(model, dataset, executor, batch_size=batch_size, num_bins=num_bins, providers=providers,
                     on_batch=on_batch, threads=threads, on_weights=_search_weights(methods, percentile, weights))
    t_search = time.perf_counter()
    tables, chosen, npz, digest = _search(stats, methods, percentile, model, model_sha256, weights)
    t_write = time.perf_counter()
    write_histograms(hist_path, npz)
    seconds = time.perf_counter() - t0
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summaries = []
    for method in methods:
        # make_fingerprint is pure, and its one failure (a bad trt_version) write_trt_cache raises first anyway.
        fingerprint = make_fingerprint(model_sha256=digest, data_fingerprint=dataset.fingerprint, method=method,
                                       percentile=percentile, num_bins=num_bins, trt_version=trt_version)
        summaries.append(_write_method(
            method, tables[method], stats, chosen, paths[method], trt_version=trt_version, fingerprint=fingerprint,
            extra={
                "percentile": percentile, "trt_version": trt_version, "num_samples": stats.num_samples,
                "num_batches": stats.num_batches, "batch_size": batch_size, "seconds": round(seconds, 3),
                "histograms": hist_path.name,
                # Relative to the cache's folder: a moved or copied project names its own model.
                "model": _relpath(model, paths[method].parent), "created": created,
            },
            seconds=seconds,
        ))
    log.info("calibrated %d samples in %.1f s (onnxruntime %.1f s, histograms %.1f s)",
             stats.num_samples, stats.seconds, stats.inference_seconds, stats.histogram_seconds)
    if timings is not None:
        timings.update(_parts(stats, search=t_write - t_search, write=time.perf_counter() - t_write,
                              total=time.perf_counter() - t0))
    return summaries


def _search_weights(methods: Sequence[str], percentile: float,
                    into: list[concurrent.futures.Future[dict[str, dict[str, float]]]]
                    ) -> Callable[[Mapping[str, Any]], None]:
    """`collect_histograms`' `on_weights`: the weights' histograms are final before the data pass, so their
    search (`compute_all`, the same function on the same histograms as after it) runs on a thread during it (on
    a GPU the cores are idle then); its Future is appended to `into`."""
    def start(hists: Mapping[str, Any]) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-search")
        into.append(pool.submit(compute_all, dict(hists), _base_methods(methods), percentile=percentile))
        pool.shutdown(wait=False)  # the submitted search still runs to its end
    return start


def _search(stats: CollectedStats, methods: Sequence[str], percentile: float, model: Path,
            model_sha256: str | None, weights: Sequence[concurrent.futures.Future[dict[str, dict[str, float]]]] = (),
            ) -> tuple[dict[str, dict[str, float]], dict[str, str], bytes, str]:
    """compute_tables, with histograms.npz's bytes encoded and the model hashed (if not given) on threads
    meanwhile (numpy and hashlib release the GIL); the file is written only once everything else succeeded."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        encoding = pool.submit(histograms_npz, stats.histograms, stats.kinds)
        hashing = pool.submit(lambda: model_sha256 or onnx_model_sha256(model))
        known = weights[0].result() if weights else None  # `_search_weights`' tables
        tables, chosen = compute_tables(stats, methods, percentile=percentile, known=known)
        return tables, chosen, encoding.result(), hashing.result()


STAGE_PARTS = ("plan", "session", "inference", "histograms", "weights", "search", "write")
"""`calibrate(timings=...)`'s parts: shape inference to find the tensors; the copy of the model with every tensor
exposed as an output and its onnxruntime session; onnxruntime's runs; binning the activations; binning the
weights; the methods' search (histograms.npz encoded and the model hashed beside it); writing the files."""


def _parts(stats: CollectedStats, *, search: float, write: float, total: float) -> dict[str, float]:
    values = (stats.plan_seconds, stats.session_seconds, stats.inference_seconds,
              stats.histogram_seconds - stats.weight_seconds, stats.weight_seconds, search, write)
    return {**dict(zip(STAGE_PARTS, values, strict=True)), "collect": stats.seconds, "total": total}


def _collect(model: Path, dataset: Dataset, executor: Executor | None, *, batch_size: int, num_bins: int,
             providers: Sequence[str], on_batch: OnBatch | None, threads: int | None,
             on_weights: Callable[[Mapping[str, Any]], None] | None = None) -> CollectedStats:
    """One pass over the data: in this process, or sharded over the executor's workers when it has several
    and the data is work enough for more than one shard (`plan_shards`: batches, samples x model MB)."""
    stats = None
    if executor is not None and executor.workers > 1:
        shards = plan_shards(executor, items=len(dataset.batch_bounds(batch_size)),
                             work_mb=dataset.num_samples * model_mb(model))
        if shards > 1:
            from quantpipe.calibration.sharded import collect_sharded

            stats = collect_sharded(model, dataset, executor, batch_size=batch_size, num_bins=num_bins,
                                    providers=providers, on_batch=on_batch, shards=shards)
    if stats is None:
        stats = collect_histograms(model, dataset, batch_size=batch_size, num_bins=num_bins, providers=providers,
                                   on_batch=on_batch, threads=threads, on_weights=on_weights)
    if not stats.histograms:
        raise CalibrationError(f"{model} has no float tensors to calibrate (no float inputs, activations or weights).")
    return stats


def _relpath(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return path.name


def _write_method(
    method: str,
    amax: Mapping[str, float],
    stats: CollectedStats,
    chosen: Mapping[str, str],
    cache_path: Path,
    *,
    trt_version: str,
    fingerprint: dict[str, str],
    extra: Mapping[str, Any],
    seconds: float,
) -> CalibrationSummary:
    """Write one method's TensorRT cache (inputs and activations) and its JSON sidecar (every tensor, and `extra`)."""
    in_cache = {n: a for n, a in amax.items() if stats.kinds[n] != "weight"}
    written = write_trt_cache(cache_path, in_cache, method=method, trt_version=trt_version)
    json_path = write_sidecar(written, method=method, fingerprint=fingerprint,
                              tensors=_sidecar_tensors(method, amax, stats, chosen, in_cache), extra=extra)
    log.debug("calibration (%s): %d tensors -> %s", method, len(in_cache), written)
    return CalibrationSummary(
        method=method, num_samples=stats.num_samples, num_tensors=len(in_cache), seconds=seconds,
        cache_path=str(written), json_path=str(json_path), fingerprint=fingerprint,
    )


def _sidecar_tensors(
    method: str,
    amax: Mapping[str, float],
    stats: CollectedStats,
    chosen: Mapping[str, str],
    in_cache: Mapping[str, float],
) -> dict[str, dict[str, Any]]:
    """The sidecar's per-tensor record: kind, amax, scale, whether in the cache, histogram summary."""
    tensors: dict[str, dict[str, Any]] = {}
    for name, value in amax.items():
        info: dict[str, Any] = {
            "kind": stats.kinds[name],
            "amax": value,
            "scale": amax_to_scale(value),
            "in_cache": name in in_cache,
            "histogram": stats.histograms[name].summary(),
        }
        if method == "best":
            info["method"] = chosen[name]
        tensors[name] = info
    return tensors


def _providers(device: str) -> list[str]:
    from quantpipe.backends.onnxruntime import providers_for, resolve_device

    resolved, notice = resolve_device(device)
    if notice:
        log.info("calibrate: %s", notice)
    return providers_for(resolved)


def calibrate_to_cache(
    model_path: str | os.PathLike[str],
    dataset: Dataset,
    *,
    methods: Sequence[str] = ("entropy",),
    cache: str | os.PathLike[str] = "calibration.cache",
    batch_size: int = 32,
    percentile: float = DEFAULT_PERCENTILE,
    trt_version: str = DEFAULT_TRT_VERSION,
    device: str = "auto",
    num_bins: int = DEFAULT_NUM_BINS,
    on_batch: OnBatch | None = None,
    executor: Executor | None = None,
) -> list[Path]:
    """`quantpipe calibrate --model M --data D --cache OUT`: calibrate and return every file written."""
    summaries = calibrate(model_path, dataset, methods=methods, cache=cache, batch_size=batch_size, num_bins=num_bins,
                          percentile=percentile, trt_version=trt_version, providers=_providers(device),
                          on_batch=on_batch, executor=executor)
    written: list[Path] = []
    for s in summaries:
        written += [Path(s.cache_path), Path(s.json_path)]
    written.append(_paths(list(methods) if not isinstance(methods, str) else [methods], None, cache)[1])
    return written


def calibrate_in_memory(
    model_path: str | os.PathLike[str],
    dataset: Dataset,
    *,
    method: str = "entropy",
    batch_size: int = 32,
    percentile: float = DEFAULT_PERCENTILE,
    device: str = "auto",
    num_bins: int = DEFAULT_NUM_BINS,
    on_batch: OnBatch | None = None,
) -> dict[str, float]:
    """amax of every graph input and activation with one method, writing nothing (`quantpipe quantize`)."""
    return calibrate_tables_in_memory(model_path, dataset, methods=[method], batch_size=batch_size,
                                      percentile=percentile, device=device, num_bins=num_bins,
                                      on_batch=on_batch)[method]


def calibrate_tables_in_memory(
    model_path: str | os.PathLike[str],
    dataset: Dataset,
    *,
    methods: Sequence[str],
    batch_size: int = 32,
    percentile: float = DEFAULT_PERCENTILE,
    device: str = "auto",
    num_bins: int = DEFAULT_NUM_BINS,
    on_batch: OnBatch | None = None,
) -> dict[str, dict[str, float]]:
    """method -> amax of every graph input and activation, from one pass over the data, writing nothing."""
    checked = _check_methods(methods, percentile)
    stats = collect_histograms(model_path, dataset, batch_size=batch_size, num_bins=num_bins,
                               providers=_providers(device), on_batch=on_batch)
    tables, _ = compute_tables(stats, checked, percentile=percentile)
    return {m: {n: a for n, a in t.items() if stats.kinds[n] != "weight"} for m, t in tables.items()}


def method_tables(
    out_dir: str | os.PathLike[str],
    methods: Sequence[str],
    summaries: Sequence[CalibrationSummary],
    *,
    percentile: float | None = None,
) -> dict[str, dict[str, float]]:
    """method -> tensor -> amax (graph inputs and activations) for `methods`, from `histograms.npz` in
    `out_dir` (`calibration.use: auto` chooses among them)."""
    methods = [check_method(m) for m in methods]
    hists, kinds = load_histograms(Path(out_dir) / HISTOGRAMS_FILE)
    p = percentile
    if p is None:
        p = next((float(s.fingerprint["percentile"]) for s in summaries if "percentile" in s.fingerprint),
                 DEFAULT_PERCENTILE)
    acts = {n: h for n, h in hists.items() if kinds.get(n) != "weight"}
    return compute_all(acts, methods, percentile=p)


def select_amax(
    out_dir: str | os.PathLike[str],
    use: str,
    summaries: Sequence[CalibrationSummary],
    *,
    percentile: float | None = None,
) -> dict[str, float]:
    """The amax (graph inputs and activations) to build INT8 variants with, for `calibration.use`.

    A computed method is read from its JSON sidecar; `best` (when not itself computed) is computed
    per tensor from `histograms.npz` in `out_dir`.
    """
    import json

    check_method(use)
    by_method = {s.method: s for s in summaries}
    if use in by_method:
        path = Path(by_method[use].json_path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CalibrationError(f"cannot read calibration sidecar {path} ({err}); re-run calibration.") from err
        return {n: float(t["amax"]) for n, t in doc.get("tensors", {}).items() if t.get("kind") != "weight"}
    if use != "best":
        raise CalibrationError(
            f"calibration.use is '{use}' but only {sorted(by_method)} were calibrated; add it to calibration.methods."
        )
    hists, kinds = load_histograms(Path(out_dir) / HISTOGRAMS_FILE)
    p = percentile
    if p is None:
        p = next((float(s.fingerprint["percentile"]) for s in summaries if "percentile" in s.fingerprint),
                 DEFAULT_PERCENTILE)
    out: dict[str, float] = {}
    for name, hist in hists.items():
        if kinds.get(name) != "weight":
            out[name] = best_amax(hist, percentile=p)[0]
    return out
