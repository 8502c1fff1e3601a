"""The CLI's progress: -q shows none; a log that is not a terminal gets one line per finished task."""

from __future__ import annotations

from quantpipe.console import RichProgress


def test_quiet_progress_prints_nothing(capsys) -> None:
    with RichProgress(enabled=False).task("calibrating on 200 samples", 200) as advance:
        advance(200)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_in_a_log_prints_one_line_per_task(capsys) -> None:
    with RichProgress(enabled=True).task("calibrating on 200 samples", 200) as advance:
        advance(200)
    err = capsys.readouterr().err
    assert err.count("calibrating on 200 samples") == 1


def test_a_long_task_in_a_log_says_how_far_it_got(capsys, monkeypatch) -> None:
    import quantpipe.console as C

    monkeypatch.setattr(C, "LOG_PROGRESS_SECONDS", 0.0)
    with RichProgress(enabled=True).task("per-layer sensitivity", 59) as advance:
        advance(1)
        advance(2)
    err = capsys.readouterr().err
    assert "per-layer sensitivity: 1 of 59" in err and "per-layer sensitivity: 3 of 59" in err
    assert err.count("per-layer sensitivity") == 3  # two progress lines and the finished one
