"""`evaluate.task: detection` through a whole run: a YOLOv8-style head [N, 4 + classes, anchors] decoded into
detections, compared with FP32's in results.json, the gate and the fallback's budget; a detection gate rule on a
classifier is refused at load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.detection import decode
from tests.conftest import task_pipeline


def _detector(tmp_path: Path) -> np.ndarray:
    """x [N, 3, 16, 16] -> Conv -> Sigmoid -> [N, 7, 256] scaled to boxes (cx, cy in 0..16, w, h in 2..8) and 3 class
    scores; returns the FP32 outputs on the evaluation data."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "W2"], ["m"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["m"], ["s"]),
         helper.make_node("Reshape", ["s", "shape"], ["flat"]), helper.make_node("Mul", ["flat", "scale"], ["sc"]),
         helper.make_node("Add", ["sc", "offset"], ["head"])],
        "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 7, 256])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
         numpy_helper.from_array(0.5 * rng.standard_normal((7, 8, 3, 3)).astype(np.float32), "W2"),
         numpy_helper.from_array(np.array([0, 7, 256], np.int64), "shape"),
         numpy_helper.from_array(np.array([16, 16, 6, 6, 1, 1, 1], np.float32).reshape(1, 7, 1), "scale"),
         numpy_helper.from_array(np.array([0, 0, 2, 2, 0, 0, 0], np.float32).reshape(1, 7, 1), "offset")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "det.onnx")
    data = {name: rng.standard_normal((8, 3, 16, 16)).astype(np.float32) for name in ("calib", "eval")}
    for name, x in data.items():
        np.savez(tmp_path / f"{name}.npz", x=x)
    sess = ort.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": data["eval"]})[0]


def _yaml(tmp_path: Path, task: str) -> Path:
    return task_pipeline(tmp_path, "det", f"task: {task}, detection: {{score_threshold: 0.5}}",
                         "{metric: detection_agreement, min: 0.5}",
                         "[{variant: ort-int8, metric: detection_agreement, min: 0.2}]")


def test_a_detection_run_judges_decoded_detections(tmp_path: Path) -> None:
    fp32 = _detector(tmp_path)
    assert sum(len(d.scores) for d in decode(fp32, score_threshold=0.5)) >= 16  # FP32 detects: the metric has work
    assert main(["run", str(_yaml(tmp_path, "detection")), "-q", "--workers", "1"]) == 0
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    (fp32,) = [e for e in results["evaluations"] if e["variant"] == "ort-fp32"]
    (int8,) = [e for e in results["evaluations"] if e["variant"] == "ort-int8"]
    assert fp32["metrics"]["detection_agreement"] == 1.0
    assert 0.2 <= int8["metrics"]["detection_agreement"] <= 1.0
    assert "top1_agreement" not in int8["metrics"]
    assert results["fallback"]["metric"] == "detection_agreement"
    assert [o["metric"] for o in results["gate"]["outcomes"]] == ["detection_agreement"]
    assert "Detection agreement" in (tmp_path / "reports" / "latest" / "report.md").read_text()


def test_a_detection_rule_on_a_classifier_is_refused_at_load(tmp_path: Path, capsys) -> None:
    _detector(tmp_path)
    assert main(["run", str(_yaml(tmp_path, "classification")), "-q"]) == 2
    assert "detection" in capsys.readouterr().err


