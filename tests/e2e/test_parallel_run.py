"""`quantpipe run` on the bundled example with every search on (calibration.use: auto, split_activations: auto,
a fallback of several steps, sensitivity) gives the same results on 2 local workers as in one process: the same
auto ranges, INT8 model bytes, layers kept, sensitivity table and metrics. Only timings may differ."""

from __future__ import annotations

import json
from pathlib import Path

from quantpipe.cli import main
from tests.e2e.test_pipeline import example_config, write_config

TIMING_KEYS = {"latency", "seconds", "created", "wall_seconds", "duration_s", "environment"}


def _run(tmp: Path, execution: dict) -> tuple[dict, bytes, dict]:
    tmp.mkdir()
    cfg = example_config(tmp, execution=execution)
    cfg["build"]["fallback"] = {"metric": "cosine", "min": 0.99999}
    cfg["build"]["backends"]["onnxruntime"]["precisions"] = ["fp32", "int8"]
    cfg["build"]["backends"]["tensorrt"]["enabled"] = False
    cfg["evaluate"]["latency"] = {"enabled": False}
    cfg["gate"] = {"rules": []}
    assert main(["run", str(write_config(tmp, cfg)), "--run-id", "r", "-q"]) == 0
    run = tmp / "reports" / "r"
    results = json.loads((run / "results.json").read_text())
    work = next((tmp / "reports" / ".work").iterdir())
    ranges = json.loads((work / "calibration" / "auto_ranges.json").read_text())
    return results, next(run.rglob("model.int8.onnx")).read_bytes(), ranges


def _without_timings(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _without_timings(v) for k, v in doc.items() if k not in TIMING_KEYS}
    if isinstance(doc, list):
        return [_without_timings(v) for v in doc]
    return doc


def test_run_on_2_workers_equals_one_process(tmp_path):
    one, one_model, one_ranges = _run(tmp_path / "w1", {"workers": 1})
    # min_shard_mb 0: every stage and search step shares its work out, however small (the default keeps it here).
    two, two_model, two_ranges = _run(tmp_path / "w2", {"workers": 2, "min_shard_mb": 0})
    assert one["fallback"]["steps"] and len(one["fallback"]["steps"]) >= 3
    assert any(r["output_metric"] is not None for r in one["sensitivity"])
    assert two_model == one_model
    assert two_ranges["amax"] == one_ranges["amax"] and two_ranges["per_tensor"] == one_ranges["per_tensor"]
    for key in ("fallback", "sensitivity", "calibration", "evaluations"):
        assert _without_timings(two[key]) == _without_timings(one[key]), key
