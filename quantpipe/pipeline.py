"""Runs the stages in order: load -> calibrate -> build -> evaluate -> report -> gate.

Calibration and build artifacts live in a workspace (`<report.dir>/.work/<name>/`) that persists
between runs; each stage records the fingerprint of its inputs (model hash, data hash, its config
section, tool version) and re-runs only when that changed, logging what changed. Each run writes
its results into `<report.dir>/<run-id>/`, with the caches and models it used copied beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantpipe import __version__
from quantpipe.artifacts import (
    RESULTS_SCHEMA_VERSION,
    CalibrationSummary,
    EvalResult,
    FallbackReport,
    LayerSensitivity,
    ModelSpec,
    RunResults,
    TensorInfo,
    Variant,
    from_jsonable,
    to_jsonable,
)
from quantpipe.config import PipelineConfig, variant_name
from quantpipe.data import Dataset, check_disjoint, open_dataset
from quantpipe.errors import DataError, MissingDependencyError, QuantpipeError
from quantpipe.fsutil import atomic_write_json, sha256_file
from quantpipe.model import apply_input_overrides, load_model_spec

__all__ = ["Progress", "NullProgress", "Workspace", "LoadedInputs", "run_pipeline", "run_stages", "new_run_id"]

log = logging.getLogger(__name__)


class Progress(Protocol):
    """How stages report progress on long work (the CLI draws rich progress bars)."""

    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """Context manager yielding `advance(n)`."""
        ...


class NullProgress:
    """Progress that shows nothing (library use, tests)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


def new_run_id() -> str:
    """A sortable UTC timestamp, e.g. 20261121-142501."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


@dataclasses.dataclass(frozen=True)
class LoadedInputs:
    """The load stage's output: the model spec and the validated data sets."""

    spec: ModelSpec
    inputs: tuple[TensorInfo, ...]
    output: str
    calib: Dataset
    eval: Dataset


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Where a pipeline keeps reusable stage artifacts."""

    root: Path

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @classmethod
    def for_config(cls, cfg: PipelineConfig) -> Workspace:
        return cls(Path(cfg.report.dir) / ".work" / cfg.name)


# --------------------------------------------------------------------------- fingerprints


def _stage_manifest(folder: Path) -> Path:
    return folder / "stage.json"


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changed.append(key)
    return changed


def _reusable(folder: Path, fingerprint: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The stored manifest when the stage's inputs did not change (and its files exist), else None."""
    path = _stage_manifest(folder)
    if not path.is_file():
        log.info("%s: running (no earlier result in %s)", stage, folder)
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.info("%s: running (earlier manifest unreadable)", stage)
        return None
    changed = _fingerprint_diff(manifest.get("fingerprint", {}), fingerprint)
    if changed:
        log.info("%s: re-running because %s changed", stage, ", ".join(changed))
        return None
    missing = [f for f in manifest.get("files", []) if not (folder / f).exists()]
    if missing:
        log.info("%s: re-running because %s is missing", stage, ", ".join(missing))
        return None
    log.info("%s: inputs unchanged, reusing %s", stage, folder)
    return manifest


def _write_manifest(folder: Path, fingerprint: dict[str, Any], files: list[str], payload: Any) -> None:
    atomic_write_json(_stage_manifest(folder), {"fingerprint": fingerprint, "files": files, "payload": payload})


# --------------------------------------------------------------------------- stages


def load_inputs(cfg: PipelineConfig) -> LoadedInputs:
    """Load and check the model and both data sets (exit 2 on any mismatch)."""
    spec, _ = load_model_spec(cfg.model.path)
    inputs = apply_input_overrides(spec.inputs, cfg.model.inputs)
    out_names = [o.name for o in spec.outputs]
    output = cfg.model.output or out_names[0]
    if output not in out_names:
        raise DataError(f"pipeline.yaml model.output is '{output}', but the model's outputs are {out_names}.")
    d = cfg.data
    calib = open_dataset(d.calibration.path, inputs, max_samples=d.calibration.max_samples, role="calibration")
    ev = open_dataset(d.evaluation.path, inputs, labels_key=d.evaluation.labels, max_samples=d.evaluation.max_samples, role="evaluation")
    overlap = check_disjoint(calib, ev)
    if overlap:
        log.warning(
            "%d evaluation sample(s) also appear in the calibration data; accuracy on them is optimistic. "
            "Use disjoint splits.", overlap
        )
    return LoadedInputs(spec, inputs, output, calib, ev)


