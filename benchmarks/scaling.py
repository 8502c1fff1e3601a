"""Scaling of the execution layer (issue 18): stage wall time against workers, engine local and Ray.

    python benchmarks/scaling.py --bench /work/main/.bench --workers 1 2 4 8 16 --engines local ray \\
        --out scaling.json --markdown scaling.md
    python benchmarks/scaling.py --models effnet_lite0 --workers 1 2 --engines local   # a quick look

Models: EfficientNet-Lite0 from the open benchmark set (`--bench`, its 63 calibration / evaluation images) and
a ResNet-50-shaped model with random weights built with onnx.helper (benchmarks/resnet50_onnx.py; built once
into `--work`, `--resnet-images` calibration images, 512 by default, half as many for evaluation).

Stages, each timed around the call a pipeline run makes:
- `calibrate`: `quantpipe.calibration.calibrate` with entropy and minmax (histograms, caches and JSON written);
- `evaluate`: the outputs of the ONNX Runtime FP32 and FP16 variants on the evaluation images
  (`evaluate.sharded_outputs`; with 1 worker `run_outputs` in this process, what `workers: 1` runs);
- `sensitivity`: `layer_sensitivity` as the pipeline's stage calls it (evaluation images, `max_samples` 64, every
  layer one at a time, output SQNR), its candidates in shares on the workers;
- `fallback`: `accuracy_fallback` with `build.fallback: {metric: top1_agreement, min: 0.99}` (EfficientNet-Lite0)
  on the calibration images (`--search-samples` of them, all by default), its ranking and each step's trials on
  the workers. The ResNet-50 shape has random weights, so its INT8 top-1 agrees already: it gets `cosine >= 0.9999`
  (`FALLBACK_BUDGET`), and `--max-evaluations` bounds the search (the same bounded search at every worker count,
  so the times compare).
The searches use the `best` scales and pipeline.yaml's quantize defaults, with the per-channel statistics and the
split choice filled in once beforehand (untimed), as the pipeline's build stage hands them over.

Every case is written to `--out` as soon as it is measured (a run cut short keeps its rows); `--baseline-json`
takes the 1-worker rows (times and result digests) from an earlier `--out` of the same machine, so the cases can
run in several calls.

Per (model, engine, workers) one executor serves every stage: for calibrate and evaluate twice over, `cold`
including starting the workers (what a run pays once), `warm` reusing them (what each further stage pays); the
searches run once, `warm` (the workers already started). A local Ray instance is started once per benchmark,
before any timing (its start time is recorded apart). Workers 1 is `workers: 1` (this process, no pool;
onnxruntime on every core) for both engines. Executors get `execution.min_shard_mb` (`--min-shard-mb`; default
pipeline.yaml's), so a stage whose work is too small for N workers uses fewer, as a pipeline run does: say so
when a speed-up stalls (0 measures pure scaling). Every stage's result is checked equal to the 1-worker run's:
cache bytes, output arrays, the sensitivity table (every number) and the fallback's steps and model bytes.

Scaling efficiency = t(1 worker) / (t(N workers) x N). The JSON and the table record the machine (CPU model,
cores) and the load average before and after each case; say in RESULTS.md whether the machine was shared. The
searches' shares carry only their candidates: the model, scales and samples go to each worker once
(`executor.stash`), and a step with fewer candidates than workers is cut into sample slices (`candidates.split`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

MODELS = ("effnet_lite0", "resnet50")
STAGES = ("calibrate", "evaluate", "sensitivity", "fallback")
SEARCH_STAGES = ("sensitivity", "fallback")
#: The fallback's budget per model. The ResNet-50 shape has random weights: its INT8 top-1 already agrees with FP32
#: (every image lands in one class), so it gets a cosine budget INT8 does not meet, and the search does real work
#: (bounded by --max-evaluations, the same search at every worker count).
FALLBACK_BUDGET = {"effnet_lite0": ("top1_agreement", 0.99), "resnet50": ("cosine", 0.9999)}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from quantpipe.execution import usable_cores, visible_gpus

    return {"cpu": cpu, "cores": usable_cores(), "gpus": visible_gpus(), "python": platform.python_version(),
            "platform": platform.platform(), "host": platform.node()}


def model_files(name: str, bench: Path, work: Path, resnet_images: int) -> tuple[Path, Path, Path]:
    """(model, calibration data, evaluation data) of a benchmark model (the ResNet-50 shape built once)."""
    if name == "effnet_lite0":
        d = bench / "effnet_lite0"
        return d / "model.onnx", d / "calib.npz", d / "eval.npz"
    from benchmarks.resnet50_onnx import build_images, build_model

    d = work / f"resnet50-{resnet_images}"
    if not (d / "eval.npz").is_file():
        d.mkdir(parents=True, exist_ok=True)
        build_model(d / "model.onnx")
        build_images(d / "calib.npz", resnet_images, seed=1)
        build_images(d / "eval.npz", max(1, resnet_images // 2), seed=2)
    return d / "model.onnx", d / "calib.npz", d / "eval.npz"


def variants(model: Path, work: Path) -> list[Any]:
    from quantpipe.artifacts import Variant
    from quantpipe.quantize import write_fp16_model

    fp16 = work / f"{model.parent.name}.fp16.onnx"
    if not fp16.is_file():
        write_fp16_model(model, fp16)
    return [Variant("ort-fp32", "onnxruntime", "fp32", "cpu", artifact=str(model)),
            Variant("ort-fp16", "onnxruntime", "fp16", "cpu", artifact=str(fp16))]


def run_calibrate(executor: Any, model: Path, calib: Any, batch_size: int) -> tuple[float, str]:
    from quantpipe.calibration import calibrate

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        calibrate(model, calib, methods=["entropy", "minmax"], out_dir=out, batch_size=batch_size, executor=executor)
        seconds = time.perf_counter() - t0
        digest = hashlib.sha256(b"".join((Path(out) / f).read_bytes()
                                         for f in ("entropy.cache", "minmax.cache", "histograms.npz"))).hexdigest()
    return seconds, digest


def run_evaluate(executor: Any, vs: list[Any], data: Any, output: str, batch_size: int) -> tuple[float, str]:
    import numpy as np

    from quantpipe.evaluate import open_runner, run_outputs, sharded_outputs

    t0 = time.perf_counter()
    if executor.workers == 1:
        outs = {}
        for v in vs:
            with open_runner(v, None) as runner:
                outs[v.name] = run_outputs(runner, data, output, batch_size)
    else:
        outs = sharded_outputs(executor, vs, data, output=output, batch_size=batch_size,
                               threads=executor.threads_per_worker)
    seconds = time.perf_counter() - t0
    arrays = {n: o if isinstance(o, np.ndarray) else o.judged for n, o in outs.items()}
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(arrays[v.name]).tobytes() for v in vs)).hexdigest()
    return seconds, digest


def search_setup(model: Path, calib: Any, batch_size: int) -> dict[str, Any]:
    """What the searches start from, computed once in this process (untimed): the `best` scales and pipeline.yaml's
    quantize defaults with the per-channel statistics and the split choice filled in."""
    from quantpipe.calibration import calibrate, select_amax
    from quantpipe.config import BuildConfig
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize import QuantizeOptions, with_calibration_data

    with tempfile.TemporaryDirectory() as out:
        summaries = calibrate(model, calib, methods=["entropy", "minmax", "percentile", "mse"], out_dir=out,
                              batch_size=batch_size)
        amax = select_amax(out, "best", summaries)
    options = with_calibration_data(load_onnx(model), QuantizeOptions.from_config(BuildConfig().quantize), calib,
                                    batch_size=batch_size, amax=amax)
    return {"amax": amax, "options": options}


def run_sensitivity(executor: Any, model: Path, data: Any, setup: dict[str, Any], batch_size: int) -> tuple[float, str]:
    from quantpipe.artifacts import to_jsonable
    from quantpipe.sensitivity import layer_sensitivity

    t0 = time.perf_counter()
    rows = layer_sensitivity(model, None, setup["amax"], data, max_samples=64, batch_size=batch_size,
                             options=setup["options"], executor=executor)
    seconds = time.perf_counter() - t0
    doc = [{k: (v.hex() if isinstance(v, float) else v) for k, v in to_jsonable(r).items()} for r in rows]
    return seconds, hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def run_fallback(executor: Any, model: Path, calib: Any, setup: dict[str, Any], args: argparse.Namespace
                 ) -> tuple[float, str]:
    from quantpipe.artifacts import to_jsonable
    from quantpipe.fallback import accuracy_fallback

    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "model.int8.onnx"
        t0 = time.perf_counter()
        metric, target = FALLBACK_BUDGET[model.parent.name.split("-")[0]]
        _, fb = accuracy_fallback(model, setup["amax"], calib, metric=metric, target=target, out_path=path,
                                  batch_size=args.batch_size, max_samples=args.search_samples,
                                  max_evaluations=args.max_evaluations, options=setup["options"], executor=executor)
        seconds = time.perf_counter() - t0
        print(f"  fallback: {len(fb.steps)} layer(s) kept, {fb.metric} {fb.initial:.4f} -> {fb.final:.4f}, "
              f"met={fb.met}", flush=True)
        digest = hashlib.sha256(json.dumps(to_jsonable(fb), sort_keys=True).encode() + path.read_bytes()).hexdigest()
    return seconds, digest


def make(engine: str, workers: int, min_shard_mb: float | None) -> Any:
    from quantpipe.config import ExecutionConfig
    from quantpipe.execution import InProcess, make_executor

    if workers == 1:
        return InProcess()
    extra = {} if min_shard_mb is None else {"min_shard_mb": min_shard_mb}
    return make_executor(ExecutionConfig(engine=engine, workers=workers, **extra))


def run_stage(stage: str, executor: Any, ctx: dict[str, Any], args: argparse.Namespace) -> tuple[float, str]:
    if stage == "calibrate":
        return run_calibrate(executor, ctx["model"], ctx["calib"], args.batch_size)
    if stage == "evaluate":
        return run_evaluate(executor, ctx["variants"], ctx["data"], ctx["output"], args.batch_size)
    if stage == "sensitivity":
        return run_sensitivity(executor, ctx["model"], ctx["data"], ctx["setup"], args.batch_size)
    return run_fallback(executor, ctx["model"], ctx["calib"], ctx["setup"], args)


def bench_model(name: str, args: argparse.Namespace, results: list[dict[str, Any]], save: Any) -> None:
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    model, calib_path, eval_path = model_files(name, args.bench, args.work, args.resnet_images)
    spec, _ = load_model_spec(model)
    calib = open_dataset(calib_path, spec.inputs)
    data = open_dataset(eval_path, spec.inputs, role="evaluation")
    ctx = {"model": model, "calib": calib, "data": data, "output": spec.outputs[0].name,
           "variants": variants(model, args.work) if "evaluate" in args.stages else [],
           "setup": search_setup(model, calib, args.batch_size) if set(SEARCH_STAGES) & set(args.stages) else {}}
    reference: dict[str, str] = {}
    for row in args.baseline_rows:
        if row["model"] == name and row["workers"] == 1:
            reference.update({s: row[f"{s}_digest"] for s in args.stages if f"{s}_digest" in row})
            results.append(row)
    for engine in args.engines:
        for workers in args.workers:
            if workers == 1 and (engine != args.engines[0] or any(r["model"] == name and r["workers"] == 1
                                                                 for r in results)):
                continue  # workers: 1 is this process whatever the engine (or taken from --baseline-json)
            executor = make(engine, workers, args.min_shard_mb)
            row: dict[str, Any] = {"model": name, "engine": engine if workers > 1 else "in-process",
                                   "workers": workers, "calib_samples": calib.num_samples,
                                   "eval_samples": data.num_samples, "load_before": os.getloadavg()}
            results.append(row)
            try:
                if workers > 1:  # the searches are timed warm: start the workers first
                    executor.map(abs, list(range(workers)))
                for stage in args.stages:
                    for when in (("warm",) if stage in SEARCH_STAGES else ("cold", "warm")):
                        seconds, digest = run_stage(stage, executor, ctx, args)
                        row[f"{stage}_{when}_s"] = round(seconds, 3)
                        row[f"{stage}_digest"] = digest
                        same = reference.setdefault(stage, digest) == digest
                        row[f"{stage}_identical"] = row.get(f"{stage}_identical", True) and same
                        print(f"{name:13s} {row['engine']:10s} workers={workers:<3d} {stage:9s} {when}: {seconds:8.2f} s"
                              f"{'' if same else '  RESULT DIFFERS FROM 1 WORKER'}", flush=True)
                        row["load_after"] = os.getloadavg()
                        save()
            finally:
                executor.close()


def efficiency(results: list[dict[str, Any]]) -> None:
    """Speed-up and scaling efficiency of each row against the same model's 1-worker row (warm times)."""
    for row in results:
        base = next((r for r in results if r["model"] == row["model"] and r["workers"] == 1), None)
        for stage in STAGES:
            key = f"{stage}_warm_s"
            if base is None or key not in row or key not in base or not row[key]:
                continue
            speedup = base[key] / row[key]
            row[f"{stage}_speedup"] = round(speedup, 3)
            row[f"{stage}_efficiency"] = round(speedup / row["workers"], 3)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Measured {doc['date']} on {m['host']}: {m['cpu']}, {m['cores']} usable cores, GPUs {m['gpus'] or 'none'}, "
             f"Python {m['python']}. {doc['note']}".rstrip(), "",
             "| model | stage | engine | workers | cold s | warm s | speed-up (warm) | efficiency | same result as 1 worker "
             "| load avg (1 min) before -> after the case |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in doc["results"]:
        for stage in STAGES:
            if f"{stage}_warm_s" not in row:
                continue
            lines.append(
                f"| {row['model']} | {stage} | {row['engine']} | {row['workers']} | "
                f"{format(row[f'{stage}_cold_s'], '.2f') if f'{stage}_cold_s' in row else '-'} | "
                f"{row[f'{stage}_warm_s']:.2f} | {row.get(f'{stage}_speedup', float('nan')):.2f}x | "
                f"{row.get(f'{stage}_efficiency', float('nan')):.0%} | "
                f"{'yes' if row[f'{stage}_identical'] else 'NO'} | "
                f"{row['load_before'][0]:.1f} -> {row.get('load_after', (float('nan'),))[0]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, default=ROOT / ".bench", help="the open benchmark set (manifest.json)")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "scaling", help="where the ResNet-50 shape is built")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    ap.add_argument("--resnet-images", type=int, default=512, help="ResNet-50 calibration images (>= 500 for the issue)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--search-samples", type=int, default=None,
                    help="calibration images the fallback chooses on (default: all, as the pipeline does)")
    ap.add_argument("--max-evaluations", type=int, default=400,
                    help="bound on the fallback's model evaluations (accuracy_fallback's max_evaluations)")
    ap.add_argument("--min-shard-mb", type=float, default=None,
                    help="execution.min_shard_mb for the executors (default: pipeline.yaml's; 0: always every worker)")
    ap.add_argument("--note", default="", help="what else ran on the machine (say 'shared' when it was)")
    ap.add_argument("--out", type=Path, default=Path("scaling.json"))
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--baseline-json", type=Path,
                    help="an earlier --out of the same machine: its 1-worker rows are the baseline (times and result "
                         "digests), so a long benchmark can run in several calls")
    args = ap.parse_args()
    args.baseline_rows = json.loads(args.baseline_json.read_text())["results"] if args.baseline_json else []
    if 1 not in args.workers and not args.baseline_rows:
        args.workers = [1, *args.workers]  # the baseline every speed-up is measured against
    args.workers = sorted(set(args.workers))
    args.work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine(), "note": args.note, "args": {k: str(v) for k, v in vars(args).items()}}
    if "ray" in args.engines:
        from quantpipe.execution.ray_engine import LOOPBACK_ENV

        os.environ.setdefault(LOOPBACK_ENV, "0")
        import ray

        t0 = time.perf_counter()
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
        doc["ray_start_s"] = round(time.perf_counter() - t0, 2)
        doc["ray_version"] = ray.__version__
    results: list[dict[str, Any]] = []

    def save() -> None:  # after every case: a run cut short keeps what it measured
        efficiency(results)
        doc["results"] = results
        args.out.write_text(json.dumps(doc, indent=1))
        if args.markdown:
            args.markdown.write_text(markdown(doc))

    for name in args.models:
        bench_model(name, args, results, save)
    save()
    print(markdown(doc))


if __name__ == "__main__":
    main()
