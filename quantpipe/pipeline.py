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
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantpipe import __version__
from quantpipe.artifacts import (
    RESULTS_SCHEMA_VERSION,
    CalibrationSummary,
    LayerSensitivity,
    RunResults,
    Variant,
    from_jsonable,
    to_jsonable,
)
from quantpipe.build import calibration_skip_reason, model_files, sha256_of_mapping, stage_build
from quantpipe.config import PipelineConfig, variant_name
from quantpipe.errors import MissingDependencyError, OutputError, QuantpipeError, WriteError, os_error_message
from quantpipe.evaluate_stage import stage_evaluate
from quantpipe.execution import Executor
from quantpipe.fsutil import atomic_copy, atomic_write_json, sha256_file, writable_reason
from quantpipe.inputs import LoadedInputs, load_inputs
from quantpipe.report.rundir import (
    commit_run,
    from_run,
    mark_rewriting,
    require_complete,
    staging_dir,
    update_latest,
    warn_if_other_pipeline,
    write_complete,
)
from quantpipe.workspace import (
    NullProgress,
    Progress,
    Workspace,
    advance_to,
    new_run_id,
    relative_to,
    reusable,
    write_manifest,
)

if TYPE_CHECKING:
    from quantpipe.quantize.options import QuantizeOptions

__all__ = [
    "finish_run",
    "judge_run",
    "rewrite_report",
    "run_pipeline",
    "run_stages",
    "space_needed",
    "stage_calibrate",
    "stage_sensitivity",
    "execution_for",
]

log = logging.getLogger(__name__)


