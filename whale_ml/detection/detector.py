"""Where the animal detector comes from, and what the boxes stage finds installed.

A home holds at most one detector: ``detector.pt`` (absent when the source is
``none``) beside ``detector.json``, which records the source, the input size
the boxes stage must predict at, the SHA-256 of the weights, and for a trained one
its validation scores and a digest of what it was trained from
(:func:`training_fingerprint`). A detector trained from the box file is reused, not
trained again, while that digest is unchanged. The four sources (see
:class:`whale_ml.stage_configs.DetectorConfig`) are chosen here, so the Dagster asset
only opens the tracking run and reports the result.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pandas as pd

from whale_ml.stage_configs import DetectorConfig
from whale_ml.detection.yolo import (
    YoloDataset,
    box_iou_report,
    detect_boxes,
    install_weights,
    read_box_file,
    read_yolo_dataset,
    train_yolo,
    write_yolo_dataset,
)
from whale_ml.data.metadata import is_plain_file_name
from whale_ml.io import read_json, sha256_file, write_json
from whale_ml.progress import progress_printer

WEIGHTS_FILE = "detector.pt"
INFO_FILE = "detector.json"

# Part of every training fingerprint: raise it when what a detector learns from the same
# boxes, photos and settings changes (the training images, the training call), so that a
# detector trained by older code is trained again rather than reused.
TRAINING_VERSION = "2"  # 2: the photos decoded once, at the training size

# What detector.json records besides the validation scores.
RECORD_KEYS = ("source", "imgsz", "trained_from", "weights_sha256")

MetricsFn = Callable[[dict[str, float]], None]
TrackingScope = Callable[[], AbstractContextManager[MetricsFn | None]]


@dataclass
class DetectorResult:
    """What :func:`prepare_detector` installed.

    Attributes:
        source: the configured source.
        weights: the installed ``detector.pt``; None when the source is ``none``.
        scores: validation scores of a trained detector (mAP, precision, recall and, when
            the boxes came from the box file, the IoU of its boxes and of the full frame).
        dataset: the data set it was trained on; None when nothing was trained.
        reused: the installed detector was trained from the same fingerprint and kept
            (``scores`` are the ones recorded when it was trained).
    """

    source: str
    weights: Path | None
    scores: dict[str, float] = field(default_factory=dict)
    dataset: YoloDataset | None = None
    reused: bool = False

    @property
    def skipped(self) -> pd.DataFrame:
        """Boxes left out of training, ``image, why``, in the box file's order."""
        lines = self.dataset.skipped if self.dataset is not None else []
        return pd.DataFrame([line.split(": ", 1) for line in lines], columns=["image", "why"])


@dataclass
class InstalledDetector:
    """The detector the boxes stage predicts with (None: full frames) and its input size."""

    source: str
    weights: Path | None
    imgsz: int


def detector_files(detector_dir: str | Path) -> tuple[Path, Path]:
    """The weights and the info file of the home's detector."""
    return Path(detector_dir) / WEIGHTS_FILE, Path(detector_dir) / INFO_FILE


def read_detector(detector_dir: str | Path) -> InstalledDetector:
    """The detector :func:`prepare_detector` installed in ``detector_dir``.

    A source of ``none`` means full frames even if a stale ``detector.pt`` is still there.
    """
    weights_path, info_path = detector_files(detector_dir)
    info = read_json(info_path)
    weights = weights_path if info["source"] != "none" and weights_path.exists() else None
    return InstalledDetector(str(info["source"]), weights, int(info["imgsz"]))


def detector_version(detector_dir: str | Path) -> str:
    """A digest of the installed detector as the boxes stage uses it: its source, input
    size and weights (their SHA-256). The same weights give the same digest, however often
    they were installed; ``none`` has no weights."""
    installed = read_detector(detector_dir)
    weights = sha256_file(installed.weights) if installed.weights is not None else "none"
    return hashlib.sha256(f"{installed.source}|{installed.imgsz}|{weights}".encode()).hexdigest()[:24]


