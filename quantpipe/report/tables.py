"""The report's tables as pandas DataFrames, built from RunResults only.

Values stay raw here (fractions, ms, MB); the templates format them with gate.format_value so the
report, the gate messages and the terminal agree on units. Every number is read through
gate.observe, so a table can never disagree with the gate about what a variant measured.

results.csv is `results_frame`: one row per variant x latency batch size (the tidy layout that
`pd.read_csv(...).pivot(index="variant", columns="batch_size", values="latency_median_ms")` expects).
Accuracy columns do not depend on the batch size and repeat on each of a variant's rows; a variant
without latency (skipped, or latency disabled) has one row with an empty batch_size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from quantpipe.artifacts import RunResults
from quantpipe.gate import ACCURACY_METRICS, hook_metrics, observe

__all__ = [
    "VARIANT_COLUMNS",
    "LATENCY_COLUMNS",
    "variants_frame",
    "latency_frame",
    "results_frame",
    "sensitivity_frame",
    "fallback_frame",
    "calibration_frame",
    "environment_rows",
    "measured_accuracy_metrics",
]

VARIANT_COLUMNS = ("variant", "backend", "precision", "device", "status", "skipped_reason", "size_mb", *ACCURACY_METRICS)
LATENCY_COLUMNS = (
    "variant", "batch_size", "latency_median_ms", "latency_p90_ms", "latency_p99_ms", "latency_mean_ms",
    "latency_min_ms", "throughput", "speedup", "iterations", "warmup", "timer",
)


def _value(results: RunResults, variant: str, metric: str, **kw: Any) -> float | None:
    return observe(results, variant, metric, **kw).value


def variants_frame(results: RunResults) -> pd.DataFrame:
    """One row per variant: what it is, whether it ran (and why not), size and accuracy metrics, then the metrics
    evaluate.metrics hooks returned (`gate.hook_metrics`)."""
    hooks = hook_metrics(results)
    rows = []
    for v in results.variants:
        e = next((x for x in results.evaluations if x.variant == v.name), None)
        reason = v.skipped or (e.skipped if e is not None else None)
        if reason is None and e is None:
            reason = "not evaluated in this run"
        row: dict[str, Any] = {
            "variant": v.name, "backend": v.backend, "precision": v.precision, "device": v.device,
            "status": "skipped" if reason else ("reference" if v.name == results.reference else "ran"),
            "skipped_reason": reason,
            "size_mb": v.size_bytes / 1e6 if v.size_bytes is not None else None,
        }
        for m in (*ACCURACY_METRICS, *hooks):
            row[m] = None if reason else _value(results, v.name, m)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*VARIANT_COLUMNS, *hooks])


def latency_frame(results: RunResults) -> pd.DataFrame:
    """One row per variant x measured batch size; speedup is against the reference at the same size."""
    rows = []
    for e in results.evaluations:
        if e.skipped is not None:
            continue
        for s in sorted(e.latency, key=lambda s: s.batch_size):
            rows.append({
                "variant": e.variant, "batch_size": s.batch_size, "latency_median_ms": s.median_ms,
                "latency_p90_ms": s.p90_ms, "latency_p99_ms": s.p99_ms, "latency_mean_ms": s.mean_ms,
                "latency_min_ms": s.min_ms, "throughput": s.throughput,
                "speedup": _value(results, e.variant, "speedup", batch_size=s.batch_size),
                "iterations": s.iterations, "warmup": s.warmup, "timer": s.timer,
            })
    frame = pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))
    return frame.astype({"batch_size": "Int64", "iterations": "Int64", "warmup": "Int64"})


def results_frame(results: RunResults) -> pd.DataFrame:
    """The results.csv table: variants_frame joined with latency_frame (see the module docstring)."""
    merged = variants_frame(results).merge(latency_frame(results), on="variant", how="left")
    merged.insert(0, "run_id", results.run_id)
    merged.insert(1, "reference", results.reference)
    return merged


def measured_accuracy_metrics(frame: pd.DataFrame) -> list[str]:
    """The accuracy metrics at least one variant has (columns worth showing)."""
    extra = [c for c in frame.columns if c not in VARIANT_COLUMNS and c not in LATENCY_COLUMNS and c not in
             ("run_id", "reference")]  # a hook's
    return [m for m in (*ACCURACY_METRICS, *extra) if m in frame and frame[m].notna().any()]


def sensitivity_frame(results: RunResults, top: int | None = None) -> pd.DataFrame:
    """Per-layer sensitivity, most costly layer first, in the analysis's own order (`sensitivity.worst_first`: the
    output metric, ties by the output SQNR with that layer alone, which results.json keeps and the terminal and the
    collapse verdict name). The report re-sorted by the layer SQNR in the INT8 model, so its #2 could be results.json's
    #11 (found probing)."""
    cols = ["node", "op_type", "tensor", "sqnr_db", "output_metric", "metric_name", "output_sqnr_db", "num_samples",
            "depthwise", "reaches_output"]
    frame = pd.DataFrame([{c: getattr(r, c) for c in cols} for r in results.sensitivity], columns=cols)
    if frame.empty:
        return frame
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame.head(top) if top else frame


