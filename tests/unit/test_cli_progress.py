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
    assert "left)" in err  # a known count also says about how long is left


def test_remaining_text_is_the_mean_rate_so_far() -> None:
    from quantpipe.console import remaining_text

    assert remaining_text(0, 10, 5.0) == "no estimate yet"
    assert remaining_text(2, 10, 10.0) == "about 40 s left"  # 5 s each, 8 to go
    assert remaining_text(1, 30, 60.0) == "about 29 min left"
    assert remaining_text(10, 10, 10.0) == "about 0 s left"
