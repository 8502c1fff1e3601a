"""A realistic synthetic run for the report, gate and JUnit tests (no model is run).

Six variants (ONNX Runtime FP32/FP16/INT8 that ran, TensorRT FP32/FP16/INT8 skipped because tensorrt is
not installed), latency at two batch sizes with per-iteration samples, per-layer sensitivity, an
accuracy fallback, two calibration methods with their JSON sidecars and a small histograms.npz.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from quantpipe.artifacts import (
    RESULTS_SCHEMA_VERSION,
    CalibrationSummary,
    EvalResult,
    FallbackReport,
    FallbackStep,
    LatencyStats,
    LayerSensitivity,
    ModelSpec,
    RunResults,
    TensorInfo,
    Variant,
)

TENSORS = ["/conv1/Conv_output_0", "/relu1/Relu_output_0", "/conv2/Conv_output_0", "/relu2/Relu_output_0",
           "/pool/GlobalAveragePool_output_0", "/fc1/Gemm_output_0", "/fc2/Gemm_output_0"]
TRT_REASON = "tensorrt: not installed (ModuleNotFoundError: No module named 'tensorrt'); pip install 'quantpipe[tensorrt]'"


def _latency(rng: np.random.Generator, bs: int, median: float, warmup: int = 10, n: int = 50) -> LatencyStats:
    samples = np.sort(median * rng.lognormal(0.0, 0.08, size=n))
    samples[-1] *= 1.6  # one slow iteration, as real runs have
    med = float(np.median(samples))
    return LatencyStats(
        batch_size=bs, warmup=warmup, iterations=n, median_ms=med, p90_ms=float(np.percentile(samples, 90)),
        p99_ms=float(np.percentile(samples, 99)), mean_ms=float(samples.mean()), min_ms=float(samples.min()),
        throughput=bs / med * 1000.0, timer="perf_counter", samples_ms=tuple(float(x) for x in rng.permutation(samples)),
    )


def synthetic_results(run_dir: Path | None = None, *, run_id: str = "20250101T120000Z", int8_top1: float = 0.9733,
                      int8_speed: float = 1.0, seed: int = 0) -> RunResults:
    """A RunResults shaped like the digits example's; writes the calibration files into run_dir when given."""
    rng = np.random.default_rng(seed)
    model = ModelSpec(
        path="examples/digits/digits_cnn.onnx", sha256="a" * 64, opset=17, ir_version=8, producer="pytorch 2.13.0",
        inputs=(TensorInfo("input", "float32", ("N", 1, 32, 32)),), outputs=(TensorInfo("logits", "float32", ("N", 10)),),
        op_counts={"Conv": 2, "Relu": 3, "MaxPool": 1, "GlobalAveragePool": 1, "Gemm": 2, "Flatten": 1},
        num_parameters=25_482, size_bytes=104_512,
    )
    variants = [
        Variant("ort-fp32", "onnxruntime", "fp32", "cpu", "models/digits_cnn.onnx", 104_512),
        Variant("ort-fp16", "onnxruntime", "fp16", "cpu", "models/model.fp16.onnx", 54_210),
        Variant("ort-int8", "onnxruntime", "int8", "cpu", "models/model.int8.onnx", 33_981),
        Variant("trt-fp32", "tensorrt", "fp32", "cuda", skipped=TRT_REASON),
        Variant("trt-fp16", "tensorrt", "fp16", "cuda", skipped=TRT_REASON),
        Variant("trt-int8", "tensorrt", "int8", "cuda", skipped=TRT_REASON),
    ]
    ref_top1 = 0.9800
    evals = [
        EvalResult("ort-fp32", 450, {"top1": ref_top1, "top5": 1.0, "top1_drop": 0.0, "top1_agreement": 1.0, "cosine": 1.0,
                                     "sqnr_db": None, "max_abs_error": 0.0},
                   (_latency(rng, 1, 0.21), _latency(rng, 32, 2.95))),
        EvalResult("ort-fp16", 450, {"top1": 0.9800, "top5": 1.0, "top1_drop": 0.0, "top1_agreement": 1.0,
                                     "cosine": 0.999998, "sqnr_db": 61.3, "max_abs_error": 0.0041},
                   (_latency(rng, 1, 0.26), _latency(rng, 32, 3.40))),
        EvalResult("ort-int8", 450, {"top1": int8_top1, "top5": 0.9978, "top1_drop": ref_top1 - int8_top1,
                                     "top1_agreement": 0.9889, "cosine": 0.99952, "sqnr_db": 30.4, "max_abs_error": 0.412},
                   (_latency(rng, 1, 0.19 / int8_speed), _latency(rng, 32, 1.86 / int8_speed))),
        EvalResult("trt-fp32", 0, {}, (), skipped=TRT_REASON),
        EvalResult("trt-fp16", 0, {}, (), skipped=TRT_REASON),
        EvalResult("trt-int8", 0, {}, (), skipped=TRT_REASON),
    ]
    sens_vals = [("/conv1/Conv", "Conv", TENSORS[0], 24.1, 0.9911), ("/fc2/Gemm", "Gemm", TENSORS[6], 27.9, 0.9956),
                 ("/conv2/Conv", "Conv", TENSORS[2], 31.2, 0.9978), ("/fc1/Gemm", "Gemm", TENSORS[5], 33.0, 0.9989),
                 ("/relu1/Relu", "Relu", TENSORS[1], 38.5, 0.9998), ("/pool/GlobalAveragePool", "GlobalAveragePool",
                                                                     TENSORS[4], 41.7, 1.0)]
    sensitivity = tuple(LayerSensitivity(n, op, t, s, m, "top1_agreement") for n, op, t, s, m in sens_vals)
    fallback = FallbackReport(
        metric="top1_agreement", target=0.985, initial=0.9800, final=0.9889, met=True, num_quantizable=6,
        steps=(FallbackStep("/conv1/Conv", "Conv", "fp16", 0.9800, 0.9867),
               FallbackStep("/fc2/Gemm", "Gemm", "fp16", 0.9867, 0.9889)),
        chosen_on="calibration", chosen_samples=512,
    )
    calib_dir = (run_dir / "calibration") if run_dir is not None else Path("calibration")
    calibration = tuple(
        CalibrationSummary(
            method=m, num_samples=512, num_tensors=len(TENSORS), seconds=sec,
            cache_path=str(calib_dir / f"calib.{m}.cache"), json_path=str(calib_dir / f"calib.{m}.json"),
            fingerprint={"model_sha256": "a" * 64, "data_sha256": "b" * 64, "method": m, "tool": "quantpipe 0.1.0"},
        ) for m, sec in (("entropy", 1.84), ("minmax", 0.41))
    )
    env = {
        "quantpipe": "0.1.0", "python": "3.11.2", "platform": "Linux-6.1.0-x86_64-with-glibc2.36", "machine": "x86_64",
        "processor": "x86_64", "cpu_count": 2, "numpy": "2.4.0", "onnx": "1.23.0", "onnxruntime": "1.31.0",
        "onnxruntime_providers": ["CPUExecutionProvider"],
        "gpu": {"available": False, "reason": "nvidia-smi not found (no NVIDIA driver on this machine)"},
        "tensorrt": {"available": False, "version": None, "reason": "ModuleNotFoundError: No module named 'tensorrt'"},
        "cuda.bindings": {"available": False, "version": None, "reason": "ModuleNotFoundError: No module named 'cuda'"},
        "pycuda": {"available": False, "version": None, "reason": "ModuleNotFoundError: No module named 'pycuda'"},
        "cupy": {"available": False, "version": None, "reason": "ModuleNotFoundError: No module named 'cupy'"},
        "modelopt": {"available": False, "version": None, "reason": "ModuleNotFoundError: No module named 'modelopt'"},
        "onnxruntime_cuda": {"available": False, "version": None,
                             "reason": "no NVIDIA GPU, so no onnxruntime CUDA execution provider",
                             "install": "pip uninstall -y onnxruntime && pip install 'quantpipe[gpu]'  (onnxruntime-gpu)"},
    }
    results = RunResults(
        schema_version=RESULTS_SCHEMA_VERSION, run_id=run_id, created="2025-01-01T12:00:00+00:00", tool_version="0.1.0",
        config_path="pipeline.yaml", model=model, environment=env, calibration=calibration, variants=tuple(variants),
        evaluations=tuple(evals), reference="ort-fp32", sensitivity=sensitivity, fallback=fallback,
    )
    if run_dir is not None:
        write_calibration_files(run_dir, seed=seed)
    return results


