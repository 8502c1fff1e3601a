"""Write a run's report files: report.html, report.md, results.json, results.csv, junit.xml, summary.md.

Everything comes from RunResults plus the calibration files in the run directory. The HTML page is one
self-contained file (inline CSS, plots as inline SVG, no script, no network) that reads on a laptop and
prints on A4. A section without data says why instead of disappearing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from quantpipe.artifacts import ORT_OPTIMIZATION_KEY, RunResults, to_jsonable
from quantpipe.fsutil import atomic_write_json, atomic_write_text
from quantpipe.gate import ACCURACY_METRICS, HIGHER_IS_BETTER, format_value, hook_metrics, observe
from quantpipe.report import plots, tables
from quantpipe.report.compare import with_baseline
from quantpipe.report.junit import junit_xml
from quantpipe.report.metric_names import KEY_ACCURACY, KEY_LABELS, METRIC_LABELS, TABLE_METRICS
from quantpipe.report.rundir import TensorHistogram, load_histograms, load_thresholds
from quantpipe.runlog import MAX_WARNINGS

__all__ = ["FORMATS", "OUTPUT_FILES", "METRIC_LABELS", "build_context", "render_html", "render_markdown",
           "render_summary", "summary_context", "write_report"]

log = logging.getLogger(__name__)

FORMATS = ("md", "html", "json", "csv", "junit")
OUTPUT_FILES = {"md": "report.md", "html": "report.html", "json": "results.json", "csv": "results.csv",
                "junit": "junit.xml", "summary": "summary.md"}
_MAX_HISTOGRAMS = 6
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
SENSITIVITY_ROWS = 12
"""The sensitivity table's rows when the caller does not say (a pipeline says evaluate.sensitivity.top)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell: display text, whether it is a number (right-aligned), and a baseline change."""

    text: str
    num: bool = False
    delta: str | None = None
    delta_kind: str | None = None
    """'worse' (a flagged regression), 'better' or 'same'."""


def _jinja_env() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("quantpipe.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,  # a typo in a template is an error, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = lambda v, metric, delta=False: format_value(metric, _num(v), delta=delta)
    env.filters["md"] = _md_cell
    return env


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _md_cell(text: Any) -> str:
    """Text safe inside a GitHub markdown table cell."""
    # Escape "<" only where it could open an HTML tag: "<= 1 pt" must stay readable in the raw file.
    return _TAG_START.sub("&lt;", str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " "))


# --------------------------------------------------------------------------- context


def _deltas(baseline: Mapping[str, Any] | None) -> dict[tuple[str, str, int | None], Mapping[str, Any]]:
    if not baseline:
        return {}
    return {(d["variant"], d["metric"], d["batch_size"]): d for d in baseline.get("deltas", [])}


def _cell(metric: str, value: float | None, delta: Mapping[str, Any] | None = None) -> Cell:
    if delta is None or delta["delta"] == 0:  # an unchanged value needs no "+0.00" under it
        return Cell(format_value(metric, value), num=True)
    kind = "worse" if delta["regressed"] else "better" if delta["improved"] else "same"
    return Cell(format_value(metric, value), num=True, delta=delta["change"], delta_kind=kind)


