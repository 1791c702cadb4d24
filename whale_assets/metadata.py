"""Turning results into metadata a user reads in the UI."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import dagster as dg
import pandas as pd

from whale_ml.progress import progress_printer


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



