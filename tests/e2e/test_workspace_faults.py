"""Fault injection on the workspace and the run folders (issue 14, points 3-7), through the CLI on a copy of
the bundled example laid out as a user's project (pipeline.yaml with relative paths beside its files).

One finished project is made once per module; each test works on its own copy of it (which is itself the
`cp -a` case: a copy must reuse its own workspace and never read the original's files).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from quantpipe.cli import main
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL, ROOT


def _make_project(root: Path) -> Path:
    """The example as a user's project: model, data and pipeline.yaml in one folder, relative paths, small
    settings so that a run takes a few seconds."""
    root.mkdir(parents=True)
    for src, dest in ((EXAMPLE_MODEL, "model/digits_cnn.onnx"), (EXAMPLE_CALIB, "data/calib.npz"),
                      (EXAMPLE_EVAL, "data/eval.npz")):
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / dest)
    cfg = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    cfg["model"]["path"] = "model/digits_cnn.onnx"
    cfg["data"]["calibration"]["path"] = "data/calib.npz"
    cfg["data"]["evaluation"]["path"] = "data/eval.npz"
    cfg["build"]["backends"]["onnxruntime"]["precisions"] = ["fp32", "int8"]
    cfg["evaluate"]["latency"] = {"warmup": 1, "iterations": 3, "batch_sizes": [32]}
    cfg["evaluate"]["sensitivity"] = {"enabled": False}
    cfg["gate"]["rules"] = [r for r in cfg["gate"]["rules"] if r["variant"] == "ort-int8"]
    cfg["report"] = {"dir": "reports"}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages on one line (rich folds a long path at the terminal width)."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with one finished run, `first`."""
    project = _make_project(tmp_path_factory.mktemp("origin") / "project")
    assert main(["run", str(project / "pipeline.yaml"), "--run-id", "first", "-q"]) == 0
    return project


@pytest.fixture
def project(finished: Path, tmp_path: Path) -> Path:
    """This test's own copy of the finished project (cp -a)."""
    copy = tmp_path / "project"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, " ".join(out.out.split()), " ".join(out.err.split())


def _files_mentioning(folder: Path, text: str) -> list[str]:
    needle = text.encode()
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


WORK = Path("reports/.work/digits-cnn")


# --------------------------------------------------------------------------- 3: reuse is verified


def test_tampered_cache_and_model_are_rebuilt_not_reused(project: Path, capsys: pytest.CaptureFixture) -> None:
    published = project / "reports/first/calibration/entropy.cache"
    before = published.read_bytes()
    cache = project / WORK / "calibration/entropy.cache"
    cache.write_text("garbage\n")  # in place: the earlier run's published copy must not change
    with open(project / WORK / "models/model.int8.onnx", "r+b") as fh:
        fh.seek(64)
        fh.write(b"\x00\x01\x02\x03")
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second"], capsys)
    assert code == 0, err
    assert "calibrate: re-running because entropy.cache changed on disk since it was written" in err
    assert "build: re-running because model.int8.onnx changed on disk since it was written" in err
    assert published.read_bytes() == before, "an earlier run's published cache changed with the workspace"
    again = (project / "reports/second/calibration/entropy.cache").read_bytes()
    assert again == before and cache.read_bytes() == before  # recalibrated: the same scales, not "garbage"
    assert os.stat(published).st_ino != os.stat(cache).st_ino  # published files are copies, never links



def test_edited_auto_ranges_are_chosen_again_not_reused(project: Path, capsys: pytest.CaptureFixture) -> None:
    ranges = project / WORK / "calibration/auto_ranges.json"
    doc = json.loads(ranges.read_text())
    name = next(iter(doc["amax"]))
    doc["amax"][name] = 1e-3  # an edited range that would clip the tensor
    ranges.write_text(json.dumps(doc))
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "after-edit"], capsys)
    assert code == 0, err
    assert "choosing the auto ranges again (auto_ranges.json changed on disk since it was written)" in err
    assert json.loads(ranges.read_text())["amax"][name] != 1e-3


# --------------------------------------------------------------------------- 4: relocatable


