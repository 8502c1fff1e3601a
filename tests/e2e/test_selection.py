"""Selection never sees the judged data (issue 14): what the build chooses (the accuracy fallback) is chosen on the
calibration data or `data.validation`, never on `data.evaluation`, and a change of the evaluation data re-runs only
evaluate, report and gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantpipe.cli import main
from quantpipe.config import parse_config
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL
from tests.e2e.test_pipeline import example_config, write_config


def _fast(tmp: Path, **fallback: Any) -> dict:
    """The example with the fallback on, ONNX Runtime FP32 + INT8 only, no sensitivity, short latency."""
    cfg = example_config(tmp)
    cfg["calibration"] = {"methods": ["minmax"], "use": "minmax"}
    cfg["build"]["backends"] = {"onnxruntime": {"precisions": ["fp32", "int8"]}, "tensorrt": {"enabled": False}}
    cfg["build"]["fallback"] = fallback or {"metric": "top1_agreement", "min": 0.99}
    cfg["evaluate"]["sensitivity"] = {"enabled": False}
    cfg["evaluate"]["latency"] = {"batch_sizes": [8], "iterations": 2, "warmup": 1}
    cfg["gate"]["rules"] = [{"variant": "ort-int8", "metric": "top1_agreement", "min": 0.9}]
    return cfg


def _split_eval(tmp: Path) -> tuple[Path, Path]:
    """A labelled validation split (the first 150 evaluation images) and the 250 evaluation images left."""
    ev = np.load(EXAMPLE_EVAL)
    val, rest = tmp / "val.npz", tmp / "eval_rest.npz"
    np.savez(val, input=ev["input"][:150], label=ev["label"][:150])
    np.savez(rest, input=ev["input"][150:], label=ev["label"][150:])
    return val, rest


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the dataset every accuracy_fallback call gets (the build stage imports it at call time)."""
    import quantpipe.fallback as fallback_module

    seen: list[Any] = []
    real = fallback_module.accuracy_fallback

    def spy(model_path: Any, amax: Any, dataset: Any, **kwargs: Any) -> Any:
        seen.append(dataset)
        return real(model_path, amax, dataset, **kwargs)

    monkeypatch.setattr(fallback_module, "accuracy_fallback", spy)
    return seen


