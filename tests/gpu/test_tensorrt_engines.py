"""TensorRT FP32 / FP16 / INT8 engines on the bundled example, compared with the ONNX Runtime FP32 reference.

These run wherever `import tensorrt` works and a GPU is visible; elsewhere every test is skipped with the
reason (the `trt_version` fixture in conftest.py says which piece is missing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.backends.onnxruntime import OrtRunner
from quantpipe.backends.tensorrt.build import build_engine
from quantpipe.backends.tensorrt.calibrator import CalibrationInput
from quantpipe.backends.tensorrt.metadata import metadata_path_for
from quantpipe.backends.tensorrt.plan import plan_build
from quantpipe.backends.tensorrt.runner import TensorRTRunner
from quantpipe.backends.tensorrt.version import api_for_version
from quantpipe.data import open_dataset
from quantpipe.errors import StaleArtifactError

PROFILES = {"input": {"min": [1, 1, 32, 32], "opt": [32, 1, 32, 32], "max": [64, 1, 32, 32]}}
INPUTS = [TensorInfo("input", "float32", ("batch", 1, 32, 32))]


@pytest.fixture(scope="module")
def reference(digits: dict[str, Path]) -> dict[str, np.ndarray]:
    z = np.load(digits["eval"])
    x, labels = z["input"][:256], z["label"][:256]
    with OrtRunner(digits["model"], "ort_fp32_cpu", device="cpu") as ort:
        logits = np.concatenate([ort.infer({"input": x[i:i + 32]})["logits"] for i in range(0, len(x), 32)])
    return {"x": x, "labels": labels, "logits": logits}


def _run_engine(path: Path, x: np.ndarray) -> np.ndarray:
    with TensorRTRunner(path, path.stem) as runner:
        assert runner.input_names == ["input"]
        return np.concatenate([runner.infer({"input": x[i:i + 32]})["logits"] for i in range(0, len(x), 32)])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def _amax(model: Path, calib: Path) -> dict[str, float]:
    from quantpipe.calibration.collect import collect_histograms

    stats = collect_histograms(model, open_dataset(calib, INPUTS), batch_size=32)
    return {n: float(h.absmax) for n, h in stats.histograms.items() if stats.kinds[n] != "weight"}


def test_fp32_engine_matches_reference(trt_version: str, digits: dict[str, Path], reference: Any, tmp_path: Path) -> None:
    out = tmp_path / "digits_fp32.engine"
    info = build_engine(digits["model"], out, precision="fp32", profiles=PROFILES, workspace_mib=512,
                        timing_cache=tmp_path / "timing.cache", tf32=False)
    assert out.is_file() and (tmp_path / "timing.cache").is_file()
    meta = json.loads(metadata_path_for(out).read_text())
    assert meta["tensorrt_version"] == trt_version and meta["precision"] == "fp32" and meta["engine_sha256"] == info.engine_sha256
    logits = _run_engine(out, reference["x"])
    rel = np.linalg.norm(logits - reference["logits"]) / np.linalg.norm(reference["logits"])
    assert rel < 1e-3 and _agreement(logits, reference["logits"]) >= 0.995


def test_fp16_engine(trt_version: str, digits: dict[str, Path], reference: Any, tmp_path: Path) -> None:
    model = digits["model"]
    if plan_build("fp16", api_for_version(trt_version)).source == "fp16":  # TensorRT >= 11: strongly typed
        from quantpipe.quantize import write_fp16_model

        model = tmp_path / "digits_fp16.onnx"
        write_fp16_model(digits["model"], model)
    out = tmp_path / "digits_fp16.engine"
    build_engine(model, out, precision="fp16", profiles=PROFILES, workspace_mib=512, timing_cache=tmp_path / "timing.cache")
    logits = _run_engine(out, reference["x"])
    assert _agreement(logits, reference["logits"]) >= 0.98


def test_int8_engine_from_qdq_model(trt_version: str, digits: dict[str, Path], reference: Any, tmp_path: Path) -> None:
    from quantpipe.quantize import write_qdq_model

    qdq = tmp_path / "digits_int8_qdq.onnx"
    write_qdq_model(digits["model"], _amax(digits["model"], digits["calib"]), qdq)
    out = tmp_path / "digits_int8.engine"
    info = build_engine(qdq, out, precision="int8", int8_mode="qdq", profiles=PROFILES, workspace_mib=512)
    assert info.int8_mode == "qdq"
    logits = _run_engine(out, reference["x"])
    assert _agreement(logits, reference["logits"]) >= 0.95
    assert float(np.mean(logits.argmax(1) == reference["labels"])) >= 0.9


def test_int8_engine_through_the_calibrator(trt_version: str, digits: dict[str, Path], reference: Any, tmp_path: Path) -> None:
    if not api_for_version(trt_version).has_calibrators:
        pytest.skip(f"TensorRT {trt_version} has no implicit calibration (removed in 11.0)")
    cache = tmp_path / "digits.entropy.cache"
    calib = CalibrationInput(method="entropy", cache_path=cache, dataset=open_dataset(digits["calib"], INPUTS),
                             batch_size=32, allocator="cuda-python")
    out = tmp_path / "digits_int8_cal.engine"
    info = build_engine(digits["model"], out, precision="int8", int8_mode="calibrator", calibration=calib, profiles=PROFILES)
    details = info.options["calibration"]
    assert details["batches_fed"] == 200 // 32 and not details["used_quantpipe_cache"] and cache.is_file()
    logits = _run_engine(out, reference["x"])
    assert _agreement(logits, reference["logits"]) >= 0.95
    # a second build reads the cache (now written through quantpipe's cache module) and feeds no batch
    again = build_engine(digits["model"], tmp_path / "again.engine", precision="int8", int8_mode="calibrator",
                         calibration=CalibrationInput(method="entropy", cache_path=cache), profiles=PROFILES)
    assert again.options["calibration"]["used_quantpipe_cache"] and again.options["calibration"]["batches_fed"] == 0


def test_latency_is_timed_with_cuda_events(trt_version: str, digits: dict[str, Path], reference: Any, tmp_path: Path) -> None:
    out = tmp_path / "digits_fp32.engine"
    build_engine(digits["model"], out, precision="fp32", profiles=PROFILES, workspace_mib=512)
    with TensorRTRunner(out) as runner:
        t = runner.measure({"input": reference["x"][:32]}, warmup=10, iterations=50)
    assert t.timer == "cuda_events"
    assert t.compute is not None and t.h2d is not None and t.d2h is not None
    assert np.all(t.compute > 0) and np.all(t.h2d > 0) and np.all(t.d2h > 0)
    assert np.all(t.total >= t.compute)


def test_engine_from_another_tensorrt_is_refused(trt_version: str, digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "digits_fp32.engine"
    build_engine(digits["model"], out, precision="fp32", profiles=PROFILES, workspace_mib=512)
    meta_path = metadata_path_for(out)
    meta = json.loads(meta_path.read_text())
    meta["tensorrt_version"] = "0.0.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleArtifactError, match="Rebuild"), TensorRTRunner(out):
        pass