def stage_calibrate(
    cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, progress: Progress
) -> tuple[list[CalibrationSummary], dict[str, float]]:
    """Calibrate (or reuse) with every configured method; return summaries and the scales to build with."""
    from quantpipe.calibration import calibrate, select_amax

    c = cfg.calibration
    fp = {
        "model_sha256": li.spec.sha256,
        "data": li.calib.fingerprint,
        "calibration": json.dumps(cfg.section_fingerprint("calibration"), sort_keys=True),
        "device": c.device,
        "quantpipe": __version__,
    }
    manifest = _reusable(ws.calibration, fp, "calibrate")
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
        files = [Path(s.cache_path).name for s in summaries] + [Path(s.json_path).name for s in summaries]
        _write_manifest(ws.calibration, fp, files, [to_jsonable(s) for s in summaries])
    else:
        summaries = [from_jsonable(CalibrationSummary, s) for s in manifest["payload"]]
    amax = select_amax(ws.calibration, c.use, summaries)
    return summaries, amax


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_build(
    cfg: PipelineConfig,
    ws: Workspace,
    li: LoadedInputs,
    amax: dict[str, float],
    calib_summaries: list[CalibrationSummary],
    progress: Progress,
) -> tuple[list[Variant], FallbackReport | None]:
    """Build every requested variant (or reuse it); unavailable backends become skipped variants."""
    b = cfg.build
    variants: list[Variant] = []
    fallback: FallbackReport | None = None
    built: dict[str, Path] = {"fp32": Path(li.spec.path)}
    ort = b.backends.onnxruntime
    if ort.enabled:
        from quantpipe.backends.onnxruntime import resolve_device

        device, notice = resolve_device(ort.device)
        if notice:
            log.info("build: %s", notice)
        amax_fp = sha256_of_mapping(amax)
        fp = {
            "model_sha256": li.spec.sha256,
            "scales": amax_fp,
            "build": json.dumps(cfg.section_fingerprint("build"), sort_keys=True),
            "eval_data": li.eval.fingerprint if b.fallback is not None else "",
            "quantpipe": __version__,
        }
        manifest = _reusable(ws.models, fp, "build")
        if manifest is None:
            built, fallback, int8_build = _build_ort(cfg, ws, li, amax, progress)
            files = [Path(p).name for p in built.values() if Path(p).parent == ws.models]
            _write_manifest(ws.models, fp, files, {"paths": {k: str(v) for k, v in built.items()},
                                                   "fallback": to_jsonable(fallback) if fallback else None,
                                                   "int8_build": int8_build})
        else:
            built = {k: Path(v) for k, v in manifest["payload"]["paths"].items()}
            fb = manifest["payload"].get("fallback")
            fallback = from_jsonable(FallbackReport, fb) if fb else None
            int8_build = manifest["payload"].get("int8_build")
        for precision in ("fp32", "fp16", "int8"):
            if precision in ort.precisions:
                path = built[precision]
                details = {"quantize": int8_build} if precision == "int8" and int8_build else {}
                variants.append(Variant(variant_name("onnxruntime", precision), "onnxruntime", precision, device,  # type: ignore[arg-type]
                                        artifact=str(path), size_bytes=_size(path), details=details))
    trt = b.backends.tensorrt
    if trt.enabled:
        variants += _build_trt(cfg, ws, li, built, amax, calib_summaries, progress)
    return variants, fallback


