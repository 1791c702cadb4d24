"""Where the animal detector comes from, and what the boxes stage finds installed.

A home holds at most one detector: ``detector.pt`` (absent when the source is
``none``) beside ``detector.json``, which records the source, the input size
the boxes stage must predict at, and the validation scores of a trained one.
The four sources (see :class:`whale_ml.stage_configs.DetectorConfig`) are chosen here,
so the Dagster asset only opens the tracking run and reports the result.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
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
from whale_ml.io import read_json, write_json

WEIGHTS_FILE = "detector.pt"
INFO_FILE = "detector.json"

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
    """

    source: str
    weights: Path | None
    scores: dict[str, float] = field(default_factory=dict)
    dataset: YoloDataset | None = None

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


def training_set(settings: DetectorConfig, data_path: Path, work: Path) -> tuple[YoloDataset, pd.DataFrame | None]:
    """The data set a trained detector learns from, and the true boxes when they came from the box file.

    Raises:
        ValueError: ``dataset`` without ``dataset_yaml``, or no usable box.
        FileNotFoundError / MetadataError: from reading the yaml or the box file.
    """
    if settings.source == "dataset":
        if not settings.dataset_yaml:
            raise ValueError("source='dataset' needs dataset_yaml: the data.yaml of a YOLO-format data set")
        return read_yolo_dataset(settings.dataset_yaml, work / "dataset_yaml"), None
    boxes = read_box_file(data_path / settings.box_file)
    return write_yolo_dataset(boxes, data_path / "train_images", work / "dataset", settings.val_share, settings.seed), boxes


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
    weights. The inputs are checked before ``tracking`` is entered, so bad settings fail
    before an experiment-tracking run is opened.

    Args:
        data_path: the data set (``train_images/`` and the box file).
        home: the data home ultralytics keeps its settings under.
        log: receives progress lines (one per detector epoch).
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
    if settings.source == "none":
        weights_path.unlink(missing_ok=True)
        result.weights = None
    elif settings.source == "weights":
        if not settings.weights_path or not Path(settings.weights_path).is_file():
            raise FileNotFoundError(f"source='weights' needs weights_path to an ultralytics .pt file; got {settings.weights_path!r}")
        install_weights(settings.weights_path, weights_path)
    else:
        work = detector_dir / "work"
        result.dataset, truth = training_set(settings, data_path, work)
        for line in result.dataset.skipped:
            warn(f"box skipped: {line}")
        log(f"training {settings.model_yaml} on {result.dataset.n_train} boxed images for {settings.epochs} epochs at {settings.imgsz}px")
        with tracking() if tracking is not None else nullcontext(None) as on_metrics:
            best, result.scores = train_yolo(
                result.dataset,
                work,
                settings.model_yaml,
                settings.epochs,
                settings.imgsz,
                settings.batch,
                settings.device,
                settings.seed,
                home,
                log=log,
            )
            install_weights(best, weights_path)
            iou = held_out_iou(result.dataset, truth, weights_path, data_path / "train_images", settings.imgsz, settings.device, home)
            result.scores.update(iou)
            if on_metrics is not None:
                on_metrics({k: float(v) for k, v in result.scores.items()})
    write_json(info_path, {"source": settings.source, "imgsz": settings.imgsz, **result.scores})
    return result