def write_calibration_files(run_dir: Path, *, seed: int = 0) -> None:
    """calibration/calib.<method>.json (amax per tensor) and calibration/histograms.npz (|x| histograms)."""
    rng = np.random.default_rng(seed + 1)
    calib = run_dir / "calibration"
    calib.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    amax: dict[str, dict[str, float]] = {"entropy": {}, "minmax": {}}
    for i, name in enumerate(TENSORS):
        scale = 1.0 + i * 0.7
        x = np.abs(rng.standard_t(df=3 + i % 3, size=20_000)) * scale
        hi = float(x.max())
        counts, edges = np.histogram(x, bins=2048, range=(0.0, hi))
        arrays[f"{name}/counts"] = counts.astype(np.int64)
        arrays[f"{name}/edges"] = edges.astype(np.float64)
        amax["minmax"][name] = hi
        amax["entropy"][name] = float(np.percentile(x, 99.9))
    np.savez(calib / "histograms.npz", **arrays)
    for method, table in amax.items():
        (calib / f"calib.{method}.json").write_text(json.dumps(
            {"method": method, "tensors": {k: {"amax": v, "absmax": amax["minmax"][k]} for k, v in table.items()}}))
        (calib / f"calib.{method}.cache").write_text(f"TRT-10130-{'EntropyCalibration2' if method == 'entropy' else 'MinMaxCalibration'}\n")


def with_top1(results: RunResults, variant: str, top1: float) -> RunResults:
    """A copy of `results` whose `variant` has another top-1 (to inject a regression)."""
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "top1": top1}) if e.variant == variant else e
                  for e in results.evaluations)
    return dataclasses.replace(results, evaluations=evals)
