"""The command line's progress bars (whale_ml.progress.terminal_progress) on a stream that
says it is a terminal, and their silence on one that is not. The real commands under a
pseudo-terminal and piped: tests/test_identify.py."""

from __future__ import annotations

import io
import re

import pytest

from whale_ml.progress import shows_bars, terminal_progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal (and reports no size, as a fresh pseudo-terminal)."""

    def isatty(self) -> bool:
        return True


def _lines(screen: str) -> list[str]:
    """What is left on each line: the last frame drawn after each carriage return."""
    return [line.split("\r")[-1].rstrip() for line in screen.split("\n")]


def test_each_phase_gets_a_bar_with_its_count_rate_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    screen = Terminal()
    with terminal_progress(screen) as progress:
        assert progress is not None
        cropping = progress("cropping")
        for done in (32, 64, 70):
            cropping(done, 70)
        embedding = progress("embedding")
        embedding(0, 0)  # nothing to embed: no bar left behind
        matching = progress("matching")
        matching(3, 10)  # a loop that stopped early
    lines = [line for line in _lines(screen.getvalue()) if line]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"cropping: 100%\|\S+\| 70/70 \[\d\d:\d\d<\d\d:\d\d, +([\d.]+photo/s|[\d.]+s/photo)\]", lines[0]), lines
    # Cut short: closed where it stood when the command ends, on a line of its own.
    assert re.fullmatch(r"matching:  30%\|.*\|  ?3/10 \[\d\d:\d\d<\d\d:\d\d, .*\]", lines[1]), lines
    assert screen.getvalue().endswith("\n")


def test_a_bar_an_error_cut_short_ends_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    screen = Terminal()
    with pytest.raises(RuntimeError), terminal_progress(screen) as progress:
        assert progress is not None
        progress("checking")(1, 4)
        raise RuntimeError("bad photo")
    assert screen.getvalue().endswith("\n") and "1/4" in _lines(screen.getvalue())[-2]


def test_nothing_is_written_where_no_bar_can_be_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    piped = io.StringIO()
    with terminal_progress(piped) as progress:
        assert progress is None
    assert piped.getvalue() == ""
    with terminal_progress(Terminal(), enabled=False) as progress:  # --no-progress
        assert progress is None
    monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot redraw a line
    screen = Terminal()
    with terminal_progress(screen) as progress:
        assert progress is None
    assert screen.getvalue() == ""
    assert shows_bars(Terminal(), {"TERM": "xterm-256color"}) and not shows_bars(Terminal(), {"TERM": "dumb"})
    assert not shows_bars(io.StringIO(), {})
