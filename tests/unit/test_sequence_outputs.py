"""A sequence-of-maps output (skl2onnx's default ZipMap probabilities, found probing): the searches compare the
tensor outputs only, and model.output naming it is refused at load. Before: `quantize` crashed in `auto` ('list' has no
dtype, exit 4), and `run` crashed at evaluation (float() of a dict, exit 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main


def _classifier(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    zipmap_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
         helper.make_node("ZipMap", ["probs"], ["output_probability"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        "skl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
         helper.make_value_info("output_probability", zipmap_type)],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")])
    path = tmp_path / "skl.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
                                ir_version=8), path)
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((16, 4)).astype(np.float32))
    return path


def test_a_zipmap_output_is_left_out_of_the_searches_and_refused_as_model_output(tmp_path: Path) -> None:
    path = _classifier(tmp_path)
    assert main(["quantize", "--model", str(path), "--data", str(tmp_path / "calib.npz"), "--out",
                 str(tmp_path / "o.onnx"), "--workers", "1", "-q"]) == 0
    (tmp_path / "p.yaml").write_text(
        "version: 1\nname: skl\nmodel: {path: skl.onnx, output: output_probability}\n"
        "data: {calibration: {path: calib.npz}, evaluation: {path: eval.npz}}\n"
        "evaluate: {latency: {enabled: false}, sensitivity: {enabled: false}}\n", encoding="utf-8")
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 2
