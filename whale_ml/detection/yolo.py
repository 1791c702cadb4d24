"""The animal detector: an ultralytics YOLO model trained from a box file.

The model is built from a model yaml (``yolov8n.yaml``), so nothing is
downloaded; a user's own trained ``.pt`` can be loaded instead. Boxes whose
confidence is below the threshold fall back to the full frame, and every row
says which happened and why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from whale_ml.progress import ProgressFn
from whale_ml.data.images import ImageReadError, decode_photo, photo_size
from whale_ml.data.metadata import MetadataError, image_name_problems, is_plain_file_name, read_csv_rows
from whale_ml.detection.photo_pass import BoxRule, CropRule, PassResult, run_photo_pass
from whale_ml.detection.weights import check_detector_weights
from whale_ml.io import atomic_path, staging_dir, write_error, write_text
from whale_ml.offline import keep_torch_threads, ultralytics_session
from whale_ml.threads import pipeline_threads

BOX_COLUMNS = ("image", "x_min", "y_min", "x_max", "y_max")


@dataclass
class YoloDataset:
    """A YOLO-format data set on disk and what went into it.

    Attributes:
        data_yaml: its ``data.yaml`` (absolute ``path``).
        n_train: images in the training split.
        n_val: images in the validation split.
        val_images: the validation images' names (the photos' names).
        skipped: ``"image: reason"`` for each box row left out, in the box file's order.
        imgsz: the images' long side; None when they are the photos themselves (full size).
    """

    data_yaml: Path
    n_train: int
    n_val: int
    val_images: list[str]
    skipped: list[str] = field(default_factory=list)
    imgsz: int | None = None


def read_box_file(path: str | Path) -> pd.DataFrame:
    """A box CSV (``image,x_min,y_min,x_max,y_max``), one row per box.

    Image names must be plain file names: the detector's data set is built by
    opening ``train_images/<image>`` and writing ``labels/<image>.txt``, so a name
    like ``../x`` would read and write outside the data set. A coordinate that is
    not a number becomes NaN, which :func:`write_yolo_dataset` skips and lists.

    Raises:
        FileNotFoundError: no box file.
        MetadataError: a missing column, a malformed row or an unsafe image name, with its line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: box file not found. Train the detector from a box CSV (image,x_min,y_min,x_max,y_max), "
            "or set the detector's source to 'weights' (your own .pt) or 'none' (full frames)"
        )
    df = read_csv_rows(path, BOX_COLUMNS)
    problems = image_name_problems(df)
    if problems:
        raise MetadataError(f"{path}: " + "; ".join(problems))
    out = df[list(BOX_COLUMNS)].reset_index(drop=True)
    for col in BOX_COLUMNS[1:]:
        out[col] = pd.to_numeric(out[col], errors="coerce")
    return out


def yolo_labels(boxes: np.ndarray, sizes: np.ndarray) -> list[str]:
    """YOLO label lines (class 0) of ``x_min, y_min, x_max, y_max`` boxes in images of
    ``width, height``: centre and size over the image's, by ``torchvision.ops.box_convert``."""
    import torch
    from torchvision.ops import box_convert

    if not len(boxes):
        return []
    cxcywh = box_convert(torch.as_tensor(boxes, dtype=torch.float64), "xyxy", "cxcywh")
    cxcywh /= torch.as_tensor(sizes, dtype=torch.float64).repeat(1, 2)  # (w, h, w, h) per row
    return [f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for cx, cy, w, h in cxcywh.tolist()]


def shrink_photo(src: Path, target: Path, imgsz: int) -> tuple[int, int]:
    """Write the photo at ``src`` to ``target`` with its long side ``imgsz``; return its full size.

    The photo is decoded once, at the coarsest JPEG scale that still has a long side of
    ``imgsz`` (:func:`whale_ml.data.images.decode_photo`, as the photo pass decodes), with its
    EXIF orientation applied, so the image written is upright and carries no orientation
    tag. A ``.png`` name is written as PNG (lossless, like the photo), any other as a
    quality-95 JPEG: ultralytics reads either by its content.

    Returns:
        The photo's oriented width and height at full scale (what its boxes are given in).

    Raises:
        ImageReadError: the photo could not be read; ArtifactWriteError: the image could not be written.
    """
    photo = decode_photo(src, min_size=(imgsz, 0))
    w, h = photo.full_size
    scale = imgsz / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = photo.image if photo.image.size == size else photo.image.resize(size, Image.BICUBIC)
    try:
        if target.suffix.lower() == ".png":
            image.save(target, format="PNG")
        else:
            image.save(target, format="JPEG", quality=95)
    except OSError as exc:
        raise write_error(target, exc) from exc
    return photo.full_size


