"""`evaluate.valid_mask`: padded sequences scored on their real positions alone, in results.json, the gate and the
fallback; refused at load where it cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.metrics import sqnr_db
from quantpipe.taskmetrics import TaskSpec
from tests.conftest import task_pipeline

N, T = 16, 12


def _tagger(tmp_path: Path, classes: int = 3) -> None:
    """x [N, T, 4] -> MatMul -> Relu -> MatMul -> scores [N, T, 3] (a token tagger; `classes` other than 3: a score
    per position); `mask` [N, T] marks the real tokens. Padding holds large junk, as a padded batch can, that nobody
    reads."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["scores"])],
        "tagger", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 4]),
                   helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "T", classes])],
        [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((16, classes)).astype(np.float32), "W2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "tag.onnx")
    for name in ("calib", "eval"):
        lengths = rng.integers(3, T + 1, size=N)
        mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
        x = np.where(mask[..., None] > 0, rng.standard_normal((N, T, 4)), 30 * rng.standard_normal((N, T, 4)))
        np.savez(tmp_path / f"{name}.npz", x=x.astype(np.float32), mask=mask)


def _yaml(tmp_path: Path, extra: str) -> Path:
    return task_pipeline(tmp_path, "tag", f"task: segmentation, segmentation: {{class_axis: -1}}{extra}",
                         "{metric: pixel_agreement, min: 0.5}",
                         "[{variant: ort-int8, metric: pixel_agreement, min: 0.5}]")


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic exact
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(["scores"], feeds)[0]


def test_a_masked_run_scores_the_real_positions_alone(tmp_path: Path) -> None:
    _tagger(tmp_path)
    assert main(["run", str(_yaml(tmp_path, ", valid_mask: mask")), "-q", "--workers", "1"]) == 0
    run = tmp_path / "reports" / "latest"
    results = json.loads((run / "results.json").read_text())
    (int8,) = [e["metrics"] for e in results["evaluations"] if e["variant"] == "ort-int8"]
    data = dict(np.load(tmp_path / "eval.npz"))
    valid = data["mask"] > 0
    fp32, q = _run(tmp_path / "tag.onnx", data), _run(run / "models" / "model.int8.onnx", data)
    # Every number on the real tokens only, as one computes them by hand.
    assert int8["sqnr_db"] == pytest.approx(sqnr_db(q[valid], fp32[valid]), rel=1e-6)
    assert int8["pixel_agreement"] == pytest.approx(np.mean(q[valid].argmax(-1) == fp32[valid].argmax(-1)))
    assert int8["sqnr_db"] != pytest.approx(sqnr_db(q, fp32), rel=1e-3)  # the padding would have moved it
    assert results["fallback"]["metric"] == "pixel_agreement"
    assert TaskSpec(task="segmentation", valid_mask="mask").judged(q, valid).shape == (1, int(valid.sum()), 3)


@pytest.mark.parametrize(("extra", "said"), [
    (", valid_mask: lengths", "evaluate.valid_mask is 'lengths', which is not an input"),
    (", valid_mask: x", "evaluate.valid_mask 'x' has shape [1, 12, 4]"),
])
def test_a_mask_that_cannot_apply_is_refused_at_load(tmp_path: Path, capsys, extra: str, said: str) -> None:
    _tagger(tmp_path)
    assert main(["run", str(_yaml(tmp_path, extra)), "-q", "--workers", "1"]) == 2
    assert said in capsys.readouterr().err


def test_a_mask_over_ctc_or_detection_outputs_is_refused() -> None:
    from pydantic import ValidationError

    from quantpipe.evalconfig import EvaluateConfig

    with pytest.raises(ValidationError, match="valid_mask reads the output's positions"):
        EvaluateConfig(task="ctc", valid_mask="mask")


def test_a_fallback_on_calibration_samples_of_several_lengths_is_refused_at_load(tmp_path: Path, capsys) -> None:
    # A folder of variable-length samples calibrates fine, but the fallback compares outputs as one array: it ended
    # in exit 4 in the middle of the build (found probing). Refused at load, with the way out (data.validation).
    _tagger(tmp_path)
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, t in enumerate((5, 9, 7)):
        np.savez(folder / f"s{i}.npz", x=rng.standard_normal((1, t, 4)).astype(np.float32),
                 mask=np.ones((1, t), np.float32))
    path = _yaml(tmp_path, ", valid_mask: mask")
    path.write_text(path.read_text().replace("calibration: {path: calib.npz}", "calibration: {path: calib}"))
    assert main(["run", str(path), "-q", "--workers", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "build.fallback chooses on the calibration data" in err and "data.validation" in err


def _labelled(tmp_path: Path, labels_of: str = "fp32") -> dict[str, np.ndarray]:
    """eval.npz with `tag` labels [N, T]: FP32's class on the real tokens, a third of them flipped (so that top-1
    is no agreement in disguise), -100 on the padding and on every fifth real token (not scored)."""
    data = dict(np.load(tmp_path / "eval.npz"))
    fp32 = _run(tmp_path / "tag.onnx", {k: data[k] for k in ("x", "mask")}).argmax(-1)
    rng = np.random.default_rng(1)
    tag = np.where(rng.random(fp32.shape) < 1 / 3, (fp32 + 1) % 3, fp32)
    tag[(data["mask"] == 0) | (np.arange(T)[None, :] % 5 == 4)] = -100
    data["tag"] = tag.astype(np.int64) if labels_of == "fp32" else tag[:, :T - 1]
    np.savez(tmp_path / "eval.npz", **data)
    return data


def _tag_yaml(tmp_path: Path, labels: str, mask: str = ", valid_mask: mask") -> Path:
    path = task_pipeline(tmp_path, "tag", f"metrics: [top1, top1_agreement, sqnr_db]{mask}", "null",
                         "[{variant: ort-fp32, metric: top1, min: 0.0}]")
    text = path.read_text().replace("evaluation: {path: eval.npz}", f"evaluation: {{path: eval.npz, labels: {labels}}}")
    path.write_text(text.replace("        fallback: null}", "        }"))
    return path


def test_labels_per_token_are_scored_on_the_labelled_real_positions(tmp_path: Path, capsys) -> None:
    _tagger(tmp_path)
    data = _labelled(tmp_path)
    assert main(["run", str(_tag_yaml(tmp_path, "tag")), "-q", "--workers", "1"]) == 0, capsys.readouterr().err
    run = tmp_path / "reports" / "latest"
    results = json.loads((run / "results.json").read_text())
    metrics = {e["variant"]: e["metrics"] for e in results["evaluations"]}
    scored = (data["mask"] > 0) & (data["tag"] >= 0)
    for variant, model in (("ort-fp32", tmp_path / "tag.onnx"), ("ort-int8", run / "models" / "model.int8.onnx")):
        pred = _run(model, {k: data[k] for k in ("x", "mask")}).argmax(-1)
        assert metrics[variant]["top1"] == pytest.approx(np.mean(pred[scored] == data["tag"][scored]))
    assert 0.5 < metrics["ort-fp32"]["top1"] < 0.8  # a third flipped: not agreement with FP32 in disguise
    assert "-100" not in capsys.readouterr().err


@pytest.mark.parametrize(("labels_of", "mask", "said"), [
    ("short", ", valid_mask: mask", "labels array 'tag' has shape [16, 11], a label per position, but model.output"),
    ("fp32", "", "set evaluate.valid_mask (its positions are scored)"),
])
def test_labels_per_token_that_cannot_apply_are_refused_at_load(tmp_path: Path, capsys, labels_of: str, mask: str,
                                                                 said: str) -> None:
    _tagger(tmp_path)
    _labelled(tmp_path, labels_of)
    assert main(["run", str(_tag_yaml(tmp_path, "tag", mask)), "-q", "--workers", "1"]) == 2
    assert said in " ".join(capsys.readouterr().err.split())


def test_labels_per_token_out_of_the_class_range_are_refused(tmp_path: Path, capsys) -> None:
    _tagger(tmp_path)
    data = _labelled(tmp_path)
    data["tag"][0, 0] = 7
    np.savez(tmp_path / "eval.npz", **data)
    assert main(["run", str(_tag_yaml(tmp_path, "tag")), "-q", "--workers", "1"]) == 2
    assert "class indices must be in [0, 3)" in " ".join(capsys.readouterr().err.split())


def test_labels_one_per_sample_beside_a_mask_are_said_unread(tmp_path: Path, capsys) -> None:
    _tagger(tmp_path)
    data = dict(np.load(tmp_path / "eval.npz"))
    np.savez(tmp_path / "eval.npz", **data, cls=np.arange(N) % 3)
    assert main(["run", str(_tag_yaml(tmp_path, "cls")), "-q", "--workers", "1"]) == 1  # the top1 rule: unmeasured
    out = capsys.readouterr()
    assert "one label per sample, but evaluate.valid_mask scores each position" in " ".join(out.err.split())
    assert "one per position [N, T] with evaluate.valid_mask" in " ".join(out.out.split())


def test_a_top1_rule_on_one_score_per_position_is_refused_at_load(tmp_path: Path, capsys) -> None:
    _tagger(tmp_path, classes=1)
    path = task_pipeline(tmp_path, "tag", "metrics: [top1_agreement, sqnr_db], valid_mask: mask", "null",
                         "[{variant: ort-int8, metric: top1_agreement, min: 0.9}]")
    path.write_text(path.read_text().replace("        fallback: null}", "        }"))
    assert main(["run", str(path), "-q", "--workers", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has shape [1, 12, 1] for one sample: one value per position, which top-1 cannot be read from" in err
