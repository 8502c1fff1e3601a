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
  (`evaluate.sharded_outputs`; with 1 worker `run_outputs` in this process, what `workers: 1` runs).
Sensitivity and fallback still run in one process (their parallel search is not built yet): not measured.

Per (model, engine, workers) one executor serves every stage, twice over: `cold` includes starting the workers
(what a run pays once), `warm` reuses them (what each further stage pays). A local Ray instance is started once
per benchmark, before any timing (its start time is recorded apart). Workers 1 is `workers: 1` (this process,
no pool; onnxruntime on every core) for both engines. The calibration results are checked equal (cache bytes)
to the 1-worker run in every case, and the evaluation outputs too.

Scaling efficiency = t(1 worker) / (t(N workers) x N). The JSON records the machine (CPU model, cores, load
average before and after each case); say in RESULTS.md whether the machine was shared.
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
STAGES = ("calibrate", "evaluate")


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
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(outs[v.name]).tobytes() for v in vs)).hexdigest()
    return seconds, digest


def make(engine: str, workers: int) -> Any:
    from quantpipe.config import ExecutionConfig
    from quantpipe.execution import InProcess, make_executor

    if workers == 1:
        return InProcess()
    return make_executor(ExecutionConfig(engine=engine, workers=workers))


def bench_model(name: str, args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    model, calib_path, eval_path = model_files(name, args.bench, args.work, args.resnet_images)
    spec, _ = load_model_spec(model)
    calib = open_dataset(calib_path, spec.inputs)
    data = open_dataset(eval_path, spec.inputs, role="evaluation")
    vs = variants(model, args.work)
    output = spec.outputs[0].name
    reference: dict[str, str] = {}
    for engine in args.engines:
        for workers in args.workers:
            if workers == 1 and engine != args.engines[0]:
                continue  # workers: 1 is this process whatever the engine
            executor = make(engine, workers)
            row: dict[str, Any] = {"model": name, "engine": engine if workers > 1 else "in-process",
                                   "workers": workers, "calib_samples": calib.num_samples,
                                   "eval_samples": data.num_samples, "load_before": os.getloadavg()}
            try:
                for stage in args.stages:
                    for when in ("cold", "warm"):
                        if stage == "calibrate":
                            seconds, digest = run_calibrate(executor, model, calib, args.batch_size)
                        else:
                            seconds, digest = run_evaluate(executor, vs, data, output, args.batch_size)
                        row[f"{stage}_{when}_s"] = round(seconds, 3)
                        same = reference.setdefault(stage, digest) == digest
                        row[f"{stage}_identical"] = row.get(f"{stage}_identical", True) and same
                        print(f"{name:13s} {row['engine']:10s} workers={workers:<3d} {stage:9s} {when}: {seconds:8.2f} s"
                              f"{'' if same else '  RESULT DIFFERS FROM 1 WORKER'}", flush=True)
            finally:
                executor.close()
            row["load_after"] = os.getloadavg()
            results.append(row)


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
             "| model | stage | engine | workers | cold s | warm s | speed-up (warm) | efficiency | same result as 1 worker |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in doc["results"]:
        for stage in STAGES:
            if f"{stage}_warm_s" not in row:
                continue
            lines.append(
                f"| {row['model']} | {stage} | {row['engine']} | {row['workers']} | {row[f'{stage}_cold_s']:.2f} | "
                f"{row[f'{stage}_warm_s']:.2f} | {row.get(f'{stage}_speedup', float('nan')):.2f}x | "
                f"{row.get(f'{stage}_efficiency', float('nan')):.0%} | "
                f"{'yes' if row[f'{stage}_identical'] else 'NO'} |")
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
    ap.add_argument("--note", default="", help="what else ran on the machine (say 'shared' when it was)")
    ap.add_argument("--out", type=Path, default=Path("scaling.json"))
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args()
    if 1 not in args.workers:
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
    try:
        for name in args.models:
            bench_model(name, args, results)
    finally:
        efficiency(results)
        doc["results"] = results
        args.out.write_text(json.dumps(doc, indent=1))
        table = markdown(doc)
        if args.markdown:
            args.markdown.write_text(table)
        print(table)


if __name__ == "__main__":
    main()
