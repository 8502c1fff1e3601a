"""`evaluate.task: segmentation` through a whole run: class maps compared with FP32's by pixel and by mean IoU, in
results.json, the gate and the fallback's budget; a segmentation gate rule on a classifier is refused at load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from tests.conftest import task_pipeline


def _segmenter(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "W2"], ["logits"])],
        "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5, 16, 16])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((5, 8, 1, 1)).astype(np.float32), "W2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "seg.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))


def _yaml(tmp_path: Path, task: str) -> Path:
    return task_pipeline(tmp_path, "seg", f"task: {task}", "{metric: pixel_agreement, min: 0.9}",
                         "[{variant: ort-int8, metric: pixel_agreement, min: 0.5}, "
                         "{variant: ort-int8, metric: miou, min: 0.3}]")


def test_a_segmentation_run_judges_class_maps(tmp_path: Path) -> None:
    _segmenter(tmp_path)
    assert main(["run", str(_yaml(tmp_path, "segmentation")), "-q", "--workers", "1"]) == 0
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    (int8,) = [e for e in results["evaluations"] if e["variant"] == "ort-int8"]
    assert 0.9 <= int8["metrics"]["pixel_agreement"] <= 1.0 and 0.0 < int8["metrics"]["miou"] <= 1.0
    assert "top1_agreement" not in int8["metrics"]  # not read as 5 x 16 x 16 class scores per sample
    assert results["fallback"]["metric"] == "pixel_agreement"
    assert [o["metric"] for o in results["gate"]["outcomes"]] == ["pixel_agreement", "miou"]


def test_a_segmentation_rule_on_a_classifier_is_refused_at_load(tmp_path: Path, capsys) -> None:
    _segmenter(tmp_path)
    assert main(["run", str(_yaml(tmp_path, "classification")), "-q"]) == 2
    assert "segmentation" in capsys.readouterr().err


def test_a_task_that_cannot_read_the_output_is_refused_at_load(tmp_path: Path, capsys) -> None:
    # task dense on a [N, L] output ended in exit 4 after calibration, the build and the FP32 evaluation (probing).
    from tests.conftest import make_mlp

    make_mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((8, 8)).astype(np.float32))
    path = task_pipeline(tmp_path, "mlp", "task: dense", "null", "[]")
    assert main(["run", str(path), "-q", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.task is dense, but the output has shape [1, 4]" in err and "found at load" in err
    assert not (tmp_path / "reports" / ".work").exists() or not any((tmp_path / "reports" / ".work").rglob("*.cache"))


def test_a_channels_last_map_read_channels_first_is_warned_about_at_load(tmp_path: Path, capsys) -> None:
    # [N, 16, 16, 3] read as [N, C, H, W] is 16 maps of 16 x 3 pixels (found probing a TFLite export's map).
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["h"], ["s"]),
         helper.make_node("Transpose", ["s"], ["maps"], perm=[0, 2, 3, 1])],
        "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 16, 16, 3])],
        [numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "W1")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "nhwc.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    for channels, warned in (("auto", True), ("last", False)):
        path = task_pipeline(tmp_path, "nhwc", f"task: dense, dense: {{channels: {channels}}}", "null", "[]")
        assert main(["run", str(path), "-q", "--workers", "1", "--run-id", channels]) == 0  # two runs in a second
        err = " ".join(capsys.readouterr().err.split())
        assert ("as maps of 16 x 3 pixels" in err and "evaluate.dense.channels: last" in err) is warned
