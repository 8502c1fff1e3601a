"""The build stage: one variant per backend x precision (ONNX Runtime FP32 / FP16 / INT8 Q/DQ, TensorRT
engines), reused from the workspace while its inputs are unchanged; a backend this machine cannot run
becomes a skipped variant with the reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from quantpipe import __version__
from quantpipe.artifacts import CalibrationSummary, FallbackReport, Precision, Variant, from_jsonable, to_jsonable
from quantpipe.config import FALLBACK_METRICS, PipelineConfig, variant_name
from quantpipe.errors import MissingDependencyError
from quantpipe.evalconfig import TASK_SCORES
from quantpipe.execution import Executor
from quantpipe.externaldata import external_data_files
from quantpipe.fsutil import sha256_file
from quantpipe.inputs import LoadedInputs
from quantpipe.onnxgraph import load_onnx, model_size_bytes
from quantpipe.workspace import NullProgress, Progress, Workspace, earlier_file, relative_to, reusable, write_manifest

if TYPE_CHECKING:
    from quantpipe.quantize.options import QuantizeOptions

__all__ = ["calibration_skip_reason", "model_files", "quantize_options", "sha256_of_mapping", "stage_build"]

log = logging.getLogger(__name__)


def _size(path: Path) -> int:
    if path.is_file():
        return model_size_bytes(path) if path.suffix == ".onnx" else path.stat().st_size  # with external data
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: What the calibration data decided for the INT8 model (`quantize.decisions`), in the models folder.
DECISIONS_FILE = "model.int8.decisions.npz"


def calibration_skip_reason(cfg: PipelineConfig) -> str | None:
    """Why this run needs no calibration, or None when a variant built here uses quantpipe's INT8 scales: ONNX
    Runtime's INT8, ModelOpt's `int8-qpscales`, or TensorRT's INT8 where TensorRT can build it. A run without any
    calibrated and searched every range for nothing (minutes on a large model: `auto` ranges); `quantpipe
    calibrate` still writes the caches alone."""
    b = cfg.build.backends
    if b.onnxruntime.enabled and "int8" in b.onnxruntime.precisions:
        return None
    if b.modelopt.enabled and "int8-qpscales" in b.modelopt.variants:
        return None
    trt = b.tensorrt
    if trt.enabled and "int8" in trt.precisions:
        from quantpipe.backends.tensorrt.plan import variant_skip_reason

        reason = variant_skip_reason("int8", int8_mode=trt.int8_mode)
        if reason is None:
            return None
        # Not the reason itself: the build stage says it, once (a test counts it).
        return (f"{variant_name('tensorrt', 'int8')}, the only variant that would use its scales, cannot be built "
                f"here (the build stage says why); `quantpipe calibrate` writes the TensorRT caches alone")
    return "no variant of this pipeline is INT8 (build.backends.*.precisions)"


class Built(NamedTuple):
    """What the build stage hands on: the variants, the fallback's report, and the options the INT8 ONNX model was
    built with, what the calibration data decided filled in (`quantize.with_calibration_data`; read back from
    DECISIONS_FILE when the build is reused; None when no INT8 ONNX model was built): the sensitivity stage builds
    the same model's layers with them instead of measuring the per-channel statistics and the output bias again."""

    variants: list[Variant]
    fallback: FallbackReport | None
    int8_options: QuantizeOptions | None