def _verdict(results: RunResults) -> dict[str, Any]:
    gate = results.gate
    if gate is None:
        return {"state": "none", "title": "Gate not evaluated",
                "detail": "These results were written before the gate ran; `quantpipe gate` judges them.",
                "outcomes": [], "failed": 0, "total": 0}
    outcomes = []
    for o in gate.outcomes:
        is_change = " change vs baseline" in o.message  # judge_rule words every baseline rule this way
        outcomes.append({"passed": o.passed, "rule": o.rule, "variant": o.variant, "metric": o.metric,
                         "observed": format_value(o.metric, o.observed, delta=is_change) if o.observed is not None
                         else ("inf dB" if o.passed and o.metric == "sqnr_db" else "n/a"),
                         "allowed": o.allowed, "message": o.message})
    failed = sum(not o.passed for o in gate.outcomes)
    total = len(gate.outcomes)
    if total == 0:
        return {"state": "passed", "title": "Gate passed (no rules)",
                "detail": "pipeline.yaml has no gate rules, so nothing can fail. Add rules under gate.rules.",
                "outcomes": [], "failed": 0, "total": 0}
    if failed:
        title = f"Gate FAILED: {failed} of {total} rule{'s' if total != 1 else ''} failed"
    else:
        title = f"Gate passed: all {total} rule{'s' if total != 1 else ''} passed"
    return {"state": "failed" if failed else "passed", "title": title, "detail": "", "outcomes": outcomes,
            "failed": failed, "total": total}


#: Said beside an onnxruntime INT8 variant slower than the reference (all four models of a wake-word and VAD set were,
#: 1.5-2.7x, and the report said only "2.44x slower"; found probing).
_CPU_QDQ = (" (onnxruntime runs the Q/DQ model as written, converting around each layer; the file is built for "
            "TensorRT, which fuses the pairs into INT8 kernels; on a CPU like this one, FP32 is the faster file)")

#: Said of an onnxruntime FP16 variant on the CPU (a document unwarper's FP16 output equalled FP32's bit for bit: its
#: Convs ran in FP32; found probing).
_CPU_FP16 = ("measured on onnxruntime's CPU, which has FP16 kernels for few ops (not Conv) and runs the rest in FP32 "
             "between casts: these numbers show the FP16 weights' rounding more than FP16 arithmetic, which a TensorRT "
             "or CUDA variant measures")


def _highlights(results: RunResults, variants: pd.DataFrame, latency: pd.DataFrame) -> list[str]:
    """One line per variant that ran: its accuracy cost and speed against the reference."""
    out = []
    ref = variants[variants["variant"] == results.reference]
    ref_size = ref["size_mb"].iloc[0] if len(ref) else None
    for _, v in variants.iterrows():
        if v["status"] != "ran":
            continue
        parts = []
        if _num(v["top1"]) is not None:
            drop = _num(v["top1_drop"])
            parts.append(f"top-1 {format_value('top1', v['top1'])}"
                         + (f" ({format_value('top1', 0.0 - drop, delta=True)} vs {results.reference})" if drop is not None else ""))
        else:
            # the task's own accuracy (top-1 has its branch above; the cosine is no highlight)
            key = next((m for m in KEY_ACCURACY if m not in ("top1", "cosine") and _num(v[m]) is not None), None)
            if key is not None:
                parts.append(f"{KEY_LABELS[key].removesuffix(' with the reference')} {format_value(key, v[key])}")
        lat = latency[(latency["variant"] == v["variant"]) & latency["speedup"].notna()]
        if len(lat):
            row = lat.iloc[-1]
            speed, bs = float(row["speedup"]), int(row["batch_size"])
            parts.append((f"{speed:.2f}x faster than {results.reference} at batch size {bs}" if speed >= 1 else
                          f"{1 / speed:.2f}x slower than {results.reference} at batch size {bs}"
                          + (_CPU_QDQ if (v["precision"], v["backend"], v["device"]) == ("int8", "onnxruntime", "cpu")
                             else ""))
                         + (f" (at onnxruntime's optimization level '{lvl}')" if (lvl := _levels(results).get(
                             v["variant"])) else ""))
        size = _num(v["size_mb"])
        if size and ref_size:
            # "detection agreement 0.0922, 3.2x smaller" read as the agreement being smaller (found probing)
            parts.append(f"its file {ref_size / size:.1f}x smaller" if size < ref_size
                         else f"its file {size / ref_size:.1f}x the size")
        if (v["precision"], v["backend"], v["device"]) == ("fp16", "onnxruntime", "cpu"):
            parts.append(_CPU_FP16)
        if parts:
            out.append(f"{v['variant']}: " + ", ".join(parts))
    return out


