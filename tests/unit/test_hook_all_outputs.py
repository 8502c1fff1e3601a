"""A metric hook that declares `all_outputs` is given every output of the model, not only model.output: a detector
whose class scores and boxes are separate outputs (PP-PicoDet's eight heads, found probing) can be decoded by the
user's own code, as it cannot from one of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from quantpipe.cli import main
from quantpipe.errors import ConfigError
from quantpipe.taskmetrics import TaskSpec, reads_all_outputs, run_hooks
from tests.conftest import task_pipeline
from tests.unit.test_other_outputs import _two_heads

HOOKS = '''
import numpy as np

SEEN = []


def flags(out, ref, labels, *, all_outputs, all_reference=None):
    SEEN.append((sorted(all_outputs), None if all_reference is None else sorted(all_reference)))
    np.testing.assert_array_equal(all_outputs["logits"], out)
    flag = all_outputs["flag"][:, 0]
    base = flag if all_reference is None else all_reference["flag"][:, 0]
    return {"flag_mean_gap": float(np.mean(np.abs(flag - base))), "flag_n": float(len(flag))}


def plain(out, ref, labels):
    return {"plain_rows": float(out.shape[0])}
'''


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "qp_allhooks.py").write_text(HOOKS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "qp_allhooks"
    sys.modules.pop("qp_allhooks", None)


def test_only_a_hook_declaring_all_outputs_is_given_them(hooks: str) -> None:
    out, ref = np.ones((3, 4)), np.zeros((3, 4))
    every = {"logits": out, "flag": np.full((3, 1), 2.0)}
    every_ref = {"logits": ref, "flag": np.full((3, 1), 1.5)}
    assert reads_all_outputs(f"{hooks}:flags") and not reads_all_outputs(f"{hooks}:plain")
    got = run_hooks([f"{hooks}:flags", f"{hooks}:plain"], out, ref, None, all_outputs=every, all_reference=every_ref)
    assert got == {"flag_mean_gap": 0.5, "flag_n": 3.0, "plain_rows": 3.0}
    with pytest.raises(ConfigError, match="reads every output"):
        run_hooks([f"{hooks}:flags"], out, ref, None)  # only model.output computed: never a silent half answer


def test_the_fallback_refuses_a_budget_only_an_all_outputs_hook_can_give(hooks: str) -> None:
    with pytest.raises(ConfigError, match=r"fallback's candidates compute model.output alone.*Concat"):
        TaskSpec(hooks=(f"{hooks}:flags",)).check_fallback_hooks("flag_mean_gap")
    TaskSpec(hooks=(f"{hooks}:flags", f"{hooks}:plain")).check_fallback_hooks("plain_rows")  # another hook may


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_gives_the_hook_every_output_of_each_variant(tmp_path: Path, hooks: str, workers: int) -> None:
    import onnxruntime as ort

    _two_heads(tmp_path)
    path = task_pipeline(tmp_path, "two", f'task: classification, metrics: [sqnr_db, "{hooks}:flags"]', "null",
                         "[{variant: ort-int8, metric: flag_mean_gap, max: 1000}]")
    path.write_text(path.read_text().replace("model: {path: two.onnx}", "model: {path: two.onnx, output: logits}"))
    assert main(["run", str(path), "-q", "--workers", str(workers), "--run-id", "r"]) == 0
    results = json.loads((tmp_path / "reports" / "r" / "results.json").read_text())
    by = {e["variant"]: e["metrics"] for e in results["evaluations"]}
    assert by["ort-fp32"]["flag_mean_gap"] == 0.0 and by["ort-fp32"]["flag_n"] == 48.0
    # The INT8 variant's number is the hook's arithmetic on what its file computes, checked here independently.
    (variant,) = [v for v in results["variants"] if v["name"] == "ort-int8"]
    x = np.load(tmp_path / "eval.npz")["x"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(tmp_path / "two.onnx"), opts).run(["flag"], {"x": x})[0]
    q = ort.InferenceSession(str(tmp_path / "reports" / "r" / variant["artifact"]), opts).run(["flag"], {"x": x})[0]
    assert np.abs(q - ref).max() > 0  # INT8 moved the flag: the check below could fail
    assert by["ort-int8"]["flag_mean_gap"] == pytest.approx(float(np.mean(np.abs(q - ref))), rel=1e-5)


def test_a_run_with_that_budget_stops_with_the_reason(tmp_path: Path, hooks: str, capsys: pytest.CaptureFixture) -> None:
    _two_heads(tmp_path)
    path = task_pipeline(tmp_path, "two", f'task: classification, metrics: [sqnr_db, "{hooks}:flags"]',
                         "{metric: flag_mean_gap, max: 0.001}", "[]")
    path.write_text(path.read_text().replace("model: {path: two.onnx}", "model: {path: two.onnx, output: logits}"))
    assert main(["run", str(path), "-q", "--workers", "1"]) == 2
    assert "fallback's candidates compute model.output alone" in " ".join(capsys.readouterr().err.split())


def test_judging_a_run_where_its_hooks_cannot_be_imported_assumes_nothing(hooks: str) -> None:
    # `quantpipe gate` re-judges results.json, maybe on a machine without the hook's package: not an error there.
    from quantpipe.taskmetrics import only_all_output_readers

    assert only_all_output_readers([f"{hooks}:flags"]) and not only_all_output_readers([])
    assert not only_all_output_readers([f"{hooks}:flags", f"{hooks}:plain"])
    assert not only_all_output_readers(["no_such_module_qp:f"])
