"""Fixtures of the unit tests: the damaged 3-layer MLP that the sensitivity and fallback tests judge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.data import open_dataset
from quantpipe.model import tensor_info
from quantpipe.onnxgraph import expose_outputs

N = 48


def _mlp(path: Path, rng: np.random.Generator) -> Path:
    """x[N,16] -> MatMul fc1 -> Relu -> MatMul fc2 -> Relu -> MatMul fc3 -> logits[N,10]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="a1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"], name="a2"),
        helper.make_node("MatMul", ["r2", "w3"], ["logits"], name="fc3"),
    ]
    inits = [numpy_helper.from_array((rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 32)), ("w3", (32, 10)))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def damaged_mlp(tmp_path_factory):
    """(folder, model path, evaluation Dataset, amax): the same weights and data for every test module."""
    rng = np.random.default_rng(2)
    d = tmp_path_factory.mktemp("sens")
    model_path = _mlp(d / "mlp.onnx", rng)
    x = rng.normal(size=(N, 16)).astype(np.float32)
    np.savez(d / "eval.npz", x=x, label=np.zeros(N, dtype=np.int64))
    model = onnx.load(model_path)
    ds = open_dataset(d / "eval.npz", [tensor_info(i) for i in model.graph.input], role="evaluation")
    sess = ort.InferenceSession(expose_outputs(model, ["r1", "r2"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    r1, r2 = sess.run(["r1", "r2"], {"x": x})
    # fc2's input gets a badly clipped range (as from a bad calibration): it must come out as the worst layer.
    amax = {"x": float(np.abs(x).max()), "r1": 0.1 * float(r1.max()), "r2": float(r2.max())}
    return d, model_path, ds, amax


