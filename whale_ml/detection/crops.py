"""Cutting the boxes out of the photos, once, and a contact sheet to check them by eye.

A crop's file name carries a digest of what made it (source file size and
time, box, output size, resize mode), so re-running writes only the crops
whose inputs changed and reuses the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from whale_ml.data.images import ImageReadError, load_rgb
from whale_ml.io import ArtifactWriteError, atomic_path, remove_stale_temps

RESIZE_MODES = ("stretch", "letterbox")


def crop_key(path: str | Path, box: tuple[int, int, int, int], size: int, resize: str = "stretch") -> str:
    """Digest of the source file's identity, the box, the output size and the resize mode."""
    st = Path(path).stat()
    text = f"{Path(path).name}|{st.st_size}|{st.st_mtime_ns}|{box}|{size}"
    if resize != "stretch":  # (stretch keeps the digests of crops written before the option existed)
        text += f"|{resize}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cut_crop(image: Image.Image, box: tuple[int, int, int, int], size: int, resize: str = "stretch") -> Image.Image:
    """The box of ``image`` as a ``size`` x ``size`` RGB image.

    ``stretch`` scales width and height independently (what the winning Kaggle
    solutions fed their models); ``letterbox`` keeps the aspect ratio and pads
    the short side with black.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
    crop = image.crop(box)
    if resize == "stretch":
        return crop.resize((size, size), Image.BICUBIC)
    scale = size / max(crop.size)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(crop.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


def write_crops(
    boxes: pd.DataFrame,
    paths: dict[str, str],
    out_dir: str | Path,
    size: int,
    progress: Callable[[int, int], None] | None = None,
    resize: str = "stretch",
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
    # Once for the folder (it can hold a crop per photo), not once per crop.
    remove_stale_temps(out)
    rows = []
    for i, row in enumerate(boxes.itertuples(index=False)):
        src = paths[row.image]
        box = (int(row.x_min), int(row.y_min), int(row.x_max), int(row.y_max))
        record = {"image": row.image, "crop_path": "", "written": False, "error": ""}
        try:
            if row.source == "unreadable":
                raise ImageReadError(row.note)
            target = out / f"{Path(row.image).stem}_{crop_key(src, box, size, resize)}.jpg"
            if not target.exists():
                image = cut_crop(load_rgb(src), box, size, resize)
                with atomic_path(target, sweep=False) as tmp:
                    image.save(tmp, quality=95)
                record["written"] = True
            record["crop_path"] = str(target)
        except ArtifactWriteError:
            raise  # the home, not the photo, is at fault: stop rather than mark every photo bad
        except (ImageReadError, OSError) as exc:
            record["error"] = str(exc)
        rows.append(record)
        if progress is not None:
            progress(i + 1, len(boxes))
    return pd.DataFrame(rows)


def contact_sheet(rows: pd.DataFrame, paths: dict[str, str], thumb: int = 160, columns: int = 4) -> Image.Image:
    """A grid of photos with their crop box drawn in, each beside its crop.

    Args:
        rows: box rows (``image``, the box, ``source``) with ``crop_path``.
        paths: image name -> source photo path.
        thumb: side of each tile, in pixels.
        columns: photo-and-crop pairs per row.
    """
    rows = rows.reset_index(drop=True)
    n_rows = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * 2 * thumb, n_rows * thumb), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, row in rows.iterrows():
        x, y = (i % columns) * 2 * thumb, (i // columns) * thumb
        try:
            photo = load_rgb(paths[row["image"]])
        except ImageReadError:
            draw.text((x + 4, y + 4), f"unreadable:\n{row['image']}", fill=(200, 0, 0))
            continue
        scale = thumb / max(photo.size)
        small = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))))
        sheet.paste(small, (x, y))
        colour = (0, 200, 0) if row["source"] == "detector" else (230, 120, 0)
        box = [row["x_min"] * scale + x, row["y_min"] * scale + y, row["x_max"] * scale + x - 1, row["y_max"] * scale + y - 1]
        draw.rectangle(box, outline=colour, width=2)
        if row.get("crop_path"):
            sheet.paste(Image.open(row["crop_path"]).convert("RGB").resize((thumb, thumb)), (x + thumb, y))
        draw.text((x + 3, y + thumb - 12), str(row["image"])[:24], fill=(255, 255, 0))
    return sheet
