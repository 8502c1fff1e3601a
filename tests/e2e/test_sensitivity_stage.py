"""The sensitivity stage builds the INT8 model's layers with the options the build stage built it with (handed on
in the same run, read back from `models/model.int8.decisions.npz` when the build is reused): what the calibration
data decides (per-channel statistics, the output bias) is measured once, and the table is the one a run that
measures it again gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quantpipe.build import DECISIONS_FILE
from quantpipe.config import parse_config
from quantpipe.workspace import Workspace
from tests.e2e.test_pipeline import example_config


def _config(tmp: Path, fallback: bool) -> dict:
    cfg = example_config(tmp)
    cfg["calibration"] = {"methods": ["minmax"], "use": "minmax"}
    cfg["build"]["backends"] = {"onnxruntime": {"precisions": ["fp32", "int8"]}, "tensorrt": {"enabled": False}}
    if fallback:
        cfg["build"]["fallback"] = {"metric": "top1_agreement", "min": 0.99}
    cfg["evaluate"]["sensitivity"] = {"enabled": True, "max_samples": 24}
    cfg["evaluate"]["latency"] = {"batch_sizes": [8], "iterations": 2, "warmup": 1}
    cfg["gate"]["rules"] = [{"variant": "ort-int8", "metric": "top1_agreement", "min": 0.5}]
    return cfg


def _count(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("fallback", [False, True], ids=["writer", "fallback"])
def test_sensitivity_reuses_the_builds_options_with_the_same_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   fallback: bool) -> None:
    import quantpipe.quantize.write as write
    from quantpipe.pipeline import run_stages

    bias = _count(monkeypatch, write, "output_bias")
    stats = _count(monkeypatch, write, "collect_channel_stats")
    cfg = parse_config(_config(tmp_path, fallback), base_dir=tmp_path)
    first, _ = run_stages(cfg, until="evaluate", run_id="first")
    assert first is not None and first.sensitivity
    # Measured once, by the build; the sensitivity stage took the build's options.
    assert (len(bias), len(stats)) == (1, 1)

    # The build reused: its decisions are read back (checked by sha256 with the models), not measured again.
    second, _ = run_stages(cfg, until="evaluate", run_id="second")
    assert second is not None
    assert (len(bias), len(stats)) == (1, 1)
    assert second.sensitivity == first.sensitivity  # every number, in the same order
    assert any(r.output_metric is not None for r in first.sensitivity)

    # A workspace from before the decisions were saved: the sensitivity measures them again, the same table.
    models = Workspace.for_config(cfg).models
    manifest = models / "stage.json"
    doc = json.loads(manifest.read_text())
    doc["payload"].pop("decisions")
    doc["files"].pop(DECISIONS_FILE)
    manifest.write_text(json.dumps(doc))
    (models / DECISIONS_FILE).unlink()
    third, _ = run_stages(cfg, until="evaluate", run_id="third")
    assert third is not None
    assert (len(bias), len(stats)) == (2, 2)
    assert third.sensitivity == first.sensitivity
