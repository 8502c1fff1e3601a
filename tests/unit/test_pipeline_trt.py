"""The pipeline's TensorRT wiring, with build_engine replaced by a recorder (TensorRT is not installed here).

What is checked is quantpipe's own logic: which ONNX model each TensorRT version and precision is
built from, which cache the implicit calibrator gets, and the optimization profiles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from quantpipe.backends.tensorrt import build as trt_build
from quantpipe.backends.tensorrt import plan as trt_plan
from quantpipe.backends.tensorrt import version as trt_version
from quantpipe.backends.tensorrt.metadata import EngineInfo
from quantpipe.backends.tensorrt.version import api_for_version
from quantpipe.build import stage_build
from quantpipe.config import parse_config
from quantpipe.inputs import load_inputs
from quantpipe.pipeline import stage_calibrate
from quantpipe.workspace import NullProgress, Workspace
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL


def _cfg(tmp: Path, use: str = "entropy") -> Any:
    return parse_config(
        {
            "model": {"path": str(EXAMPLE_MODEL)},
            "data": {"calibration": {"path": str(EXAMPLE_CALIB), "max_samples": 16},
                     "evaluation": {"path": str(EXAMPLE_EVAL), "labels": "label", "max_samples": 16}, "batch_size": 8},
            "calibration": {"methods": ["entropy", "minmax"], "use": use},
            "build": {"backends": {"onnxruntime": {"precisions": ["fp32"]},
                                   "tensorrt": {"enabled": True, "precisions": ["fp32", "fp16", "int8"]}}},
            "evaluate": {"latency": {"batch_sizes": [1, 4]}},
            "report": {"dir": str(tmp / "reports")},
        },
        base_dir=tmp,
    )


@pytest.mark.parametrize(("version", "expect_sources", "use"), [
    ("10.13.0", {"fp32": "digits_cnn.onnx", "fp16": "digits_cnn.onnx", "int8": "digits_cnn.onnx"}, "entropy"),
    ("10.13.0", {"fp32": "digits_cnn.onnx", "fp16": "digits_cnn.onnx", "int8": "digits_cnn.onnx"}, "best"),
    ("11.1.0", {"fp32": "digits_cnn.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}, "entropy"),
])
def test_trt_variants_built_from_the_right_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, expect_sources: dict[str, str], use: str
) -> None:
    api = api_for_version(version)
    calls: list[dict[str, Any]] = []

    def fake_build(onnx_path: Path, out_path: Path, **kw: Any) -> Any:
        calls.append({"onnx": Path(onnx_path), **kw})
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_bytes(b"engine")
        return EngineInfo(
            path=str(out_path), metadata_path=str(out_path) + ".json", precision=kw["precision"], tensorrt_version=version,
            gpu_name="fake", compute_capability="9.0", source_model=str(onnx_path), source_sha256=kw["source_sha256"],
            engine_sha256="0" * 64, size_bytes=6, build_seconds=0.0, strongly_typed=not api.weak_typing,
            int8_mode=None, options={},
        )

    monkeypatch.setattr(trt_plan, "variant_skip_reason", lambda *a, **k: None)
    monkeypatch.setattr(trt_version, "require_tensorrt", lambda: api)
    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    cfg = _cfg(tmp_path, use)
    ws = Workspace.for_config(cfg)
    li = load_inputs(cfg)
    summaries, amax = stage_calibrate(cfg, ws, li, NullProgress())
    variants, _, _ = stage_build(cfg, ws, li, amax, summaries, NullProgress())
    assert [v.name for v in variants] == ["ort-fp32", "trt-fp32", "trt-fp16", "trt-int8"]
    assert all(v.ran and v.size_bytes == 6 for v in variants[1:])
    by_precision = {c["precision"]: c for c in calls}
    assert {p: c["onnx"].name for p, c in by_precision.items()} == expect_sources
    prof = by_precision["fp32"]["profiles"]["input"]
    assert prof == {"min": [1, 1, 32, 32], "opt": [4, 1, 32, 32], "max": [8, 1, 32, 32]}
    int8 = by_precision["int8"]["calibration"]
    if api.weak_typing:
        assert int8 is not None and int8.method == "entropy"
        assert int8.cache_path.name == ("best.cache" if use == "best" else "entropy.cache")
        assert int8.cache_path.read_text().startswith("TRT-101300-EntropyCalibration2")
    else:
        assert int8 is None  # TensorRT 11 has no calibrators: the Q/DQ model carries the scales
    assert dataclasses.asdict(variants[1])["details"]["gpu_name"] == "fake"