def _photo_sizes(
    names: list[str], image_dir: Path, shrunk_dir: Path | None, imgsz: int | None, workers: int | None, progress: ProgressFn | None
) -> dict[str, tuple[int, int] | str]:
    """Each photo's full oriented size, or why it could not be read; with ``imgsz``, each
    photo is also written to ``shrunk_dir`` (:func:`shrink_photo`), else only its header is read."""

    def one(name: str) -> tuple[int, int] | str:
        try:
            if imgsz is None or shrunk_dir is None:
                return photo_size(image_dir / name)  # the header: no pixel needs decoding here
            return shrink_photo(image_dir / name, shrunk_dir / name, imgsz)
        except ImageReadError as exc:
            return str(exc)

    sizes: dict[str, tuple[int, int] | str] = {}
    # Threads: Pillow releases the GIL while it decodes, resizes and encodes. Each photo is
    # read alone, so nothing depends on the number of workers.
    with ThreadPoolExecutor(pipeline_threads(workers), thread_name_prefix="detector-images") as pool:
        for i, (name, size) in enumerate(zip(names, pool.map(one, names), strict=True)):
            sizes[name] = size
            if progress is not None:
                progress(i + 1, len(names))
    return sizes


def _label_lines(boxes: pd.DataFrame, plain: list[bool], sizes: dict[str, tuple[int, int] | str], skipped: list[str]) -> dict[str, list[str]]:
    """Image name -> its YOLO label lines, from the boxes that are usable; the others are
    added to ``skipped`` with the reason, in the box table's order."""
    kept: list[tuple[str, float, float, float, float, int, int]] = []  # image, clipped box, image size
    reported: set[str] = set()
    for row, is_plain in zip(boxes.itertuples(index=False), plain, strict=True):
        name = str(row.image)
        if not is_plain:  # read_box_file refuses these; a table built in code is checked here too
            skipped.append(f"{name}: not a plain file name (never opened)")
            continue
        size = sizes[name]
        if isinstance(size, str):  # unreadable: said once, for its first box
            if name not in reported:
                skipped.append(f"{name}: {size}")
                reported.add(name)
            continue
        w, h = size
        x0, y0, x1, y1 = (float(v) for v in (row.x_min, row.y_min, row.x_max, row.y_max))
        if not all(np.isfinite([x0, y0, x1, y1])):
            skipped.append(f"{name}: box ({row.x_min}, {row.y_min}, {row.x_max}, {row.y_max}) has a missing coordinate")
            continue
        if x0 >= x1 or y0 >= y1:
            skipped.append(f"{name}: box ({row.x_min}, {row.y_min}, {row.x_max}, {row.y_max}) has x_min >= x_max or y_min >= y_max")
            continue
        x0, x1 = np.clip([x0, x1], 0, w)
        y0, y1 = np.clip([y0, y1], 0, h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            skipped.append(f"{name}: box ({row.x_min}, {row.y_min}, {row.x_max}, {row.y_max}) lies outside the {w}x{h} image")
            continue
        kept.append((name, x0, y0, x1, y1, w, h))
    labelled: dict[str, list[str]] = {}
    lines = yolo_labels(np.array([k[1:5] for k in kept]), np.array([k[5:] for k in kept]))
    for k, line in zip(kept, lines, strict=True):
        labelled.setdefault(k[0], []).append(line)
    return labelled


def write_yolo_dataset(
    boxes: pd.DataFrame,
    image_dir: str | Path,
    out_dir: str | Path,
    val_share: float,
    seed: int,
    imgsz: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> YoloDataset:
    """Turn a box table into an ultralytics data set (images/ + labels/ + data.yaml).

    Boxes are clipped to their image; a box that is empty after clipping, or
    whose image cannot be read, is skipped and listed with the reason. A
    held-out share of the boxed images becomes the validation split.

    With ``imgsz``, every boxed photo is decoded once, on a pool of threads, and written
    with its long side ``imgsz`` (:func:`shrink_photo`): the size ultralytics' loader
    resizes each image to, so every epoch reads a small file and resizes nothing. The
    labels are fractions of the photo's width and height, the same at any uniform scale.
    Without ``imgsz``, the photos are linked (copied where links fail) as they are and
    only their headers are read; ultralytics then decodes each at full size in every
    epoch: on survey-size photos 2.4x the training time at 3 epochs, more with every epoch
    (docs/benchmarks.md, "The detector's training images").

    The data set is built in a staging folder and renamed to ``out_dir`` when whole, so
    ``out_dir`` never holds part of one.

    Args:
        imgsz: the training input size; None: the photos at full size.
        workers: decode threads (default ``$WHALE_THREADS`` or every core).
        progress: called with (photos read, boxed photos) as the photos are read.

    Raises:
        ValueError: no usable box.
    """
    image_dir, out = Path(image_dir), Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out.parent, "yolo-dataset")  # a killed run's staging folder is swept here
    try:
        plain = is_plain_file_name(boxes["image"]).tolist()
        names = list(dict.fromkeys(str(n) for n, p in zip(boxes["image"], plain, strict=True) if p))
        shrunk = staging / "photos"
        shrunk.mkdir()
        skipped: list[str] = []
        labelled = _label_lines(boxes, plain, _photo_sizes(names, image_dir, shrunk, imgsz, workers, progress), skipped)
        if not labelled:
            raise ValueError("no usable boxes to train the detector on" + (f" (skipped: {'; '.join(skipped[:5])})" if skipped else ""))
        dataset = _lay_out(labelled, image_dir, shrunk if imgsz is not None else None, staging, out, val_share, seed)
        dataset.skipped, dataset.imgsz = skipped, imgsz
        shutil.rmtree(shrunk)  # the photos whose every box was skipped
        if out.exists() or out.is_symlink():
            trash = staging_dir(out.parent, "deleting", out.name)
            out.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataset


def _lay_out(
    labelled: dict[str, list[str]], image_dir: Path, shrunk: Path | None, staging: Path, out: Path, val_share: float, seed: int
) -> YoloDataset:
    """The splits, images, labels and ``data.yaml`` of a data set built in ``staging`` for ``out``.

    Each image is moved from ``shrunk`` (the photos written small) or, without it, linked to
    the photo in ``image_dir``. Files are written plainly: the folder is renamed into place whole.
    """
    names = sorted(labelled)
    rng = np.random.default_rng(seed)
    n_val = round(len(names) * val_share) if len(names) > 1 else 0
    val = set(rng.choice(names, size=n_val, replace=False).tolist()) if n_val else set()
    for split in ("train", "val"):
        (staging / "images" / split).mkdir(parents=True)
        (staging / "labels" / split).mkdir(parents=True)
    for name in names:
        split = "val" if name in val else "train"
        image = staging / "images" / split / name
        if shrunk is not None:
            os.replace(shrunk / name, image)
        else:
            try:
                image.symlink_to((image_dir / name).resolve())
            except OSError:
                shutil.copyfile(image_dir / name, image)
        (staging / "labels" / split / name).with_suffix(".txt").write_text("\n".join(labelled[name]) + "\n")
    # Ultralytics resolves relative dataset paths against its own settings dir: use absolute ones.
    val_dir = "images/val" if val else "images/train"
    yaml = staging / "data.yaml"
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: {val_dir}\nnames:\n  0: animal\n")
    return YoloDataset(out / "data.yaml", len(names) - len(val), len(val), sorted(val))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def read_yolo_dataset(data_yaml: str | Path, work_dir: str | Path | None = None) -> YoloDataset:
    """A YOLO-format data set that already exists (``data.yaml`` with ``train`` and ``val``).

    With ``work_dir``, a copy of the yaml with its ``path`` made absolute is written
    there and used: ultralytics resolves a relative ``path`` against its own
    settings folder, not against the yaml.

    Raises:
        FileNotFoundError / ValueError: naming the file and what is missing.
    """
    import yaml

    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: YOLO data set yaml not found")
    spec = yaml.safe_load(data_yaml.read_text()) or {}
    missing = [k for k in ("train", "val") if k not in spec]
    if missing:
        raise ValueError(f"{data_yaml}: no {' or '.join(missing)} entry (a YOLO data.yaml names its train and val images)")
    root = Path(spec.get("path") or data_yaml.parent)
    root = root if root.is_absolute() else (data_yaml.parent / root).resolve()

    def images(entry: str | list[str]) -> list[Path]:
        found: list[Path] = []
        for part in [entry] if isinstance(entry, str) else entry:
            folder = root / part
            if not folder.exists():
                raise FileNotFoundError(f"{data_yaml}: {folder} does not exist")
            found += [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else [folder]
        return found

    train, val = images(spec["train"]), images(spec["val"])
    if not train:
        raise ValueError(f"{data_yaml}: no training images under {spec['train']}")
    if work_dir is not None:
        copy = write_text(Path(work_dir) / "data.yaml", yaml.safe_dump({**spec, "path": str(root)}))
        data_yaml = copy
    return YoloDataset(data_yaml, len(train), len(val), sorted(p.name for p in val))


def _device_arg(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def train_yolo(
    dataset: YoloDataset,
    work_dir: str | Path,
    model_yaml: str = "yolov8n.yaml",
    epochs: int = 40,
    imgsz: int = 192,
    batch: int = 16,
    device: str = "auto",
    seed: int = 0,
    home: Path | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> tuple[Path, dict[str, float]]:
    """Train a YOLO detector from its yaml; return the best weights and validation metrics.

    ``log`` receives a line per epoch (mAP so far), since training takes minutes.
    Training runs with ``threads`` torch threads (default ``$WHALE_THREADS`` or every
    core: :func:`whale_ml.threads.pipeline_threads`), and the process's thread settings
    are as they were afterwards (ultralytics would leave torch on ``cpu_count - 1``).
    """
    if model_yaml.endswith(".pt"):  # fine-tuning a user's weights: ultralytics unpickles them in full
        check_detector_weights(model_yaml)
    work = Path(work_dir)
    with ultralytics_session(home or work, threads) as n:
        return _train_yolo(dataset, work, model_yaml, epochs, imgsz, batch, device, seed, n, log)


def _train_yolo(
    dataset: YoloDataset,
    work: Path,
    model_yaml: str,
    epochs: int,
    imgsz: int,
    batch: int,
    device: str,
    seed: int,
    threads: int,
    log: Callable[[str], None] | None,
) -> tuple[Path, dict[str, float]]:
    import cv2
    from ultralytics import YOLO

    cv2.setNumThreads(0)  # as ultralytics' first import does: its DataLoader workers fork (restored by the session)
    model = YOLO(model_yaml)
    keep_torch_threads(model, threads)
    if log is not None:

        def report(trainer: object) -> None:
            if trainer.epoch >= trainer.epochs:  # type: ignore[attr-defined]  # the final re-validation of best.pt
                return
            m = getattr(trainer, "metrics", None) or {}
            log(f"detector epoch {trainer.epoch + 1}/{trainer.epochs}: mAP50 {m.get('metrics/mAP50(B)', float('nan')):.3f}")  # type: ignore[attr-defined]

        model.add_callback("on_fit_epoch_end", report)
    model.train(
        data=str(dataset.data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=_device_arg(device),
        project=str(work.resolve()),
        name="train",
        exist_ok=True,
        plots=False,
        amp=False,  # the AMP self-check downloads weights; the detector is small anyway
        seed=seed,
        deterministic=True,
        workers=min(2, os.cpu_count() or 1),
        fliplr=0.5,
        mosaic=0.5,
        verbose=False,
    )
    best = work / "train" / "weights" / "best.pt"
    if not best.exists():
        best = work / "train" / "weights" / "last.pt"
    metrics = model.trainer.metrics or {}
    return best, {
        "map50": float(metrics.get("metrics/mAP50(B)", float("nan"))),
        "map50_95": float(metrics.get("metrics/mAP50-95(B)", float("nan"))),
        "precision": float(metrics.get("metrics/precision(B)", float("nan"))),
        "recall": float(metrics.get("metrics/recall(B)", float("nan"))),
    }


def install_weights(source: str | Path, target: str | Path) -> Path:
    """Copy detector weights into the data home atomically, once they pass
    :func:`check_detector_weights` (a tampered file never reaches the home)."""
    check_detector_weights(source)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)


_IOU_BLOCK = 1024  # rows per torchvision box_iou call: its pairwise matrix is block x block


def paired_box_iou(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of each ``x_min, y_min, x_max, y_max`` box of ``a`` with the box in the same row of ``b``.

    ``torchvision.ops.box_iou`` (pairwise) on blocks of rows, keeping the diagonal.
    torchvision rather than ultralytics' ``bbox_iou``: importing ultralytics has side effects
    (settings file, network checks) that must wait for :func:`whale_ml.offline.configure_environment`.
    Two empty boxes (an unreadable photo's full frame against nothing) have IoU 0, not NaN.
    """
    import torch
    from torchvision.ops import box_iou

    ta = torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, 4))
    tb = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1, 4))
    if len(ta) != len(tb):
        raise ValueError(f"{len(ta)} boxes against {len(tb)}: paired IoU needs one box of each per row")
    blocks = [torch.diagonal(box_iou(ta[i : i + _IOU_BLOCK], tb[i : i + _IOU_BLOCK])) for i in range(0, len(ta), _IOU_BLOCK)]
    iou = torch.cat(blocks).numpy() if blocks else np.zeros(0)
    return np.nan_to_num(iou, nan=0.0)


def detect_boxes(
    images: pd.DataFrame,
    weights: str | Path | None,
    min_confidence: float,
    expand: float,
    imgsz: int,
    batch: int = 32,
    device: str = "auto",
    home: Path | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """One crop box per image: the most confident detection, expanded, or the full frame.

    Args:
        images: ``image, path`` rows.
        weights: detector ``.pt``; None means no detector (full frames).
        min_confidence: detections below it fall back to the full frame.
        expand: factor on the box's width and height.
        threads: torch threads to predict with (default ``$WHALE_THREADS`` or every core);
            the process's thread settings are as they were afterwards.
        workers: decode threads (default ``$WHALE_THREADS`` or every core).

    Returns:
        ``image, width, height, x_min, y_min, x_max, y_max, confidence, source, note``:
        ``source`` is ``detector``, ``full_frame`` or ``unreadable``; ``note``
        says why a row fell back.
    """
    rule = BoxRule(min_confidence, expand, imgsz)
    return box_and_crop(images, weights, rule, None, batch, device, home, progress, threads, workers).boxes


def box_and_crop(
    images: pd.DataFrame,
    weights: str | Path | None,
    rule: BoxRule,
    crop: CropRule | None,
    batch: int = 32,
    device: str = "auto",
    home: Path | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
    workers: int | None = None,
) -> PassResult:
    """The box of every photo and, with ``crop``, its crop, in one pass that decodes each
    photo once (:func:`whale_ml.detection.photo_pass.run_photo_pass`) with the detector
    ``weights`` (None: full frames).

    Args:
        images: ``image, path`` rows (and ``split``: each split's crops in its own folder).
        threads: torch threads to predict with (default ``$WHALE_THREADS`` or every core);
            the process's thread settings are as they were afterwards.
        workers: decode and crop threads (default ``$WHALE_THREADS`` or every core).
    """
    if weights is None:
        return run_photo_pass(images, None, rule, crop, batch, workers, progress)
    check_detector_weights(weights)  # ultralytics unpickles it in full
    with ultralytics_session(home or Path(weights).parent, threads) as n:
        from ultralytics import YOLO

        model = YOLO(str(weights))
        keep_torch_threads(model, n)
        dev = _device_arg(device)

        def predict(batch_images: list[object]) -> list[object]:
            conf = min(0.01, rule.min_confidence)
            return model.predict(batch_images, imgsz=rule.imgsz, device=dev, verbose=False, conf=conf, max_det=5)

        # On the CPU the detector's threads take every core: decoding beside them only contends.
        return run_photo_pass(images, predict, rule, crop, batch, workers, progress, overlap=dev != "cpu")


def box_iou_report(boxes: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Mean IoU of detected crop boxes against true boxes, and of the full frame (the baseline).

    Args:
        boxes: :func:`detect_boxes` rows (run with ``expand=1`` for a fair IoU).
        truth: true boxes (``image, x_min, y_min, x_max, y_max``), one per image.
    """
    merged = boxes.merge(truth, on="image", suffixes=("", "_true"))
    if merged.empty:
        return {"iou_detector": float("nan"), "iou_full_frame": float("nan"), "images": 0}
    true = merged[["x_min_true", "y_min_true", "x_max_true", "y_max_true"]].to_numpy(dtype=np.float64)
    det = paired_box_iou(merged[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=np.float64), true)
    frame = np.zeros((len(merged), 4))
    frame[:, 2], frame[:, 3] = merged["width"], merged["height"]
    full = paired_box_iou(frame, true)
    return {"iou_detector": float(det.mean()), "iou_full_frame": float(full.mean()), "images": len(merged)}