def test_moved_project_reuses_its_workspace(project: Path, capsys: pytest.CaptureFixture) -> None:
    moved = project.parent / "moved"
    project.rename(moved)
    code, _, err = _run_cli(["run", str(moved / "pipeline.yaml"), "--run-id", "after-move"], capsys)
    assert code == 0, err
    assert "calibrate: inputs unchanged" in err and "build: inputs unchanged" in err
    assert _files_mentioning(moved / "reports/after-move", str(project)) == []
    assert _files_mentioning(moved / WORK, str(project)) == []
    assert _files_mentioning(moved / "reports/first", str(moved.parent)) == []  # results.json: paths from the run


def test_a_moved_run_is_judged_with_its_own_pipeline_file(project: Path, capsys: pytest.CaptureFixture) -> None:
    results = json.loads((project / "reports/first/results.json").read_text())
    assert results["config_path"] == "../../pipeline.yaml"
    assert results["model"]["path"] == "../../model/digits_cnn.onnx"
    assert results["variants"][0]["artifact"] == "../../model/digits_cnn.onnx"  # the FP32 variant: the user's file
    moved = project.parent / "moved"
    project.rename(moved)
    env = {"GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(moved)}
    from quantpipe.report import load_results, publish_ci

    lines = publish_ci(load_results(moved / "reports/first"), moved / "reports/first", env=env)
    assert lines and lines[0].startswith("::notice"), lines


def test_what_a_run_killed_outright_left_is_removed_by_the_next(project: Path, capsys: pytest.CaptureFixture) -> None:
    # SIGKILL (the out-of-memory killer, `kill -9`) leaves its staging folder and temporary files: no handler runs.
    import subprocess
    import sys

    from quantpipe.fsutil import owner_tag

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    host = owner_tag().rsplit(".", 1)[0]
    staged = project / "reports" / f".killed.{host}.{gone}.partial"
    (staged / "models").mkdir(parents=True)
    (staged / "models/model.int8.onnx").write_bytes(b"half a model")
    half = project / WORK / "models" / f".model.int8.onnx.{host}.{gone}.x1y2.onnx.tmp"
    half.write_bytes(b"half a model")
    live = project / "reports" / f".beside.{owner_tag()}.partial"  # a run of this process: still being written
    other = project / "reports" / f".elsewhere.other-host.{gone}.partial"  # a run on another machine sharing the disk
    live.mkdir()
    other.mkdir()
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second", "-v"], capsys)
    assert code == 0, err
    assert not staged.exists() and not half.exists()
    assert live.is_dir() and other.is_dir()
    assert "removed 2 temporary file(s) or folder(s) left by runs killed outright" in err, err


def test_copied_project_never_reads_the_original(finished: Path, project: Path, capsys: pytest.CaptureFixture) -> None:
    # The original's workspace is damaged after the copy: a copy that read it would publish the garbage.
    original_cache = finished / WORK / "calibration/entropy.cache"
    saved = original_cache.read_bytes()
    try:
        original_cache.write_text("garbage\n")
        code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "copy"], capsys)
    finally:
        original_cache.write_bytes(saved)
    assert code == 0, err
    assert "calibrate: inputs unchanged" in err and "build: inputs unchanged" in err
    run = project / "reports/copy"
    assert (run / "calibration/entropy.cache").read_bytes() == saved
    assert _files_mentioning(run, str(finished)) == []
    res = json.loads((run / "results.json").read_text())
    assert {s["cache_path"] for s in res["calibration"]} >= {"calibration/entropy.cache", "calibration/minmax.cache"}
    assert next(v for v in res["variants"] if v["name"] == "ort-int8")["artifact"] == "models/model.int8.onnx"


# --------------------------------------------------------------------------- 5, 7: checked before work starts


def _no_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration ran before the output checks")

    monkeypatch.setattr("quantpipe.pipeline.stage_calibrate", fail)


def test_existing_run_id_is_refused_before_calibration(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    _no_calibration(monkeypatch)
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "first"], capsys)
    assert code == 2, err
    assert "reports/first already exists" in err and "Traceback" not in err


