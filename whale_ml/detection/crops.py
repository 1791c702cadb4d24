"""Cutting the boxes out of the photos, once, and a contact sheet to check them by eye.

A crop's file name carries a digest of what made it (source file size and
time, box, output size, resize mode), so re-running writes only the crops
whose inputs changed and reuses the rest.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from whale_ml.progress import ProgressFn
from whale_ml.data.images import DRAFT_SCALES, DecodedPhoto, ImageReadError, decode_photo
from whale_ml.io import ArtifactWriteError, atomic_path, fsync_dir, fsync_enabled, remove_stale_temps, write_error

RESIZE_MODES = ("stretch", "letterbox")
CONTACT_SHEET_FILE = "contact_sheet.png"


# Crops cut since photos are decoded once, at a reduced JPEG scale (photo_pass.py), are
# resampled from a sub-pixel box: a new digest, so older crops are cut again, not reused.
CROP_METHOD = "v2"


# A crop is named after its photo; a photo name can be up to the file system's 255 bytes,
# and the crop's name adds a digest and the temp file's name more. Past this many bytes the
# photo's stem is cut: the digest in the name covers the whole photo name, so two photos
# whose names start alike still get crops of their own.
CROP_STEM_BYTES = 100


def crop_file_name(image: str, key: str) -> str:
    """``<photo stem>_<key>.jpg``, the stem cut to :data:`CROP_STEM_BYTES` bytes (at a character boundary)."""
    stem = Path(image).stem.encode()[:CROP_STEM_BYTES].decode(errors="ignore")
    return f"{stem}_{key}.jpg"


def crop_key(path: str | Path, box: tuple[int, int, int, int], size: int, resize: str = "stretch") -> str:
    """Digest of the source file's identity, the box, the output size, the resize mode and the cutting method."""
    st = Path(path).stat()
    text = f"{Path(path).name}|{st.st_size}|{st.st_mtime_ns}|{box}|{size}|{resize}|{CROP_METHOD}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def crop_side(width: float, height: float, resize: str = "stretch") -> float:
    """The side of a box that must hold the crop's ``size`` pixels: the short one for
    ``stretch`` (both sides are scaled to ``size``), the long one for ``letterbox``."""
    return min(width, height) if resize == "stretch" else max(width, height)


def crop_reduction(box: tuple[int, int, int, int], size: int, resize: str = "stretch") -> int:
    """The largest JPEG reduction (8, 4, 2, 1) at which ``box`` (full-scale pixels) still
    holds ``size`` pixels where the crop needs them: both sides for ``stretch``, the long
    side for ``letterbox``; 1 when even the full scale has fewer (the crop is upsampled)."""
    side = crop_side(box[2] - box[0], box[3] - box[1], resize)
    return next((r for r in DRAFT_SCALES if side / r >= size), 1)


