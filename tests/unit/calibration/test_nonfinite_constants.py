"""Constants and activations that hold Inf on purpose (an open Clip bound, as torch.clamp(min=...) exports; an
attention mask's -inf) are not ranges: calibration leaves them without a histogram, so they stay in float, instead of
calling the model broken. NaN still stops calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.artifacts import TensorInfo
from quantpipe.calibration import collect_histograms
from quantpipe.data import open_dataset
from quantpipe.errors import CalibrationError


def test_an_open_clip_bound_and_an_unused_inf_mask_get_no_histogram(tmp_path: Path) -> None:
    inits = [numpy_helper.from_array(np.array(1e-10, np.float32), "lo"),
             numpy_helper.from_array(np.array(np.inf, np.float32), "hi"),
             numpy_helper.from_array(np.array([0.0, -np.inf, 0.0, 0.0], np.float32), "mask")]
    # The mask is a Where's branch never taken here (one that reaches an activation: the test below).
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
             helper.make_node("Greater", ["c", "hi"], ["never"]),
             helper.make_node("Where", ["never", "mask", "c"], ["y"]),
             helper.make_node("Softmax", ["y"], ["p"], axis=-1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype(np.float32))
    stats = collect_histograms(tmp_path / "m.onnx", open_dataset(tmp_path / "d.npz", (TensorInfo("x", "float32",
                                                                                                  ("N", 4)),)))
    assert "lo" in stats.histograms and "hi" not in stats.histograms and "mask" not in stats.histograms
    assert {"x", "c", "p"} <= set(stats.histograms)


def _save(tmp_path: Path, nodes: list, inits: list, out: str, shape: tuple = ("N", 4)) -> Path:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(shape))], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_an_activation_holding_minus_inf_stays_without_a_range(tmp_path: Path) -> None:
    """A causal mask written with -inf (torch.triu(full(-inf))) added to the scores: that tensor, its Relu output and
    its reshaped copy get no histogram (they stay in float); the Softmax after it and everything else do."""
    mask = np.triu(np.full((4, 4), -np.inf, np.float32), 1)
    inits = [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
             numpy_helper.from_array(np.array([-1, 4, 4], np.int64), "back")]
    nodes = [helper.make_node("MatMul", ["x", "x_t"], ["s"]), helper.make_node("Transpose", ["x"], ["x_t"], perm=[0, 2, 1]),
             helper.make_node("Add", ["s", "mask"], ["sm"]), helper.make_node("Relu", ["sm"], ["r"]),
             helper.make_node("Reshape", ["sm", "shape"], ["sm_r"]), helper.make_node("Softmax", ["sm"], ["p"]),
             helper.make_node("Reshape", ["sm_r", "back"], ["sm_b"]),
             helper.make_node("Add", ["p", "r"], ["pr"]), helper.make_node("Add", ["pr", "sm_b"], ["y"])]
    nodes.insert(0, nodes.pop(1))
    path = _save(tmp_path, nodes, inits, "y", ("N", 4, 4))
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    stats = collect_histograms(path, open_dataset(tmp_path / "d.npz", (TensorInfo("x", "float32", ("N", 4, 4)),)))
    # r (finite) is read from sm's signed histogram, so it goes too; y holds -inf itself
    assert not {"sm", "r", "sm_r", "sm_b", "y"} & set(stats.histograms)
    assert {"x", "x_t", "s", "p", "pr"} <= set(stats.histograms)
    assert stats.histograms["p"].num_values == 6 * 16


def test_inf_in_some_samples_only_drops_the_tensor_in_a_sharded_pass_too(tmp_path: Path) -> None:
    """log(relu(x)) is -inf where x <= 0: the tensor is left out whichever shard met it, as in one pass; and NaN
    (log of a negative number) still stops calibration, naming the tensor."""
    from quantpipe.calibration.collect import collect_partial, finish_stats

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Log", ["r"], ["lg"]),
             helper.make_node("Exp", ["lg"], ["y"])]
    path = _save(tmp_path, nodes, [], "y")
    x = np.random.default_rng(2).uniform(0.1, 1, (8, 4)).astype(np.float32)
    x[6, 1] = -0.5  # only the second half holds a zero after the Relu
    np.savez(tmp_path / "d.npz", x=x)
    ds = open_dataset(tmp_path / "d.npz", (TensorInfo("x", "float32", ("N", 4)),))
    whole = collect_histograms(path, ds, batch_size=2)
    assert "lg" not in whole.histograms and {"x", "r", "y"} <= set(whole.histograms)
    halves = [collect_partial(path, ds.subset(lo, hi), batch_size=2) for lo, hi in ((0, 4), (4, 8))]
    assert halves[0].infinite == set() and halves[1].infinite == {"lg"}
    merged = finish_stats(halves[0].merge(halves[1]), 0.0)
    assert dict(merged.histograms) == dict(whole.histograms)

    nan_path = _save(tmp_path, [helper.make_node("Log", ["x"], ["lg"]), helper.make_node("Exp", ["lg"], ["y"])], [], "y")
    with pytest.raises(CalibrationError, match="'lg' holds NaN for the batch starting at sample 6"):
        collect_histograms(nan_path, ds, batch_size=2)


def test_a_causal_attention_with_a_minus_inf_mask_quantizes(tmp_path: Path) -> None:
    """End to end (`quantpipe quantize`): before, calibration stopped at the masked scores ("NaN or Inf", exit 4)."""
    import onnxruntime as ort

    from quantpipe.cli import main

    rng = np.random.default_rng(3)
    length, dim = 6, 8
    inits = [numpy_helper.from_array((rng.standard_normal((dim, dim)) / 3).astype(np.float32), w)
             for w in ("Wq", "Wk", "Wv")]
    inits.append(numpy_helper.from_array(np.triu(np.full((length, length), -np.inf, np.float32), 1), "mask"))
    nodes = [helper.make_node("MatMul", ["x", w], [o]) for w, o in (("Wq", "q"), ("Wk", "k"), ("Wv", "v"))]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Add", ["s", "mask"], ["sm"]), helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["y"])]
    path = _save(tmp_path, nodes, inits, "y", ("N", length, dim))
    x = rng.standard_normal((40, length, dim)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x[:32])
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--model", str(path), "--data", str(tmp_path / "d.npz"), "--out", str(out), "-q"]) == 0
    ref = ort.InferenceSession(str(path)).run(None, {"x": x[32:]})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x[32:]})[0]
    assert np.all(np.isfinite(got))
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 20.0