def training_fingerprint(settings: DetectorConfig, data_path: Path, boxes: pd.DataFrame) -> str:
    """A digest of what a detector trained from the box file learns from: the box file's
    bytes, each boxed photo's name, size and modification time (from ``train_images/``;
    missing ones count as missing), the training settings, and the training code
    (:data:`TRAINING_VERSION`, ultralytics' version, and the bytes of a ``.pt`` to fine-tune).

    Args:
        boxes: the box file's rows (:func:`read_box_file`), for the photos' names.
    """
    parts: dict[str, object] = {
        "code": TRAINING_VERSION,
        "ultralytics": version("ultralytics"),
        # The box file counts by its content, wherever it lies; the other sources' fields do not train.
        "settings": settings.model_dump(exclude={"source", "weights_path", "dataset_yaml", "box_file"}),
        "boxes": sha256_file(data_path / settings.box_file),
    }
    if settings.model_yaml.endswith(".pt") and Path(settings.model_yaml).is_file():
        parts["start_weights"] = sha256_file(settings.model_yaml)
    photos = []
    names = boxes["image"][is_plain_file_name(boxes["image"])].astype(str)
    for name in sorted(set(names)):
        try:
            st = (data_path / "train_images" / name).stat()
            photos.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            photos.append((name, -1, -1))
    parts["photos"] = photos
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def reusable_scores(detector_dir: Path, fingerprint: str) -> dict[str, float] | None:
    """The recorded scores of the installed detector if it was trained from ``fingerprint``
    and its weights are the ones recorded then; None when it must be trained."""
    weights_path, info_path = detector_files(detector_dir)
    try:
        info = read_json(info_path)
    except (OSError, ValueError):
        return None
    if info.get("source") != "train" or info.get("trained_from") != fingerprint or not weights_path.is_file():
        return None
    if info.get("weights_sha256") != sha256_file(weights_path):
        return None
    return {k: float(v) for k, v in info.items() if k not in RECORD_KEYS}


def training_set(
    settings: DetectorConfig, data_path: Path, work: Path, boxes: pd.DataFrame | None = None, log: Callable[[str], None] | None = None
) -> tuple[YoloDataset, pd.DataFrame | None]:
    """The data set a trained detector learns from, and the true boxes when they came from the box file.

    From the box file, each boxed photo is decoded once and written at the training size
    (``imgsz``; :func:`whale_ml.detection.yolo.write_yolo_dataset`).

    Args:
        boxes: the box file's rows when already read.
        log: receives the progress of decoding the photos.

    Raises:
        ValueError: ``dataset`` without ``dataset_yaml``, or no usable box.
        FileNotFoundError / MetadataError: from reading the yaml or the box file.
    """
    if settings.source == "dataset":
        if not settings.dataset_yaml:
            raise ValueError("source='dataset' needs dataset_yaml: the data.yaml of a YOLO-format data set")
        return read_yolo_dataset(settings.dataset_yaml, work / "dataset_yaml"), None
    boxes = read_box_file(data_path / settings.box_file) if boxes is None else boxes
    progress = progress_printer(log, f"detector images at {settings.imgsz}px") if log is not None else None
    dataset = write_yolo_dataset(
        boxes, data_path / "train_images", work / "dataset", settings.val_share, settings.seed, imgsz=settings.imgsz, progress=progress
    )
    return dataset, boxes


def held_out_iou(
    dataset: YoloDataset, truth: pd.DataFrame | None, weights: Path, image_dir: Path, imgsz: int, device: str, home: Path | None
) -> dict[str, float]:
    """Mean IoU of the detector's unexpanded box, and of the full frame, against the true
    boxes of the held-out images: how much tighter than the full frame the crops get.

    Empty when nothing was held out or the data set came without a box file.
    """
    rows = pd.DataFrame({"image": dataset.val_images, "path": [str(image_dir / n) for n in dataset.val_images]})
    if not len(rows) or truth is None:
        return {}
    report = box_iou_report(detect_boxes(rows, weights, 0.0, 1.0, imgsz, device=device, home=home), truth.drop_duplicates("image"))
    return {k: v for k, v in report.items() if k != "images"}