def test_changed_evaluation_data_reuses_the_build(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fallback on: run, change the evaluation npz, run again: calibrate and build are reused, the new
    evaluation data is judged, and the report says which data chose and which judged."""
    from quantpipe.pipeline import run_stages

    cfg = _fast(tmp_path)
    first, _ = run_stages(parse_config(cfg, base_dir=tmp_path), run_id="first")
    assert first is not None and first.fallback is not None
    assert (first.fallback.chosen_on, first.fallback.chosen_samples) == ("calibration", 200)

    ev = np.load(EXAMPLE_EVAL)
    smaller = tmp_path / "eval_300.npz"
    np.savez(smaller, input=ev["input"][:300], label=ev["label"][:300])
    cfg["data"]["evaluation"]["path"] = str(smaller)
    caplog.clear()
    caplog.set_level("INFO", logger="quantpipe")
    second, run_dir = run_stages(parse_config(cfg, base_dir=tmp_path), run_id="second")
    assert "build: inputs unchanged, reusing" in caplog.text
    assert "calibrate: inputs unchanged, reusing" in caplog.text
    assert "build: re-running" not in caplog.text
    assert second is not None and run_dir is not None
    assert {e.variant: e.num_samples for e in second.evaluations} == {"ort-fp32": 300, "ort-int8": 300}
    assert second.fallback == first.fallback
    line = "Fallback chose on: calibration data (200 samples); judged on: evaluation data (300 samples)."
    assert line in (run_dir / "report.md").read_text()
    assert line in (run_dir / "report.html").read_text()
    assert ("INT8 scales and the choices above made on: calibration data (200 samples); judged on: evaluation "
            "data (300 samples).") in (run_dir / "report.md").read_text()
    fb = json.loads((run_dir / "results.json").read_text())["fallback"]
    assert (fb["chosen_on"], fb["chosen_samples"]) == ("calibration", 200)


def test_fallback_chooses_on_calibration_data_never_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantpipe.pipeline import run_stages

    seen = _spy(monkeypatch)
    run_stages(parse_config(_fast(tmp_path), base_dir=tmp_path), until="build")
    assert [(d.role, Path(d.path)) for d in seen] == [("calibration", EXAMPLE_CALIB.resolve())]


def test_fallback_chooses_on_validation_split_when_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """top1_drop with a labelled validation split: chosen on it (150 samples), the evaluation data untouched."""
    from quantpipe.pipeline import run_stages

    val, rest = _split_eval(tmp_path)
    cfg = _fast(tmp_path, metric="top1_drop", max=0.0)
    cfg["data"]["validation"] = {"path": str(val), "labels": "label"}
    cfg["data"]["evaluation"]["path"] = str(rest)
    seen = _spy(monkeypatch)
    results, run_dir = run_stages(parse_config(cfg, base_dir=tmp_path), run_id="val")
    assert [(d.role, Path(d.path), d.num_samples) for d in seen] == [("validation", val.resolve(), 150)]
    assert results is not None and results.fallback is not None and run_dir is not None
    assert (results.fallback.chosen_on, results.fallback.chosen_samples) == ("validation", 150)
    assert ("Fallback chose on: validation data (150 samples); judged on: evaluation data (250 samples)."
            in (run_dir / "report.md").read_text())


def test_changed_validation_data_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The data the fallback chose on is part of the build's fingerprint; the evaluation data is not."""
    from quantpipe.pipeline import run_stages

    val, rest = _split_eval(tmp_path)
    cfg = _fast(tmp_path)
    cfg["data"]["validation"] = {"path": str(val)}
    cfg["data"]["evaluation"]["path"] = str(rest)
    run_stages(parse_config(cfg, base_dir=tmp_path), until="build")
    cfg["data"]["validation"]["max_samples"] = 100
    caplog.set_level("INFO", logger="quantpipe")
    run_stages(parse_config(cfg, base_dir=tmp_path), until="build")
    assert "build: re-running because selection_data changed" in caplog.text


def test_top1_drop_fallback_without_validation_labels_is_exit_2(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    cfg = _fast(tmp_path, metric="top1_drop", max=0.01)
    code = main(["run", str(write_config(tmp_path, cfg)), "-q"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "top1_drop" in err and "data.validation" in err and "top1_agreement" in err
    assert not (tmp_path / "reports").exists()


def test_validation_overlapping_evaluation_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from quantpipe.inputs import load_inputs

    ev = np.load(EXAMPLE_EVAL)
    val = tmp_path / "val.npz"
    np.savez(val, input=ev["input"][:30], label=ev["label"][:30])
    cfg = example_config(tmp_path)
    cfg["data"]["validation"] = {"path": str(val), "labels": "label"}
    caplog.set_level("WARNING", logger="quantpipe")
    li = load_inputs(parse_config(cfg, base_dir=tmp_path))
    assert "30 evaluation sample(s) also appear in the validation data" in caplog.text
    assert li.selection is li.validation and li.validation is not None and li.validation.labels is not None


def test_changing_calibration_use_alone_reuses_the_calibration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`calibration.use` picks among the tables after calibration: changing it re-runs the build (other scales), not
    the calibration (found probing: it re-ran calibration)."""
    from quantpipe.pipeline import run_stages

    cfg = _fast(tmp_path)
    cfg["calibration"] = {"methods": ["minmax", "percentile"], "use": "minmax"}
    del cfg["build"]["fallback"]
    run_stages(parse_config(cfg, base_dir=tmp_path), run_id="first")
    cfg["calibration"]["use"] = "percentile"
    caplog.clear()
    caplog.set_level("INFO", logger="quantpipe")
    second, _ = run_stages(parse_config(cfg, base_dir=tmp_path), run_id="second")
    assert "calibrate: inputs unchanged, reusing" in caplog.text
    assert "build: re-running because scales changed" in caplog.text
    assert second is not None
