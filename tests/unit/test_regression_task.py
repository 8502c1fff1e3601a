"""`evaluate.task: regression`: an output read as numbers (a score, an estimate, coordinates) is judged in its own
units, against its variation over the samples and by the order it puts the samples in; an offset it sits around is
no signal (a speech-quality model's MOS read 24.6 dB and cosine 0.9994 for an error that flipped 3 of 64 accept
decisions; found probing)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from quantpipe import metrics as M
from quantpipe.cli import main
from quantpipe.collapse import find_collapse
from quantpipe.config import CollapseConfig, FallbackConfig
from tests.conftest import float_model, task_pipeline
from tests.report_data import synthetic_results


def test_mean_abs_error_is_in_the_outputs_units() -> None:
    ref = np.array([[2.5], [3.0], [3.5]])
    assert M.mean_abs_error(ref + [[0.1], [-0.2], [0.0]], ref) == pytest.approx(0.1)


def test_centered_sqnr_ignores_the_offset_the_plain_one_counts() -> None:
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((64, 2))
    err = 0.1 * rng.standard_normal((64, 2))
    # against the variation: 10 log10(sum (ref - mean)^2 / sum err^2), whatever offset is added
    want = 10 * math.log10(np.sum((spread - spread.mean(axis=0)) ** 2) / np.sum(err**2))
    for offset in (0.0, 3.0, 100.0):
        assert M.centered_sqnr_db(spread + offset + err, spread + offset) == pytest.approx(want)
    assert M.sqnr_db(spread + 100 + err, spread + 100) > want + 30  # the plain one reads the offset as signal
    assert M.centered_sqnr_db(spread, spread) == math.inf
    assert M.centered_sqnr_db(np.ones((4, 1)), np.full((4, 1), 2.0)) == -math.inf  # a reference that never varies


def test_rank_correlation_is_spearmans() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pred = np.array([1.0, 3.0, 2.0, 4.0, 5.0])  # one swap: d = (0, 1, -1, 0, 0)
    assert M.rank_correlation(pred, ref) == pytest.approx(1 - 6 * 2 / (5 * (25 - 1)))
    assert M.rank_correlation(ref * 7 - 3, ref) == pytest.approx(1.0)  # any increasing map keeps the order
    assert M.rank_correlation(-ref, ref) == pytest.approx(-1.0)
    # ties share their mean rank: pred ranks (1.5, 1.5, 3, 4), ref (1, 2, 3, 4)
    r = np.array([1.5, 1.5, 3, 4]) - 2.5
    f = np.array([1.0, 2, 3, 4]) - 2.5
    assert M.rank_correlation(np.array([0.0, 0, 1, 2]), np.array([0.0, 1, 2, 3])) == pytest.approx(
        float(r @ f / math.sqrt((r @ r) * (f @ f))))
    # per value, over the values FP32 varies in; a value INT8 holds constant counts 0
    two = np.stack([ref, np.full(5, 2.0), ref], axis=1)
    got = np.stack([pred, np.full(5, 9.0), np.zeros(5)], axis=1)
    assert M.rank_correlation(got, two) == pytest.approx((1 - 6 * 2 / 120 + 0.0) / 2)
    assert math.isnan(M.rank_correlation(ref[:2], ref[:2]))


def _regressor(tmp_path: Path, offset: float = 3.0) -> None:
    """x [N, 8] -> a score around `offset` [N, 1] (a MOS-like estimate) through a hidden ReLU layer."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = (0.05 * rng.standard_normal((16, 1))).astype(np.float32)
    model = float_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["m"]), helper.make_node("Add", ["m", "B"], ["score"])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
         numpy_helper.from_array(np.array([offset], np.float32), "B")],
        {"x": ["N", 8]}, {"score": ["N", 1]})
    import onnx

    onnx.save(model, tmp_path / "reg.onnx")
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((48, 8)).astype(np.float32))


