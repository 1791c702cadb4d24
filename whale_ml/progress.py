"""Progress of long loops: the callback every per-photo loop takes, and its log lines."""

from __future__ import annotations

import time
from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(done, total)`` by every loop over photos or batches."""


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

