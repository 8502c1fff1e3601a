"""An FP16 variant whose judged output equals FP32's bit for bit is said first, like INT8's: a model wrapped in
control flow (found probing: every layer inside an `If`, which the FP16 writer keeps in FP32 whole) passed its FP16
gate rules with cosine 1.0 and no SQNR, said by nothing but a build warning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.collapse import find_collapse
from quantpipe.config import CollapseConfig
from quantpipe.report import write_report
from tests.report_data import synthetic_results


def _wrapped(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "W"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["N", 8])])

    g = helper.make_graph(
        [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")),
         helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
        "wrapped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")])
    path = tmp_path / "wrapped.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((16, 16)).astype(np.float32))
    return path


def _fp16_pipeline(tmp_path: Path, model: str) -> Path:
    """A pipeline.yaml that builds FP32 and FP16 alone (no INT8: nothing calibrated), no latency, no sensitivity."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"version: 1\nname: fp16only\nmodel: {{path: {model}}}\n"
        "data: {calibration: {path: calib.npz}, evaluation: {path: eval.npz}}\n"
        "build: {backends: {onnxruntime: {precisions: [fp32, fp16]}, tensorrt: {required: false}}}\n"
        "evaluate: {latency: {enabled: false}, sensitivity: {enabled: false}}\n"
        "report: {dir: reports}\n", encoding="utf-8")
    return path


def test_an_fp16_model_equal_to_fp32_is_said_not_measured(tmp_path: Path) -> None:
    _wrapped(tmp_path)
    assert main(["run", str(_fp16_pipeline(tmp_path, "wrapped.onnx")), "-q"]) == 0  # no gate rule fails: said, not refused
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    (c,) = results["collapse"]
    assert (c["variant"], c["severity"], c["precision"]) == ("ort-fp16", "unmeasured", "fp16")
    assert "1 If node(s)" in c["cause"]
    summary = (tmp_path / "reports" / "latest" / "summary.md").read_text()
    assert 0 <= summary.find("FP16 NOT MEASURED: `ort-fp16`") < summary.find("| Variant")
    assert "```yaml" not in summary  # no YAML fixes this


def test_an_fp16_model_that_differs_is_not_flagged(tmp_path: Path) -> None:
    results = synthetic_results(tmp_path)
    assert find_collapse(results, CollapseConfig()) == ()
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "identical_to_fp32": 1.0})
                  if e.variant == "ort-fp16" else e for e in results.evaluations)
    (c,) = find_collapse(dataclasses.replace(results, evaluations=evals), CollapseConfig())
    assert c.precision == "fp16" and "FP16" in c.problems[0]
    written = write_report(tmp_path / "run", dataclasses.replace(results, evaluations=evals, collapse=(c,)))
    assert "FP16 not measured: ort-fp16" in written["html"].read_text()


def test_fp16_nodes_run_in_fp32_on_the_cpu_are_said_to_be_the_backends_doing(tmp_path: Path) -> None:
    # A document unwarper's FP16 file held 110 FP16 Convs, and the verdict blamed nodes kept in FP32 or control flow:
    # onnxruntime's CPU ran its Convs in FP32, and its weights were exact in FP16 (found probing).
    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "identical_to_fp32": 1.0})
                  if e.variant == "ort-fp16" else e for e in results.evaluations)
    variants = tuple(dataclasses.replace(v, details={"compute": {"fp16": 110, "other": 40}})
                     if v.name == "ort-fp16" else v for v in results.variants)
    (c,) = find_collapse(dataclasses.replace(results, evaluations=evals, variants=variants), CollapseConfig())
    assert "holds 110 FP16 compute node(s)" in c.problems[0] and "runs them in FP32" in c.problems[0]
    assert c.cause.startswith("the backend, not the model") and "tensorrt fp16" in c.fix


def _overflowing(tmp_path: Path) -> None:
    """A Conv whose output reaches ~1e5, above FP16's 65504, between two Convs (a probe's toy)."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(0, 1, (8, 3, 3, 3)) * 1000).astype(np.float32)
    w2 = (rng.normal(0, 1, (4, 8, 3, 3)) / 10000).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="c2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "big.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(0, 10, (8, 3, 16, 16)).astype(np.float32))


def test_a_pipeline_that_builds_fp16_without_int8_keeps_overflowing_activations_in_fp32(tmp_path: Path) -> None:
    # Without an INT8 variant nothing was calibrated, so the FP16 writer never saw the ranges: the activation at
    # 7e4 went to FP16 (inf there) and the run passed at 71 dB on onnxruntime's CPU, which runs Conv in FP32.
    from quantpipe.model import read_model_spec
    from quantpipe.modelinfo import describe_precision

    _overflowing(tmp_path)
    assert main(["run", str(_fp16_pipeline(tmp_path, "big.onnx")), "-q"]) == 0
    by_op = describe_precision(read_model_spec(tmp_path / "reports" / "latest" / "models" / "model.fp16.onnx")[1]).by_op
    assert by_op["Conv"].get("fp32") == 2  # both Convs touch the overflowing activation: they stay FP32
    assert main(["quantize", "--model", str(tmp_path / "big.onnx"), "--fp16", "--out", str(tmp_path / "q.onnx"),
                 "--data", str(tmp_path / "calib.npz")]) == 0
    assert describe_precision(read_model_spec(tmp_path / "q.onnx")[1]).by_op["Conv"].get("fp32") == 2
