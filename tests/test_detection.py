"""The detector stage: box file -> YOLO data set -> real ultralytics training -> boxes -> crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whale_ml.data.metadata import read_train_metadata
from whale_ml.detection.crops import cut_crop, write_crops
from whale_ml.detection.photo_pass import expand_box
from whale_ml.detection.yolo import (
    box_iou_report,
    detect_boxes,
    paired_box_iou,
    read_box_file,
    read_yolo_dataset,
    train_yolo,
    write_yolo_dataset,
)


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A YOLO model built from yolov8n.yaml and trained for one epoch at 64 px (real training)."""
    work = tmp_path_factory.mktemp("yolo")
    ds = write_yolo_dataset(read_box_file(tiny_data / "fluke_boxes.csv"), tiny_data / "train_images", work / "ds", 0.25, 0)
    return train_yolo(ds, work, epochs=1, imgsz=64, batch=8, device="cpu")


def test_yolo_dataset_clips_and_skips_bad_boxes(tiny_data: Path, tmp_path: Path) -> None:
    boxes = read_box_file(tiny_data / "fluke_boxes.csv").head(4).copy()
    w, h = Image.open(tiny_data / "train_images" / boxes.iloc[0]["image"]).size
    boxes.loc[boxes.index[0], ["x_min", "y_min", "x_max", "y_max"]] = [-10, -10, w + 50, h + 50]  # clipped to the frame
    boxes.loc[boxes.index[1], ["x_min", "x_max"]] = [50, 10]  # x_min > x_max: skipped
    ds = write_yolo_dataset(boxes, tiny_data / "train_images", tmp_path / "ds", 0.25, 0)
    assert ds.n_train + ds.n_val == 3
    assert len(ds.skipped) == 1 and boxes.iloc[1]["image"] in ds.skipped[0]
    assert f"path: {(tmp_path / 'ds').resolve()}" in ds.data_yaml.read_text()
    split = "val" if boxes.iloc[0]["image"] in ds.val_images else "train"
    label = (tmp_path / "ds" / "labels" / split / boxes.iloc[0]["image"]).with_suffix(".txt").read_text().split()
    assert [float(v) for v in label[1:]] == pytest.approx([0.5, 0.5, 1.0, 1.0])


@pytest.mark.slow
def test_yolo_trains_from_yaml_and_reports_map(trained: tuple[Path, dict]) -> None:
    weights, metrics = trained
    assert weights.exists() and weights.suffix == ".pt"
    assert set(metrics) == {"map50", "map50_95", "precision", "recall"}
    assert 0.0 <= metrics["map50"] <= 1.0


@pytest.mark.slow
def test_boxes_for_every_image_with_fallback_and_unreadable_rows(trained: tuple[Path, dict], tiny_data: Path, tmp_path: Path) -> None:
    weights, _ = trained
    images = read_train_metadata(tiny_data)[["image", "path"]].head(6).copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    images.loc[len(images)] = ["broken.jpg", str(broken)]

    # A confidence floor nothing can reach: every readable photo falls back to its full frame.
    rows = detect_boxes(images, weights, min_confidence=1.0, expand=1.2, imgsz=64, device="cpu")
    assert rows["image"].tolist() == images["image"].tolist()
    readable = rows[rows["image"] != "broken.jpg"]
    assert (readable["source"] == "full_frame").all()
    assert (readable["x_max"] == readable["width"]).all() and (readable["y_max"] == readable["height"]).all()
    assert readable["note"].str.len().gt(0).all()
    bad = rows[rows["image"] == "broken.jpg"].iloc[0]
    assert bad["source"] == "unreadable" and "broken.jpg" in bad["note"]

    # No detector at all: full frames, and they say why.
    none = detect_boxes(images.head(2), None, 0.25, 1.2, 64)
    assert (none["source"] == "full_frame").all() and (none["note"] == "no detector").all()


def test_expand_box_scales_about_the_centre_and_clips() -> None:
    assert expand_box((40, 40, 60, 60), 2.0, 100, 100) == (30, 30, 70, 70)
    assert expand_box((0, 0, 50, 50), 1.5, 60, 60) == (0, 0, 60, 60)


def test_paired_box_iou_against_hand_computed_overlaps() -> None:
    a = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10), (2, 2, 4, 4), (0, 0, 0, 0)]
    b = [(5, 0, 15, 10), (20, 20, 30, 30), (0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 0, 0)]
    # half overlap: 50 / 150; apart; the same box; 2x2 inside 10x10: 4 / 100; two empty boxes: 0, not NaN
    assert paired_box_iou(a, b).tolist() == pytest.approx([50 / 150, 0.0, 1.0, 0.04, 0.0])
    many = np.tile(np.array([[0, 0, 10, 10]], dtype=float), (2500, 1))  # more rows than one torchvision block
    shifted = many + [5, 0, 5, 0]
    assert paired_box_iou(many, shifted).tolist() == pytest.approx([50 / 150] * 2500)
    with pytest.raises(ValueError, match="3 boxes against 2"):
        paired_box_iou(a[:3], b[:2])


