"""One pass over the photos: decode each once, small, on every core; detect; crop.

At the real scale the photos (1,500-4,000 px survey JPEGs, ~80k of them) cost far
more to decode than anything done with them: the detector looks at 128-640 px and
a crop is 64-512 px. So each photo is decoded once, with JPEG DCT scaling, at the
largest reduction (1/8, 1/4, 1/2) that still gives the detector its input size
and the full frame the crop's size; the box is detected on that image and the
crop cut from it. Only a crop whose box is too small at that scale is decoded a
second time, at the scale the box needs (counted as a redecode).

Decoding, cutting and writing run on a pool of ``workers`` threads (Pillow releases
the GIL while it decodes, resizes and encodes); the detector runs in the calling
thread on fixed batches in photo order. No result depends on the number of
workers: every photo's decode, box and crop are computed alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.progress import ProgressFn
from whale_ml.data.images import DecodedPhoto, ImageReadError, decode_photo
from whale_ml.detection.crops import crop_key, crop_reduction, cut_crop
from whale_ml.io import ArtifactWriteError, atomic_path, remove_stale_temps
from whale_ml.threads import pipeline_threads

PredictFn = Callable[[list[object]], list[object]]


@dataclass(frozen=True)
class BoxRule:
    """How a detection becomes the crop box.

    Attributes:
        min_confidence: below it the full frame is used.
        expand: factor on the box's width and height, about its centre.
        imgsz: the detector's input size: photos are decoded with at least this long side.
    """

    min_confidence: float
    expand: float
    imgsz: int


@dataclass(frozen=True)
class CropRule:
    """Where and how the crops are written.

    Attributes:
        out_dir: the crops folder; with a ``split`` column, each split gets ``out_dir/<split>``.
        size: side of the square crops.
        resize: ``stretch`` or ``letterbox`` (:func:`whale_ml.detection.crops.cut_crop`).
    """

    out_dir: Path
    size: int
    resize: str = "stretch"


@dataclass
class PassStats:
    """What the pass did: photos, decodes by reduction, redecodes and time.

    Attributes:
        photos: photos in the pass.
        decodes: decodes of a photo's pixels (one per readable photo, plus the redecodes).
        redecodes: photos decoded a second time because their box was too small at the first scale.
        by_reduction: first decodes per reduction (1, 2, 4 or 8).
        workers: decode threads.
        seconds: wall time of the pass.
    """

    photos: int = 0
    decodes: int = 0
    redecodes: int = 0
    by_reduction: dict[int, int] = field(default_factory=dict)
    workers: int = 1
    seconds: float = 0.0

    @property
    def photos_per_second(self) -> float:
        return self.photos / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class PassResult:
    """The box table (one row per photo, in order), the crop table (None without a
    :class:`CropRule`; same order) and the pass's :class:`PassStats`."""

    boxes: pd.DataFrame
    crops: pd.DataFrame | None
    stats: PassStats


def expand_box(box: Sequence[float], factor: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Scale a box's width and height by ``factor`` about its centre, clipped to the image."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    return (
        int(max(0, np.floor(cx - hw))),
        int(max(0, np.floor(cy - hh))),
        int(min(width, np.ceil(cx + hw))),
        int(min(height, np.ceil(cy + hh))),
    )


