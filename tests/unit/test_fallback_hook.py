"""The fallback's budget held on a metric of the user's own hook (`build.fallback.metric: <name a hook returns>`):
the task's own metric chooses the layers kept in float, as it judges the gate (found probing: a pitch tracker and a
word segmenter whose decisions no built-in metric reads)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from quantpipe.cli import main
from quantpipe.config import FallbackConfig
from quantpipe.taskmetrics import hooks_sha256
from tests.conftest import task_pipeline
from tests.unit.test_segmentation_run import _segmenter

HOOK = '''
import numpy as np

CALLS = []


def agree(out, ref, labels):
    CALLS.append(out.shape)
    same = float(np.mean(out.argmax(1) == ref.argmax(1))) if ref is not None else 1.0
    return {"pix_agree": same, "pix_disagree": 1.0 - same}
'''


@pytest.mark.parametrize("bound", ["min: 0.999, metric: pix_agree", "max: 0.001, metric: pix_disagree"])
def test_a_hook_metric_holds_the_fallbacks_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    _segmenter(tmp_path)
    (tmp_path / "seghook.py").write_text(HOOK, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = task_pipeline(tmp_path, "seg", 'task: segmentation, metrics: [sqnr_db, "seghook:agree"]',
                         f"{{{bound}, max_layers: 2}}", "[{variant: ort-int8, metric: pix_agree, min: 0.0}]")
    assert main(["run", str(path), "-q", "--workers", "1"]) in (0, 1)
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    fb = results["fallback"]
    metric = bound.rsplit(": ", 1)[1]
    assert fb["metric"] == metric and fb["chosen_on"] == "calibration"
    # Each kept layer moved the hook's own number the way its bound reads (higher for min, lower for max).
    better = (lambda a, b: a >= b) if metric == "pix_agree" else (lambda a, b: a <= b)
    assert all(better(s["metric_after"], s["metric_before"]) for s in fb["steps"])
    assert len(importlib.import_module("seghook").CALLS) > 3  # the fallback ran the hook on its candidates
    (int8,) = [v for v in results["variants"] if v["name"] == "ort-int8"]
    kept = {k["node"]: k["reason"] for k in int8["details"]["quantize"]["kept_float"]}
    assert {s["node"] for s in fb["steps"]} <= set(kept)  # the report says who kept them
    assert all(kept[s["node"]] == "kept in float by the accuracy fallback" for s in fb["steps"])


def test_a_hook_metric_needs_one_bound_and_a_hook(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="needs `min` .* or `max`"):
        FallbackConfig(metric="pix_agree", min=0.9, max=0.1)
    _segmenter(tmp_path)
    path = task_pipeline(tmp_path, "seg", "task: segmentation", "{metric: pix_agree, min: 0.9}", "[]")
    assert main(["run", str(path), "-q"]) == 2
    assert "no built-in metric, and evaluate.metrics names no hook" in capsys.readouterr().err


def test_the_build_depends_on_the_hooks_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "seghook2.py").write_text(HOOK, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = hooks_sha256(["seghook2:agree"])
    (tmp_path / "seghook2.py").write_text(HOOK.replace("1.0 - same", "1.0 - same * same"), encoding="utf-8")
    assert hooks_sha256(["seghook2:agree"]) != before  # a cached build chosen by the old code is not reused
    assert np.isfinite(len(before))
