"""Layers inside If / Loop / Scan subgraphs stay in float: the verdict, `inspect` and the weight share say where they
are (silero VAD: its 6 Conv and its LSTM sit inside an If on the sample rate; the verdict named "no Conv / Gemm /
MatMul it quantizes", `inspect` counted "3 fp32, 1 other" nodes and the weight share read 100 % int8; found probing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.modelinfo import weight_share
from tests.conftest import task_pipeline


def _branchy(tmp_path: Path) -> Path:
    """x [N, 8] -> If(a constant condition) whose branches each hold a MatMul with their own weight -> y [N, 4]."""
    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"W_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["N", 4])], [w])

    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [cond])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "branchy.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    return tmp_path / "branchy.onnx"


def test_the_weights_a_subgraph_reads_count_as_float(tmp_path: Path) -> None:
    share = weight_share(onnx.load(_branchy(tmp_path)))
    assert share.quantized == 0 and share.in_float == 2 * 8 * 4 and share.float_by_op == {"inside If": 64}


def test_inspect_names_the_layers_inside_subgraphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(_branchy(tmp_path))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "inside the subgraphs of 1 If (every branch and body; not in the table above, and left in float by " \
           "quantpipe): MatMul 2" in out


def test_the_verdict_says_the_layers_sit_inside_a_subgraph(tmp_path: Path) -> None:
    _branchy(tmp_path)
    path = task_pipeline(tmp_path, "branchy", "metrics: [cosine, sqnr_db, max_abs_error]", "null", "[]")
    assert main(["run", str(path), "-q", "--workers", "1"]) == 0
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    assert results["model"]["subgraph_op_counts"] == {"MatMul": 2}
    (c,) = [c for c in results["collapse"] if c["variant"] == "ort-int8"]
    assert c["severity"] == "unmeasured"
    assert c["cause"].startswith("nothing in this model was quantized: its 2 MatMul sit inside the branches or bodies "
                                 "of 1 If node(s), which quantpipe leaves in float. Where the branch the model takes "
                                 "is fixed")
