"""The searches' output error where an output's channels differ in scale by orders of magnitude (a YOLO head's box
rows in pixels over its class scores): each channel against its own signal (`fake_quant.output_weights`); every
other output as before, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.metrics import SquaredSums
from quantpipe.quantize.fake_quant import output_error, output_signal, output_weights


def _head(rng: np.random.Generator) -> np.ndarray:
    """[4, 6, 50]: 2 box rows of RMS ~100, 3 class rows of RMS ~0.3, one class that hardly fires."""
    boxes = rng.uniform(50, 150, (4, 2, 50))
    scores = rng.uniform(0, 0.6, (4, 3, 50))
    rare = np.full((4, 1, 50), 1e-6)
    return np.concatenate([boxes, scores, rare], axis=1).astype(np.float32)


def test_weights_only_where_channels_differ_by_orders_of_magnitude() -> None:
    rng = np.random.default_rng(0)
    head = _head(rng)
    (w,) = output_weights([head])
    assert w is not None and w.shape == (1, 6, 1)
    rms = np.sqrt(np.mean(np.square(head.astype(np.float64)), axis=(0, 2)))
    median = np.median(rms)
    assert np.allclose(w.ravel(), 1.0 / np.maximum(rms, median))
    assert w.ravel()[5] == w.ravel().max()  # the rare class is floored at the median channel, not weighed by 1e6
    similar = rng.normal(0, 1, (4, 40, 100)).astype(np.float32)  # a recognizer's timesteps
    assert output_weights([similar, rng.normal(0, 1, (4, 10)).astype(np.float32), np.zeros((4, 3, 9), np.int64)]) \
        == [None, None, None]


def test_weighted_sums_are_the_plain_expressions_and_see_the_class_rows() -> None:
    rng = np.random.default_rng(1)
    ref = _head(rng)
    weights = output_weights([ref])
    got = ref.copy()
    got[:, 2:5] += 0.05  # the class scores off by a sixth of their RMS: nothing in the pooled error
    sums = SquaredSums()
    w = weights[0]
    assert w is not None
    plain = float(np.sum(((got.astype(np.float64) - ref) * w) ** 2))
    assert output_error([got], [ref], sums, weights) == plain
    assert output_signal([ref], sums, weights) == float(np.sum((ref.astype(np.float64) * w) ** 2))
    assert output_error([got], [ref], sums) == float(np.sum((got.astype(np.float64) - ref) ** 2))  # unweighted: as before
    pooled_db = 10 * np.log10(output_signal([ref], sums) / output_error([got], [ref], sums))
    weighted_db = 10 * np.log10(output_signal([ref], sums, weights) / output_error([got], [ref], sums, weights))
    assert pooled_db > 40 and weighted_db < 20


def test_quantize_says_what_its_closing_sqnr_covers(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["h"], ["s"]),
         helper.make_node("Reshape", ["s", "shape"], ["flat"]), helper.make_node("Mul", ["flat", "scale"], ["head"])],
        "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 6, 64])],
        [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array([0, 6, 64], np.int64), "shape"),
         numpy_helper.from_array(np.array([320, 320, 160, 160, 1, 1], np.float32).reshape(1, 6, 1), "scale")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "det.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    assert main(["quantize", "--model", str(tmp_path / "det.onnx"), "--data", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "int8.onnx"), "--workers", "1"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "INT8 output SQNR (each channel of head against its own signal)" in said