def test_a_regression_run_judges_the_score_in_its_units(tmp_path: Path) -> None:
    _regressor(tmp_path)
    path = task_pipeline(tmp_path, "reg", "task: regression", "{metric: mae, max: 0.5}",
                         "[{variant: ort-int8, metric: mae, max: 0.5}, "
                         "{variant: ort-int8, metric: centered_sqnr_db, min: 5}]")
    assert main(["run", str(path), "-q", "--workers", "1"]) == 0
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    (int8,) = [e for e in results["evaluations"] if e["variant"] == "ort-int8"]
    m = int8["metrics"]
    assert 0 < m["mae"] < 0.5 and -1 <= m["rank_correlation"] <= 1
    assert m["sqnr_db"] > m["centered_sqnr_db"] + 10  # the offset of 3 is no signal to the centered one
    assert "top1_agreement" not in m
    assert results["fallback"]["metric"] == "mae" and results["fallback"]["lower_is_better"] is True
    assert [o["metric"] for o in results["gate"]["outcomes"]] == ["mae", "centered_sqnr_db"]


def test_a_top1_rule_on_a_regression_is_refused_at_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _regressor(tmp_path)
    path = task_pipeline(tmp_path, "reg", "task: regression", "null",
                         "[{variant: ort-int8, metric: top1_agreement, min: 0.99}]")
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "top1_agreement is measured only with evaluate.task: classification" in err and "mae" in err


@pytest.mark.parametrize(("bound", "ok"), [({"metric": "mae", "max": 0.1}, True), ({"metric": "mae", "min": 0.1}, False),
                                            ({"metric": "mae", "min": 0.0, "max": 0.1}, False),
                                            ({"metric": "centered_sqnr_db", "min": 30}, True),
                                            ({"metric": "top1_agreement", "min": 0.99, "max": 1.0}, False)])
def test_a_fallback_budget_bounds_its_metric_the_way_it_reads(bound: dict, ok: bool) -> None:
    if ok:
        FallbackConfig(**bound)
    else:
        with pytest.raises(ValueError, match="alone"):
            FallbackConfig(**bound)


def test_the_collapse_limits_judge_a_regression_against_its_variation(tmp_path: Path) -> None:
    results = synthetic_results(tmp_path)
    evals = tuple(dataclasses.replace(e, metrics={"sqnr_db": 24.6, "cosine": 0.9994, "mae": 0.08,
                                                  "centered_sqnr_db": 12.5, "rank_correlation": 0.97})
                  if e.variant == "ort-int8" else e for e in results.evaluations)
    results = dataclasses.replace(results, evaluations=evals, fallback=None)
    (c,) = find_collapse(results, CollapseConfig())
    assert c.severity == "degraded"
    assert c.problems[0] == "output SQNR 12.50 dB against FP32's variation over the samples (degraded below 20 dB)"
    assert "metric: centered_sqnr_db" in c.fix_yaml and "min: 30" in c.fix_yaml


def test_quantize_says_a_score_around_an_offset_against_its_variation(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # A speech-quality score's closing line read 46.2 dB against FP32 and nothing else; against its variation over
    # the samples it was 29.7 dB (found probing).
    import re

    import onnxruntime as ort

    _regressor(tmp_path, offset=40.0)
    out = tmp_path / "reg.int8.onnx"
    assert main(["quantize", "--model", str(tmp_path / "reg.onnx"), "--data", str(tmp_path / "calib.npz"),
                 "--out", str(out), "-q"]) == 0
    cap = capsys.readouterr()
    said = " ".join((cap.out + cap.err).split())
    got = re.search(r"INT8 output SQNR (\S+) dB .*; score sits around an offset: (\S+) dB against its variation "
                    r"over these samples \((\S+) dB lower", said)
    assert got is not None, said
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.load(tmp_path / "calib.npz")["x"]
    ref, int8 = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for p in (tmp_path / "reg.onnx", out))
    assert float(got[1]) == pytest.approx(M.sqnr_db(int8, ref), abs=0.051)
    assert float(got[2]) == pytest.approx(M.centered_sqnr_db(int8, ref), abs=0.051)
    assert float(got[3]) == pytest.approx(M.offset_db(ref), abs=0.051) and float(got[3]) > 10