def cut_crop(
    image: Image.Image, box: tuple[int, int, int, int], size: int, resize: str = "stretch", full_size: tuple[int, int] | None = None
) -> Image.Image:
    """The box of ``image`` as a ``size`` x ``size`` RGB image.

    ``stretch`` scales width and height independently (what the winning Kaggle
    solutions fed their models); ``letterbox`` keeps the aspect ratio and pads
    the short side with black.

    Args:
        box: in full-scale pixels of the photo.
        full_size: the photo's full-scale size when ``image`` was decoded smaller (JPEG
            draft): the box is then resampled from its sub-pixel place in ``image``.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
    sx, sy = (image.width / full_size[0], image.height / full_size[1]) if full_size else (1.0, 1.0)
    region = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if resize == "stretch":
        return image.resize((size, size), Image.BICUBIC, box=region)
    scale = size / max(box[2] - box[0], box[3] - box[1])
    w, h = max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.resize((w, h), Image.BICUBIC, box=region), ((size - w) // 2, (size - h) // 2))
    return canvas


def write_crop(
    src: str | Path,
    image: str,
    box: tuple[int, int, int, int],
    out_dir: Path,
    size: int,
    resize: str = "stretch",
    decoded: DecodedPhoto | None = None,
) -> tuple[Path, bool, bool]:
    """Cut ``box`` of the photo at ``src`` into ``out_dir`` unless that crop is already there.

    With ``decoded`` (the photo's pixels from an earlier, perhaps reduced, decode) the crop
    is cut from them, unless the box is too small at their scale
    (:func:`crop_reduction`): then, as without them, the photo is decoded at the scale the
    box needs.

    Returns:
        The crop's path, whether it was written now, and whether ``decoded`` was too coarse.

    Raises:
        ImageReadError: the photo could not be read; ArtifactWriteError: the crop could not be written.
    """
    target = out_dir / crop_file_name(image, crop_key(src, box, size, resize))
    if target.exists():
        return target, False, False
    needed = crop_reduction(box, size, resize)
    too_coarse = decoded is not None and needed < decoded.reduction
    if decoded is None or too_coarse:
        decoded = decode_photo(src, needed)
    crop = cut_crop(decoded.image, box, size, resize, full_size=decoded.full_size)
    # The crop is flushed before it gets its name (a crop found under its name is reused,
    # so that name must never point at data lost in a power cut); its folder is flushed by
    # the caller once per batch (fsync_dir), not once per crop.
    with atomic_path(target, sweep=False, sync_dir=False) as tmp:
        crop.save(tmp, quality=95)
    return target, True, too_coarse


def write_crops(
    boxes: pd.DataFrame,
    paths: dict[str, str],
    out_dir: str | Path,
    size: int,
    progress: ProgressFn | None = None,
    resize: str = "stretch",
) -> pd.DataFrame:
    """Write a ``size`` x ``size`` crop per box row of known boxes; skip crops already written.

    Each photo is decoded at the scale its box needs (:func:`crop_reduction`). The
    pipeline boxes and crops in one pass instead (:mod:`whale_ml.detection.photo_pass`).

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
            target, record["written"], _ = write_crop(src, row.image, box, out, size, resize)
            record["crop_path"] = str(target)
        except ArtifactWriteError as exc:
            if not photo_at_fault(exc):
                raise  # the home, not the photo, is at fault: stop rather than mark every photo bad
            record["error"] = str(exc)
        except (ImageReadError, OSError) as exc:
            record["error"] = str(exc)
        rows.append(record)
        if progress is not None:
            progress(i + 1, len(boxes))
    flush_folders([out])
    return pd.DataFrame(rows)


def photo_at_fault(exc: ArtifactWriteError) -> bool:
    """Whether a crop write failed because of its photo (a name the file system refuses),
    so that the photo loses its crop, not the run; other write errors are the home's."""
    return exc.errno == errno.ENAMETOOLONG


def flush_folders(folders: Iterable[Path]) -> None:
    """Flush the crop folders' names to disk (:func:`whale_ml.io.fsync_dir`) after a batch of
    :func:`write_crop` calls, which flush each crop but not its folder; skipped with
    ``WHALE_FSYNC=0``.

    Raises:
        ArtifactWriteError: the flush failed (an I/O error): the crops' names may not be on disk.
    """
    if not fsync_enabled():
        return
    for folder in folders:
        try:
            fsync_dir(folder)
        except OSError as exc:
            raise write_error(folder, exc) from exc


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
            photo = decode_photo(paths[row["image"]], min_size=(thumb, 0))  # a thumbnail needs no full decode
        except ImageReadError:
            draw.text((x + 4, y + 4), f"unreadable:\n{row['image']}", fill=(200, 0, 0))
            continue
        scale = thumb / max(photo.full_size)
        small = photo.image.resize((max(1, round(photo.full_size[0] * scale)), max(1, round(photo.full_size[1] * scale))))
        sheet.paste(small, (x, y))
        colour = (0, 200, 0) if row["source"] == "detector" else (230, 120, 0)
        box = [row["x_min"] * scale + x, row["y_min"] * scale + y, row["x_max"] * scale + x - 1, row["y_max"] * scale + y - 1]
        draw.rectangle(box, outline=colour, width=2)
        if row.get("crop_path"):
            sheet.paste(Image.open(row["crop_path"]).convert("RGB").resize((thumb, thumb)), (x + thumb, y))
        draw.text((x + 3, y + thumb - 12), str(row["image"])[:24], fill=(255, 255, 0))
    return sheet


def photo_paths(photos: pd.DataFrame) -> dict[str, str]:
    """Image name -> photo path over the ``image, path`` rows of train then test photos
    (:func:`whale_ml.detection.box_summary.photos_to_box`): a test name shadows a training one."""
    return dict(zip(photos["image"], photos["path"], strict=True))


@dataclass
class CropReport:
    """What :func:`crop_report` found in a crop table.

    Attributes:
        failed: the rows (``image, crop_path, written, error, split``) of the photos
            that could not be cropped; ``train_failed`` and ``test_failed`` split them.
        written: crops written by this run.
        reused: crops already on disk from an earlier run.
    """

    failed: pd.DataFrame
    train_failed: pd.DataFrame
    test_failed: pd.DataFrame
    written: int
    reused: int


def crop_report(table: pd.DataFrame, bad_train_image: str = "fail") -> CropReport:
    """Counts and failures of a :func:`crop_every_split` table.

    A training photo without a crop cannot be learnt from: with ``bad_train_image='fail'``
    the run stops and names them (up to ten), with ``'exclude'`` the folds leave them out.
    A test photo without a crop keeps its row and gets the prior answer.

    Raises:
        RuntimeError: a training photo could not be read and ``bad_train_image`` is ``fail``.
    """
    failed = table[table["crop_path"] == ""]
    train_failed = failed[failed["split"] == "train"]
    if len(train_failed) and bad_train_image == "fail":
        raise RuntimeError(
            f"{len(train_failed)} training photo(s) could not be read (set crops' bad_train_image to 'exclude' to train "
            "without them): " + "; ".join(train_failed["error"].head(10))
        )
    return CropReport(
        failed=failed,
        train_failed=train_failed,
        test_failed=failed[failed["split"] == "test"],
        written=int(table["written"].sum()),
        reused=int((~table["written"] & (table["crop_path"] != "")).sum()),
    )


def write_contact_sheet(boxes: pd.DataFrame, table: pd.DataFrame, paths: dict[str, str], n: int, path: str | Path) -> Image.Image:
    """A :func:`contact_sheet` of ``n`` photos drawn at random (the same ones on every run,
    in name order), written to ``path``.

    Args:
        boxes: box rows.
        table: the crop table (``image, crop_path``).
    """
    sample = boxes.merge(table[["image", "crop_path"]], on="image")
    sample = sample.sample(min(n, len(sample)), random_state=0).sort_values("image")
    sheet = contact_sheet(sample, paths)
    with atomic_path(path) as tmp:
        sheet.save(tmp)
    return sheet
