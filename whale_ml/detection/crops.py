"""Cutting the boxes out of the photos, once.

A crop's file name carries a digest of what made it (source file size and
time, box, output size), so re-running writes only the crops whose inputs
changed and reuses the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image

from whale_ml.data.images import ImageReadError, load_rgb
from whale_ml.io import atomic_path


def crop_key(path: str | Path, box: tuple[int, int, int, int], size: int) -> str:
    """Digest of the source file's identity, the box and the output size."""
    st = Path(path).stat()
    text = f"{Path(path).name}|{st.st_size}|{st.st_mtime_ns}|{box}|{size}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def write_crops(
    boxes: pd.DataFrame,
    paths: dict[str, str],
    out_dir: str | Path,
    size: int,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Write a ``size`` x ``size`` crop per box row; skip crops already written.

    Args:
        boxes: rows of :func:`detect_boxes` (``image``, the box, ``source``).
        paths: image name -> source photo path.
        out_dir: folder for the crops of one split.

    Returns:
        ``image, crop_path, written, error``; ``crop_path`` is empty when the
        photo could not be read (``error`` says why).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, row in enumerate(boxes.itertuples(index=False)):
        src = paths[row.image]
        box = (int(row.x_min), int(row.y_min), int(row.x_max), int(row.y_max))
        record = {"image": row.image, "crop_path": "", "written": False, "error": ""}
        try:
            if row.source == "unreadable":
                raise ImageReadError(row.note)
            target = out / f"{Path(row.image).stem}_{crop_key(src, box, size)}.jpg"
            if not target.exists():
                image = load_rgb(src).crop(box).resize((size, size), Image.BICUBIC)
                with atomic_path(target) as tmp:
                    image.save(tmp, quality=95)
                record["written"] = True
            record["crop_path"] = str(target)
        except (ImageReadError, OSError) as exc:
            record["error"] = str(exc)
        rows.append(record)
        if progress is not None:
            progress(i + 1, len(boxes))
    return pd.DataFrame(rows)
