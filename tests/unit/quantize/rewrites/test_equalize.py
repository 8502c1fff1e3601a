"""build.quantize.equalize_depthwise: a depthwise Conv's small input channels get the tensor's int8 resolution."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.types import ChannelStats

RANGES = np.array([16.0, 0.4, 8.0, 0.2], np.float32)  # MobileNetV3's HardSwish: a few channels far below the rest


def _depthwise() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], group=4, pads=[1, 1, 1, 1], name="dw")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, int8: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for k, v in (ORT_INT8_SESSION_CONFIG.items() if int8 else ()):
        opts.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _per_channel_sqnr(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    err = ((out - ref) ** 2).sum(axis=(0, 2, 3))
    return 10 * np.log10((ref**2).sum(axis=(0, 2, 3)) / np.maximum(err, 1e-30))


def test_equalizing_a_depthwise_input_gives_its_small_channels_the_resolution_of_the_largest() -> None:
    rng = np.random.default_rng(1)
    x = (rng.uniform(-1, 1, (8, 4, 6, 6)) * RANGES[None, :, None, None]).astype(np.float32)
    model = _depthwise()
    stats = {"x": ChannelStats("x", 1, np.abs(x).max(axis=(0, 2, 3)), x.mean(axis=(0, 2, 3)), 8)}
    base = QuantizeOptions(channel_stats=stats, bias_correction=False, smooth_alpha=None, shift_nonnegative=False,
                           split_activations="off")
    ref = _run(model, x, int8=False)
    plain, _ = build_qdq_model(model, {"x": float(np.abs(x).max())}, base)
    equal, rep = build_qdq_model(model, {"x": float(np.abs(x).max())}, dataclasses.replace(base, equalize_depthwise=True))
    onnx.checker.check_model(equal, full_check=True)
    assert rep.smoothed_tensors == ("x",)
    assert [n.op_type for n in equal.graph.node][0] == "Mul"  # x / s, before the Q/DQ
    before, after = _per_channel_sqnr(_run(plain, x, True), ref), _per_channel_sqnr(_run(equal, x, True), ref)
    assert np.all(after[[1, 3]] > before[[1, 3]] + 20)  # the small channels: 20 dB and more
    assert np.all(after[[0, 2]] > before[[0, 2]] - 0.5)  # the large ones lose nothing
    # Decided on the calibration data by default ("auto" builds as off until then), and a tensor whose channels
    # are alike is left alone.
    assert QuantizeOptions().equalize_depthwise == "auto"
    undecided, _ = build_qdq_model(model, {"x": float(np.abs(x).max())}, dataclasses.replace(base,
                                                                                           equalize_depthwise="auto"))
    assert undecided.SerializeToString() == plain.SerializeToString()
    even = {"x": ChannelStats("x", 1, np.full(4, 3.0, np.float32), np.zeros(4, np.float32), 8)}
    _, rep = build_qdq_model(model, {"x": 3.0}, dataclasses.replace(base, channel_stats=even, equalize_depthwise=True))
    assert rep.smoothed_tensors == ()


def test_a_relu_output_is_left_to_the_non_negative_shift() -> None:
    # EfficientNet-Lite0's depthwise inputs are ReLU6 outputs, which the shift quantizes over their range; a Mul in
    # front would take that away (measured: 0.921 -> 0.889 agreement), so they are not equalized while it is on.
    model = _depthwise()
    model.graph.node[0].input[0] = "r"
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"], name="relu"))
    stats = {"r": ChannelStats("r", 1, RANGES, RANGES / 4, 8)}
    opts = QuantizeOptions(channel_stats=stats, bias_correction=False, smooth_alpha=None, split_activations="off",
                           equalize_depthwise=True)
    _, rep = build_qdq_model(model, {"r": 16.0}, opts)
    assert rep.smoothed_tensors == ()
    _, rep = build_qdq_model(model, {"r": 16.0}, dataclasses.replace(opts, shift_nonnegative=False))
    assert rep.smoothed_tensors == ("r",)


def test_auto_equalizes_where_the_calibration_data_says_it_lowers_the_output_noise(tmp_path) -> None:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.data import open_dataset
    from quantpipe.quantize.decisions import load_decisions, save_decisions
    from quantpipe.quantize.write import with_calibration_data

    rng = np.random.default_rng(2)
    model = _depthwise()
    amax = {"x": float(RANGES.max())}
    info = (TensorInfo("x", "float32", ("n", 4, 6, 6)),)
    opts = QuantizeOptions(bias_correction=True, smooth_alpha=None, shift_nonnegative=False, split_activations="off")
    # Channels of very different ranges: equalizing wins on the calibration data.
    np.savez(tmp_path / "spread.npz", x=(rng.uniform(-1, 1, (16, 4, 6, 6)) * RANGES[None, :, None, None]).astype(
        np.float32))
    chosen = with_calibration_data(model, opts, open_dataset(tmp_path / "spread.npz", info), amax=amax)
    assert chosen.equalize_depthwise is True
    # Channels alike: nothing to equalize, so nothing is measured and it stays off.
    np.savez(tmp_path / "even.npz", x=rng.uniform(-3, 3, (16, 4, 6, 6)).astype(np.float32))
    even = with_calibration_data(model, opts, open_dataset(tmp_path / "even.npz", info), amax={"x": 3.0})
    assert even.equalize_depthwise is False
    # The decision travels with the build's other decisions (the sensitivity stage reads them back).
    save_decisions(tmp_path / "d.npz", chosen)
    back = load_decisions(tmp_path / "d.npz", opts)
    assert back is not None and back.equalize_depthwise is True
    save_decisions(tmp_path / "e.npz", even)
    back = load_decisions(tmp_path / "e.npz", opts)
    assert back is not None and back.equalize_depthwise is False