def _variant_rows(results: RunResults, variants: pd.DataFrame, metrics: Sequence[str],
                  deltas: Mapping[tuple[str, str, int | None], Any]) -> list[dict[str, Any]]:
    rows = []
    for _, v in variants.iterrows():
        name = v["variant"]
        row: dict[str, Any] = {"variant": name, "backend": v["backend"], "precision": v["precision"],
                               "device": v["device"], "status": v["status"], "reason": v["skipped_reason"]}
        row["size"] = _cell("size_mb", _num(v["size_mb"]), deltas.get((name, "size_mb", None)))
        row["cells"] = [_cell(m, _num(v[m]), deltas.get((name, m, None))) for m in metrics]
        rows.append(row)
    return rows


def _key_rows(results: RunResults, variants: pd.DataFrame) -> list[dict[str, Any]]:
    """One short row per variant for the CI summary: accuracy, latency, speedup, size (as the gate reads them)."""
    measured = tables.measured_accuracy_metrics(variants)
    acc = next((m for m in KEY_ACCURACY if m in measured), None)
    rows: list[dict[str, Any]] = []
    for _, v in variants.iterrows():
        name = v["variant"]
        if v["status"] == "skipped":
            same = next((r for r in rows if r["status"] == "skipped" and r["reason"] == v["skipped_reason"]), None)
            if same is not None:  # three TensorRT variants skipped for one reason read better as one row
                same["variant"] += f", {name}"
            else:
                rows.append({"variant": name, "status": "skipped", "reason": v["skipped_reason"]})
            continue
        lat = observe(results, name, "latency_ms")
        speed = observe(results, name, "speedup")
        rows.append({
            "variant": name, "status": v["status"], "reason": None,
            "accuracy": format_value(acc, _num(v[acc])) if acc else "n/a",
            "latency": f"{format_value('latency_ms', lat.value)} @bs{lat.batch_size}" if lat.value is not None else "n/a",
            "speedup": format_value("speedup", speed.value) if speed.value is not None else "n/a",
            "size": format_value("size_mb", _num(v["size_mb"])),
        })
    return rows


def _levels(results: RunResults) -> dict[str, str]:
    """The variants timed below onnxruntime's default optimization level (the default crashed onnxruntime), and at
    which: their latency is that level's, not comparable one for one (found probing khmersm's FP16)."""
    return {v.name: str(v.details[ORT_OPTIMIZATION_KEY]) for v in results.variants if ORT_OPTIMIZATION_KEY in v.details}


def _latency_rows(latency: pd.DataFrame, order: Sequence[str], deltas: Mapping[tuple[str, str, int | None], Any],
                  levels: Mapping[str, str]) -> list[dict[str, Any]]:
    rank = {n: i for i, n in enumerate(order)}
    frame = latency.assign(_rank=latency["variant"].map(rank)).sort_values(["batch_size", "_rank"], kind="stable")
    rows = []
    previous_bs = None
    for _, r in frame.iterrows():
        bs = int(r["batch_size"])
        name = r["variant"]
        rows.append({
            "batch_size": bs, "first_of_batch": bs != previous_bs,
            "variant": f"{name} (optimization level '{levels[name]}')" if name in levels else name,
            "cells": [
                _cell("latency_ms", r["latency_median_ms"], deltas.get((name, "latency_ms", bs))),
                Cell(format_value("latency_ms", r["latency_p90_ms"]), num=True),
                _cell("latency_p99_ms", r["latency_p99_ms"], deltas.get((name, "latency_p99_ms", bs))),
                _cell("throughput", r["throughput"], deltas.get((name, "throughput", bs))),
                Cell(format_value("speedup", _num(r["speedup"])), num=True),
                Cell(f"{int(r['iterations'])} (+{int(r['warmup'])} warm-up)", num=True),
            ],
        })
        previous_bs = bs
    return rows


