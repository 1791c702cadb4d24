"""Turning results into metadata a user reads in the UI."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from whale_ml.io import atomic_path
from whale_ml.progress import progress_printer

Cell = str | int | float | bool | None


def table_meta(table: pd.DataFrame | Sequence[Mapping[str, object]], digits: int | None = 4) -> dg.MetadataValue:
    """A small table (per-fold results, species, thresholds, versions, a preview) as Dagster
    table metadata: the UI shows it as a table with typed columns, and the values stay
    values (an API reader gets numbers, not Markdown). Rows may be a DataFrame or a list
    of dicts (a list keeps ``None`` beside integers, where a DataFrame would make them
    floats). Floats are rounded to ``digits`` significant digits for reading (``None``:
    kept); NaN becomes an empty cell and infinities the strings ``inf``/``-inf`` (JSON,
    which carries the table to the UI, has neither)."""
    if isinstance(table, pd.DataFrame):
        columns = [str(c) for c in table.columns]
        rows: list[dict[str, object]] = [{str(k): v for k, v in r.items()} for r in table.to_dict("records")]
    else:
        rows = [{str(k): v for k, v in r.items()} for r in table]
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [{c: _cell(r.get(c), digits) for c in columns} for r in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type([r[c] for r in cells])) for c in columns])
    return dg.MetadataValue.table([dg.TableRecord(r) for r in cells], schema)


def _cell(value: object, digits: int | None) -> Cell:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.{digits}g}") if digits else x
    return value if isinstance(value, str) else str(value)


def _column_type(values: list[Cell]) -> str:
    """The UI's column type: bool, int, float (ints and floats), else string."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


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





# Photos a summary warning names; the rest are in its file.
NAMED_IN_WARNING = 10


def photo_list(warn: Callable[[str], None], what: str, rows: pd.DataFrame, path: Path) -> dg.MetadataValue | None:
    """One WARNING for a kind of bad photo, however many there are, and the full list as a file.

    At the real scale one bad folder is tens of thousands of photos: a warning each would
    flood the run's event log. So the warning gives the count, the first
    :data:`NAMED_IN_WARNING` names and one reason (:func:`warn_photos`), and every photo
    is written to ``path``, which the metadata links (:func:`write_photo_list`).

    Args:
        warn: the step's warning log.
        what: the kind, as the warning's subject (``test photo(s) without a crop``).
        rows: ``image``, ``reason`` and, optionally, ``split``.

    Returns:
        The file's path as metadata, or None when ``rows`` is empty.
    """
    listed = write_photo_list(rows, path)
    warn_photos(warn, what, rows, path)
    return listed


def write_photo_list(rows: pd.DataFrame, path: Path) -> dg.MetadataValue | None:
    """Every row (``image``, ``split`` where known, ``reason``) as a CSV at ``path`` under the
    home, linked as metadata; None, and a list left by an earlier run removed, when there is none."""
    if rows.empty:
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp:
        rows[[c for c in ("image", "split", "reason") if c in rows]].to_csv(tmp, index=False)
    return dg.MetadataValue.path(str(path))


def warn_photos(warn: Callable[[str], None], what: str, rows: pd.DataFrame, path: Path) -> None:
    """One warning for ``rows`` (none when empty): how many, the first names, one reason, and where the full list is."""
    if rows.empty:
        return
    names = rows["image"].astype(str).tolist()
    more = len(names) - NAMED_IN_WARNING
    shown = ", ".join(names[:NAMED_IN_WARNING]) + (f" and {more} more" if more > 0 else "")
    warn(f"{len(rows)} {what}: {shown} (e.g. {rows['reason'].iloc[0]}); every one in {path}")