def sha256_of_mapping(m: dict[str, float]) -> str:
    """Stable hash of a name -> float mapping (bit-exact floats)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(m):
        h.update(f"{k}={float(m[k]).hex()};".encode())
    return h.hexdigest()


def _int8_build_summary(rep: Any) -> dict[str, Any]:
    """What the Q/DQ writer did, for the report: counts, and the names where they are few enough to read."""
    return {
        "quantized": len(rep.quantized_nodes), "num_quantizable": rep.num_quantizable,
        "kept_float": [{"node": f.name, "op_type": f.op_type, "reason": f.reason} for f in rep.kept_float
                       if f.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")][:20],
        "per_channel": rep.per_channel, "opset_before": rep.opset_before, "opset_after": rep.opset_after,
        "shifted": len(rep.shifted_tensors), "bias_corrected": len(rep.bias_corrected),
        "smoothed": len(rep.smoothed_tensors), "gptq_rounded": len(rep.gptq_rounded), "warnings": list(rep.warnings),
        "split": [{"tensor": t, "pieces": k} for t, k in rep.split_tensors],
    }


def _build_ort(
    cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, amax: dict[str, float], progress: Progress
) -> tuple[dict[str, Path], FallbackReport | None, dict[str, Any] | None]:
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize import QuantizeOptions, quantize_model, with_calibration_data, write_fp16_model

    b = cfg.build
    ort = b.backends.onnxruntime
    ws.models.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {"fp32": Path(li.spec.path)}
    fallback = None
    int8_build = None
    q = b.quantize
    with progress.task("building ONNX Runtime variants", len(ort.precisions)) as advance:
        if "fp16" in ort.precisions:
            out = ws.models / "model.fp16.onnx"
            write_fp16_model(li.spec.path, out, b.fp16)
            built["fp16"] = out
            advance(1)
        if "int8" in ort.precisions:
            out = ws.models / "model.int8.onnx"
            if b.fallback is not None:
                from quantpipe.fallback import accuracy_fallback

                fb = b.fallback
                target = fb.min if fb.metric != "top1_drop" else fb.max
                rep, fallback = accuracy_fallback(
                    li.spec.path, amax, li.eval, out_path=out, metric=fb.metric, target=float(target),  # type: ignore[arg-type]
                    keep_in=fb.keep_in, max_layers=fb.max_layers, output=li.output, batch_size=cfg.data.batch_size,
                    options=QuantizeOptions.from_config(q), calibration_data=li.calib,
                )
            else:
                options = with_calibration_data(load_onnx(li.spec.path), QuantizeOptions.from_config(q), li.calib,
                                                batch_size=cfg.data.batch_size, amax=amax)
                rep = quantize_model(li.spec.path, amax, out, options)
            int8_build = _int8_build_summary(rep)
            built["int8"] = out
            advance(1)
        if "fp32" in ort.precisions:
            advance(1)
    return built, fallback, int8_build


def _trt_profiles(cfg: PipelineConfig, li: LoadedInputs) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes per input: pipeline.yaml's, else batch 1 .. the largest batch size used,
    with the other dynamic axes taken from the first calibration sample."""
    sizes = [cfg.data.batch_size, *cfg.evaluate.latency.batch_sizes]
    first = li.calib.first_batch(1).feeds
    axis = cfg.model.batch_axis
    out: dict[str, dict[str, list[int]]] = {}
    for info in li.inputs:
        spec = cfg.model.inputs.get(info.name)
        base = list(first[info.name].shape)

        def with_batch(b: int, base: list[int] = base) -> list[int]:
            shape = list(base)
            shape[axis] = b
            return shape

        out[info.name] = {
            "min": list(spec.min_shape) if spec and spec.min_shape else with_batch(1),
            "opt": list(spec.opt_shape) if spec and spec.opt_shape else with_batch(max(cfg.evaluate.latency.batch_sizes)),
            "max": list(spec.max_shape) if spec and spec.max_shape else with_batch(max(sizes)),
        }
    return out