@pytest.mark.parametrize("fault", ["read-only", "not-a-folder", "full"])
def test_unusable_reports_folder_is_refused_before_calibration(
    project: Path, fault: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    reports = project / "reports"
    cfg = yaml.safe_load((project / "pipeline.yaml").read_text())
    if fault == "not-a-folder":
        (project / "blocked").write_text("a file where a folder is wanted\n")
        cfg["report"]["dir"] = "blocked/reports"
    elif fault == "read-only":
        if os.geteuid() == 0:
            # root writes through permission bits: emulate a read-only mount for the reports folder only
            import tempfile

            real = tempfile.mkstemp

            def read_only(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:  # noqa: A002
                if dir is not None and Path(str(dir)).resolve() == reports.resolve():
                    raise PermissionError(errno.EROFS, "Read-only file system", str(dir))
                return real(*args, dir=dir, **kwargs)  # type: ignore[call-overload, no-any-return]

            monkeypatch.setattr(tempfile, "mkstemp", read_only)
        else:
            reports.chmod(0o555)
    else:
        monkeypatch.setattr("quantpipe.pipeline.shutil.disk_usage", lambda p: SimpleNamespace(total=10 << 30, free=1 << 20))
    (project / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _no_calibration(monkeypatch)
    try:
        code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second"], capsys)
    finally:
        reports.chmod(0o755)
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    expected = {"read-only": "cannot be written", "not-a-folder": "cannot be written", "full": "MiB free"}[fault]
    assert expected in err and "nothing was computed" in err


def test_write_failure_mid_run_is_exit_4_with_path_and_reason(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    import quantpipe.report.render as render

    real = render.atomic_write_text

    def disk_full(dest: object, text: str) -> Path:
        if Path(str(dest)).name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        return real(dest, text)  # type: ignore[arg-type]

    monkeypatch.setattr(render, "atomic_write_text", disk_full)
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second"], capsys)
    assert code == 4, err
    assert "No space left on device" in err and "report.html" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not (project / "reports/second").exists()
    assert os.readlink(project / "reports/latest") == "first"
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "third", "--debug"], capsys)
    assert code == 4 and "Traceback" in err


# --------------------------------------------------------------------------- 6: a run is committed last


def test_interrupt_while_reporting_leaves_no_run(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("quantpipe.report.render.render_html", interrupted)
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second"], capsys)
    assert code == 130, err
    reports = project / "reports"
    assert sorted(p.name for p in reports.iterdir()) == [".work", "first", "latest"]  # no half run, no staging
    assert os.readlink(reports / "latest") == "first"


def test_report_and_gate_refuse_an_incomplete_run(project: Path, capsys: pytest.CaptureFixture) -> None:
    half = project / "reports/half"
    shutil.copytree(project / "reports/first", half)
    (half / "complete.json").unlink()
    (half / "report.html").unlink()
    cfg = str(project / "pipeline.yaml")
    for command in ("gate", "report"):
        code, _, err = _run_cli([command, cfg, "--run", str(half)], capsys)
        assert code == 2, (command, err)
        assert "not a complete run" in err and "Traceback" not in err
    assert os.readlink(project / "reports/latest") == "first"


def test_interrupted_report_rewrite_is_refused_by_gate_until_finished(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import quantpipe.report.render as render

    cfg, run = str(project / "pipeline.yaml"), str(project / "reports/first")
    real = render.render_html

    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "render_html", interrupted)
    assert _run_cli(["report", cfg, "--run", run], capsys)[0] == 130
    code, _, err = _run_cli(["gate", cfg, "--run", run], capsys)
    assert code == 2 and "quantpipe report --run" in err
    monkeypatch.setattr(render, "render_html", real)
    assert _run_cli(["report", cfg, "--run", run], capsys)[0] == 0
    assert _run_cli(["gate", cfg, "--run", run], capsys)[0] == 0


# --------------------------------------------------------------------------- a release engineer's CI day (probing)


def test_sigterm_cleans_up_as_ctrl_c_does(project: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    # What a cancelled or timed-out CI job sends: it killed the run where it stood, a .partial folder left behind.
    import signal

    def terminated(*args: object, **kwargs: object) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return ""

    monkeypatch.setattr("quantpipe.report.render.render_html", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second"], capsys)
    assert code == 130 and "interrupted" in err, err
    assert sorted(p.name for p in (project / "reports").iterdir()) == [".work", "first", "latest"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the CLI's only while it runs


def test_a_baseline_must_be_a_complete_run(project: Path, capsys: pytest.CaptureFixture) -> None:
    half = project / "reports/half"
    shutil.copytree(project / "reports/first", half)
    (half / "complete.json").unlink()
    code, _, err = _run_cli(["gate", str(project / "pipeline.yaml"), "--baseline", str(half)], capsys)
    assert code == 2 and "not a complete run" in err, err


def test_a_latest_folder_left_by_a_copy_is_not_judged(project: Path, capsys: pytest.CaptureFixture) -> None:
    # cp -rL made `latest` a folder holding an older run: `gate` judged it with exit 0 (found probing).
    latest = project / "reports/latest"
    latest.unlink()
    shutil.copytree(project / "reports/first", latest)
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "second"], capsys)
    assert code == 0 and "is a folder, not a link" in err, err
    assert (project / "reports/latest.txt").read_text().strip() == "second"
    for argv in (["gate", str(project / "pipeline.yaml")],
                 ["gate", str(project / "pipeline.yaml"), "--run", str(latest)]):
        code, out, err = _run_cli([*argv, "-v"], capsys)
        assert code == 0 and "second" in out + err and "/first" not in out + err, (argv, out, err)


def test_a_run_of_another_pipeline_judged_here_is_warned_about(project: Path, capsys: pytest.CaptureFixture) -> None:
    # Two pipelines sharing one report.dir share `latest`: one's rules judged the other's run, exit 0 (found probing).
    other = project / "regress.yaml"
    other.write_text((project / "pipeline.yaml").read_text())
    assert _run_cli(["run", str(other), "--run-id", "second", "-q"], capsys)[0] == 0
    code, _, err = _run_cli(["gate", str(project / "pipeline.yaml")], capsys)
    assert code == 0 and "run second was made by regress.yaml, and is judged here with pipeline.yaml's rules" in err
    code, _, err = _run_cli(["gate", str(other)], capsys)
    assert code == 0 and "was made by" not in err


def test_a_new_fallback_budget_reuses_the_calibration_datas_decisions(project: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    # Only build.fallback changed: the statistics, splits and output bias of the last build still hold (a new budget
    # re-ran them for ~250 s on a speech-quality model, found probing). The model must be the one a fresh build makes.
    def with_fallback(root: Path, max_layers: int) -> Path:
        cfg = yaml.safe_load((root / "pipeline.yaml").read_text())
        cfg["build"]["fallback"] = {"metric": "cosine", "min": 0.99999999, "max_layers": max_layers}
        (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return root / "pipeline.yaml"

    code, _, err = _run_cli(["run", str(with_fallback(project, 1)), "--run-id", "one", "-v"], capsys)
    assert code in (0, 1) and "are those of the last build, reused" in err, err  # `first` was built without a fallback
    code, _, err = _run_cli(["run", str(with_fallback(project, 2)), "--run-id", "two", "-v"], capsys)
    assert code in (0, 1) and "build: re-running because build changed" in err, err
    assert "build: the calibration data's decisions (statistics, splits, output bias) are those of the last build, reused" in err
    fresh = tmp_path / "fresh"
    shutil.copytree(project, fresh, symlinks=True, ignore=shutil.ignore_patterns("reports"))
    code, _, err = _run_cli(["run", str(with_fallback(fresh, 2)), "--run-id", "two", "-v"], capsys)
    assert code in (0, 1) and "are those of the last build" not in err
    for name in ("models/model.int8.onnx", "results.json"):
        reused, made = (root / "reports/two" / name for root in (project, fresh))
        if name == "models/model.int8.onnx":
            assert reused.read_bytes() == made.read_bytes()
        else:
            assert (json.loads(reused.read_text())["fallback"] == json.loads(made.read_text())["fallback"])
    with_fallback(project, 2)
    cfg = yaml.safe_load((project / "pipeline.yaml").read_text())
    cfg["build"]["quantize"]["shift_nonnegative"] = False  # what the decisions depend on: measured again
    (project / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, _, err = _run_cli(["run", str(project / "pipeline.yaml"), "--run-id", "three", "-v"], capsys)
    assert code in (0, 1) and "are those of the last build" not in err, err
