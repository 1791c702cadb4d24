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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.progress import ProgressFn
from whale_ml.data.images import DRAFT_SCALES, DecodedPhoto, ImageReadError, decode_photo, reduction_for
from whale_ml.detection.crops import crop_side, flush_folders, photo_at_fault, write_crop
from whale_ml.io import ArtifactWriteError, remove_stale_temps
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


def rule_folder(rule: CropRule, split: str | None) -> Path:
    """The folder of a split's crops: ``out_dir/<split>``, or ``out_dir`` without splits."""
    return rule.out_dir / split if split is not None else rule.out_dir


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


# Relative cost of decoding one survey JPEG at each reduction (a full decode = 1),
# measured on Kaggle-shaped 1,500-4,000 px photos on this project's 2-core machine
# (docs/benchmarks.md, "the per-scale decode costs"): a 1/2 decode costs about a third of a full one, because the
# inverse DCT and the full-size pixel buffer dominate, not the entropy decoding.
DECODE_COST = {1: 1.0, 2: 0.35, 4: 0.29, 8: 0.2}


@dataclass(frozen=True)
class ScalePlan:
    """The first decode scale of a photo, from its stored size (the header).

    The coarsest allowed scale is the one that still gives the detector its input size
    and the full frame the crop's size. A photo whose box turns out too small at that
    scale must be decoded again, finer. So with the boxes already found (``shares``: each
    box's side over the photo's, the short sides for ``stretch``, the long ones for
    ``letterbox``), the plan picks the scale of least expected cost: its own decode,
    plus a second one for the share of boxes that would not fit. On survey photos with
    small crops that is the coarsest scale; with 512 px crops it is usually 1/2, not 1/4.
    Without boxes yet (the first two batches), it takes the coarsest allowed scale.
    """

    min_long: int
    min_short: int
    crop_size: int = 0
    resize: str = "stretch"
    shares: Sequence[float] = ()  # sorted (np.sort once per batch, not per photo)

    def __call__(self, stored_size: tuple[int, int]) -> int:
        coarsest = reduction_for(stored_size, self.min_long, self.min_short)
        if not len(self.shares) or not self.crop_size:
            return coarsest
        shares = self.shares
        side = crop_side(*stored_size, self.resize)

        def below(share: float) -> float:  # the share of boxes smaller than this share of the side
            return float(np.searchsorted(shares, share, side="left")) / len(shares)

        def cost(r: int) -> float:  # decode at r, then again at the scale each box needs when finer
            again = sum(DECODE_COST[q] * (below(2 * q * self.crop_size / side) - (below(q * self.crop_size / side) if q > 1 else 0.0))
                        for q in DRAFT_SCALES if q < r)
            return DECODE_COST[r] + again

        return min((r for r in DRAFT_SCALES if r <= coarsest), key=lambda r: (cost(r), -r))


def box_share(row: dict[str, object], resize: str) -> float | None:
    """A box's side over its photo's (short sides for ``stretch``, long for ``letterbox``); None when unreadable."""
    w, h = int(row["width"]), int(row["height"])  # type: ignore[call-overload]
    if not w or not h:
        return None
    bw, bh = int(row["x_max"]) - int(row["x_min"]), int(row["y_max"]) - int(row["y_min"])  # type: ignore[call-overload]
    return crop_side(bw, bh, resize) / crop_side(w, h, resize)


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
    row.update({"confidence": 0.0, "source": "full_frame", "note": "", "decode_reduction": photo.reduction if photo else 0})
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


