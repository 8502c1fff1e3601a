"""A time-major output [T, N, C] (a CRNN exported for PyTorch's CTC loss) is compared sample by sample once
pipeline.yaml names its batch axis: evaluation, sensitivity and the fallback read it samples first."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.data import open_dataset
from quantpipe.model import tensor_info
from quantpipe.ortsession import ort_session
from quantpipe.quantize import QuantizeOptions
from quantpipe.quantize.build import build_qdq_model
from quantpipe.reference import prepare_reference, run_candidates, run_output
from tests.e2e.test_pipeline import example_config, write_config

T, F, C = 6, 8, 5


def _time_major(path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((F, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "W2"),
             numpy_helper.from_array(rng.standard_normal((16, C)).astype(np.float32), "W3")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("MatMul", ["ar", "W2"], ["b"], name="mm2"), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("MatMul", ["br", "W3"], ["y"], name="mm3"),
             helper.make_node("Transpose", ["y"], ["logits"], perm=[1, 0, 2])]
    g = helper.make_graph(nodes, "crnn_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, F])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [T, "N", C])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _data(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name, n in (("calib", 40), ("eval", 36)):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((n, T, F)).astype(np.float32))


def test_candidates_of_a_time_major_output_come_back_samples_first(tmp_path: Path) -> None:
    _time_major(tmp_path / "m.onnx")
    _data(tmp_path)
    model = onnx.load(tmp_path / "m.onnx")
    ds = open_dataset(tmp_path / "calib.npz", [tensor_info(i) for i in model.graph.input])
    amax = {"x": 4.0, "ar": 8.0, "br": 8.0}
    ctx = prepare_reference(tmp_path / "m.onnx", amax, ds, output=None, batch_size=16, max_samples=None,
                            options=QuantizeOptions(split_activations="off"), calibration_data=None, output_axis=1)
    assert ctx.ref.shape == (40, T, C)  # 16 + 16 + 8 samples joined on axis 1, then first
    whole = np.concatenate([ort_session(ctx.model).run(["logits"], dict(f))[0] for f in ctx.feeds], axis=1)
    assert np.array_equal(ctx.ref, np.moveaxis(whole, 1, 0))
    full, rep = build_qdq_model(ctx.model, amax, ctx.options)
    keeps = [build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, keep_float_nodes=frozenset({q.name})))[0]
             for q in rep.quantized_nodes]
    got = run_candidates(full, keeps, ctx.feeds, ctx.output, max_part=1.0, min_skipped=0.0, output_axis=1)
    for k, m in zip(got, keeps, strict=True):
        assert k.shape == (40, T, C)
        assert np.array_equal(k, run_output(ort_session(m, int8=True, optimize=False), ctx.feeds, "logits", 1))


def test_a_time_major_ctc_output_runs_with_sensitivity_and_fallback(tmp_path: Path) -> None:
    _time_major(tmp_path / "m.onnx")
    _data(tmp_path)
    cfg = example_config(tmp_path)
    cfg["model"] = {"path": str(tmp_path / "m.onnx"), "output": "logits", "output_batch_axis": 1}
    cfg["data"] = {"calibration": {"path": str(tmp_path / "calib.npz")},
                   "evaluation": {"path": str(tmp_path / "eval.npz")}, "batch_size": 16}
    cfg["evaluate"]["task"] = "ctc"
    cfg["evaluate"]["metrics"] = ["sqnr_db"]
    cfg["build"]["backends"]["tensorrt"]["enabled"] = False
    cfg["build"]["fallback"] = {"metric": "line_agreement", "min": 0.95}
    cfg["gate"] = {"rules": []}
    assert main(["run", str(write_config(tmp_path, cfg)), "--run-id", "r", "-q"]) == 0
    res = json.loads((tmp_path / "reports" / "r" / "results.json").read_text())
    ev = {e["variant"]: e for e in res["evaluations"]}
    assert ev["ort-int8"]["num_samples"] == 36
    assert ev["ort-fp32"]["metrics"]["line_agreement"] == 1.0
    assert 0.0 <= ev["ort-int8"]["metrics"]["line_agreement"] <= 1.0
    assert res["fallback"]["met"] and len(res["fallback"]["steps"]) < 3  # some layers stay INT8
    assert res["sensitivity"]  # their one-layer-at-a-time line agreement, read samples first