def stage_build(
    cfg: PipelineConfig,
    ws: Workspace,
    li: LoadedInputs,
    amax: dict[str, float],
    calib_summaries: list[CalibrationSummary],
    progress: Progress,
    executor: Executor | None = None,
) -> Built:
    """Build every requested variant (or reuse it); unavailable backends become skipped variants.
    `executor`: the fallback's candidates run in shares on its workers (the same layers kept)."""
    b = cfg.build
    variants: list[Variant] = []
    fallback: FallbackReport | None = None
    int8_options: QuantizeOptions | None = None
    built: dict[str, Path] = {"fp32": Path(li.spec.path)}
    ort = b.backends.onnxruntime
    if ort.enabled:
        from quantpipe.backends.onnxruntime import resolve_device

        device, notice = resolve_device(ort.device)
        if notice:
            log.info("build: %s", notice)
        fp = _ort_fingerprint(cfg, li, amax)
        manifest = reusable(ws.models, fp, "build")
        if manifest is None:
            decided = _decisions_fingerprint(cfg, li, amax)
            built, fallback, int8_build, int8_options = _build_ort(cfg, ws, li, amax, progress, executor,
                                                                   _earlier_decisions(cfg, ws, decided))
            # Only what the build wrote, relative to the stage folder (the FP32 model is the user's, found
            # through pipeline.yaml each run): a moved or copied project reads its own files.
            paths = {k: relative_to(v, ws.models) for k, v in built.items() if k != "fp32"}
            files = [f for p in paths.values() for f in model_files(ws.models, p)]
            decisions = None
            if int8_options is not None:  # what the calibration data decided, for the sensitivity stage
                from quantpipe.quantize.decisions import save_decisions

                decisions = DECISIONS_FILE
                save_decisions(ws.models / decisions, int8_options)
                files.append(decisions)
            write_manifest(ws.models, fp, files,
                           {"paths": paths, "fallback": to_jsonable(fallback) if fallback else None,
                            "int8_build": int8_build, "decisions": decisions, "decisions_fingerprint": decided})
        else:
            built = {"fp32": Path(li.spec.path), **{k: ws.models / v for k, v in manifest["payload"]["paths"].items()}}
            fb = manifest["payload"].get("fallback")
            fallback = from_jsonable(FallbackReport, fb) if fb else None
            int8_build = manifest["payload"].get("int8_build")
            if manifest["payload"].get("decisions"):  # verified with the models (sha256 in the manifest)
                from quantpipe.quantize.decisions import load_decisions

                int8_options = load_decisions(ws.models / manifest["payload"]["decisions"], quantize_options(cfg))
        for precision in ("fp32", "fp16", "int8"):
            if precision in ort.precisions:
                path = built[precision]
                details = {"quantize": int8_build} if precision == "int8" and int8_build else \
                    {"compute": _compute_nodes(path)} if precision == "fp16" else {}
                variants.append(Variant(variant_name("onnxruntime", precision), "onnxruntime", precision, device,
                                        artifact=str(path), size_bytes=_size(path), details=details))
        _warn_if_fallback_outgrew_fp16(variants, fallback)
    trt = b.backends.tensorrt
    if trt.enabled:
        variants += _build_trt(cfg, ws, li, built, amax, calib_summaries, progress)
    if b.backends.modelopt.enabled:  # NVIDIA ModelOpt's INT8 / FP16 beside quantpipe's (out of process)
        from quantpipe.backends.modelopt.build import build_modelopt_variants

        mo_variants = build_modelopt_variants(cfg, ws, li, amax, progress)
        variants += mo_variants
        if trt.enabled:
            variants += _build_trt_modelopt(cfg, ws, li, mo_variants, progress)
    return Built(variants, fallback, int8_options)


def _ort_fingerprint(cfg: PipelineConfig, li: LoadedInputs, amax: dict[str, float]) -> dict[str, str]:
    """What the ONNX Runtime models depend on: a change in any of these builds them again."""
    b = cfg.build
    fp = {
        "model_sha256": li.spec.sha256,
        "scales": sha256_of_mapping(amax),
        "build": json.dumps(cfg.section_fingerprint("build"), sort_keys=True),
        # What the build chooses on (statistics, splits, GPTQ codes, the fallback). Never the evaluation
        # data: the gate judges it, and a change there re-runs only evaluate, report and gate.
        "calib_data": li.calib.fingerprint,
        "selection_data": li.selection.fingerprint if b.fallback is not None else "",
        "quantpipe": __version__,
    }
    if cfg.calibration.from_cache is not None:  # the cache's scales are kept exact: see quantize_options
        fp["from_cache"] = sha256_file(cfg.calibration.from_cache)  # its content: a moved project reuses its build
    if b.fallback is not None and b.fallback.metric in TASK_SCORES:
        # How the output is decoded / thresholded decides what the fallback keeps in float.
        # (The detection section only where it is the task: the other tasks' fingerprints stay as they were.)
        read = {"task", "ctc", "dense", "segmentation"} | ({"detection"} if cfg.evaluate.task == "detection" else set())
        fp["task"] = json.dumps(cfg.evaluate.model_dump(mode="json", include=read), sort_keys=True)
    if b.fallback is not None and cfg.evaluate.valid_mask is not None:  # which positions its budget reads
        fp["valid_mask"] = cfg.evaluate.valid_mask
    if b.fallback is not None and b.fallback.metric not in FALLBACK_METRICS:  # a hook's metric: its code decides
        from quantpipe.taskmetrics import hooks_sha256

        fp["hooks"] = hooks_sha256(cfg.evaluate.hooks())
    return fp