def _scatter(results: RunResults, variants: pd.DataFrame, latency: pd.DataFrame,
             draw: bool) -> tuple[str | None, str, str]:
    """(svg or None, caption, reason when None)."""
    ran = variants[variants["status"] != "skipped"]
    metric = next((m for m in KEY_ACCURACY if ran[m].notna().any()), None)
    if metric is None:
        return None, "", "no accuracy metric was measured for any variant"
    if latency.empty:
        return None, "", "no latency was measured in this run (evaluate.latency.enabled is false)"
    common = set.intersection(*(set(latency.loc[latency["variant"] == n, "batch_size"]) for n in ran["variant"]))
    bs = int(max(common)) if common else int(latency["batch_size"].max())
    lat = latency[latency["batch_size"] == bs][["variant", "latency_median_ms"]]
    points = ran.merge(lat, on="variant").rename(columns={"latency_median_ms": "latency_ms"})
    points = points[points[metric].notna()]
    if points.empty:
        return None, "", f"no variant has both {metric} and latency at batch size {bs}"
    label = KEY_LABELS[metric]
    svg = plots.accuracy_vs_latency(points, accuracy=metric, batch_size=bs, accuracy_label=label) if draw else ""
    return svg, f"{label.capitalize()} against median latency at batch size {bs}. Up and to the left is better.", ""


def _latency_plot(results: RunResults, variants: pd.DataFrame, draw: bool) -> tuple[str | None, str]:
    precision = dict(zip(variants["variant"], variants["precision"], strict=True))
    per_bs: dict[int, list[tuple[str, str, Sequence[float]]]] = {}
    for e in results.evaluations:
        if e.skipped is not None:
            continue
        for s in e.latency:
            samples = s.samples_ms or (s.min_ms, s.median_ms, s.p90_ms, s.p99_ms)  # summary only: draw what we have
            per_bs.setdefault(s.batch_size, []).append((e.variant, precision.get(e.variant, ""), samples))
    if not per_bs:
        return None, "no latency was measured in this run (evaluate.latency.enabled is false)"
    return (plots.latency_distributions(per_bs) if draw else ""), ""


def _pick_histograms(hists: Mapping[str, TensorHistogram], sens: pd.DataFrame,
                     thresholds: Mapping[str, Mapping[str, float]]) -> tuple[list[TensorHistogram], str]:
    """The tensors to draw, and how they were chosen."""
    names = list(dict.fromkeys(t for t in (sens["tensor"] if not sens.empty else ()) if t in hists))  # ordered, unique
    if names:
        return [hists[n] for n in names[:_MAX_HISTOGRAMS]], "the most sensitive layers' output tensors, most sensitive first"

    def spread(name: str) -> float:
        vals = [t[name] for t in thresholds.values() if name in t and t[name] > 0]
        return max(vals) / min(vals) if len(vals) > 1 else 1.0

    names = sorted(hists, key=lambda n: (-spread(n), n))
    how = ("the tensors whose calibration methods disagree most (no per-layer sensitivity in this run)"
           if len(thresholds) > 1 else "the first tensors of the model (no per-layer sensitivity in this run)")
    return [hists[n] for n in names[:_MAX_HISTOGRAMS]], how


def _display_path(path: str, run: Path) -> str:
    """A path inside the run directory relative to it (the report travels with its folder)."""
    try:
        return Path(path).resolve().relative_to(run.resolve()).as_posix()
    except (ValueError, OSError):
        return path


