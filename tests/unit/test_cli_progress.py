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