def prepare_detector(
    settings: DetectorConfig,
    data_path: str | Path,
    detector_dir: str | Path,
    home: Path | None = None,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
    tracking: TrackingScope | None = None,
) -> DetectorResult:
    """Install the configured detector in ``detector_dir`` and record it in ``detector.json``.

    ``none`` removes any detector (full frames); ``weights`` installs a user's checked
    ``.pt``; ``train`` and ``dataset`` train an ultralytics YOLO model and install its best
    weights. With ``train``, a detector already installed from the same box file, boxed
    photos, settings and code (:func:`training_fingerprint`) is kept as it is: nothing is
    trained and its recorded scores are returned. The inputs are checked before
    ``tracking`` is entered, so bad settings fail before an experiment-tracking run is opened.

    Args:
        data_path: the data set (``train_images/`` and the box file).
        home: the data home ultralytics keeps its settings under.
        log: receives progress lines (the photos' decoding, one per detector epoch).
        warn: receives one line per box left out of training.
        tracking: opened around the training only; what it yields, when not None,
            receives the validation scores.

    Raises:
        FileNotFoundError: ``weights`` without a readable ``weights_path``, or a missing box file or yaml.
        ValueError: ``dataset`` without ``dataset_yaml``, or no usable box.
    """
    data_path, detector_dir = Path(data_path), Path(detector_dir)
    weights_path, info_path = detector_files(detector_dir)
    result = DetectorResult(settings.source, weights_path)
    record: dict[str, object] = {"source": settings.source, "imgsz": settings.imgsz}
    if settings.source == "none":
        weights_path.unlink(missing_ok=True)
        result.weights = None
    elif settings.source == "weights":
        if not settings.weights_path or not Path(settings.weights_path).is_file():
            raise FileNotFoundError(f"source='weights' needs weights_path to an ultralytics .pt file; got {settings.weights_path!r}")
        install_weights(settings.weights_path, weights_path)
    else:
        boxes, fingerprint = None, None
        if settings.source == "train":
            boxes = read_box_file(data_path / settings.box_file)
            fingerprint = training_fingerprint(settings, data_path, boxes)
            record["trained_from"] = fingerprint
            scores = reusable_scores(detector_dir, fingerprint)
            if scores is not None:
                log(f"detector reused: {weights_path} was trained from the same boxes, photos, settings and code")
                result.scores, result.reused = scores, True
        if not result.reused:
            result.dataset, result.scores = _train(settings, data_path, weights_path, boxes, home, log, warn, tracking)
    if result.weights is not None:
        record["weights_sha256"] = sha256_file(result.weights)
    write_json(info_path, {**record, **result.scores})
    return result


def detector_epochs(n_train: int, batch: int, epochs: int, min_steps: int) -> int:
    """``epochs``, or more when they would make fewer than ``min_steps`` optimiser steps
    (``ceil(n_train / batch)`` a pass).

    A YOLO model trained from scratch learns from the number of steps it takes: the demo's
    113 training boxes make 8 batches a pass, 400 steps in its 50 epochs, and a 0.93 mAP50;
    a set with 40 training boxes makes 3, and its 150 steps in 50 epochs learn nothing
    (mAP50 0.09, every photo then falls back to the full frame). The floor gives small box
    sets the demo's steps; at the real scale (thousands of boxes) it never binds.
    """
    per_pass = max(1, math.ceil(n_train / max(1, batch)))
    return max(epochs, math.ceil(min_steps / per_pass))


def _train(
    settings: DetectorConfig,
    data_path: Path,
    weights_path: Path,
    boxes: pd.DataFrame | None,
    home: Path | None,
    log: Callable[[str], None],
    warn: Callable[[str], None],
    tracking: TrackingScope | None,
) -> tuple[YoloDataset, dict[str, float]]:
    """Train the detector (:func:`prepare_detector`'s ``train`` and ``dataset``), install its
    best weights at ``weights_path``, and return its data set and validation scores."""
    work = weights_path.parent / "work"
    dataset, truth = training_set(settings, data_path, work, boxes, log)
    for line in dataset.skipped:
        warn(f"box skipped: {line}")
    epochs = detector_epochs(dataset.n_train, settings.batch, settings.epochs, settings.min_steps)
    more = f" (raised from {settings.epochs} to reach {settings.min_steps} optimiser steps)" if epochs > settings.epochs else ""
    log(f"training {settings.model_yaml} on {dataset.n_train} boxed images for {epochs} epochs{more} at {settings.imgsz}px")
    with tracking() if tracking is not None else nullcontext(None) as on_metrics:
        best, scores = train_yolo(
            dataset,
            work,
            settings.model_yaml,
            epochs,
            settings.imgsz,
            settings.batch,
            settings.device,
            settings.seed,
            home,
            log=log,
        )
        install_weights(best, weights_path)
        scores.update(held_out_iou(dataset, truth, weights_path, data_path / "train_images", settings.imgsz, settings.device, home))
        if on_metrics is not None:
            on_metrics({k: float(v) for k, v in scores.items()})
    return dataset, scores