def _decisions_fingerprint(cfg: PipelineConfig, li: LoadedInputs, amax: dict[str, float]) -> dict[str, str]:
    """What the calibration data's decisions for the INT8 model (`with_calibration_data`: statistics, split and
    equalization choices, GPTQ codes, the output bias) depend on: not the fallback, nor the other variants."""
    return {"model_sha256": li.spec.sha256, "scales": sha256_of_mapping(amax), "calib_data": li.calib.fingerprint,
            "quantize": json.dumps(cfg.build.quantize.model_dump(mode="json"), sort_keys=True),
            "batch_size": str(cfg.data.batch_size), "from_cache": str(cfg.calibration.from_cache is not None),
            "quantpipe": __version__}


def _earlier_decisions(cfg: PipelineConfig, ws: Workspace, decided: dict[str, str]) -> QuantizeOptions | None:
    """The last build's decisions where only what they do not depend on changed (a new fallback budget re-ran the
    split choice and the output bias for nothing, ~250 s on a speech-quality model: found probing); verified by
    their sha256, else None."""
    from quantpipe.quantize.decisions import load_decisions

    path = earlier_file(ws.models, "decisions", decided)
    if path is None:
        return None
    options = load_decisions(path, quantize_options(cfg))
    if options is not None:
        log.info("build: the calibration data's decisions (statistics, splits, output bias) are those of the last "
                 "build, reused (%s verified): only what they do not depend on changed", path.name)
    return options


def _build_trt_modelopt(cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, mo_variants: list[Variant],
                        progress: Progress) -> list[Variant]:
    """`trt-modelopt-<variant>`: TensorRT engines of ModelOpt's ONNX models, as TensorRT 11 users build them (strongly
    typed: the precision is the model's own; on <= 10 the Q/DQ model with the INT8 flag, AutoCast's with FP16)."""
    from quantpipe.backends.tensorrt.plan import variant_skip_reason

    trt = cfg.build.backends.tensorrt
    out: list[Variant] = []
    todo: list[Variant] = []
    for v in mo_variants:
        reason = variant_skip_reason(v.precision, int8_mode="qdq") or v.skipped
        if reason is None:
            todo.append(v)
        else:
            out.append(Variant(variant_name("tensorrt", v.name), "tensorrt", v.precision, "cuda", skipped=reason))
    _log_skipped(out)
    if not todo:
        return out
    from quantpipe.backends.tensorrt.build import build_engine

    out_dir = ws.models / "tensorrt"
    with progress.task("building TensorRT engines of ModelOpt's models", len(todo)) as advance:
        for v in todo:
            source = Path(v.artifact or "")
            info = build_engine(source, out_dir / f"{v.name}.engine", precision=v.precision, profiles=_trt_profiles(cfg, li),
                                workspace_mib=trt.workspace_mib, timing_cache=trt.timing_cache or out_dir / "timing.cache",
                                source_sha256=sha256_file(source), int8_mode="qdq")
            out.append(Variant(variant_name("tensorrt", v.name), "tensorrt", v.precision, "cuda", artifact=info.path,
                               size_bytes=info.size_bytes, details=to_jsonable(info)))
            advance(1)
    return out


def model_files(folder: Path, name: str) -> list[str]:
    """An ONNX model's files relative to `folder`: the model, and the external-data files it names (quantpipe's
    writers put a large model's weights in `<name>.data` beside it)."""
    path = folder / name
    if path.suffix != ".onnx":
        return [name]
    return [name] + [f.relative_to(folder).as_posix() for f in external_data_files(load_onnx(path), path)]