def build_context(run_dir: str | os.PathLike[str], results: RunResults, *,
                  notes: Mapping[str, str] | None = None, draw: bool = True,
                  sensitivity_rows: int = SENSITIVITY_ROWS) -> dict[str, Any]:
    """Everything the templates show. `notes` overrides the 'why is this section empty' texts
    (keys: sensitivity, fallback, histograms, latency, calibration); `draw=False` skips the plots
    (report.md has none); `sensitivity_rows`: the sensitivity table's rows (evaluate.sensitivity.top)."""
    notes = dict(notes or {})
    run = Path(run_dir)
    summary = summary_context(results)
    variants, latency = summary["_variants"], summary["_latency"]
    deltas = _deltas(results.baseline)
    order = list(variants["variant"])
    int8_ran = bool(((variants["precision"] == "int8") & (variants["status"] != "skipped")).any())

    scatter_svg, scatter_caption, scatter_reason = _scatter(results, variants, latency, draw)
    latency_svg, latency_reason = _latency_plot(results, variants, draw)

    sens_all = tables.sensitivity_frame(results)
    sens = sens_all.head(sensitivity_rows)
    sens_reason = notes.get("sensitivity") or (
        "no per-layer sensitivity: no INT8 variant ran in this run" if not int8_ran else
        "no per-layer sensitivity: the INT8 model holds no quantized layer to measure"
        if any(v.quantize_detail("quantized") == 0 for v in results.variants) else "no per-layer sensitivity: not computed in this run (evaluate.sensitivity.enabled turns it on)")
    fallback = tables.fallback_frame(results)
    fallback_reason = notes.get("fallback") or (
        "no accuracy-driven fallback: build.fallback is not set in pipeline.yaml, so every quantizable layer stayed INT8")

    hists, hist_reason = load_histograms(run)
    thresholds = load_thresholds(results, run)
    hist_svg, hist_how = None, ""
    if hists:
        picked, hist_how = _pick_histograms(hists, sens_all, thresholds)
        hist_svg = plots.activation_histograms(picked, thresholds) if draw else ""
        if not thresholds:
            hist_how += "; no calibration JSON was found, so no thresholds are drawn"
    else:
        hist_reason = notes.get("histograms") or hist_reason

    calib = tables.calibration_frame(results)
    calib["cache_path"] = [_display_path(p, run) for p in calib["cache_path"]]
    model = results.model
    return {
        **summary,
        "model": {
            "path": model.path, "sha256": model.sha256[:12], "opset": model.opset, "producer": model.producer,
            "parameters": f"{model.num_parameters:,}", "size": format_value("size_mb", model.size_bytes / 1e6),
            "inputs": ", ".join(f"{t.name} {t.dtype}[{', '.join('?' if d is None else str(d) for d in t.shape)}]"
                                for t in model.inputs),
            "outputs": ", ".join(f"{t.name} {t.dtype}[{', '.join('?' if d is None else str(d) for d in t.shape)}]"
                                 for t in model.outputs),
            "ops": ", ".join(f"{op} x{n}" for op, n in sorted(model.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        },
        "latency_rows": _latency_rows(latency, order, deltas, _levels(results)) if not latency.empty else [],
        "latency_reason": notes.get("latency") or latency_reason,
        "scatter": {"svg": scatter_svg, "caption": scatter_caption, "reason": scatter_reason},
        "latency_plot": latency_svg,
        "sensitivity": _sensitivity(sens, sens_all, sens_reason, draw),
        "variant_sensitivity": _variant_sensitivity(results, sensitivity_rows),
        "fallback": {"report": results.fallback, "rows": [r for _, r in fallback.iterrows()], "reason": fallback_reason,
                     "data": _fallback_data_line(results)},
        "int8_build": _int8_build_lines(results),
        "histograms": {"svg": hist_svg, "how": hist_how, "reason": hist_reason, "count": len(hists),
                       "methods": sorted(thresholds)},
        "calibration": {"rows": [r for _, r in calib.iterrows()],
                        "reason": notes.get("calibration") or _no_calibration(results)},
        "environment": tables.environment_rows(results.environment),
        "baseline_flagged": [d for d in (results.baseline or {}).get("deltas", []) if d["regressed"] or d["improved"]],
    }


def _no_calibration(results: RunResults) -> str:
    """Why a run holds no calibration: no INT8 variant asked for, or every one skipped (the pipeline then does
    not calibrate for nothing)."""
    skipped = [v for v in results.variants if v.precision == "int8" and v.skipped]
    if not skipped:
        return "no calibration in this run (no INT8 variant was requested)"
    return ("no calibration in this run: no INT8 variant could be built here ("
            + "; ".join(f"{v.name}: {v.skipped}" for v in skipped) + ")")


def _judged_samples(results: RunResults) -> int | None:
    ref = next((e for e in results.evaluations if e.variant == results.reference and not e.skipped), None)
    return ref.num_samples if ref is not None else None


def _fallback_data_line(results: RunResults) -> str | None:
    """Which data the fallback chose on and which data the gate judged (None for results that do not say)."""
    fb = results.fallback
    if fb is None or fb.chosen_on is None:
        return None
    judged = _judged_samples(results)
    return (f"Fallback chose on: {fb.chosen_on} data ({fb.chosen_samples} samples); judged on: evaluation data"
            + (f" ({judged} samples)" if judged is not None else "") + ".")


def _sensitivity(sens: pd.DataFrame, sens_all: pd.DataFrame, reason: str, draw: bool) -> dict[str, Any]:
    """The sensitivity section: the chart draws the quantity the rows are ranked by (tables.sensitivity_frame)."""
    metric = str(sens_all["metric_name"].iloc[0]) if not sens_all.empty else ""
    ranked_by_output = not sens_all.empty and bool(sens_all["output_metric"].notna().any())
    unit = metric if ranked_by_output else "sqnr_db"
    label = METRIC_LABELS.get(metric, metric)
    if ranked_by_output:
        ranked_by = f"{label} of the model output with only this layer quantized"
    else:
        ranked_by = "SQNR of the layer's output in the INT8 model"
    better = "lower" if HIGHER_IS_BETTER.get(unit, True) else "higher"
    axis = f"{ranked_by} ({'dB; ' if unit == 'sqnr_db' else ''}{better} = more costly)"
    svg = None
    if not sens.empty:
        svg = plots.sensitivity_bars(sens, column="output_metric" if ranked_by_output else "sqnr_db", metric=unit,
                                     axis_label=axis) if draw else ""
    samples = sens_all["num_samples"].dropna() if not sens_all.empty else sens_all
    return {"rows": [r for _, r in sens.iterrows()], "svg": svg, "reason": reason, "total": len(sens_all),
            "metric": metric, "ranked_by": ranked_by, "ranked_by_output": ranked_by_output,
            # the output SQNR that orders layers an agreement count ties, shown where it did (it was not: the order
            # of tied rows looked arbitrary), and the samples the values are of
            "tie_break": ranked_by_output and bool(sens_all["output_sqnr_db"].notna().any()),
            "samples": int(samples.iloc[0]) if len(samples) else None}


def _variant_sensitivity(results: RunResults, top: int) -> list[dict[str, Any]]:
    """Per-layer sensitivity of INT8 variants quantpipe did not write (ModelOpt's: `details["sensitivity"]`, worst
    first), the first `top` rows of each (evaluate.sensitivity.top, as the main table)."""
    out = []
    for v in results.variants:
        rows = (v.details or {}).get("sensitivity")
        if rows:
            out.append({"variant": v.name, "rows": rows[:top], "total": len(rows),
                        "metric": rows[0].get("metric_name", "")})
    return out


def _int8_build_lines(results: RunResults) -> list[str]:
    """How the ONNX Runtime INT8 (Q/DQ) model was made, one sentence per transform, from the build stage."""
    v = next((v for v in results.variants if v.backend == "onnxruntime" and v.precision == "int8"), None)
    b = (v.details or {}).get("quantize") if v is not None else None
    if not b:
        return []
    # "110 of 110 quantizable nodes" read wrong beside two Gemms left in float (found probing): those the writer
    # could not quantize were not counted among the quantizable; say both counts.
    floats, w = b.get("kept_float_count", len(b["kept_float"])), b.get("weights") or {}
    share = f"; {100 * w['int8'] / total:.0f} % of the weight values in int8" if (total := w.get("int8", 0) + w.get("float", 0)) else ""
    lines = [f"{b['quantized']} node(s) got Q/DQ" + (f", {floats} Conv / Gemm / MatMul node(s) stayed in float (below)"
                                                    if floats else "")
             + f" (weights symmetric int8 {'per output channel' if b['per_channel'] else 'per tensor'}, activations "
             f"per tensor){share}"
             + (f"; the model was upgraded from opset {b['opset_before']} to {b['opset_after']}"
                if b["opset_before"] != b["opset_after"] else "") + "."]
    if b["kept_float"]:
        kept = ", ".join(f"{k['node']} ({k['reason']})" for k in b["kept_float"][:5])
        more = len(b["kept_float"]) - 5
        lines.append(f"Left in float: {kept}" + (f" and {more} more" if more > 0 else "") + ".")
    if b.get("ranges"):
        r = b["ranges"]
        counts = ", ".join(f"{m} {n}" for m, n in r["per_method"].items())
        lines.append(f"Activation ranges (calibration.use: auto), chosen per tensor by measured output effect: "
                     f"{counts}; whole-model check kept {r['winner']} ({r['model_db'].get(r['winner'])} dB on "
                     f"{r['samples']} calibration samples); auto_ranges.json says why for each tensor.")
    if b.get("split"):
        lines.append("Quantized in pieces (all INT8; build.quantize.split_activations): " + ", ".join(
            f"{s['tensor']} in {s['pieces']} (its readers read {s['pieces']}x the channels)" for s in b["split"])
            + " (README: split activations).")
    if b["shifted"]:
        lines.append(f"{b['shifted']} non-negative activation(s) quantized around the middle of their range "
                     "(build.quantize.shift_nonnegative): twice the resolution of a symmetric grid.")
    if b["bias_corrected"]:
        lines.append(f"{b['bias_corrected']} bias(es) corrected for the mean error of the quantized weights.")
    if b["smoothed"]:
        lines.append(f"{b['smoothed']} activation(s) smoothed: outlier channels moved into the weights ("
                     + ("SmoothQuant, and the depthwise Convs' inputs equalized: build.quantize.equalize_depthwise)."
                        if b.get("equalized_depthwise") else "SmoothQuant)."))
    if b["gptq_rounded"]:
        lines.append(f"{b['gptq_rounded']} weight(s) rounded by GPTQ against the calibration inputs.")
    if b.get("calibration_samples") is not None:
        judged = _judged_samples(results)
        lines.append(f"INT8 scales and the choices above made on: calibration data ({b['calibration_samples']} "
                     "samples); judged on: evaluation data"
                     + (f" ({judged} samples)" if judged is not None else "") + ".")
    from quantpipe.modelinfo import int8_run_lines  # onnx: only for a run with an INT8 model

    lines.append(" ".join(int8_run_lines()))
    return lines


def summary_context(results: RunResults) -> dict[str, Any]:
    """The cheap part of the context (no plots, no files read): enough for summary.md."""
    variants = tables.variants_frame(results)
    latency = tables.latency_frame(results)
    measured = tables.measured_accuracy_metrics(variants)
    metrics = [m for m in TABLE_METRICS if m in measured] + [m for m in measured if m not in ACCURACY_METRICS]  # hooks'
    baseline = results.baseline
    return {
        "results": results,
        "title": f"{Path(results.model.path).stem}: quantization report",
        "model_name": Path(results.model.path).stem,
        "run_dir": None,
        "_variants": variants,
        "_latency": latency,
        "verdict": _verdict(results),
        "collapse": list(results.collapse),
        "highlights": _highlights(results, variants, latency),
        "metric_labels": {**{m: m for m in hook_metrics(results)}, **METRIC_LABELS},
        "metrics": metrics,
        "variant_rows": _variant_rows(results, variants, metrics, _deltas(baseline)),
        "skipped": [(r["variant"], r["skipped_reason"]) for _, r in variants.iterrows() if r["status"] == "skipped"],
        "key_rows": _key_rows(results, variants),
        "key_metric": next((m for m in KEY_ACCURACY if m in measured), None),
        "baseline": baseline,
        "baseline_regressions": list(baseline.get("regressions", [])) if baseline else [],
        "files": [],
        "warnings": list(results.warnings[:MAX_WARNINGS]),
        "warnings_more": max(0, len(results.warnings) - MAX_WARNINGS),
    }


# --------------------------------------------------------------------------- rendering


def render_html(context: Mapping[str, Any]) -> str:
    """report.html from a build_context() result."""
    return _jinja_env().get_template("report.html.j2").render(**context)


def render_markdown(context: Mapping[str, Any]) -> str:
    """report.md (GitHub-flavoured) from a build_context() result."""
    return _jinja_env().get_template("report.md.j2").render(**context)


def render_summary(context: Mapping[str, Any]) -> str:
    """The short markdown for $GITHUB_STEP_SUMMARY: verdict, rules, one line per variant."""
    return _jinja_env().get_template("summary.md.j2").render(**context)


def write_report(
    run_dir: str | os.PathLike[str],
    results: RunResults,
    *,
    formats: Iterable[str] = FORMATS,
    baseline: RunResults | None = None,
    notes: Mapping[str, str] | None = None,
    shown_dir: str | os.PathLike[str] | None = None,
    sensitivity_rows: int = SENSITIVITY_ROWS,
) -> dict[str, Path]:
    """Write the report files of `results` into `run_dir`, each atomically; return {format: path}.

    `formats` picks among md, html, json, csv, junit; summary.md is always written (CI reads it).
    With `baseline`, every metric gets its change against that run and regressions are flagged
    (stored in results.json as `baseline`; without it, a comparison already in `results.baseline` is
    shown). `notes` replaces the text of an empty section, e.g. {"sensitivity": "no sensitivity
    analysis: disabled in pipeline.yaml"} (keys: sensitivity, fallback, histograms, latency, calibration).
    `shown_dir`: the folder the report names as its own (the run's final place, when `run_dir` is where it
    is staged before being committed). `sensitivity_rows`: the sensitivity table's rows (evaluate.sensitivity.top).
    """
    started = time.perf_counter()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        from quantpipe.errors import ConfigError

        raise ConfigError(f"report.formats: unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    results = with_baseline(results, baseline)
    written: dict[str, Path] = {}
    if "json" in wanted:
        written["json"] = atomic_write_json(run / OUTPUT_FILES["json"], to_jsonable(results))
    if "csv" in wanted:
        written["csv"] = atomic_write_text(run / OUTPUT_FILES["csv"], tables.results_frame(results).to_csv(index=False))
    if "junit" in wanted:
        written["junit"] = atomic_write_text(run / OUTPUT_FILES["junit"], junit_xml(results))
    context = build_context(run, results, notes=notes, draw="html" in wanted, sensitivity_rows=sensitivity_rows)
    context["files"] = [OUTPUT_FILES[f] for f in FORMATS if f in wanted and f != "html"]
    context["run_dir"] = str(shown_dir if shown_dir is not None else run)
    if "md" in wanted:
        written["md"] = atomic_write_text(run / OUTPUT_FILES["md"], render_markdown(context))
    if "html" in wanted:
        written["html"] = atomic_write_text(run / OUTPUT_FILES["html"], render_html(context))
    written["summary"] = atomic_write_text(run / OUTPUT_FILES["summary"], render_summary(context))
    log.debug("report written in %.2f s: %s", time.perf_counter() - started, ", ".join(p.name for p in written.values()))
    return written