def fallback_frame(results: RunResults) -> pd.DataFrame:
    """The layers the accuracy-driven fallback kept in float, in the order it chose them."""
    cols = ["step", "node", "op_type", "kept_in", "metric_before", "metric_after", "gain", "same_step"]
    fb = results.fallback
    if fb is None:
        return pd.DataFrame(columns=cols)
    rows, i = [], 0
    for s in fb.steps:  # the layers kept in one step together (the linear front end) share its number
        i += 0 if s.same_step else 1
        rows.append({"step": i, "node": s.node, "op_type": s.op_type, "kept_in": s.kept_in,
                     "metric_before": s.metric_before, "metric_after": s.metric_after,
                     "gain": s.metric_after - s.metric_before, "same_step": s.same_step})
    return pd.DataFrame(rows, columns=cols)


def calibration_frame(results: RunResults) -> pd.DataFrame:
    """One row per calibration method: samples, tensors, time, cache and its fingerprint."""
    rows = [{
        "method": c.method, "num_samples": c.num_samples, "num_tensors": c.num_tensors, "seconds": c.seconds,
        "cache_path": c.cache_path, "json_path": c.json_path,
        "fingerprint": ", ".join(f"{k}={_short(v)}" for k, v in sorted(c.fingerprint.items())),
    } for c in results.calibration]
    return pd.DataFrame(rows, columns=["method", "num_samples", "num_tensors", "seconds", "cache_path", "json_path",
                                       "fingerprint"])


def _short(v: Any) -> str:
    s = str(v)
    # sha256 digests are unreadable in a table; 12 hex digits identify a file just as well for people.
    return s[:12] if len(s) == 64 and all(ch in "0123456789abcdef" for ch in s) else s


def _status(entry: Any) -> str:
    if not isinstance(entry, Mapping):
        return _readable(entry)
    if entry.get("available"):
        return f"{entry.get('version') or 'available'}"
    return f"not available: {entry.get('reason') or 'unknown reason'}"


def _readable(value: Any) -> str:
    """Any probe value as text for people: never a Python repr of a dict or a list."""
    if isinstance(value, Mapping):
        if "available" in value:
            return _status(value)
        return "; ".join(f"{k}: {_readable(v)}" for k, v in value.items() if v not in (None, "", [], {})) or "none"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(_readable(v) for v in value) or "none"
    return "unknown" if value is None else str(value)


def environment_rows(env: Mapping[str, Any]) -> list[tuple[str, str]]:
    """probe_env()'s dict as (what, value) rows for people: versions, CPU, GPU, TensorRT or why not."""
    rows: list[tuple[str, str]] = []
    simple = [("quantpipe", "quantpipe"), ("Python", "python"), ("Platform", "platform"), ("CPU", "processor"),
              ("CPU cores", "cpu_count"), ("numpy", "numpy"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")]
    for label, key in simple:
        if key in env:
            rows.append((label, str(env[key])))
    if "onnxruntime_providers" in env:
        rows.append(("onnxruntime providers", ", ".join(map(str, env["onnxruntime_providers"]))))
    gpu = env.get("gpu")
    if isinstance(gpu, Mapping):
        if gpu.get("available"):
            gpus = gpu.get("gpus") or []
            rows.append(("GPU", "; ".join(
                f"{g.get('name')} (driver {g.get('driver')}, sm {g.get('compute_capability')}, {g.get('memory')})"
                for g in gpus) or "available"))
        else:
            rows.append(("GPU", f"none: {gpu.get('reason') or 'not detected'}"))
    labels = {"onnxruntime_cuda": "onnxruntime CUDA", "tensorrt": "TensorRT", "cuda.bindings": "cuda-python",
              "pycuda": "pycuda", "cupy": "CuPy", "modelopt": "ModelOpt"}
    for key, label in labels.items():
        if key in env:
            rows.append((label, _status(env[key])))
    known = {k for _, k in simple} | {"onnxruntime_providers", "gpu", "machine", *labels}
    rows += [(k, _readable(v)) for k, v in env.items() if k not in known]  # keys a newer probe added
    return rows