def _fp32(tmp_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "reg.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].astype(np.float64)


def _targets(tmp_path: Path, noise: float = 0.1) -> None:
    """eval.npz again, with labels: FP32's score plus noise, as ground truth a regressor misses by a little."""
    x = np.load(tmp_path / "eval.npz")["x"]
    y = _fp32(tmp_path, x) + noise * np.random.default_rng(1).standard_normal((len(x), 1))
    np.savez(tmp_path / "eval.npz", x=x, mos=y.astype(np.float32))


def test_regression_labels_are_target_values_judged_in_their_units(tmp_path: Path) -> None:
    _regressor(tmp_path)
    _targets(tmp_path)
    path = task_pipeline(tmp_path, "reg", "task: regression", "null",
                         "[{variant: ort-int8, metric: label_mae_increase, max: 0.05}]")
    path.write_text(path.read_text().replace("evaluation: {path: eval.npz}", "evaluation: {path: eval.npz, labels: mos}"))
    assert main(["run", str(path), "-q", "--workers", "1"]) == 0
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    got = {e["variant"]: e["metrics"] for e in results["evaluations"] if e["metrics"]}
    data = np.load(tmp_path / "eval.npz")
    fp32 = got["ort-fp32"]["label_mae"]
    assert fp32 == pytest.approx(float(np.mean(np.abs(_fp32(tmp_path, data["x"]) - data["mos"]))), rel=1e-5)
    assert got["ort-int8"]["label_mae_increase"] == pytest.approx(got["ort-int8"]["label_mae"] - fp32)
    assert [o["metric"] for o in results["gate"]["outcomes"]] == ["label_mae_increase"]


@pytest.mark.parametrize(("labels", "said"), [
    (np.zeros((48, 2), np.float32), "holds 2 target value(s) per sample, but model.output 'score' holds 1"),
    (np.full((48, 1), np.nan, np.float32), "NaN or infinite values in 48 sample(s)"),
    (np.array(["a"] * 48), "regression labels are numbers")])
def test_regression_labels_that_do_not_fit_are_refused_at_load(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               labels: np.ndarray, said: str) -> None:
    _regressor(tmp_path)
    np.savez(tmp_path / "eval.npz", x=np.load(tmp_path / "eval.npz")["x"], mos=labels)
    path = task_pipeline(tmp_path, "reg", "task: regression", "null", "[]")
    path.write_text(path.read_text().replace("evaluation: {path: eval.npz}", "evaluation: {path: eval.npz, labels: mos}"))
    assert main(["run", str(path), "-q"]) == 2
    assert said in " ".join(capsys.readouterr().err.split())


def test_a_folder_of_samples_holds_each_ones_target_values(tmp_path: Path) -> None:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.data import open_dataset

    folder = tmp_path / "eval"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=np.zeros((1, 8), np.float32), y=np.array([[0.5 * i, 2.0]]))
    ds = open_dataset(folder, [TensorInfo("x", "float32", ["N", 8])], labels_key="y", role="evaluation",
                      target_labels=True)
    np.testing.assert_array_equal(ds.labels, [[0.0, 2.0], [0.5, 2.0], [1.0, 2.0]])


def test_the_sensitivity_reads_a_regression_against_its_variation(tmp_path: Path) -> None:
    # sqnr_db and centered_sqnr_db share their noise: the same order, every row lower by the offset's dB.
    _regressor(tmp_path)
    rows = {}
    for metric in ("sqnr_db", "centered_sqnr_db"):
        path = task_pipeline(tmp_path, "reg", "task: regression", "null", "[]")
        path.write_text(path.read_text().replace("sensitivity: {enabled: false}",
                                                 f"sensitivity: {{enabled: true, metric: {metric}}}"))
        assert main(["run", str(path), "-q", "--workers", "1", "--run-id", metric]) == 0  # two runs in a second
        results = json.loads((tmp_path / "reports" / metric / "results.json").read_text())
        rows[metric] = [(r["node"], r["output_metric"]) for r in results["sensitivity"]]
        assert all(r["output_sqnr_db"] is None for r in results["sensitivity"])  # continuous: no tie-break column
    assert len(rows["sqnr_db"]) == 2 and [n for n, _ in rows["sqnr_db"]] == [n for n, _ in rows["centered_sqnr_db"]]
    offset = M.offset_db(_fp32(tmp_path, np.load(tmp_path / "eval.npz")["x"]))
    for (_, plain), (_, centered) in zip(rows["sqnr_db"], rows["centered_sqnr_db"], strict=True):
        assert plain - centered == pytest.approx(offset, abs=1e-3)


