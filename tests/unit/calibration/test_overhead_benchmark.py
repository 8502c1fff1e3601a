"""benchmarks/calibration_overhead.py on a few samples of the bundled example: every case runs and the parts add up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from quantpipe.calibration import STAGE_PARTS

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "calibration_overhead.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calibration_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_measures_every_case_and_the_parts_add_up(bench: ModuleType) -> None:
    model, data = bench.models(None, ["digits"])["digits"]
    row = bench.measure("digits", model, data, repeats=2, batch_size=8, max_samples=12)
    assert row["samples"] == 12 and row["repeats"] == 2
    assert set(row["runs"]) == set(bench.CASES) and all(len(r) == 2 for r in row["runs"].values())
    calib = row["median"]["calibrate"]
    assert set(STAGE_PARTS) <= set(calib)
    assert all(calib[p] >= 0.0 for p in STAGE_PARTS)
    # The parts are disjoint pieces of the stage: together no longer than it (loading the model is the rest).
    for run in row["runs"]["calibrate"]:
        assert sum(run[p] for p in STAGE_PARTS) <= run["total"] <= run["wall"]
    assert row["median"]["exposed"]["runs"] >= 2  # 12 samples in batches of 8, at least
    assert row["ratio"] == pytest.approx(calib["wall"] / row["median"]["plain"]["total"])
    text = bench.render({"machine": bench.machine(), "note": "test", "models": [row]})
    assert text.startswith(bench.BEGIN) and text.rstrip().endswith(bench.END)
    assert "digits (12 samples)" in text and "Target (issue 18)" in text


def test_unknown_model_is_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit, match="effnet_lite0"):
        bench.models(None, ["effnet_lite0"])