def box_row(image: str, photo: DecodedPhoto | None, error: str, result: object | None, rule: BoxRule, detector: bool) -> dict[str, object]:
    """One row of the box table: the most confident detection, expanded and in full-scale
    coordinates, or the full frame with the reason in ``note`` (``unreadable``: the error)."""
    w, h = photo.full_size if photo is not None else (0, 0)
    row: dict[str, object] = {"image": image, "width": w, "height": h, "x_min": 0, "y_min": 0, "x_max": w, "y_max": h}
    row.update({"confidence": 0.0, "source": "full_frame", "note": ""})
    if photo is None:
        row.update({"source": "unreadable", "note": error})
    elif not detector:
        row["note"] = "no detector"
    elif result is None or len(result.boxes) == 0:  # type: ignore[attr-defined]
        row["note"] = "nothing detected"
    else:
        confs = result.boxes.conf.cpu().numpy()  # type: ignore[attr-defined]
        best = int(confs.argmax())
        conf = float(confs[best])
        row["confidence"] = conf
        if conf < rule.min_confidence:
            row["note"] = f"best confidence {conf:.2f} < {rule.min_confidence:.2f}"
        else:
            # The detector saw the decoded (perhaps reduced) image: back to full-scale coordinates.
            sx, sy = w / photo.image.width, h / photo.image.height
            x0, y0, x1, y1 = result.boxes.xyxy[best].cpu().numpy().tolist()  # type: ignore[attr-defined]
            x0, y0, x1, y1 = expand_box((x0 * sx, y0 * sy, x1 * sx, y1 * sy), rule.expand, w, h)
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                row.update({"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "source": "detector"})
            else:
                row["note"] = "degenerate box"
    return row


@dataclass
class _Photo:
    """One photo on its way through the pass."""

    image: str
    path: str
    split: str | None
    decoded: DecodedPhoto | None = None
    error: str = ""


def _decode(photo: _Photo, min_long: int, min_short: int) -> _Photo:
    try:
        photo.decoded = decode_photo(photo.path, min_size=(min_long, min_short))
    except ImageReadError as exc:
        photo.error = str(exc)
    return photo


def _crop(photo: _Photo, row: dict[str, object], rule: CropRule) -> tuple[dict[str, object], bool]:
    """Cut and write one photo's crop (unless already written); whether it was decoded again."""
    record: dict[str, object] = {"image": photo.image, "crop_path": "", "written": False, "error": ""}
    if photo.decoded is None:
        record["error"] = photo.error
        return record, False
    box = (int(row["x_min"]), int(row["y_min"]), int(row["x_max"]), int(row["y_max"]))  # type: ignore[call-overload]
    out = rule.out_dir / photo.split if photo.split is not None else rule.out_dir
    redecoded = False
    try:
        target = out / f"{Path(photo.image).stem}_{crop_key(photo.path, box, rule.size, rule.resize)}.jpg"
        if not target.exists():
            source = photo.decoded
            needed = crop_reduction(box, rule.size, rule.resize)
            if needed < source.reduction:  # the box is too small at the first scale: decode finer
                source, redecoded = decode_photo(photo.path, reduction=needed), True
            image = cut_crop(source.image, box, rule.size, rule.resize, full_size=source.full_size)
            with atomic_path(target, sweep=False) as tmp:
                image.save(tmp, quality=95)
            record["written"] = True
        record["crop_path"] = str(target)
    except ArtifactWriteError:
        raise  # the home, not the photo, is at fault: stop rather than mark every photo bad
    except (ImageReadError, OSError) as exc:
        record["error"] = str(exc)
    return record, redecoded


def _chunks(items: list[_Photo], size: int) -> Iterator[list[_Photo]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_photo_pass(
    photos: pd.DataFrame,
    predict: PredictFn | None,
    rule: BoxRule,
    crop: CropRule | None = None,
    batch: int = 32,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PassResult:
    """Box (and, with ``crop``, crop) every photo, decoding each once.

    Args:
        photos: ``image, path`` rows, and ``split`` to write each split's crops in its own folder.
        predict: the detector on a list of PIL images, one result per image (ultralytics
            ``Results``); None: no detector, every box is the full frame.
        rule: how a detection becomes a box; its ``imgsz`` sets the decode scale.
        crop: where and how to write the crops; None: boxes only.
        batch: photos per detector call (fixed, so results do not depend on ``workers``).
        workers: decode/crop threads (default ``$WHALE_THREADS`` or every core).
        progress: called with (photos done, total) after each batch.

    Returns:
        The box rows (``image, width, height, x_min, y_min, x_max, y_max, confidence,
        source, note``), the crop rows (``image, crop_path, written, error``) and the stats.
    """
    start = time.perf_counter()
    n_workers = pipeline_threads(workers)
    split = photos["split"].tolist() if "split" in photos else [None] * len(photos)
    items = [_Photo(str(i), str(p), s) for i, p, s in zip(photos["image"], photos["path"], split, strict=True)]
    # The smallest decode that still gives the detector its input size and the full frame the crop's size.
    min_long = max(rule.imgsz if predict is not None else 0, crop.size if crop else 0)
    min_short = crop.size if crop else 0
    if crop is not None:
        for folder in {crop.out_dir / s if s is not None else crop.out_dir for s in split} or {crop.out_dir}:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder)  # once per folder (it can hold a crop per photo), not once per crop
    stats = PassStats(photos=len(items), workers=n_workers)
    rows: list[dict[str, object]] = []
    crop_rows: list[dict[str, object]] = []
    with ThreadPoolExecutor(n_workers, thread_name_prefix="photo-pass") as pool:
        chunks = list(_chunks(items, batch))
        pending: list[Future[_Photo]] = [pool.submit(_decode, p, min_long, min_short) for p in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            done = [f.result() for f in pending]
            # The next batch decodes while the detector looks at this one.
            pending = [pool.submit(_decode, p, min_long, min_short) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            readable = [p for p in done if p.decoded is not None]
            results = predict([p.decoded.image for p in readable]) if predict is not None and readable else []  # type: ignore[union-attr]
            by_photo = dict(zip(map(id, readable), results, strict=False))
            batch_rows = [box_row(p.image, p.decoded, p.error, by_photo.get(id(p)), rule, predict is not None) for p in done]
            rows += batch_rows
            for p in readable:
                stats.decodes += 1
                stats.by_reduction[p.decoded.reduction] = stats.by_reduction.get(p.decoded.reduction, 0) + 1  # type: ignore[union-attr]
            if crop is not None:
                for record, redecoded in [f.result() for f in [pool.submit(_crop, p, r, crop) for p, r in zip(done, batch_rows, strict=True)]]:
                    crop_rows.append(record)
                    stats.redecodes += redecoded
                    stats.decodes += redecoded
            for p in done:
                p.decoded = None  # the pixels are done with: keep at most two batches in memory
            if progress is not None:
                progress(min((k + 1) * batch, len(items)), len(items))
    stats.seconds = time.perf_counter() - start
    boxes = pd.DataFrame(rows, columns=list(BOX_TABLE_COLUMNS))
    crops = pd.DataFrame(crop_rows, columns=list(CROP_TABLE_COLUMNS)) if crop is not None else None
    return PassResult(boxes, crops, stats)


BOX_TABLE_COLUMNS = ("image", "width", "height", "x_min", "y_min", "x_max", "y_max", "confidence", "source", "note")
CROP_TABLE_COLUMNS = ("image", "crop_path", "written", "error")
