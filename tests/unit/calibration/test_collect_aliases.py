"""Tensors that hold another tensor's values (Reshape, Transpose, ...) take its histogram without a pass of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.artifacts import TensorInfo
from quantpipe.calibration import collect, collect_histograms
from quantpipe.calibration.collect import plan_tensors, same_value_sources
from quantpipe.data import open_dataset

RNG = np.random.default_rng(11)
INPUT = (TensorInfo("x", "float32", ("N", 6)),)


def reshaping_model() -> onnx.ModelProto:
    """x -> Reshape(xr) -> MatMul(h) -> Reshape(hr) -> Transpose(ht) -> Identity(hi) -> Flatten(y);
    hr -> Relu(r) (hr is a Relu's source, so it is binned itself); a Reshape of a weight (wr) and the Add of it
    (batch-independent, binned once per run like the weight's reshape) -> Unsqueeze(u) -> Squeeze(q)."""
    w = numpy_helper.from_array(RNG.standard_normal((6, 8)).astype(np.float32), "W")
    shape = numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "shape")
    xshape = numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "xshape")
    back = numpy_helper.from_array(np.array([-1, 6], np.int64), "back")
    b = numpy_helper.from_array(RNG.standard_normal((8,)).astype(np.float32), "B")
    bshape = numpy_helper.from_array(np.array([2, 4], np.int64), "bshape")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("Reshape", ["x", "xshape"], ["xr"]),
        helper.make_node("Reshape", ["xr", "back"], ["xb"]),
        helper.make_node("MatMul", ["xb", "W"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["hr"]),
        helper.make_node("Relu", ["hr"], ["r"]),
        helper.make_node("Transpose", ["hr"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("Identity", ["ht"], ["hi"]),
        helper.make_node("Flatten", ["hi"], ["y"]),
        helper.make_node("Reshape", ["B", "bshape"], ["wr"]),
        helper.make_node("Add", ["wr", "wr"], ["c"]),
        helper.make_node("Unsqueeze", ["c", "axes"], ["u"]),
        helper.make_node("Squeeze", ["u", "axes"], ["q"]),
    ]
    graph = helper.make_graph(
        nodes, "reshaping",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 2, 4]),
         helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 4])],
        [w, shape, xshape, back, b, bshape, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "reshaping.onnx"
    onnx.save(reshaping_model(), model)
    data = tmp_path / "calib.npz"
    np.savez(data, x=(RNG.standard_normal((37, 6)) * np.linspace(0.2, 4, 37)[:, None]).astype(np.float32))
    return model, data


def test_aliases_resolve_chains_to_a_run_time_source(paths: tuple[Path, Path]) -> None:
    proto = onnx.load(paths[0])
    plan = plan_tensors(proto)
    aliases = same_value_sources(proto, plan.kinds, plan.relu_from)
    # hr feeds a Relu: binned with its signs, never an alias. wr reshapes a weight: binned per run, unlike B.
    assert aliases == {"xr": "x", "xb": "x", "ht": "hr", "hi": "hr", "y": "hr", "u": "c", "q": "c"}


@pytest.mark.parametrize("max_run_bytes", [None, 1000])
def test_aliases_equal_a_pass_that_fetches_them(paths: tuple[Path, Path], max_run_bytes: int | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = paths
    ds = open_dataset(data, INPUT)
    derived = collect_histograms(model, ds, batch_size=8, max_run_bytes=max_run_bytes)
    monkeypatch.setattr(collect, "same_value_sources", lambda *args: {})  # every tensor fetched and binned
    fetched = collect_histograms(model, ds, batch_size=8, max_run_bytes=max_run_bytes)
    assert list(derived.histograms) == list(fetched.histograms) == list(plan_tensors(onnx.load(model)).kinds)
    assert derived.histograms == fetched.histograms  # bit-exact, in graph order
    # The runs are sized as if the aliases were fetched: the batch-independent c, u, q are binned once per run.
    assert derived.num_batches == fetched.num_batches
    assert derived.histograms["q"].num_values == 8 * derived.num_batches
    if max_run_bytes is not None:
        assert derived.num_batches > 5