def test_the_offset_is_summed_batch_by_batch_as_it_is_whole() -> None:
    rng = np.random.default_rng(0)
    coords = 96 + 8 * rng.standard_normal((70, 1404))  # landmark pixels around the crop's middle
    want = 10 * math.log10(np.sum(coords**2) / np.sum((coords - coords.mean(axis=0)) ** 2))
    assert M.offset_db(coords) == pytest.approx(want, abs=1e-9)
    sums = M.OffsetSums()
    for i in range(0, 70, 32):
        sums.add(coords[i:i + 32])
    assert sums.db() == pytest.approx(want, abs=1e-9) and sums.mean() == pytest.approx(coords.mean())
    assert M.offset_db(np.full((64, 3), 0.1, np.float32)) == math.inf  # constant: no variation, not 120 dB of rounding
    sums.add(np.zeros((2, 5)))  # samples of another shape (dynamic axes): no offset to say
    assert math.isnan(sums.db())


def test_coordinates_around_the_crops_middle_are_warned_about_as_class_scores(caplog: pytest.LogCaptureFixture) -> None:
    # Face landmarks, 1404 values per sample: 45.3 dB, 29.7 around their mean position; only outputs of <= 64 values
    # were looked at (found probing). Class logits and embeddings sit at 0.5-4.7 dB: not said.
    from quantpipe.evaluate import warn_if_offset_dominates
    from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

    rng = np.random.default_rng(0)
    coords = 96 + 8 * rng.standard_normal((64, 1404))
    with caplog.at_level("WARNING"):
        assert warn_if_offset_dominates(coords, "conv2d_21", CLASSIFICATION)
    assert "coordinates, set evaluate.task: regression" in caplog.text
    assert not warn_if_offset_dominates(rng.standard_normal((64, 1000)) * 3 + 0.5, "logits", CLASSIFICATION)
    assert not warn_if_offset_dominates(coords, "conv2d_21", TaskSpec(task="regression"))


def test_a_fallback_int8_larger_than_fp16_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A face-landmark model's fallback kept 12 layers in float: 1.99 MB against FP16's 1.22 MB, unsaid (found probing).
    _regressor(tmp_path)
    path = task_pipeline(tmp_path, "reg", "task: regression", "{metric: mae, max: 0.0025}", "[]")
    path.write_text(path.read_text().replace("precisions: [fp32, int8]", "precisions: [fp32, fp16, int8]"))
    assert main(["run", str(path), "-q", "--workers", "1"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    sizes = {v["precision"]: v["size_bytes"] for v in results["variants"] if v["backend"] == "onnxruntime"}
    assert results["fallback"]["steps"] and sizes["int8"] > sizes["fp16"]
    assert "kept in float by the accuracy fallback, is" in err and "larger than the FP16 model" in err


def test_a_regression_ranks_its_layers_against_the_variation_unless_told() -> None:
    from quantpipe.evalconfig import EvaluateConfig

    assert EvaluateConfig(task="regression").sensitivity.metric == "centered_sqnr_db"
    assert EvaluateConfig(task="regression", sensitivity={"top": 3}).sensitivity.metric == "centered_sqnr_db"
    assert EvaluateConfig(task="regression", sensitivity={"metric": "sqnr_db"}).sensitivity.metric == "sqnr_db"
    assert EvaluateConfig().sensitivity.metric == "sqnr_db"


def test_pose_landmarks_nine_db_around_their_mean_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # Pose landmarks sat 9.3 dB around their mean: under a 10 dB line, unsaid, at 16.1 dB against FP32 and 6.8 around
    # the mean (found probing). The open and real sets' class scores, embeddings and maps sit at 0.5-4.7 dB.
    from quantpipe.evaluate import warn_if_offset_dominates
    from quantpipe.taskmetrics import CLASSIFICATION

    rng = np.random.default_rng(0)
    spread = rng.standard_normal((64, 195))
    pose = 2.75 * np.sign(rng.standard_normal(195)) + spread  # each coordinate's mean 2.6 spreads away from it
    assert 9.0 < M.offset_db(pose) < 9.6
    with caplog.at_level("WARNING"):
        assert warn_if_offset_dominates(pose, "Identity", CLASSIFICATION)
    logits = 2 * rng.standard_normal((64, 2)) + np.array([0.3, -0.3])  # two class logits, neither class dominant
    assert M.offset_db(logits) < 6 and not warn_if_offset_dominates(logits, "logits", CLASSIFICATION)