def sha256_of_mapping(m: dict[str, float]) -> str:
    """Stable hash of a name -> float mapping (bit-exact floats)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(m):
        h.update(f"{k}={float(m[k]).hex()};".encode())
    return h.hexdigest()


def _int8_build_summary(rep: Any, asked: frozenset[str]) -> dict[str, Any]:
    """What the Q/DQ writer did, for the report: counts, and the names where they are few enough to read. A layer
    kept in float on request is said kept by `build.quantize.keep_float_nodes` (`asked`) or by the fallback."""
    from quantpipe.quantize.placement import KEPT_AS_ASKED, QUANTIZABLE_OPS

    def reason(f: Any) -> str:
        if f.reason != KEPT_AS_ASKED:
            return str(f.reason)
        return ("kept in float as asked (build.quantize.keep_float_nodes)" if f.name in asked
                else "kept in float by the accuracy fallback")

    return {
        "quantized": len(rep.quantized_nodes), "num_quantizable": rep.num_quantizable,
        "kept_float": [{"node": f.name, "op_type": f.op_type, "reason": reason(f)} for f in rep.kept_float
                       if f.op_type in QUANTIZABLE_OPS][:20],
        "kept_float_count": sum(1 for f in rep.kept_float if f.op_type in QUANTIZABLE_OPS),
        "per_channel": rep.per_channel, "opset_before": rep.opset_before, "opset_after": rep.opset_after,
        "shifted": len(rep.shifted_tensors), "bias_corrected": len(rep.bias_corrected),
        "smoothed": len(rep.smoothed_tensors), "gptq_rounded": len(rep.gptq_rounded), "warnings": list(rep.warnings),
        "split": [{"tensor": t, "pieces": k} for t, k in rep.split_tensors],
    }


def _compute_nodes(path: Path) -> dict[str, int]:
    """Compute nodes per precision of a written model, as `inspect` counts them: an FP16 model equal to FP32 on the
    CPU may still hold FP16 nodes, which onnxruntime's CPU ran in FP32 (`collapse`)."""
    from quantpipe.model import read_model_spec
    from quantpipe.modelinfo import describe_precision

    return dict(describe_precision(read_model_spec(path)[1]).totals)


def _warn_if_fallback_outgrew_fp16(variants: list[Variant], fallback: FallbackReport | None) -> None:
    """Warn where the layers the accuracy fallback kept in float made the INT8 file larger than the FP16 one: FP16 keeps
    every layer in float16 (a face-landmark model's fallback kept 12 layers, 73 % of its weights, and wrote 1.99 MB
    against FP16's 1.22 MB, still short of its budget; found probing)."""
    sizes = {v.precision: v.size_bytes for v in variants if v.backend == "onnxruntime"}
    int8, fp16 = sizes.get("int8"), sizes.get("fp16")
    if fallback is None or not fallback.steps or not int8 or not fp16 or int8 <= fp16:
        return
    log.warning("the INT8 model, with %d layer(s) kept in float by the accuracy fallback, is %.3g MB, larger than the "
                "FP16 model (%.3g MB): compare their accuracy and latency in the report before releasing INT8; a budget "
                "that needs this much float may be FP16's to meet.", len(fallback.steps), int8 / 1e6, fp16 / 1e6)


def _written_graph(path: Any, quantized: set[str], kept: int = 0) -> dict[str, Any]:
    """From the written INT8 model's graph (not its weights): `outputs_reached`, the graph outputs a quantized node
    reaches (what an INT8 variant whose judged output is FP32's can be judged on instead), and `weights`, the share
    of its weight values stored in int8 (warned about where it is under half)."""
    import onnx

    from quantpipe.modelinfo import mostly_float_warning, weight_share
    from quantpipe.onnxgraph import reaching

    m = onnx.load(str(path), load_external_data=False)
    share = weight_share(m)
    if (warning := mostly_float_warning(share, Path(path).name, kept)) is not None:
        log.warning("%s", warning)
    return {"outputs_reached": [o.name for o in m.graph.output if reaching(m, [o.name]) & quantized],
            "weights": {"int8": share.quantized, "float": share.in_float, "float_by_op": dict(share.float_by_op)}}


