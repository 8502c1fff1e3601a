"""Evaluation samples of two sizes through a fully convolutional model: model.output changes shape with the input,
which evaluation cannot compare as one array. Refused at load (exit 2), before calibrating; before: refused only at
evaluation, after calibration and the build (found probing a segmentation model on photos of two sizes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main


def _fcn(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["y"], ["pooled"])],
        "fcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4, 1, 1])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "fcn.onnx")
    for name in ("calib", "eval"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(6):
            s = sizes[i % len(sizes)]
            np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((1, 3, s, s)).astype(np.float32))


def _yaml(tmp_path: Path, output: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"version: 1\nname: fcn\nmodel: {{path: fcn.onnx, output: {output}}}\n"
        "data: {calibration: {path: calib}, evaluation: {path: eval}}\n"
        "build: {backends: {onnxruntime: {precisions: [fp32]}, tensorrt: {required: false}}}\n"
        "evaluate: {latency: {enabled: false}, sensitivity: {enabled: false}}\nreport: {dir: reports}\n",
        encoding="utf-8")
    return path


def test_an_output_that_follows_the_input_size_is_refused_at_load(tmp_path: Path, capsys) -> None:
    _fcn(tmp_path, (8, 12))
    assert main(["run", str(_yaml(tmp_path, "y")), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "output 'y' of the FP32 model" in err and "(4, 8, 8)" in err and "(4, 12, 12)" in err
    assert "before calibrating" in err and "data.evaluation samples of one shape" in err
    assert not (tmp_path / "reports" / "latest").exists()  # nothing ran


def test_a_fixed_size_output_of_the_same_data_runs(tmp_path: Path) -> None:
    # Also: the first-run check asked for 2 samples, got 1 (the folder's second sample has another shape) and refused
    # the pooled output as "not holding the samples on axis 0".
    _fcn(tmp_path, (8, 12))
    assert main(["run", str(_yaml(tmp_path, "pooled")), "-q"]) == 0
