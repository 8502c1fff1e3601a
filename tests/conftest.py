"""Shared fixtures: tiny models built in code, the bundled example's paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = ROOT / "examples" / "digits" / "digits_cnn.onnx"
EXAMPLE_CALIB = ROOT / "calib_data" / "digits" / "calib.npz"
EXAMPLE_EVAL = ROOT / "calib_data" / "digits" / "eval.npz"


def task_pipeline(tmp_path: Path, name: str, evaluate: str, fallback: str, rules: str) -> Path:
    """tmp_path/p.yaml: `name`.onnx with calib.npz / eval.npz beside it, ONNX Runtime FP32 and INT8 (TensorRT not
    required), the fallback, the `evaluate` section's flow mapping body (latency and sensitivity off) and the gate
    rules given, as the task metrics' whole-run tests write it."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"version: 1\nname: {name}\nmodel: {{path: {name}.onnx}}\n"
        "data: {calibration: {path: calib.npz}, evaluation: {path: eval.npz}}\n"
        "build: {backends: {onnxruntime: {precisions: [fp32, int8]}, tensorrt: {required: false}},\n"
        f"        fallback: {fallback}}}\n"
        f"evaluate: {{{evaluate}, latency: {{enabled: false}}, sensitivity: {{enabled: false}}}}\n"
        f"gate: {{rules: {rules}}}\nreport: {{dir: reports}}\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _not_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The busy-machine latency warning depends on the host's load, not on the code under test: said already."""
    import quantpipe.evaluate

    monkeypatch.setattr(quantpipe.evaluate, "_busy_said", {True})


def float_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], inputs: dict[str, list | None],
                outputs: dict[str, list | None], *, opset: int = 17) -> onnx.ModelProto:
    """A checked (full_check) FP32 model of `nodes`: float inputs and outputs by name -> shape, IR version 8
    (what the pinned onnxruntime reads)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_mlp(path: Path, *, dtype: int = TensorProto.FLOAT, opset: int = 17, seed: int = 0) -> Path:
    """A 2-layer MLP classifier: x[N,8] -> MatMul -> Relu -> Gemm -> logits[N,4]."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np_dtype), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np_dtype), "w2")
    b2 = numpy_helper.from_array(np.zeros(4, np_dtype), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", dtype, ["N", 8])],
        [helper.make_tensor_value_info("logits", dtype, ["N", 4])],
        [w1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def mlp_model(tmp_path: Path) -> Path:
    return make_mlp(tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_data(tmp_path: Path) -> tuple[Path, Path]:
    """Calibration and labelled evaluation .npz for mlp_model."""
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    ev = tmp_path / "eval.npz"
    np.savez(calib, x=rng.normal(size=(64, 8)).astype(np.float32))
    x = rng.normal(size=(48, 8)).astype(np.float32)
    np.savez(ev, x=x, label=rng.integers(0, 4, size=48))
    return calib, ev


@pytest.fixture
def example_paths() -> tuple[Path, Path, Path]:
    for p in (EXAMPLE_MODEL, EXAMPLE_CALIB, EXAMPLE_EVAL):
        if not p.exists():
            pytest.fail(f"bundled example file missing: {p}")
    return EXAMPLE_MODEL, EXAMPLE_CALIB, EXAMPLE_EVAL