def test_detection_settings_that_do_not_fit_the_head_are_refused_at_load(tmp_path: Path, capsys) -> None:
    _detector(tmp_path)
    path = _yaml(tmp_path, "detection")
    path.write_text(path.read_text().replace("detection: {score_threshold: 0.5}",
                                             "detection: {score_threshold: 0.5, layout: NAC}"))
    assert main(["run", str(path), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "looks like NCA" in err and "reports" not in {p.name for p in tmp_path.iterdir()}
    path.write_text(path.read_text().replace("layout: NAC", "layout: auto").replace("score_threshold: 0.5",
                                                                                    "score_threshold: 1.5"))
    assert main(["run", str(path), "-q"]) == 2


def test_a_reference_that_detects_nothing_is_warned_about(tmp_path: Path, caplog) -> None:
    fp32 = _detector(tmp_path)
    from quantpipe.evaluate import warn_if_no_detections
    from quantpipe.taskmetrics import TaskSpec

    assert not warn_if_no_detections(fp32, TaskSpec(task="detection", det_score_threshold=0.5))
    quiet = fp32.copy()
    quiet[:, 4:] = 0.1  # every score under the threshold
    assert warn_if_no_detections(quiet, TaskSpec(task="detection", det_score_threshold=0.5))
    assert "detects nothing" in caplog.text
    assert warn_if_no_detections(fp32, TaskSpec(task="detection", det_score_threshold=0.0, det_max_detections=5))
    assert "every anchor" in caplog.text


def test_a_sensitivity_metric_of_another_task_is_refused_at_load(tmp_path: Path, capsys) -> None:
    _detector(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text("version: 1\nmodel: {path: det.onnx}\ndata: {calibration: {path: calib.npz}, evaluation: "
                    "{path: eval.npz}}\nevaluate: {sensitivity: {metric: detection_agreement}}\n", encoding="utf-8")
    assert main(["run", str(path), "-q"]) == 2
    assert "evaluate.sensitivity.metric detection_agreement needs evaluate.task: detection" in \
        " ".join(capsys.readouterr().err.split())


def test_a_dense_map_without_a_box_is_warned_about(caplog) -> None:
    # basic-pitch's note map: one pitch bin wide notes, no component min_box_side (3) pixels a side, so box_agreement
    # scored 1.0 for INT8 and for an FP16 model whose output was NaN (found probing).
    from quantpipe.evaluate import warn_if_no_detections
    from quantpipe.taskmetrics import TaskSpec

    notes = np.zeros((4, 1, 32, 88), np.float32)
    notes[:, 0, 5:20, 40] = 0.9  # a note: 15 frames long, one pitch bin wide
    assert warn_if_no_detections(notes, TaskSpec(task="dense", threshold=0.3))
    assert "holds no component of at least evaluate.dense.min_box_side (3) pixels a side" in caplog.text
    assert not warn_if_no_detections(notes, TaskSpec(task="dense", threshold=0.3, min_box_side=1))
    notes[:, 0, 5:20, 40:43] = 0.9  # three bins wide: a box
    assert not warn_if_no_detections(notes, TaskSpec(task="dense", threshold=0.3))


def test_a_detector_whose_scores_and_boxes_are_split_over_outputs_is_refused_at_load(tmp_path, capsys) -> None:
    # PP-PicoDet's layout model: class-score heads [1, A, 10] beside box-distribution heads [1, A, 32]; task detection
    # read 4 score columns as a box and reported detection_agreement 0.092 for an F1 of 0.737 (found probing).
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from quantpipe.cli import main
    from tests.conftest import float_model, task_pipeline

    rng = np.random.default_rng(0)
    model = float_model(
        [helper.make_node("MatMul", ["x", "Ws"], ["m"]), helper.make_node("Sigmoid", ["m"], ["scores"]),
         helper.make_node("MatMul", ["x", "Wb"], ["boxes"])],
        [numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "Ws"),
         numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "Wb")],
        {"x": ["N", 50, 8]}, {"scores": ["N", 50, 10], "boxes": ["N", 50, 32]})
    onnx.save(model, tmp_path / "pico.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((8, 50, 8)).astype(np.float32))
    path = task_pipeline(tmp_path, "pico", "task: detection", "null", "[]")
    path.write_text(path.read_text().replace("model: {path: pico.onnx}", "model: {path: pico.onnx, output: scores}"))
    assert main(["run", str(path), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.output 'scores' (50 anchors) shares its anchors with boxes" in err and "a hook metric" in err
