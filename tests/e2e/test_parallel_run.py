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


def test_scored_outputs_run_on_one_thread_and_latency_on_the_configured_count(tmp_path, monkeypatch):
    """onnxruntime's float GEMM on a dequantized weight sums in an order set by its thread count: the outputs the
    metrics score run on one intra-op thread in every process (evaluate.accuracy_threads), so they never depend on
    the workers or the machine's cores; latency runs as configured (unset: onnxruntime's default)."""
    from quantpipe.backends import onnxruntime as ortb

    seen: list[tuple[str, str, int | None]] = []
    infer, measure = ortb.OrtRunner.infer, ortb.OrtRunner.measure

    def spy_infer(self, feeds):
        seen.append(("infer", self.name, self.threads))
        return infer(self, feeds)

    def spy_measure(self, feeds, warmup, iterations):
        seen.append(("measure", self.name, self.threads))
        return measure(self, feeds, warmup, iterations)

    monkeypatch.setattr(ortb.OrtRunner, "infer", spy_infer)
    monkeypatch.setattr(ortb.OrtRunner, "measure", spy_measure)
    tmp_path.mkdir(exist_ok=True)
    cfg = example_config(tmp_path, execution={"workers": 1})
    cfg["build"]["backends"]["tensorrt"]["enabled"] = False
    cfg["evaluate"]["latency"] = {"enabled": True, "batch_sizes": [1], "warmup": 1, "iterations": 2}
    cfg["gate"] = {"rules": []}
    assert main(["run", str(write_config(tmp_path, cfg)), "--run-id", "r", "-q"]) == 0
    names = {name for _, name, _ in seen}
    assert {"ort-fp32", "ort-int8"} <= names, names
    for name in names:
        assert {t for k, n, t in seen if n == name and k == "infer"} == {1}, name
        assert {t for k, n, t in seen if n == name and k == "measure"} == {None}, name