def stage_calibrate(
    cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, progress: Progress, executor: Executor | None = None
) -> tuple[list[CalibrationSummary], dict[str, float]]:
    """Calibrate (or reuse) with every configured method; return summaries and the scales to build with.
    `executor`: shard the data pass over its workers (the same caches, bit for bit)."""
    from quantpipe.calibration import HISTOGRAMS_FILE, calibrate, select_amax

    c = cfg.calibration
    fp = {
        "model_sha256": li.spec.sha256,
        "data": li.calib.fingerprint,
        # Every calibration setting but `use`, which picks among the tables afterwards (the build's fingerprint
        # holds the scales it picked): changing it alone re-ran calibration (found probing).
        "calibration": json.dumps({k: _cache_content(v) if k == "from_cache" else v for k, v in
                                   cfg.section_fingerprint("calibration")["calibration"].items() if k != "use"},
                                  sort_keys=True),
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
                on_batch=advance_to(advance),
                model_sha256=li.spec.sha256,
                executor=executor,
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
    if c.from_cache is not None:
        return summaries, _cache_amax(cfg, ws, summaries, li)
    if c.use == "auto":
        return summaries, _auto_amax(cfg, ws, li, summaries, fp, executor)
    amax = select_amax(ws.calibration, c.use, summaries)
    return summaries, amax


def _cache_content(path: str | None) -> str | None:
    """calibration.from_cache as its content's sha256, not its absolute path: a moved project reuses its calibration
    (found probing: "re-running because calibration changed" after a copy)."""
    return None if path is None else "sha256:" + sha256_file(path)


AUTO_RANGES_FILE = "auto_ranges.json"


def _cache_amax(cfg: PipelineConfig, ws: Workspace, summaries: list[CalibrationSummary],
                li: LoadedInputs) -> dict[str, float]:
    """`calibration.from_cache`: a TensorRT <= 10 cache's ranges, exactly, and for the tensors it lacks the
    calibrated ranges of the method closest to its calibrator (`migrate`); what was done goes to the log and
    to `from_cache.json` beside the calibration files (the build summary reads it)."""
    from quantpipe.calibration import method_tables
    from quantpipe.migrate import MIGRATION_FILE, exact_scale_options, merge_amax, read_legacy_cache
    from quantpipe.quantize import QuantizeOptions

    assert cfg.calibration.from_cache is not None
    options, disabled = exact_scale_options(QuantizeOptions.from_config(cfg.build.quantize))
    match = read_legacy_cache(cfg.calibration.from_cache, li.spec.path, options)
    calibrated = None
    if match.missing:
        calibrated = method_tables(ws.calibration, [match.method], summaries,
                                   percentile=cfg.calibration.percentile)[match.method]
    migration = merge_amax(match, calibrated, disabled)
    for line in migration.lines():
        log.info("calibrate: %s", line)
    atomic_write_json(ws.calibration / MIGRATION_FILE, migration.to_json())
    return dict(migration.amax)


def _auto_amax(cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, summaries: list[CalibrationSummary],
               calib_fp: dict[str, Any], executor: Executor | None = None) -> dict[str, float]:
    """`calibration.use: auto`: the per-tensor ranges `choose_ranges` measures, reused while the calibration
    and the `build.quantize` section (the choice depends on how the model is quantized) are unchanged; the
    choice and why are written to `auto_ranges.json` beside the calibration files (the build summary reads it)."""
    from quantpipe.calibration import method_tables
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize import QuantizeOptions
    from quantpipe.quantize.range_search import AUTO_CANDIDATES, choose_ranges

    fp = {**calib_fp, "build.quantize": json.dumps(cfg.build.quantize.model_dump(mode="json"), sort_keys=True)}
    path = ws.calibration / AUTO_RANGES_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    if doc.get("fingerprint") == fp:
        amax = {k: float(v) for k, v in doc.get("amax", {}).items()}
        # Verified, not trusted: ranges edited on disk since they were written are chosen again.
        if amax and doc.get("amax_sha256") == sha256_of_mapping(amax):
            log.info("calibrate: reusing the auto ranges (%s)", path)
            return amax
        log.info("calibrate: choosing the auto ranges again (%s changed on disk since it was written)", path.name)
    elif doc:
        log.info("calibrate: choosing the auto ranges again (calibration or build.quantize changed)")
    tables = method_tables(ws.calibration, [*AUTO_CANDIDATES, "best"], summaries, percentile=cfg.calibration.percentile)
    choice = choose_ranges(load_onnx(li.spec.path), tables, QuantizeOptions.from_config(cfg.build.quantize), li.calib,
                           batch_size=cfg.data.batch_size, executor=executor)
    atomic_write_json(path, {"fingerprint": fp, "amax": choice.amax, "amax_sha256": sha256_of_mapping(choice.amax),
                             "summary": choice.summary(), "per_tensor": choice.per_tensor})
    return choice.amax


def stage_sensitivity(
    cfg: PipelineConfig, li: LoadedInputs, amax: dict[str, float], variants: list[Variant], progress: Progress,
    executor: Executor | None = None, int8_options: QuantizeOptions | None = None,
) -> tuple[LayerSensitivity, ...]:
    """Per-layer sensitivity of the INT8 ONNX variant (skipped when disabled or not built); its one-layer-at-a-time
    candidates run in shares on the executor's workers. `int8_options`: what the build stage built the INT8 model
    with (`build.Built`: built in this run, or read back with a reused build); without them (a workspace from
    before they were saved) what the calibration data decides is measured again (the same values)."""
    s = cfg.evaluate.sensitivity
    int8 = next((v for v in variants if v.name == variant_name("onnxruntime", "int8") and v.ran), None)
    if not s.enabled or int8 is None:
        return ()
    from quantpipe.build import quantize_options
    from quantpipe.sensitivity import layer_sensitivity
    from quantpipe.taskmetrics import TaskSpec

    options = int8_options or quantize_options(cfg)
    built = int8.quantize_detail("split")
    if options.split_activations == "auto" and built is not None:
        # What the build stage chose: the same model, without choosing again.
        options = dataclasses.replace(options, split_activations={x["tensor"]: x["pieces"] for x in built})
    with progress.task("per-layer sensitivity", None):
        rows = layer_sensitivity(
            li.spec.path, int8.artifact or "", amax, li.eval, output=li.output, max_samples=s.max_samples,
            one_at_a_time=s.one_at_a_time, batch_size=cfg.data.batch_size,
            options=options, calibration_data=li.calib, metric=s.metric, task=TaskSpec.from_config(cfg.evaluate),
            executor=executor, output_axis=cfg.model.output_batch_axis,
        )
    return tuple(rows)


# --------------------------------------------------------------------------- whole pipeline


def _publish(src: Path, dest_dir: Path) -> str:
    """Copy a workspace artifact into the staged run; return its path relative to the run folder.

    A copy, not a hard link: a link shares the inode, so rewriting the workspace file in place changed every
    earlier run's published copy (a reflink exists only on some file systems). A run that cannot change under
    its reader is worth the disk."""
    atomic_copy(src, dest_dir / src.name)
    return f"{dest_dir.name}/{src.name}"


def _preflight(cfg: PipelineConfig) -> None:
    """Fail fast (exit 3) when a required backend cannot run here, before hours of calibration."""
    mo = cfg.build.backends.modelopt
    if mo.enabled and mo.required:
        from quantpipe.backends.modelopt.build import modelopt_skip

        modelopt_skip(cfg)  # raises MissingDependencyError (exit 3) with the set-up command
    trt = cfg.build.backends.tensorrt
    if not (trt.enabled and trt.required):
        return
    from quantpipe.backends.tensorrt.plan import variant_skip_reason
    from quantpipe.backends.tensorrt.version import require_tensorrt

    require_tensorrt("build.backends.tensorrt.required")
    for precision in trt.precisions:
        reason = variant_skip_reason(precision, int8_mode=trt.int8_mode)
        if reason is not None:
            raise MissingDependencyError(
                f"build.backends.tensorrt.required is true, but {variant_name('tensorrt', precision)} cannot be built "
                f"here: {reason}. Run on a machine with an NVIDIA GPU and TensorRT (pip install 'quantpipe[tensorrt]'), "
                f"or set required: false to report TensorRT variants as skipped."
            )


# Size of a built variant per byte of the FP32 model, generous (a Q/DQ model keeps float biases and scales).
_SIZE_PER_MODEL_BYTE = {"fp32": 1.0, "fp16": 0.5, "int8": 0.5}
_REPORT_BYTES = 32 << 20  # report pages, plots, caches of a small model


def space_needed(cfg: PipelineConfig, li: LoadedInputs) -> int:
    """A generous estimate of the bytes a run writes: its models and engines twice (workspace, run folder),
    the calibration histograms, the report."""
    b = cfg.build.backends
    factor = sum(_SIZE_PER_MODEL_BYTE[p] for p in b.onnxruntime.precisions if p != "fp32") if b.onnxruntime.enabled else 0.0
    factor += sum(_SIZE_PER_MODEL_BYTE[p] for p in b.tensorrt.precisions) if b.tensorrt.enabled else 0.0
    factor += sum(_SIZE_PER_MODEL_BYTE[v[:4]] for v in b.modelopt.variants) if b.modelopt.enabled else 0.0
    tensors = sum(li.spec.op_counts.values()) + len(li.spec.inputs)
    histograms = tensors * cfg.calibration.num_bins * 8
    return int(2 * (factor * li.spec.size_bytes + histograms)) + _REPORT_BYTES


def _check_outputs(cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, run_id: str | None) -> None:
    """Before any work: every output folder writable, enough free space, the run folder's name free.
    A failure is an OutputError (exit 2) naming the folder and the fix."""
    report_dir = Path(cfg.report.dir)
    if run_id is not None:
        run_dir = report_dir / run_id
        if run_dir.is_file() or (run_dir.is_dir() and any(run_dir.iterdir())):
            raise OutputError(
                f"run folder {run_dir} already exists (report.run_id / --run-id '{run_id}'). Choose another run id, "
                f"or remove that folder; nothing was computed."
            )
    folders = [(report_dir, "report.dir"), (ws.root, "the workspace")]
    if cfg.build.backends.tensorrt.enabled and cfg.build.backends.tensorrt.timing_cache:
        folders.append((Path(cfg.build.backends.tensorrt.timing_cache).parent, "build.backends.tensorrt.timing_cache's folder"))
    for folder, what in folders:
        reason = writable_reason(folder)
        if reason is not None:
            raise OutputError(
                f"{what} {folder} cannot be written: {reason}. Make it writable (or point report.dir in "
                f"{cfg.source or 'pipeline.yaml'} at a writable folder); nothing was computed."
            )
    need, free = space_needed(cfg, li), shutil.disk_usage(report_dir).free
    if free < need:
        raise OutputError(
            f"report.dir {report_dir} has {free / 2**20:.0f} MiB free, and this run writes about {need / 2**20:.0f} MiB "
            f"(its models and engines in the workspace and in the run folder, histograms, report). Free some space "
            f"or point report.dir at another disk; nothing was computed."
        )


def run_stages(
    cfg: PipelineConfig, *, until: str = "gate", progress: Progress | None = None, run_id: str | None = None,
    baseline_dir: Path | None = None,
) -> tuple[RunResults | None, Path | None]:
    """Run the pipeline up to and including `until` (calibrate|build|evaluate|report|gate).

    Returns the results and the run directory (both None before evaluate). The gate's verdict is in
    results.gate; the caller maps it to an exit code."""
    from quantpipe.runlog import warnings_said

    executor = execution_for(cfg)
    try:
        with warnings_said() as said:
            return _run_stages(cfg, executor, until=until, progress=progress or NullProgress(), run_id=run_id,
                               baseline_dir=baseline_dir, said=said)
    finally:
        executor.close()


def execution_for(cfg: PipelineConfig) -> Executor:
    """The run's executor (`execution:`); its workers get a GPU each when calibration runs on CUDA."""
    from quantpipe.backends.onnxruntime import resolve_device
    from quantpipe.execution import make_executor

    try:
        gpu = resolve_device(cfg.calibration.device)[0] == "cuda"
    except MissingDependencyError:
        gpu = False  # calibrate says so, with the fix
    return make_executor(cfg.execution, gpu=gpu)


def _run_stages(cfg: PipelineConfig, executor: Executor, *, until: str, progress: Progress, run_id: str | None,
                baseline_dir: Path | None, said: list[str]) -> tuple[RunResults | None, Path | None]:
    ws = Workspace.for_config(cfg)
    ws.remove_orphans(cfg.report.dir)
    li = load_inputs(cfg)
    _preflight(cfg)
    makes_run = until not in ("calibrate", "build")
    fixed_id = run_id or cfg.report.run_id
    _check_outputs(cfg, ws, li, fixed_id if makes_run else None)
    run_id = fixed_id or new_run_id(cfg.report.dir)
    skip = calibration_skip_reason(cfg) if until != "calibrate" else None
    if skip is not None:
        log.info("calibrate: skipped, %s", skip)
    summaries, amax = stage_calibrate(cfg, ws, li, progress, executor) if skip is None else ([], {})
    if until == "calibrate":
        return None, None
    variants, fallback, int8_options = stage_build(cfg, ws, li, amax, summaries, progress, executor)
    if until == "build":
        return None, None
    from quantpipe.evaluate import with_sessions_checked

    variants = with_sessions_checked(variants)
    evals, ref = stage_evaluate(cfg, li, variants, progress, executor)
    sens = stage_sensitivity(cfg, li, amax, variants, progress, executor, int8_options)
    if cfg.build.backends.modelopt.enabled:  # ModelOpt's INT8 models, judged as written (details["sensitivity"])
        from quantpipe.backends.modelopt.sensitivity import with_modelopt_sensitivity

        variants = with_modelopt_sensitivity(cfg, li, variants, progress)
    run_dir = Path(cfg.report.dir) / run_id
    if run_dir.exists() and any(run_dir.iterdir()):
        raise OutputError(f"run folder {run_dir} appeared while this run was running. Choose another report.run_id.")
    staging = staging_dir(cfg.report.dir, run_id)
    try:
        results = _stage_run(cfg, ws, li, staging, run_id,
                             RunResults(schema_version=RESULTS_SCHEMA_VERSION, run_id=run_id, created="", tool_version=__version__,
                                        config_path=str(cfg.source) if cfg.source else None, model=li.spec,
                                        environment={}, calibration=tuple(summaries), variants=tuple(variants),
                                        evaluations=tuple(evals), reference=ref, sensitivity=sens, fallback=fallback,
                                        warnings=tuple(said), evaluation_data=li.eval.fingerprint))
        if until != "evaluate":
            results, _ = finish_run(cfg, results, staging, baseline_dir=baseline_dir, shown_dir=run_dir)
        commit_run(staging, run_dir, stage="evaluate" if until == "evaluate" else "report")
    except OSError as err:
        raise WriteError(os_error_message(err, f"writing run {run_id}")) from err
    finally:
        if staging.exists():  # not committed: an interrupted or failed run leaves nothing half-written
            shutil.rmtree(staging, ignore_errors=True)
    if until != "evaluate":
        update_latest(Path(cfg.report.dir), run_dir)
    return results, run_dir


def _stage_run(cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, staging: Path, run_id: str,
               results: RunResults) -> RunResults:
    """Copy the run's caches and models into `staging` and write results.json there; paths in it are
    relative to the run folder, so the folder can be moved or archived whole."""
    from quantpipe.deps import probe_env

    staging.mkdir(parents=True)
    calib = staging / "calibration"
    summaries = [dataclasses.replace(s, cache_path=_publish(Path(s.cache_path), calib),
                                     json_path=_publish(Path(s.json_path), calib)) for s in results.calibration]
    if (ws.calibration / "histograms.npz").exists():
        _publish(ws.calibration / "histograms.npz", calib)
    variants, run_dir = [], staging.parent / run_id
    for v in results.variants:
        if v.ran and v.artifact and Path(v.artifact).resolve() != Path(li.spec.path).resolve():
            src = Path(v.artifact)
            for extra in model_files(src.parent, src.name)[1:]:  # external data beside a large model
                _publish(src.parent / extra, staging / "models")
            v = dataclasses.replace(v, artifact=_publish(src, staging / "models"))
        elif v.artifact:  # the user's model: where it is from the run folder, so that a moved project still reads
            v = dataclasses.replace(v, artifact=from_run(v.artifact, run_dir))
        variants.append(v)
    results = dataclasses.replace(
        results, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), environment=probe_env(),
        calibration=tuple(summaries), variants=tuple(variants),
        model=dataclasses.replace(results.model, path=from_run(results.model.path, run_dir)),
        config_path=from_run(results.config_path, run_dir) if results.config_path else None)
    atomic_write_json(staging / "results.json", to_jsonable(results))
    return results


