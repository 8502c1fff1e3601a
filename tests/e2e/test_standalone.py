"""`quantpipe calibrate` and `quantpipe quantize` without a pipeline.yaml, on the bundled example, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantpipe.cli import main
from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL


def _top1(model: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    for k, v in ORT_INT8_SESSION_CONFIG.items():
        opts.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0].argmax(axis=1) for i in range(0, len(x), 64)])


@pytest.fixture(scope="module")
def eval_images() -> np.ndarray:
    with np.load(EXAMPLE_EVAL) as z:
        return next(z[k] for k in z.files if z[k].dtype == np.float32)


def test_calibrate_writes_a_cache_and_its_sidecar(tmp_path: Path) -> None:
    cache = tmp_path / "digits.cache"
    code = main(["calibrate", "--model", str(EXAMPLE_MODEL), "--data", str(EXAMPLE_CALIB), "--method", "minmax",
                 "--batch-size", "16", "--cache", str(cache), "-q"])
    assert code == 0
    lines = cache.read_text().splitlines()
    assert lines[0].startswith("TRT-") and lines[0].endswith("-MinMaxCalibration")
    assert len(lines) > 5 and all(":" in ln for ln in lines[1:])
    # the TensorRT cache, its JSON sidecar (fingerprint, every method's amax) and the histograms; no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.cache", "digits.histograms.npz", "digits.json"]
    assert json.loads((tmp_path / "digits.json").read_text())


@pytest.mark.parametrize("flags", [["--weight-rounding", "nearest", "--no-shift"], ["--weight-rounding", "gptq"]])
def test_quantize_writes_an_int8_model_that_agrees_with_fp32(tmp_path: Path, eval_images: np.ndarray,
                                                            flags: list[str]) -> None:
    out = tmp_path / "digits.int8.onnx"
    code = main(["quantize", "--model", str(EXAMPLE_MODEL), "--data", str(EXAMPLE_CALIB), "--method", "percentile",
                 *flags, "--out", str(out), "-q"])
    assert code == 0
    onnx.checker.check_model(onnx.load(out), full_check=True)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    agreement = np.mean(_top1(out, eval_images) == _top1(EXAMPLE_MODEL, eval_images))
    assert agreement >= 0.98


def test_quantize_fp16_needs_no_data(tmp_path: Path, eval_images: np.ndarray) -> None:
    out = tmp_path / "digits.fp16.onnx"
    assert main(["quantize", "--model", str(EXAMPLE_MODEL), "--fp16", "--out", str(out), "-q"]) == 0
    assert np.mean(_top1(out, eval_images) == _top1(EXAMPLE_MODEL, eval_images)) >= 0.99


def test_quantize_int8_without_data_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["quantize", "--model", str(EXAMPLE_MODEL), "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
