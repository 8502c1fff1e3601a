"""Runs the stages in order: load (`inputs`) -> calibrate -> build (`build`) -> evaluate -> report -> gate.

Calibration and build artifacts live in a workspace (`workspace`, `<report.dir>/.work/<name>/`) that persists
between runs; each stage records the fingerprint of its inputs (model hash, data hash, its config
section, tool version) and re-runs only when that changed, logging what changed. Each run writes
its results into `<report.dir>/<run-id>/`, with the caches and models it used copied beside them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe import __version__
from quantpipe.artifacts import (
    RESULTS_SCHEMA_VERSION,
    CalibrationSummary,
    EvalResult,
    LayerSensitivity,
    RunResults,
    Variant,
    from_jsonable,
    to_jsonable,
)
from quantpipe.build import stage_build
from quantpipe.config import PipelineConfig, variant_name
from quantpipe.errors import DataError, MissingDependencyError, QuantpipeError
from quantpipe.fsutil import atomic_write_json
from quantpipe.inputs import LoadedInputs, load_inputs
from quantpipe.workspace import NullProgress, Progress, Workspace, new_run_id, relative_to, reusable, write_manifest

__all__ = ["finish_run", "run_pipeline", "run_stages", "stage_calibrate", "stage_evaluate", "stage_sensitivity"]

log = logging.getLogger(__name__)


def stage_calibrate(
    cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, progress: Progress
) -> tuple[list[CalibrationSummary], dict[str, float]]:
    """Calibrate (or reuse) with every configured method; return summaries and the scales to build with."""
    from quantpipe.calibration import HISTOGRAMS_FILE, calibrate, select_amax

    c = cfg.calibration
    fp = {
        "model_sha256": li.spec.sha256,
        "data": li.calib.fingerprint,
        "calibration": json.dumps(cfg.section_fingerprint("calibration"), sort_keys=True),
        "device": c.device,
        "quantpipe": __version__,
    }
    manifest = reusable(ws.calibration, fp, "calibrate")
    if manifest is None:
        from quantpipe.backends.onnxruntime import providers_for, resolve_device

        device, notice = resolve_device(c.device)
        if notice:
            log.info("calibrate: %s", notice)
        with progress.task(f"calibrating on {li.calib.num_samples} samples ({device})", li.calib.num_samples) as advance:
            summaries = calibrate(
                li.spec.path,
                li.calib,
                methods=list(c.methods),
                out_dir=ws.calibration,
                batch_size=cfg.data.batch_size,
                num_bins=c.num_bins,
                percentile=c.percentile,
                trt_version=c.trt_version,
                providers=providers_for(device),
                on_batch=lambda done, total: advance(done),
                model_sha256=li.spec.sha256,
            )
        stored = [dataclasses.replace(s, cache_path=relative_to(s.cache_path, ws.calibration),
                                      json_path=relative_to(s.json_path, ws.calibration)) for s in summaries]
        files = [s.cache_path for s in stored] + [s.json_path for s in stored]
        if (ws.calibration / HISTOGRAMS_FILE).is_file():
            files.append(HISTOGRAMS_FILE)
        write_manifest(ws.calibration, fp, files, [to_jsonable(s) for s in stored])
    else:
        # Paths are stored relative to the stage folder: a moved or copied project reads its own files.
        summaries = [from_jsonable(CalibrationSummary, s) for s in manifest["payload"]]
        summaries = [dataclasses.replace(s, cache_path=str(ws.calibration / s.cache_path),
                                         json_path=str(ws.calibration / s.json_path)) for s in summaries]
    amax = select_amax(ws.calibration, c.use, summaries)
    return summaries, amax



def stage_evaluate(
    cfg: PipelineConfig, li: LoadedInputs, variants: list[Variant], progress: Progress
) -> tuple[list[EvalResult], str]:
    """Evaluate every variant that was built; the FP32 ONNX Runtime variant is the reference."""
    from quantpipe.evaluate import evaluate_variant

    ev = cfg.evaluate
    lat = ev.latency
    ran = [v for v in variants if v.ran]
    ref_name = variant_name("onnxruntime", "fp32")
    results: list[EvalResult] = []
    reference: np.ndarray | None = None
    ref_labelled: dict[str, float] | None = None
    if not any(v.name == ref_name for v in ran):
        log.warning("no %s variant: agreement metrics need the FP32 reference; enable onnxruntime fp32", ref_name)
    order = sorted(ran, key=lambda v: v.name != ref_name)
    for v in order:
        runner = _runner_for(v, cfg)
        n_lat = len(lat.batch_sizes) if lat.enabled else 0
        with progress.task(f"evaluating {v.name}", li.eval.num_samples) as advance, runner:
            res, out = evaluate_variant(
                runner, li.eval, output=li.output, batch_size=cfg.data.batch_size, metrics=ev.metrics,
                reference=reference, ref_labelled=ref_labelled,
                latency_batch_sizes=lat.batch_sizes if n_lat else (), warmup=lat.warmup, iterations=lat.iterations,
                on_batch=advance,
            )
        if v.name == ref_name:
            reference = out
            ref_labelled = {k: float(val) for k, val in res.metrics.items() if k in ("top1", "top5") and val is not None}
            # The reference against itself: exact agreement by definition, recomputed for honesty.
            from quantpipe.evaluate import accuracy_metrics

            res = dataclasses.replace(res, metrics={**res.metrics, **accuracy_metrics(out, out, li.eval.labels, ev.metrics, ref_labelled)})
        results.append(res)
    for v in variants:
        if not v.ran:
            results.append(EvalResult(variant=v.name, num_samples=0, metrics={}, skipped=v.skipped))
    by_name = {r.variant: r for r in results}
    return [by_name[v.name] for v in variants if v.name in by_name], ref_name


def _runner_for(v: Variant, cfg: PipelineConfig) -> Any:
    if v.backend == "onnxruntime":
        from quantpipe.backends.onnxruntime import OrtRunner

        return OrtRunner(v.artifact or "", v.name, device=v.device, threads=cfg.build.backends.onnxruntime.threads)
    from quantpipe.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(v.artifact or "", v.name, source_sha256=v.details.get("source_sha256"))


def stage_sensitivity(
    cfg: PipelineConfig, li: LoadedInputs, amax: dict[str, float], variants: list[Variant], progress: Progress
) -> tuple[LayerSensitivity, ...]:
    """Per-layer sensitivity of the INT8 ONNX variant (skipped when disabled or not built)."""
    s = cfg.evaluate.sensitivity
    int8 = next((v for v in variants if v.name == variant_name("onnxruntime", "int8") and v.ran), None)
    if not s.enabled or int8 is None:
        return ()
    from quantpipe.quantize import QuantizeOptions
    from quantpipe.sensitivity import layer_sensitivity

    options = QuantizeOptions.from_config(cfg.build.quantize)
    built = ((int8.details or {}).get("quantize") or {}).get("split")
    if options.split_activations == "auto" and built is not None:
        # What the build stage chose: the same model, without choosing again.
        options = dataclasses.replace(options, split_activations={x["tensor"]: x["pieces"] for x in built})
    with progress.task("per-layer sensitivity", None):
        rows = layer_sensitivity(
            li.spec.path, int8.artifact or "", amax, li.eval, output=li.output, max_samples=s.max_samples,
            one_at_a_time=s.one_at_a_time, batch_size=cfg.data.batch_size,
            options=options, calibration_data=li.calib,
        )
    return tuple(rows)


# --------------------------------------------------------------------------- whole pipeline


def _copy_into(src: Path, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)  # engines and models can be large: a hard link costs nothing
    except OSError:
        shutil.copy2(src, dest)


def _preflight(cfg: PipelineConfig) -> None:
    """Fail fast (exit 3) when a required backend cannot run here, before hours of calibration."""
    trt = cfg.build.backends.tensorrt
    if not (trt.enabled and trt.required):
        return
    from quantpipe.backends.tensorrt.plan import variant_skip_reason
    from quantpipe.backends.tensorrt.version import require_tensorrt

    require_tensorrt()
    for precision in trt.precisions:
        reason = variant_skip_reason(precision, int8_mode=trt.int8_mode)
        if reason is not None:
            raise MissingDependencyError(
                f"build.backends.tensorrt.required is true, but {variant_name('tensorrt', precision)} cannot be built "
                f"here: {reason}. Run on a machine with an NVIDIA GPU and TensorRT (pip install 'quantpipe[tensorrt]'), "
                f"or set required: false to report TensorRT variants as skipped."
            )


def run_stages(
    cfg: PipelineConfig,
    *,
    until: str = "gate",
    progress: Progress | None = None,
    run_id: str | None = None,
    baseline_dir: Path | None = None,
) -> tuple[RunResults | None, Path | None]:
    """Run the pipeline up to and including `until` (calibrate|build|evaluate|report|gate).

    Returns the results (None before evaluate) and the run directory (None before evaluate).
    The gate's verdict is in results.gate; the caller maps it to an exit code.
    """
    from quantpipe.deps import probe_env

    progress = progress or NullProgress()
    ws = Workspace.for_config(cfg)
    li = load_inputs(cfg)
    _preflight(cfg)
    summaries, amax = stage_calibrate(cfg, ws, li, progress)
    if until == "calibrate":
        return None, None
    variants, fallback = stage_build(cfg, ws, li, amax, summaries, progress)
    if until == "build":
        return None, None
    evals, ref = stage_evaluate(cfg, li, variants, progress)
    sens = stage_sensitivity(cfg, li, amax, variants, progress)
    run_id = run_id or cfg.report.run_id or new_run_id()
    run_dir = Path(cfg.report.dir) / run_id
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DataError(f"run directory {run_dir} already exists. Choose another report.run_id or remove it.")
    run_dir.mkdir(parents=True, exist_ok=True)
    for s in summaries:
        for p in (Path(s.cache_path), Path(s.json_path)):
            _copy_into(p, run_dir / "calibration")
    hist = ws.calibration / "histograms.npz"
    if hist.exists():
        _copy_into(hist, run_dir / "calibration")
    run_variants = []
    for v in variants:
        if v.ran and v.artifact and Path(v.artifact).parent.resolve() != Path(li.spec.path).parent.resolve():
            _copy_into(Path(v.artifact), run_dir / "models")
            v = dataclasses.replace(v, artifact=str(run_dir / "models" / Path(v.artifact).name))
        run_variants.append(v)
    summaries_here = [
        dataclasses.replace(s, cache_path=str(run_dir / "calibration" / Path(s.cache_path).name),
                            json_path=str(run_dir / "calibration" / Path(s.json_path).name))
        for s in summaries
    ]
    results = RunResults(
        schema_version=RESULTS_SCHEMA_VERSION,
        run_id=run_id,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tool_version=__version__,
        config_path=str(cfg.source) if cfg.source else None,
        model=li.spec,
        environment=probe_env(),
        calibration=tuple(summaries_here),
        variants=tuple(run_variants),
        evaluations=tuple(evals),
        reference=ref,
        sensitivity=sens,
        fallback=fallback,
    )
    atomic_write_json(run_dir / "results.json", to_jsonable(results))
    if until == "evaluate":
        return results, run_dir
    return finish_run(cfg, results, run_dir, baseline_dir=baseline_dir, write=until in ("report", "gate"))


def finish_run(
    cfg: PipelineConfig, results: RunResults, run_dir: Path, *, baseline_dir: Path | None = None, write: bool = True
) -> tuple[RunResults, Path]:
    """Judge the results with the gate rules and write the report files (report and gate stages)."""
    from quantpipe.gate import evaluate_gate
    from quantpipe.report import load_results, update_latest, with_baseline, write_report

    baseline_dir = baseline_dir or cfg.report.baseline
    baseline = load_results(baseline_dir) if baseline_dir else None
    decision = evaluate_gate(results, cfg.gate.rules, baseline)
    results = with_baseline(dataclasses.replace(results, gate=decision), baseline)
    if write:
        write_report(run_dir, results, formats=cfg.report.formats, baseline=baseline, notes=_section_notes(cfg))
        update_latest(Path(cfg.report.dir), run_dir)
    return results, run_dir


def _section_notes(cfg: PipelineConfig) -> dict[str, str]:
    """Why a report section is empty when the configuration turned it off."""
    notes = {}
    if not cfg.evaluate.sensitivity.enabled:
        notes["sensitivity"] = "no sensitivity analysis: disabled in pipeline.yaml (evaluate.sensitivity.enabled: false)"
    if cfg.build.fallback is None:
        notes["fallback"] = "no accuracy-driven fallback: build.fallback is not set in pipeline.yaml"
    if not cfg.evaluate.latency.enabled:
        notes["latency"] = "no latency measured: disabled in pipeline.yaml (evaluate.latency.enabled: false)"
    return notes


def run_pipeline(config: str | Path | PipelineConfig, *, progress: Progress | None = None) -> RunResults:
    """Run every stage on a pipeline.yaml (path or loaded config); return the judged results.

    Raises QuantpipeError subclasses on bad input; the gate's verdict is in `results.gate`.
    """
    from quantpipe.config import load_config

    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    results, _ = run_stages(cfg, until="gate", progress=progress)
    if results is None:  # pragma: no cover - until="gate" always evaluates
        raise QuantpipeError("the pipeline ended before evaluation")
    return results


