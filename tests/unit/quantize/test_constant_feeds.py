"""A part cut below a tensor copies in the Constant nodes it reads instead of feeding them: DeepLabV3's ASPP pooling
branch as torch.onnx.export (legacy) writes it made `calibration.use: auto` crash ("Number of elements of input
'sizes' (0)", exit 4; found probing), since a fed index tensor leaves onnxruntime's shape inference without its value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.quantize.downstream import cut_below


def _aspp_pool(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.array(v, np.int64), n + "_v"))
             for n, v in [("s0", [0]), ("s2", [2]), ("i2", 2), ("i3", 3), ("ax0", [0])]]
    nodes += [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("HardSwish", ["c1"], ["hs"]),
        helper.make_node("GlobalAveragePool", ["hs"], ["gap"]), helper.make_node("Conv", ["gap", "W2"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r"]), helper.make_node("Shape", ["r"], ["shp_r"]),
        helper.make_node("Slice", ["shp_r", "s0", "s2"], ["nc"]), helper.make_node("Shape", ["hs"], ["shp_h"]),
        helper.make_node("Gather", ["shp_h", "i2"], ["g2"], axis=0),
        helper.make_node("Gather", ["shp_h", "i3"], ["g3"], axis=0),
        helper.make_node("Unsqueeze", ["g2", "ax0"], ["u2"]), helper.make_node("Unsqueeze", ["g3", "ax0"], ["u3"]),
        helper.make_node("Concat", ["u2", "u3"], ["hw"], axis=0), helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["up"], mode="linear"),
        helper.make_node("Concat", ["hs", "up"], ["cat"], axis=1), helper.make_node("Conv", ["cat", "W3"], ["out"])]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W1", (4, 3, 3, 3)), ("W2", (4, 4, 1, 1)), ("W3", (2, 8, 1, 1)))]
    g = helper.make_graph(nodes, "aspp_pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2, 16, 16])], inits)
    path = tmp_path / "aspp.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    return path


def test_constant_nodes_are_copied_into_a_part_not_fed(tmp_path: Path) -> None:
    path = _aspp_pool(tmp_path)
    cut = cut_below(onnx.load(path), ["hs"])
    assert not {"s0", "s2", "i2", "i3", "ax0"} & set(cut.feeds)
    assert {"i2", "i3", "ax0"} <= {o for n in cut.nodes for o in n.output}
    assert main(["quantize", "--model", str(path), "--data", str(tmp_path / "calib.npz"), "--method", "auto",
                 "--out", str(tmp_path / "o.onnx"), "--workers", "1", "-q"]) == 0
