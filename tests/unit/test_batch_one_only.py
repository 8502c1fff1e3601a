"""A model that declares a dynamic batch but runs one sample at a time (a Reshape holds the exported batch: torchvision's
ViT through torch.onnx.export, found probing) is run one sample at a time, said once, instead of failing a stage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.data import open_dataset
from quantpipe.inputs import check_first_run
from quantpipe.model import load_model_spec


def _model(tmp_path: Path, reshape_to: list[int]) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(reshape_to, np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["rr"]), helper.make_node("MatMul", ["rr", "W2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / f"m{len(reshape_to)}{reshape_to[0]}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_a_batch_held_at_one_inside_the_graph_runs_one_sample_at_a_time(tmp_path: Path, caplog) -> None:
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32))
    held, free = _model(tmp_path, [1, 8]), _model(tmp_path, [-1, 8])
    for path, batch in ((held, 1), (free, "N")):
        spec, _ = load_model_spec(path)
        ds = open_dataset(tmp_path / "d.npz", spec.inputs)
        with caplog.at_level(logging.WARNING, logger="quantpipe"):
            (x,) = check_first_run(path, spec, spec.inputs, ds)
        assert x.shape == (batch, 8)
    assert caplog.text.count("declares a dynamic batch") == 1
    assert "a Reshape node: Input shape:{2,8}, requested shape:{1,8}" in caplog.text
    # Before, calibration ran 12 samples at once there: "onnxruntime failed on the calibration batch", exit 4.
    assert main(["quantize", "--model", str(held), "--data", str(tmp_path / "d.npz"), "--out",
                 str(tmp_path / "o.onnx"), "--workers", "1", "-q"]) == 0


def test_an_output_without_the_samples_on_its_batch_axis_is_refused_before_calibrating(tmp_path: Path) -> None:
    """SSDlite's [K, 4] boxes (found probing) were refused only at evaluation, after 9 minutes, with exit 4."""
    import pytest

    from quantpipe.errors import DataError

    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["boxes"]),
                           helper.make_node("Transpose", ["x"], ["time_major"], perm=[1, 0])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
                           helper.make_tensor_value_info("time_major", TensorProto.FLOAT, [8, "N"])], [shape])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    np.savez(tmp_path / "d.npz", x=np.ones((5, 8), np.float32))
    spec, _ = load_model_spec(path)
    ds = open_dataset(tmp_path / "d.npz", spec.inputs)
    with pytest.raises(DataError, match=r"model.output 'boxes' has shape \[4, 4\] for 2 sample\(s\): its axis 0 does "
                                        r"not hold the samples.*point model.output at a raw head"):
        check_first_run(path, spec, spec.inputs, ds, output="boxes")
    assert check_first_run(path, spec, spec.inputs, ds, output="time_major", output_axis=1) == spec.inputs
    with pytest.raises(DataError, match="time_major"):
        check_first_run(path, spec, spec.inputs, ds, output="time_major")


def test_a_batch_held_at_one_is_found_in_a_folder_whose_first_samples_differ_in_length(tmp_path: Path) -> None:
    """A Khmer word segmenter (found probing): runs of text of many lengths, its Reshape holding batch 1. The check
    ran only on the first two samples, which differ in length, so it ran one; calibration then batched three runs of
    one length and died (exit 4). The first sample twice finds it."""
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
             helper.make_node("Reshape", ["s", "shape"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    model = tmp_path / "seg.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    folder = tmp_path / "runs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate([5, 7, 6, 6, 6, 9, 4, 4]):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((1, n)).astype(np.float32))
    spec, _ = load_model_spec(model)
    (x,) = check_first_run(model, spec, spec.inputs, open_dataset(folder, spec.inputs))
    assert x.shape == (1, "L")
    assert main(["quantize", "--model", str(model), "--data", str(folder), "--out", str(tmp_path / "o.onnx"),
                 "--method", "minmax", "--workers", "1", "-q"]) == 0