def test_box_iou_report_scores_the_detector_and_the_full_frame() -> None:
    truth = pd.DataFrame({"image": ["a", "b"], "x_min": [0, 10], "y_min": [0, 10], "x_max": [50, 30], "y_max": [100, 30]})
    boxes = pd.DataFrame(
        {"image": ["b", "a", "c"], "width": [100, 100, 9], "height": [100, 100, 9],
         "x_min": [10, 25, 0], "y_min": [10, 0, 0], "x_max": [30, 75, 9], "y_max": [30, 100, 9]}
    )
    report = box_iou_report(boxes, truth)
    # b: exact (1.0); a: half of a 50x100 box against its 75-wide union (2500 / 7500)
    assert report["images"] == 2 and report["iou_detector"] == pytest.approx((1.0 + 2500 / 7500) / 2)
    # The full frame: a covers half the photo (0.5); b is 400 of 10,000 pixels (0.04)
    assert report["iou_full_frame"] == pytest.approx((0.5 + 0.04) / 2)


def test_crops_are_written_once_and_redone_when_the_box_changes(tiny_data: Path, tmp_path: Path) -> None:
    meta = read_train_metadata(tiny_data).head(3)
    paths = dict(zip(meta["image"], meta["path"], strict=True))
    boxes = detect_boxes(meta, None, 0.25, 1.0, 64)
    first = write_crops(boxes, paths, tmp_path, 32)
    assert first["written"].all() and (first["error"] == "").all()
    assert Image.open(first["crop_path"].iloc[0]).size == (32, 32)
    again = write_crops(boxes, paths, tmp_path, 32)
    assert not again["written"].any() and again["crop_path"].tolist() == first["crop_path"].tolist()
    moved = boxes.copy()
    moved.loc[0, "x_min"] = 1
    redo = write_crops(moved, paths, tmp_path, 32)
    assert redo["written"].tolist() == [True, False, False]
    # No half-written file is ever left under a crop's name.
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_crops_redone_when_the_resize_mode_changes(tiny_data: Path, tmp_path: Path) -> None:
    meta = read_train_metadata(tiny_data).head(2)
    paths = dict(zip(meta["image"], meta["path"], strict=True))
    boxes = detect_boxes(meta, None, 0.25, 1.0, 64)
    stretched = write_crops(boxes, paths, tmp_path, 32)
    letterboxed = write_crops(boxes, paths, tmp_path, 32, resize="letterbox")
    assert letterboxed["written"].all() and set(letterboxed["crop_path"]).isdisjoint(stretched["crop_path"])


def test_letterbox_keeps_the_aspect_ratio() -> None:
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    out = cut_crop(wide, (0, 0, 200, 100), 40, "letterbox")
    assert out.size == (40, 40)
    assert out.getpixel((20, 2)) == (0, 0, 0) and out.getpixel((20, 20)) == (255, 255, 255)  # black bars above and below
    stretched = cut_crop(wide, (0, 0, 200, 100), 40)
    assert stretched.getpixel((20, 2)) == (255, 255, 255)
    with pytest.raises(ValueError, match="unknown resize mode"):
        cut_crop(wide, (0, 0, 10, 10), 8, "squash")


@pytest.mark.slow
def test_detector_trains_on_an_existing_yolo_data_set(tiny_data: Path, tmp_path: Path) -> None:
    """source='dataset': a YOLO-format folder made elsewhere, with a relative path in its yaml."""
    made = write_yolo_dataset(read_box_file(tiny_data / "fluke_boxes.csv"), tiny_data / "train_images", tmp_path / "theirs", 0.25, 0)
    yaml_path = made.data_yaml
    yaml_path.write_text(yaml_path.read_text().replace(f"path: {(tmp_path / 'theirs').resolve()}", "path: ."))
    dataset = read_yolo_dataset(yaml_path, tmp_path / "work")
    assert (dataset.n_train, dataset.n_val) == (made.n_train, made.n_val)
    assert f"path: {(tmp_path / 'theirs').resolve()}" in dataset.data_yaml.read_text()
    weights, metrics = train_yolo(dataset, tmp_path / "work", epochs=1, imgsz=64, batch=8, device="cpu")
    assert weights.exists() and set(metrics) == {"map50", "map50_95", "precision", "recall"}


def test_yolo_data_set_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.yaml"):
        read_yolo_dataset(tmp_path / "data.yaml")
    (tmp_path / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(ValueError, match="no val entry"):
        read_yolo_dataset(tmp_path / "data.yaml")
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\n")
    with pytest.raises(FileNotFoundError, match="images/train does not exist"):
        read_yolo_dataset(tmp_path / "data.yaml")