def _auto_ranges(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """`calibration.use: auto`'s summary (which method each tensor got and why) from the calibration stage."""
    import json

    path = ws.calibration / "auto_ranges.json"
    if cfg.calibration.use != "auto" or not path.is_file():
        return {}
    try:
        return {"ranges": json.loads(path.read_text(encoding="utf-8"))["summary"]}
    except (OSError, ValueError, KeyError):
        return {}


def quantize_options(cfg: PipelineConfig) -> Any:
    """`build.quantize` as QuantizeOptions; with `calibration.from_cache`, without the rewrites that would
    change a scale the cache fixes (`migrate.exact_scale_options`)."""
    from quantpipe.quantize import QuantizeOptions

    options = QuantizeOptions.from_config(cfg.build.quantize)
    if cfg.calibration.from_cache is not None:
        from quantpipe.migrate import exact_scale_options

        options, _ = exact_scale_options(options)
    return options


def _from_cache(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """`calibration.from_cache`'s record (what the cache gave, lacked, held for nothing) from the calibration stage."""
    from quantpipe.migrate import MIGRATION_FILE

    path = ws.calibration / MIGRATION_FILE
    if cfg.calibration.from_cache is None or not path.is_file():
        return {}
    try:
        return {"from_cache": json.loads(path.read_text(encoding="utf-8"))}
    except (OSError, ValueError):
        return {}


def _build_ort(
    cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, amax: dict[str, float], progress: Progress,
    executor: Executor | None = None, decided: QuantizeOptions | None = None,
) -> tuple[dict[str, Path], FallbackReport | None, dict[str, Any] | None, QuantizeOptions | None]:
    """The ONNX Runtime variants' models, the fallback's report, the INT8 build's summary and its filled options
    (`decided`: the calibration data's decisions of the last build, when they still hold)."""
    from quantpipe.quantize import quantize_model, with_calibration_data, write_fp16_model

    b = cfg.build
    ort = b.backends.onnxruntime
    ws.models.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {"fp32": Path(li.spec.path)}
    fallback = None
    int8_build = None
    options = None
    with progress.task("building ONNX Runtime variants", len(ort.precisions)) as advance:
        if "fp16" in ort.precisions:
            out = ws.models / "model.fp16.onnx"
            # amax: which activations overflow FP16 (measured on the calibration data where INT8 calibrated nothing)
            write_fp16_model(li.spec.path, out, b.fp16, amax=amax, calibration_data=li.calib,
                             batch_size=cfg.data.batch_size)
            built["fp16"] = out
            advance(1)
        if "int8" in ort.precisions:
            out = ws.models / "model.int8.onnx"
            # What the calibration data decides, once: the writer or the fallback, then the sensitivity stage.
            options = decided or with_calibration_data(load_onnx(li.spec.path), quantize_options(cfg), li.calib,
                                                       batch_size=cfg.data.batch_size, amax=amax, executor=executor)
            if b.fallback is not None:
                from quantpipe.fallback import accuracy_fallback
                from quantpipe.taskmetrics import TaskSpec

                fb = b.fallback
                target = fb.min if fb.min is not None else fb.max  # a hook's metric bounded by max: lower is better
                rep, fallback = accuracy_fallback(
                    li.spec.path, amax, li.selection, out_path=out, metric=fb.metric, target=float(target),  # type: ignore[arg-type]
                    keep_in=fb.keep_in, max_layers=fb.max_layers, max_evaluations=fb.max_evaluations,
                    output=li.output, batch_size=cfg.data.batch_size,
                    options=options, task=TaskSpec.from_config(cfg.evaluate), executor=executor,
                    output_axis=cfg.model.output_batch_axis, lower_is_better=fb.min is None,
                )
            else:
                rep = quantize_model(li.spec.path, amax, out, options)
            int8_build = {**_int8_build_summary(rep, frozenset(b.quantize.keep_float_nodes)),
                          "calibration_samples": li.calib.num_samples,
                          "equalized_depthwise": options.equalize_depthwise is True,
                          **_written_graph(out, {q.name for q in rep.quantized_nodes},
                                           len(fallback.steps) if fallback is not None else 0),
                          **_auto_ranges(cfg, ws), **_from_cache(cfg, ws)}
            built["int8"] = out
            advance(1)
        if "fp32" in ort.precisions:
            advance(1)
    return built, fallback, int8_build, options


def _trt_profiles(cfg: PipelineConfig, li: LoadedInputs) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes per input: pipeline.yaml's, else batch 1 .. the largest batch size used,
    with the other dynamic axes taken from the first calibration sample."""
    cap = li.calib.max_batch or max(cfg.data.batch_size, *cfg.evaluate.latency.batch_sizes)  # a fixed batch caps all
    sizes = [min(b, cap) for b in (cfg.data.batch_size, *cfg.evaluate.latency.batch_sizes)]
    opt = min(max(cfg.evaluate.latency.batch_sizes), cap)
    first = li.calib.first_batch(1).feeds
    out: dict[str, dict[str, list[int]]] = {}
    for info in li.inputs:
        spec = cfg.model.inputs.get(info.name)
        base = list(first[info.name].shape)
        axis = first.axes.get(info.name, 0)

        def with_batch(b: int, base: list[int] = base, axis: int = axis) -> list[int]:
            shape = list(base)
            shape[axis] = b
            return shape

        out[info.name] = {
            "min": list(spec.min_shape) if spec and spec.min_shape else with_batch(1),
            "opt": list(spec.opt_shape) if spec and spec.opt_shape else with_batch(opt),
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
    todo: list[tuple[Precision, str]] = []
    for precision in (p for p in ("fp32", "fp16", "int8") if p in trt.precisions):
        name = variant_name("tensorrt", precision)
        reason = variant_skip_reason(precision, int8_mode=trt.int8_mode)
        if reason is None:
            todo.append((precision, name))
            continue
        if trt.required:
            require_tensorrt("build.backends.tensorrt.required")  # MissingDependencyError (exit 3)
            raise MissingDependencyError(
                f"build.backends.tensorrt.required is true, but {name} cannot be built here: {reason}. "
                f"Run on a machine with an NVIDIA GPU and TensorRT (pip install 'quantpipe[tensorrt]'), "
                f"or set required: false to report TensorRT variants as skipped."
            )
        variants.append(Variant(name, "tensorrt", precision, "cuda", skipped=reason))
    _log_skipped(variants)
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
    if use == "best" or cfg.calibration.from_cache is not None:
        # The per-tensor choice has no calibration run of its own: give TensorRT a cache of exactly the
        # scales the Q/DQ model uses (read under the EntropyCalibration2 header, so TensorRT skips calibrating).
        from quantpipe.calibration.cache import write_trt_cache

        best_cache = write_trt_cache(out_dir / "best.cache", amax, method="best", trt_version=cfg.calibration.trt_version)
    with progress.task("building TensorRT engines", len(todo)) as advance:
        for precision, name in todo:
            plan = plan_build(precision, api, trt.int8_mode)
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
                source, out_dir / f"model.{precision}.engine", precision=precision, calibration=calibration,
                profiles=profiles, workspace_mib=trt.workspace_mib, timing_cache=timing_cache,
                source_sha256=sha256_file(source), int8_mode=trt.int8_mode,
            )
            variants.append(Variant(name, "tensorrt", precision, "cuda", artifact=info.path,
                                    size_bytes=info.size_bytes, details=to_jsonable(info)))
            advance(1)
    order = {n: i for i, n in enumerate(variant_name("tensorrt", p) for p in ("fp32", "fp16", "int8"))}
    return sorted(variants, key=lambda v: order[v.name])


def _log_skipped(variants: list[Variant]) -> None:
    """One info line per reason, naming every variant it skips: TensorRT not required (required: false) is a
    choice, not a problem, and the summary repeats the reason once beside the results."""
    by_reason: dict[str, list[str]] = {}
    for v in variants:
        by_reason.setdefault(v.skipped or "", []).append(v.name)
    for reason, names in by_reason.items():
        log.info("%s: skipped (%s)", ", ".join(names), reason)


def _onnx_for(
    kind: str, cfg: PipelineConfig, ws: Workspace, li: LoadedInputs, built: dict[str, Path], amax: dict[str, float]
) -> Path:
    """The ONNX model a TensorRT build parses: the FP32 original, the FP16 model or the Q/DQ model."""
    key = {"fp32": "fp32", "fp16": "fp16", "qdq": "int8"}[kind]
    if key not in built:
        only = cfg.model_copy(update={"build": cfg.build.model_copy(update={"backends": cfg.build.backends.model_copy(
            update={"onnxruntime": cfg.build.backends.onnxruntime.model_copy(update={"precisions": [key]})})})})
        extra, _, _, _ = _build_ort(only, ws, li, amax, NullProgress())
        built.update(extra)
    return built[key]