def finish_run(
    cfg: PipelineConfig, results: RunResults, run_dir: Path, *, baseline_dir: Path | None = None, write: bool = True,
    shown_dir: Path | None = None,
) -> tuple[RunResults, Path]:
    """Judge the results with the gate rules and write the report files into `run_dir` (report and gate
    stages). Committing the run and pointing `latest` at it are the caller's (run_stages, rewrite_report)."""
    from quantpipe.collapse import find_collapse
    from quantpipe.gate import evaluate_gate
    from quantpipe.report import load_results, with_baseline, write_report
    from quantpipe.taskmetrics import only_all_output_readers

    baseline_dir = baseline_dir or cfg.report.baseline
    baseline = load_results(require_complete(baseline_dir)) if baseline_dir else None  # a half run is no baseline
    decision = evaluate_gate(results, cfg.gate.rules, baseline)
    collapsed = find_collapse(dataclasses.replace(results, gate=decision), cfg.evaluate.collapse,
                              hooks_budget=not only_all_output_readers(cfg.evaluate.hooks()))
    results = with_baseline(dataclasses.replace(results, gate=decision, collapse=collapsed), baseline)
    if write:
        write_report(run_dir, results, formats=cfg.report.formats, baseline=baseline, notes=_section_notes(cfg),
                     sensitivity_rows=cfg.evaluate.sensitivity.top,
                     shown_dir=shown_dir)
    return results, run_dir


def judge_run(cfg: PipelineConfig, run_dir: Path, *, baseline_dir: Path | None = None) -> RunResults:
    """`quantpipe gate --run`: judge a committed, complete run (an incomplete one is a DataError, exit 2)."""
    from quantpipe.report import load_results

    run = require_complete(run_dir)
    warn_if_other_pipeline(results := load_results(run), cfg.source)
    results, _ = finish_run(cfg, results, run, baseline_dir=baseline_dir, write=False)
    return results


def rewrite_report(cfg: PipelineConfig, run_dir: Path, *, baseline_dir: Path | None = None) -> RunResults:
    """`quantpipe report`: rewrite a committed run's report files in place, recorded as being rewritten
    until they all are (`gate --run` refuses it meanwhile), then complete again and `latest`."""
    from quantpipe.report import load_results

    run = require_complete(run_dir, allow_rewriting=True)
    results = load_results(run)
    try:
        mark_rewriting(run, "report")
        results, _ = finish_run(cfg, results, run, baseline_dir=baseline_dir, write=True)
        write_complete(run, "report")
    except OSError as err:
        raise WriteError(os_error_message(err, f"rewriting the report of {run}")) from err
    update_latest(Path(cfg.report.dir), run)
    return results


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


