"""Turning results into metadata a user reads in the UI."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable

import dagster as dg
import pandas as pd


def table_md(df: pd.DataFrame, floatfmt: str = ".4g") -> dg.MetadataValue:
    """A DataFrame as a Markdown table."""
    return dg.MetadataValue.md(df.to_markdown(index=False, floatfmt=floatfmt))


def figure_md(fig: object) -> dg.MetadataValue:
    """A matplotlib figure as an inline PNG (Markdown), shown in the asset's metadata."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def image_md(image: object, max_side: int = 1280) -> dg.MetadataValue:
    """A PIL image as an inline PNG (Markdown), shown in the asset's metadata."""
    buf = io.BytesIO()
    image.thumbnail((max_side, max_side))  # type: ignore[attr-defined]
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return dg.MetadataValue.md(f"![contact sheet](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def progress_logger(context: dg.AssetExecutionContext, what: str, every_s: float = 10.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for long loops: ``what: done/total (share), rate/s,
    ETA``. Logs the first step, then at most every ``every_s`` seconds, and the end, so
    short work stays quiet."""
    return progress_printer(context.log.info, what, every_s)


def progress_printer(
    log: Callable[[str], None], what: str, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
) -> Callable[[int, int], None]:
    """:func:`progress_logger` for any ``log`` function (the rate counts from the first call)."""
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
