"""Constants that hold Inf on purpose (an open Clip bound, as torch.clamp(min=...) exports; a mask's -inf) are not
ranges: calibration leaves them without a histogram instead of calling the model broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.artifacts import TensorInfo
from quantpipe.calibration import collect_histograms
from quantpipe.data import open_dataset


def test_an_open_clip_bound_and_an_unused_inf_mask_get_no_histogram(tmp_path: Path) -> None:
    inits = [numpy_helper.from_array(np.array(1e-10, np.float32), "lo"),
             numpy_helper.from_array(np.array(np.inf, np.float32), "hi"),
             numpy_helper.from_array(np.array([0.0, -np.inf, 0.0, 0.0], np.float32), "mask")]
    # The mask is a Where's branch never taken here: a -inf reaching an activation is refused (finite ranges only).
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