def _build_trt(
    cfg: PipelineConfig,
    ws: Workspace,
    li: LoadedInputs,
    onnx_models: dict[str, Path],
    amax: dict[str, float],
    calib_summaries: list[CalibrationSummary],
    progress: Progress,
) -> list[Variant]:
    """TensorRT engines; each precision this machine cannot build becomes a skipped variant with the reason."""
    from quantpipe.backends.tensorrt.build import build_engine
    from quantpipe.backends.tensorrt.calibrator import CalibrationInput
    from quantpipe.backends.tensorrt.plan import plan_build, variant_skip_reason
    from quantpipe.backends.tensorrt.version import require_tensorrt

    trt = cfg.build.backends.tensorrt
    variants: list[Variant] = []
    todo: list[tuple[str, str]] = []
    for precision in (p for p in ("fp32", "fp16", "int8") if p in trt.precisions):
        name = variant_name("tensorrt", precision)
        reason = variant_skip_reason(precision, int8_mode=trt.int8_mode)  # type: ignore[arg-type]
        if reason is None:
            todo.append((precision, name))
            continue
        if trt.required:
            require_tensorrt()  # raises MissingDependencyError (exit 3) with the pip command
            raise MissingDependencyError(
                f"build.backends.tensorrt.required is true, but {name} cannot be built here: {reason}. "
                f"Run on a machine with an NVIDIA GPU and TensorRT (pip install 'quantpipe[tensorrt]'), "
                f"or set required: false to report TensorRT variants as skipped."
            )
        log.warning("%s: skipped (%s)", name, reason)
        variants.append(Variant(name, "tensorrt", precision, "cuda", skipped=reason))  # type: ignore[arg-type]
    if not todo:
        return variants
    api = require_tensorrt()
    out_dir = ws.models / "tensorrt"
    profiles = _trt_profiles(cfg, li)
    timing_cache = trt.timing_cache or out_dir / "timing.cache"
    use = cfg.calibration.use
    method = "minmax" if use == "minmax" else "entropy"
    summary = next((s for s in calib_summaries if s.method == use), None)
    best_cache: Path | None = None
    if use == "best":
        # The per-tensor choice has no calibration run of its own: give TensorRT a cache of exactly the
        # scales the Q/DQ model uses (read under the EntropyCalibration2 header, so TensorRT skips calibrating).
        from quantpipe.calibration.cache import write_trt_cache

        best_cache = write_trt_cache(out_dir / "best.cache", amax, method="best", trt_version=cfg.calibration.trt_version)
    with progress.task("building TensorRT engines", len(todo)) as advance:
        for precision, name in todo:
            plan = plan_build(precision, api, trt.int8_mode)  # type: ignore[arg-type]
            source = _onnx_for(plan.source, cfg, ws, li, onnx_models, amax)
            calibration = None
            if plan.calibrator and best_cache is not None:
                calibration = CalibrationInput(method="entropy", cache_path=best_cache, dataset=li.calib,
                                               batch_size=cfg.data.batch_size, write_cache=False)
            elif plan.calibrator and summary is not None:
                calibration = CalibrationInput(
                    method=method, cache_path=Path(summary.cache_path), dataset=li.calib,  # type: ignore[arg-type]
                    batch_size=cfg.data.batch_size, fingerprint=dict(summary.fingerprint),
                )
            info = build_engine(
                source, out_dir / f"model.{precision}.engine", precision=precision, calibration=calibration,  # type: ignore[arg-type]
                profiles=profiles, workspace_mib=trt.workspace_mib, timing_cache=timing_cache,
                source_sha256=sha256_file(source), int8_mode=trt.int8_mode,
            )
            variants.append(Variant(name, "tensorrt", precision, "cuda", artifact=info.path,  # type: ignore[arg-type]
                                    size_bytes=info.size_bytes, details=to_jsonable(info)))
            advance(1)
    order = {n: i for i, n in enumerate(variant_name("tensorrt", p) for p in ("fp32", "fp16", "int8"))}
    return sorted(variants, key=lambda v: order[v.name])


def _onnx_for(
    kind: str, cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, built: dict[str, Path], amax: dict[str, float]
) -> Path:
    """The ONNX model a TensorRT build parses: the FP32 original, the FP16 model or the Q/DQ model."""
    key = {"fp32": "fp32", "fp16": "fp16", "qdq": "int8"}[kind]
    if key not in built:
        only = cfg.model_copy(update={"build": cfg.build.model_copy(update={"backends": cfg.build.backends.model_copy(
            update={"onnxruntime": cfg.build.backends.onnxruntime.model_copy(update={"precisions": [key]})})})})
        extra, _, _ = _build_ort(only, ws, li, amax, NullProgress())
        built.update(extra)
    return built[key]


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


