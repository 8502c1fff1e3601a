"""A model with an input batched on axis 1 (an RNN state [layers, N, hidden], as PyTorch's LSTM takes it) runs
end to end once pipeline.yaml names that axis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from tests.e2e.test_pipeline import example_config, write_config


def _stateful_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W")
    v = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "V")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["xw", "s"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("MatMul", ["h", "V"], ["y"]),
        helper.make_node("Mul", ["state", "half"], ["state_out"]),
    ]
    g = helper.make_graph(nodes, "rnnish",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
                           helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "N", 4])],
                          [w, v, axes, half])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_state_batched_on_axis_1_runs(tmp_path: Path) -> None:
    _stateful_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    for name, n in (("calib", 48), ("eval", 40)):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((n, 3)).astype(np.float32),
                 state=rng.standard_normal((2, n, 4)).astype(np.float32))
    cfg = example_config(tmp_path)
    cfg["model"] = {"path": str(tmp_path / "m.onnx"), "output": "y", "inputs": {"state": {"batch_axis": 1}}}
    cfg["data"] = {"calibration": {"path": str(tmp_path / "calib.npz")},
                   "evaluation": {"path": str(tmp_path / "eval.npz")}, "batch_size": 16}
    cfg["evaluate"]["metrics"] = ["top1_agreement", "cosine", "sqnr_db"]
    cfg["gate"] = {"rules": []}
    cfg["build"]["backends"]["tensorrt"]["enabled"] = False
    assert main(["run", str(write_config(tmp_path, cfg)), "--run-id", "r", "-q"]) == 0
    res = json.loads((tmp_path / "reports" / "r" / "results.json").read_text())
    ev = {e["variant"]: e for e in res["evaluations"]}
    assert ev["ort-int8"]["num_samples"] == 40
    assert ev["ort-int8"]["metrics"]["sqnr_db"] > 15
    # latency at batch 32 fed the state [2, 32, 4]: any other layout fails onnxruntime's shape check
    assert [lat["batch_size"] for lat in ev["ort-int8"]["latency"]] == [1, 32]


def test_quantize_takes_the_states_axis_from_the_command_line(tmp_path: Path, capsys) -> None:
    # `quantpipe quantize` reads no pipeline.yaml, and its error pointed there (found probing a VAD model).
    _stateful_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((48, 3)).astype(np.float32),
             state=rng.standard_normal((2, 48, 4)).astype(np.float32))
    base = ["quantize", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "calib.npz"), "--method", "best",
            "-q", "--out"]
    assert main([*base, str(tmp_path / "a.onnx")]) == 2
    assert "--batch-axis NAME=AXIS" in " ".join(capsys.readouterr().err.split())
    assert main([*base, str(tmp_path / "a.onnx"), "--batch-axis", "stat=1"]) == 2
    assert "expected NAME=AXIS with NAME one of the model's inputs (x, state)" in " ".join(capsys.readouterr().err.split())
    assert main([*base, str(tmp_path / "b.onnx"), "--batch-axis", "state=1"]) == 0
    q = onnx.load(tmp_path / "b.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 2