def _decode(photo: _Photo, plan: ScalePlan) -> _Photo:
    try:
        photo.decoded = decode_photo(photo.path, choose=plan)
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
    out = rule_folder(rule, photo.split)
    redecoded = False
    try:
        # From the pass's own pixels; decoded again, finer, only when the box is too small at their scale.
        target, record["written"], redecoded = write_crop(photo.path, photo.image, box, out, rule.size, rule.resize, photo.decoded)
        record["crop_path"] = str(target)
    except ArtifactWriteError as exc:
        if not photo_at_fault(exc):
            raise  # the home, not the photo, is at fault: stop rather than mark every photo bad
        record["error"] = str(exc)
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
    overlap: bool = True,
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
        overlap: decode the next batch while the detector looks at this one (for a detector
            on a GPU); False when it runs on the CPU, whose cores its threads already use:
            there the overlap made the pass 1.2-3x slower on 2 cores (docs/benchmarks.md).
            Results do not depend on it.

    Returns:
        The box rows (``image, width, height, x_min, y_min, x_max, y_max, confidence,
        source, note, decode_reduction``: the scale of the photo's first decode, 0 when
        unreadable), the crop rows (``image, crop_path, written, error``) and the stats.
    """
    start = time.perf_counter()
    n_workers = pipeline_threads(workers)
    split = photos["split"].tolist() if "split" in photos else [None] * len(photos)
    items = [_Photo(str(i), str(p), s) for i, p, s in zip(photos["image"], photos["path"], split, strict=True)]
    # The smallest decode that still gives the detector its input size and the full frame the crop's size.
    min_long = max(rule.imgsz if predict is not None else 0, crop.size if crop else 0)
    base = ScalePlan(min_long, crop.size if crop else 0, crop.size if crop else 0, crop.resize if crop else "stretch")
    shares: list[float] = []
    if crop is not None:
        for folder in {rule_folder(crop, s) for s in split} or {crop.out_dir}:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder)  # once per folder (it can hold a crop per photo), not once per crop
    stats = PassStats(photos=len(items), workers=n_workers)
    rows: list[dict[str, object]] = []
    crop_rows: list[dict[str, object]] = []
    with ThreadPoolExecutor(n_workers, thread_name_prefix="photo-pass") as pool:
        chunks = list(_chunks(items, batch))
        pending: list[Future[_Photo]] = [pool.submit(_decode, p, base) for p in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            done = [f.result() for f in pending]
            # The next batch decodes while the detector looks at this one, at scales planned from
            # the boxes of the batches before this one: the same for any number of workers.
            plan = replace(base, shares=np.sort(np.asarray(shares, dtype=float)))
            following = chunks[k + 1] if k + 1 < len(chunks) else []
            if overlap:
                pending = [pool.submit(_decode, p, plan) for p in following]
            readable = [p for p in done if p.decoded is not None]
            results = predict([p.decoded.image for p in readable]) if predict is not None and readable else []  # type: ignore[union-attr]
            if not overlap:  # the detector had the cores: decode the next batch while this one is cut
                pending = [pool.submit(_decode, p, plan) for p in following]
            by_photo = dict(zip(map(id, readable), results, strict=False))
            batch_rows = [box_row(p.image, p.decoded, p.error, by_photo.get(id(p)), rule, predict is not None) for p in done]
            rows += batch_rows
            if crop is not None:
                shares += [q for q in (box_share(r, crop.resize) for r in batch_rows) if q is not None]
            for p in readable:
                stats.decodes += 1
                stats.by_reduction[p.decoded.reduction] = stats.by_reduction.get(p.decoded.reduction, 0) + 1  # type: ignore[union-attr]
            if crop is not None:
                for record, redecoded in [f.result() for f in [pool.submit(_crop, p, r, crop) for p, r in zip(done, batch_rows, strict=True)]]:
                    crop_rows.append(record)
                    stats.redecodes += redecoded
                    stats.decodes += redecoded
                # Each crop was flushed before its rename; the renames, once a batch (docs/benchmarks.md, "Durable writes").
                flush_folders({rule_folder(crop, p.split) for p in done})
            for p in done:
                p.decoded = None  # the pixels are done with: keep at most two batches in memory
            if progress is not None:
                progress(min((k + 1) * batch, len(items)), len(items))
    stats.seconds = time.perf_counter() - start
    boxes = pd.DataFrame(rows, columns=list(BOX_TABLE_COLUMNS))
    crops = pd.DataFrame(crop_rows, columns=list(CROP_TABLE_COLUMNS)) if crop is not None else None
    return PassResult(boxes, crops, stats)


BOX_TABLE_COLUMNS = ("image", "width", "height", "x_min", "y_min", "x_max", "y_max", "confidence", "source", "note", "decode_reduction")
CROP_TABLE_COLUMNS = ("image", "crop_path", "written", "error")
