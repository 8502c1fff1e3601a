"""Task metrics through `quantpipe run`: a tiny CTC recognizer (MatMul -> Relu -> MatMul producing [N, T, C]
logits) judged by line agreement, and a metric hook whose name a gate rule uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from quantpipe import metrics as M
from quantpipe.cli import main

T, F, C = 12, 8, 6


def _ctc_model(path: Path) -> Path:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.normal(size=(F, 16)) / np.sqrt(F)).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.normal(size=(16, C)) / 2.0).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, F])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", T, C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _project(tmp: Path, rules: list[dict], metrics: list[str] | None = None) -> Path:
    model = _ctc_model(tmp / "ctc.onnx")
    rng = np.random.default_rng(4)
    calib, ev = rng.normal(size=(40, T, F)).astype(np.float32), rng.normal(size=(30, T, F)).astype(np.float32)
    np.savez(tmp / "calib.npz", x=calib)
    # Labels: the FP32 model's own reading, padded with -1, so line_accuracy of FP32 is 1 by construction.
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": ev})[0]
    seqs = M.ctc_greedy_decode(ref)
    labels = np.full((len(seqs), T), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        labels[i, :len(s)] = s
    np.savez(tmp / "eval.npz", x=ev, labels=labels)
    cfg = {
        "name": "ctc", "model": {"path": str(model)},
        "data": {"calibration": {"path": str(tmp / "calib.npz")}, "evaluation": {"path": str(tmp / "eval.npz"), "labels": "labels"},
                 "batch_size": 8},
        "build": {"backends": {"tensorrt": {"enabled": False}, "onnxruntime": {"precisions": ["fp32", "int8"]}}},
        "evaluate": {"task": "ctc", "ctc": {"blank": 0}, "latency": {"enabled": False},
                     "sensitivity": {"metric": "line_agreement", "max_samples": 16},
                     **({"metrics": metrics} if metrics else {})},
        "gate": {"rules": rules},
        "report": {"dir": str(tmp / "reports")},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_ctc_model_is_judged_by_line_agreement(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [{"variant": "ort-int8", "metric": "line_agreement", "min": 0.5},
                              {"variant": "ort-int8", "metric": "cer", "max": 0.5},
                              {"variant": "ort-fp32", "metric": "line_accuracy", "min": 1.0}])
    assert main(["run", str(cfg), "--run-id", "r1", "-q"]) == 0
    results = json.loads((tmp_path / "reports" / "r1" / "results.json").read_text())
    by = {e["variant"]: e["metrics"] for e in results["evaluations"]}
    assert by["ort-fp32"]["line_agreement"] == 1.0 and by["ort-fp32"]["cer"] == 0.0
    assert by["ort-fp32"]["line_accuracy"] == 1.0
    int8 = by["ort-int8"]
    assert 0.5 <= int8["line_agreement"] <= 1.0 and int8["line_accuracy"] == int8["line_agreement"]
    assert int8["line_accuracy_drop"] == pytest.approx(1.0 - int8["line_accuracy"])
    assert "top1" not in int8 and "top1_agreement" not in int8  # not a classifier
    assert {s["metric_name"] for s in results["sensitivity"]} == {"line_agreement"}
    assert "line_agreement" in (tmp_path / "reports" / "r1" / "report.md").read_text()


def test_a_gate_rule_fails_on_line_agreement(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [{"variant": "ort-int8", "metric": "line_agreement", "min": 1.01}])
    assert main(["run", str(cfg), "--run-id", "r1", "-q"]) == 1


def test_hook_metric_in_a_gate_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qp_hook_e2e.py").write_text(
        "import numpy as np\n"
        "def blank_rate(out, ref, labels):\n"
        "    return {'blank_rate': float(np.mean(out.argmax(axis=2) == 0))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = _project(tmp_path, [{"variant": "ort-int8", "metric": "blank_rate", "min": 0.0}],
                       metrics=["sqnr_db", "qp_hook_e2e:blank_rate"])
        assert main(["run", str(cfg), "--run-id", "r1", "-q"]) == 0
        results = json.loads((tmp_path / "reports" / "r1" / "results.json").read_text())
        assert all("blank_rate" in e["metrics"] for e in results["evaluations"])
        bad = _project(tmp_path, [{"variant": "ort-int8", "metric": "blank_rte", "min": 0.0}],
                       metrics=["qp_hook_e2e:blank_rate"])
        assert main(["run", str(bad), "--run-id", "r2", "-q"]) == 2
    finally:
        sys.modules.pop("qp_hook_e2e", None)
