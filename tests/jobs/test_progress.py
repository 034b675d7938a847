"""The console's progress lines: one per running stage, a summary line as each ends, no bars."""

from __future__ import annotations

import io

from jobs.progress import Board, Display, Reporter, format_seconds, progress_line


class _Handle:
    """A local stand-in for the board actor's handle: `.update.remote(...)` calls the board."""

    def __init__(self, board: Board):
        for name in ("update", "finish", "note"):
            setattr(self, name, type("Method", (), {"remote": staticmethod(getattr(board, name))})())


def test_progress_line_shows_steps_rate_eta_and_metrics():
    line = progress_line("vqgan_lo", {"done": 500, "total": 2000, "rate": 10.0, "metrics": {"psnr": 24.123}})
    assert "500/2000 steps" in line and "10.0 step/s" in line and "ETA 2m30s" in line and "psnr 24.1" in line
    assert format_seconds(3725) == "1h02m" and format_seconds(59) == "0m59s"


def test_reporter_posts_at_most_every_interval_and_finishes_with_a_summary():
    board = Board()
    reporter = Reporter(_Handle(board), "base", total=100, every=3600)
    reporter.update(1, {"loss": 5.0}, force=True)
    reporter.update(2, {"loss": 4.0})  # within the interval: not posted
    assert board.states["base"]["done"] == 1 and board.states["base"]["metrics"] == {"loss": 5.0}
    reporter.finish("100 steps in 1m00s")
    states, finished = board.poll(0)
    assert states == {} and finished == ["✓ base         100 steps in 1m00s"]
    assert board.poll(1) == ({}, [])
    assert Reporter(None, "x", 1).update(1) is None  # verbose: no board, nothing posted


def test_display_prints_running_lines_periodically_and_each_summary_once_without_a_terminal():
    board = Board()
    out = io.StringIO()  # not a terminal: plain lines, as in a CI log or under `ray job submit`
    display = Display(board.poll, stream=out, interval=0.0)
    board.update("base", {"done": 10, "total": 100, "rate": 5.0, "metrics": {}})
    board.note("[all] training base and super-res concurrently")
    display.draw()
    board.finish("base", "100 steps in 20s")
    display.draw()
    display.close()
    text = out.getvalue()
    assert text.count("[all] training base") == 1 and text.count("✓ base") == 1
    assert "10/100 steps" in text and "\x1b[" not in text  # no cursor movement outside a terminal


def test_display_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    board = Board()
    out = Tty()
    display = Display(board.poll, stream=out)
    board.update("base", {"done": 1, "total": 10, "rate": 1.0, "metrics": {}})
    display.draw()
    board.update("base", {"done": 2, "total": 10, "rate": 1.0, "metrics": {}})
    display.draw()
    display.close()
    text = out.getvalue()
    assert "\x1b[1A\x1b[2K" in text  # the previous live line is cleared before the new one
    assert any("2/10 steps" in part for part in text.split("\x1b[1A")[1:])  # redrawn with the new state
    assert "\x1b[2K" in text.split("\x1b[1A")[-1] and "steps" not in text.split("\x1b[1A")[-1]  # cleared at the end
