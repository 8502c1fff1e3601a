"""The onnxruntime CUDA execution-provider path on the bundled example: runner, FP16 model, latency, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.backends.onnxruntime import OrtRunner


def _eval_batch(digits: dict[str, Path], n: int = 128) -> dict[str, np.ndarray]:
    return {"input": np.load(digits["eval"])["input"][:n]}


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_cuda_runner_matches_cpu_and_really_runs_on_cuda(ort_cuda: None, digits: dict[str, Path]) -> None:
    feeds = _eval_batch(digits)
    with OrtRunner(digits["model"], "ort_fp32_cpu", device="cpu") as cpu:
        ref = cpu.infer(feeds)["logits"]
    with OrtRunner(digits["model"], "ort_fp32_cuda", device="cuda") as gpu:
        assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"  # no silent CPU fallback
        out = gpu.infer(feeds)["logits"]
    assert out.shape == ref.shape
    # cuDNN may use TF32 for FP32 convolutions: ~3e-4 relative error is expected, 1e-2 would be a bug
    assert _rel_err(out, ref) < 5e-3
    assert float(np.mean(out.argmax(1) == ref.argmax(1))) >= 0.99


def test_fp16_model_on_cuda(ort_cuda: None, digits: dict[str, Path], tmp_path: Path, bench_gpu: Any) -> None:
    fp16 = tmp_path / "digits_fp16.onnx"
    bench_gpu.write_fp16(digits["model"], fp16)  # quantpipe's FP16 model, as the benchmark writes it
    feeds = _eval_batch(digits)
    with OrtRunner(digits["model"], "ort_fp32_cpu", device="cpu") as cpu:
        ref = cpu.infer(feeds)["logits"]
    with OrtRunner(fp16, "ort_fp16_cuda", device="cuda") as gpu:
        out = gpu.infer(feeds)["logits"]
    assert _rel_err(out, ref) < 2e-2
    assert float(np.mean(out.argmax(1) == ref.argmax(1))) >= 0.98


def test_cuda_latency_has_device_synchronised_compute(ort_cuda: None, digits: dict[str, Path]) -> None:
    feeds = _eval_batch(digits, 32)
    with OrtRunner(digits["model"], "ort_fp32_cuda", device="cuda") as gpu:
        t = gpu.measure(feeds, warmup=5, iterations=30)
    assert t.total.shape == (30,) and np.all(t.total > 0)
    assert t.compute is not None and t.compute.shape == (30,) and np.all(t.compute > 0)
    # IOBinding keeps inputs and outputs on the device: the compute alone cannot exceed the end-to-end median
    assert float(np.median(t.compute)) <= float(np.median(t.total)) * 1.5


def test_calibration_on_cuda_gives_the_cpu_scales(ort_cuda: None, digits: dict[str, Path], bench_gpu: Any) -> None:
    cpu = bench_gpu.calibrate_once(digits["model"], digits["calib"], device="cpu", batch_size=32)
    gpu = bench_gpu.calibrate_once(digits["model"], digits["calib"], device="cuda", batch_size=32)
    assert gpu.device_used == "cuda", gpu.notes
    cmp = bench_gpu.compare_amax(cpu, gpu)
    assert cmp["tensors"] > 0 and "minmax" in cmp["compared"]
    assert cmp["worst_bins"] <= 1.0, cmp
