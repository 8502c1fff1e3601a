"""Stage manifests: a stage is reused only when its inputs are unchanged and its files are what it wrote."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from quantpipe.workspace import relative_to, reusable, write_manifest

FP = {"model_sha256": "abc", "quantpipe": "0"}
CACHE = "TRT-101300-EntropyCalibration2\ninput: 3c010a14\nconv1: 3d8f5c29\n"


@pytest.fixture
def stage(tmp_path: Path) -> Path:
    (tmp_path / "entropy.cache").write_text(CACHE)
    write_manifest(tmp_path, FP, ["entropy.cache"], {"n": 1})
    return tmp_path


def test_unchanged_stage_is_reused(stage: Path) -> None:
    manifest = reusable(stage, FP, "calibrate")
    assert manifest is not None and manifest["payload"] == {"n": 1}
    assert len(manifest["files"]["entropy.cache"]) == 64


def test_edited_scale_line_is_not_reused(stage: Path, caplog: pytest.LogCaptureFixture) -> None:
    (stage / "entropy.cache").write_text(CACHE.replace("3d8f5c29", "3d8f5c2a"))  # one scale, one bit
    caplog.set_level(logging.INFO, logger="quantpipe")
    assert reusable(stage, FP, "calibrate") is None
    assert "calibrate: re-running because entropy.cache changed on disk since it was written" in caplog.text


def test_missing_file_and_changed_inputs_are_not_reused(stage: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quantpipe")
    assert reusable(stage, {**FP, "model_sha256": "def"}, "calibrate") is None
    (stage / "entropy.cache").unlink()
    assert reusable(stage, FP, "calibrate") is None
    assert "because model_sha256 changed" in caplog.text and "because entropy.cache is missing" in caplog.text


@pytest.mark.parametrize("files", [["entropy.cache"], {"/etc/passwd": "0" * 64}, {"../x.cache": "0" * 64}],
                         ids=["no-hashes", "absolute", "outside"])
def test_manifest_that_cannot_vouch_is_not_trusted(stage: Path, files: object, caplog: pytest.LogCaptureFixture) -> None:
    manifest = json.loads((stage / "stage.json").read_text())
    manifest["files"] = files
    (stage / "stage.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="quantpipe")
    assert reusable(stage, FP, "calibrate") is None
    assert "re-running because" in caplog.text


def test_relative_to(tmp_path: Path) -> None:
    assert relative_to(tmp_path / "models" / "m.onnx", tmp_path) == "models/m.onnx"


def test_advance_to_turns_samples_so_far_into_increments() -> None:
    from quantpipe.workspace import advance_to

    steps: list[int] = []
    on_batch = advance_to(steps.append)
    for done in (32, 64, 63 + 32, 100):
        on_batch(done, 100)
    assert steps == [32, 32, 31, 5] and sum(steps) == 100


def test_an_earlier_file_is_handed_over_only_when_its_fingerprint_and_bytes_hold(tmp_path: Path) -> None:
    from quantpipe.workspace import earlier_file, write_manifest

    (tmp_path / "d.npz").write_bytes(b"decisions")
    write_manifest(tmp_path, {"all": "1"}, ["d.npz"], {"decisions": "d.npz", "decisions_fingerprint": {"a": "1"}})
    assert earlier_file(tmp_path, "decisions", {"a": "1"}) == tmp_path / "d.npz"
    assert earlier_file(tmp_path, "decisions", {"a": "2"}) is None  # what it depends on changed
    assert earlier_file(tmp_path, "other", {"a": "1"}) is None
    (tmp_path / "d.npz").write_bytes(b"tampered")
    assert earlier_file(tmp_path, "decisions", {"a": "1"}) is None  # not what was written
    assert earlier_file(tmp_path / "none", "decisions", {"a": "1"}) is None


def test_a_run_started_in_the_second_of_another_gets_its_own_folder(tmp_path: Path) -> None:
    # Two runs of a small model in one second: the second failed after all its work ("run folder ... appeared").
    import datetime as dt

    from quantpipe.workspace import new_run_id

    now = dt.datetime(2026, 12, 7, 21, 31, 12, tzinfo=dt.timezone.utc)
    assert new_run_id(tmp_path, now) == "20261207-213112"
    (tmp_path / "20261207-213112").mkdir()
    assert new_run_id(tmp_path, now) == "20261207-213112-2"
    (tmp_path / "20261207-213112-2").mkdir()
    assert new_run_id(tmp_path, now) == "20261207-213112-3"
    assert sorted(["20261207-213113", "20261207-213112-2", "20261207-213112"]) == [
        "20261207-213112", "20261207-213112-2", "20261207-213113"]  # still in time order
