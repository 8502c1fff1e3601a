"""A model whose weights live in an external data file, through `quantpipe run` (calibration, the FP16 and
INT8 writers, the accuracy fallback, evaluation, sensitivity, report), with the writers' outputs forced into
external data too (as a > 2 GB model's are): the run folder and the workspace hold every data file, by
relative path, so a moved project reuses its own work; a changed weight file re-runs the stages.

The same run on a 2.4 GB model is `benchmarks/large_model.py` (too slow for CI on 2 cores; RESULTS.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantpipe import onnxgraph, ortsession
from quantpipe.cli import main
from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG
from tests.bigmodel import write_matmul_chain

DIMS = (96, 64, 96, 64, 48)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")


def _run_model(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    for k, v in ORT_INT8_SESSION_CONFIG.items():
        opts.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_run_on_an_external_data_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    yaml_path = write_matmul_chain(tmp_path / "origin", DIMS, samples=16)
    text = yaml_path.read_text().replace(
        "  quantize:\n", "  fallback: {metric: cosine, min: 0.99999, max_layers: 1}\n  quantize:\n")
    yaml_path.write_text(text)
    # Every model the writers make goes to external data, as a > 2 GB model's would.
    monkeypatch.setattr(onnxgraph, "LARGE_MODEL_BYTES", 4096)
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 4096)
    assert main(["run", str(yaml_path), "--run-id", "first", "-q"]) in (0, 1)

    run = tmp_path / "origin" / "reports" / "first"
    results = json.loads((run / "results.json").read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert all(not by_name[n]["skipped"] for n in ("ort-fp32", "ort-fp16", "ort-int8"))
    fp32_size = sum(p.stat().st_size for p in (tmp_path / "origin").glob("model.onnx*"))
    assert by_name["ort-fp32"]["size_bytes"] == fp32_size  # the weights file counts
    assert results["fallback"] is not None and results["sensitivity"]
    for name in ("ort-fp16", "ort-int8"):
        art = by_name[name]["artifact"]
        assert not Path(art).is_absolute()
        assert (run / (art + ".data")).is_file()  # the external data was published with the model
        assert art + ".data" in json.loads((run / "complete.json").read_text())["files"]

    # The project moves: the run's models read their data by relative path, and the workspace is reused.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "origin", moved)
    x = np.load(moved / "eval.npz")["x"][:4]
    ref = _run_model(moved / "model.onnx", x)
    int8 = _run_model(moved / "reports" / "first" / by_name["ort-int8"]["artifact"], x)
    assert np.max(np.abs(int8 - ref)) < 0.2 * np.max(np.abs(ref))
    capsys.readouterr()
    assert main(["build", str(moved / "pipeline.yaml")]) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "calibrate: inputs unchanged" in text and "build: inputs unchanged" in text

    # One weight changes in the data file (the .onnx file does not): every stage runs again.
    data = moved / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[8] ^= 0x40
    data.write_bytes(bytes(raw))
    assert main(["calibrate", str(moved / "pipeline.yaml")]) == 0
    assert "calibrate: re-running because model_sha256 changed" in " ".join(capsys.readouterr().err.split())
    assert onnx.load(str(moved / "model.onnx"), load_external_data=False).graph.initializer[0].external_data
