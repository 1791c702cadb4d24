"""Progress of long loops: the callback every per-photo loop takes, its log lines (the
pipeline's), and its terminal bars (the command line's)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(done, total)`` by every loop over photos or batches."""

PhaseProgress = Callable[[str], ProgressFn]
"""Given the name of one phase of a longer job (``cropping``, ``embedding``...), the
``progress(done, total)`` callback of that phase. Each phase is asked for once, when it starts."""


def progress_printer(
    log: Callable[[str], None], what: str, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
) -> ProgressFn:
    """The ``progress(done, total)`` callback of a long loop: ``what: done/total (share),
    rate/s, ETA`` lines to ``log``. Logs the first call, then at most every ``every_s``
    seconds, and the end, so short work stays quiet. The rate counts from the first call."""
    state: dict[str, float | None] = {"last": float("-inf"), "start": None, "first": 0}

    def progress(done: int, total: int) -> None:
        now = clock()
        if state["start"] is None:
            state["start"], state["first"] = now, done  # the rate is over the work done since
        if done == total or now - state["last"] >= every_s:
            elapsed = now - state["start"]
            rate = (done - state["first"]) / elapsed if elapsed > 0 else 0.0
            line = f"{what}: {done}/{total} ({done / max(total, 1):.0%})"
            if rate > 0:
                line += f", {rate:.1f}/s" + (f", ETA {_duration((total - done) / rate)}" if done < total else f" over {_duration(elapsed)}")
            log(line)
            state["last"] = now

    return progress


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def shows_bars(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` can show a bar: a terminal that redraws a line in place (not
    ``TERM=dumb``). Piped or redirected output gets none, so a log file holds no bar frames."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return tty and environ.get("TERM") != "dumb"


class _Bars:
    """One tqdm bar per phase on ``stream``, opened when the phase is asked for (so that its
    rate counts from the phase's start, not from its first batch's end) and closed by its
    last count."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.open: list[tqdm] = []

    def __call__(self, what: str) -> ProgressFn:
        # A terminal that reports no size (0 x 0, as a new pseudo-terminal does) would get
        # empty lines from tqdm: it is drawn as 80 x 24 instead.
        sized = _sized(self.stream)
        # tqdm's own format: count, share, elapsed<ETA and rate; left on screen when done.
        bar = tqdm(
            desc=what,
            unit="photo",
            file=self.stream,
            dynamic_ncols=sized,
            ncols=None if sized else 80,
            nrows=None if sized else 24,
            leave=True,
        )
        self.open.append(bar)

        def progress(done: int, total: int) -> None:
            if bar not in self.open:
                return
            if total > 0:
                bar.total = total
                bar.update(done - bar.n)
            if done >= total:
                self._finish(bar)

        return progress

    def _finish(self, bar: tqdm) -> None:
        bar.leave = bar.n > 0  # a phase with nothing to count leaves no line
        bar.close()
        self.open.remove(bar)

    def close(self) -> None:
        for bar in list(self.open):
            self._finish(bar)


def _sized(stream: TextIO) -> bool:
    """Whether the terminal behind ``stream`` reports its size."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


@contextmanager
def terminal_progress(stream: TextIO | None = None, enabled: bool = True) -> Iterator[PhaseProgress | None]:
    """Progress bars for a command: a bar per phase with its count, rate and ETA, drawn on
    ``stream`` (default: stderr) when :func:`shows_bars` says it can show them.

    Yields:
        The phases' callbacks, or None when there is no terminal to draw on (or not
        ``enabled``): then nothing at all is written. A bar that an error cut short is
        closed on exit, so the error's message starts on a line of its own.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled or not shows_bars(stream):
        yield None
        return
    bars = _Bars(stream)
    try:
        yield bars
    finally:
        bars.close()


def phase(progress: PhaseProgress | None, what: str) -> ProgressFn | None:
    """The callback of phase ``what``, or None when nobody follows the job's progress."""
    return progress(what) if progress is not None else None
