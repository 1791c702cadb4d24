"""The detection stage's core steps behind the Dagster assets: the detector's source
(real ultralytics training on the tiny set), the box summary, and the crops' failures,
counts and contact sheet."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from whale_ml.stage_configs import DetectorConfig
from whale_ml.data.metadata import read_test_metadata, read_train_metadata
from whale_ml.detection.box_summary import TEST_SPECIES, photos_to_box, summarise_boxes
from whale_ml.detection.crops import crop_report, photo_paths, write_contact_sheet
from whale_ml.detection.detector import MetricsFn, prepare_detector, read_detector, training_fingerprint
from whale_ml.detection.photo_pass import BoxRule, CropRule
from whale_ml.detection.yolo import box_and_crop, detect_boxes, read_box_file
from whale_ml.io import read_json, sha256_file

TINY_DETECTOR = {"epochs": 1, "min_steps": 0, "imgsz": 64, "batch": 8, "device": "cpu", "val_share": 0.25}


class Tracking:
    """A tracking scope that records when it was opened and what scores it received."""

    def __init__(self) -> None:
        self.opened = 0
        self.received: list[dict[str, float]] = []

    @contextmanager
    def __call__(self) -> Iterator[MetricsFn]:
        self.opened += 1
        yield self.received.append


@pytest.fixture(scope="module")
def trained_home(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tracking, list[str], object]:
    """A detector trained from the tiny box file plus one box that lies outside its photo."""
    tmp = tmp_path_factory.mktemp("detector")
    boxes = read_box_file(tiny_data / "fluke_boxes.csv")
    outside = boxes.iloc[[0]].assign(x_min=5000, y_min=5000, x_max=6000, y_max=6000)
    pd.concat([boxes, outside]).to_csv(tmp / "boxes.csv", index=False)
    tracking, warnings = Tracking(), []
    settings = DetectorConfig(source="train", box_file=str(tmp / "boxes.csv"), **TINY_DETECTOR)
    result = prepare_detector(settings, tiny_data, tmp / "detector", tmp, log=lambda _m: None, warn=warnings.append, tracking=tracking)
    return tmp / "detector", tracking, warnings, result


def test_trained_detector_is_installed_with_its_scores(trained_home: tuple) -> None:
    detector_dir, tracking, warnings, result = trained_home
    assert result.weights == detector_dir / "detector.pt" and result.weights.exists()
    assert {"map50", "map50_95", "precision", "recall", "iou_detector", "iou_full_frame"} == set(result.scores)
    # IoU against the true boxes: the full frame is the baseline, in (0, 1] on the held-out images.
    assert 0.0 < result.scores["iou_full_frame"] <= 1.0 and 0.0 <= result.scores["iou_detector"] <= 1.0
    assert tracking.opened == 1 and tracking.received == [result.scores]
    info = read_json(detector_dir / "detector.json")
    assert info["source"] == "train" and info["imgsz"] == 64 and info["map50"] == pytest.approx(result.scores["map50"], nan_ok=True)
    installed = read_detector(detector_dir)
    assert (installed.source, installed.weights, installed.imgsz) == ("train", result.weights, 64)


def test_skipped_boxes_are_warned_and_tabled(trained_home: tuple) -> None:
    _, _, warnings, result = trained_home
    assert len(warnings) == 1 and warnings[0].startswith("box skipped: ") and "outside the" in warnings[0]
    assert result.skipped.columns.tolist() == ["image", "why"] and len(result.skipped) == 1
    assert result.dataset.n_train + result.dataset.n_val > 0 and result.dataset.n_val == len(result.dataset.val_images)


def test_an_unchanged_detector_is_reused_not_trained(trained_home: tuple, tiny_data: Path) -> None:
    """The same box file, photos, settings and code: the installed weights are kept (not even
    rewritten), nothing is tracked, and the scores are the ones recorded at training."""
    detector_dir, _, _, trained = trained_home
    weights = detector_dir / "detector.pt"
    before = (weights.stat().st_mtime_ns, weights.read_bytes(), (detector_dir / "detector.json").read_text())
    tracking, lines = Tracking(), []
    settings = DetectorConfig(source="train", box_file=str(detector_dir.parent / "boxes.csv"), **TINY_DETECTOR)
    result = prepare_detector(settings, tiny_data, detector_dir, detector_dir.parent, log=lines.append, warn=lines.append, tracking=tracking)
    assert result.reused and result.dataset is None and len(result.skipped) == 0
    assert result.scores == pytest.approx(trained.scores, nan_ok=True) and tracking.opened == 0
    assert (weights.stat().st_mtime_ns, weights.read_bytes(), (detector_dir / "detector.json").read_text()) == before
    assert lines == [f"detector reused: {weights} was trained from the same boxes, photos, settings and code"]


def test_the_training_fingerprint_follows_boxes_photos_and_settings(tiny_data: Path, tmp_path: Path) -> None:
    """What a detector learns from changes its fingerprint; where the files lie and the other
    sources' settings do not."""
    data = tmp_path / "data"
    (data / "train_images").mkdir(parents=True)
    boxes = read_box_file(tiny_data / "fluke_boxes.csv").head(3)
    boxes.to_csv(data / "fluke_boxes.csv", index=False)
    for name in boxes["image"]:
        (data / "train_images" / name).write_bytes((tiny_data / "train_images" / name).read_bytes())
    settings = DetectorConfig(**TINY_DETECTOR)

    def fingerprint(config: DetectorConfig = settings, where: Path = data) -> str:
        return training_fingerprint(config, where, read_box_file(where / config.box_file))

    base = fingerprint()
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # copy2: the photos keep their size and time
    assert fingerprint(where=moved) == base
    assert fingerprint(settings.model_copy(update={"weights_path": "x.pt", "dataset_yaml": "y.yaml"})) == base
    changed = [fingerprint(settings.model_copy(update={"epochs": 2})), fingerprint(settings.model_copy(update={"imgsz": 96}))]
    boxes.assign(x_max=boxes["x_max"] - 1).to_csv(data / "fluke_boxes.csv", index=False)
    changed.append(fingerprint())
    boxes.to_csv(data / "fluke_boxes.csv", index=False)
    assert fingerprint() == base
    photo = data / "train_images" / boxes["image"].iloc[0]
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))  # a photo replaced under its name
    changed.append(fingerprint())
    assert len({base, *changed}) == len(changed) + 1


def test_weights_source_installs_a_users_file(trained_home: tuple, tmp_path: Path) -> None:
    detector_dir, _, _, trained = trained_home
    tracking = Tracking()
    settings = DetectorConfig(source="weights", weights_path=str(trained.weights), imgsz=96)
    result = prepare_detector(settings, tmp_path, tmp_path / "det", tmp_path, tracking=tracking)
    assert result.weights.read_bytes() == trained.weights.read_bytes() and result.scores == {} and result.dataset is None
    assert tracking.opened == 0  # nothing trained, nothing tracked
    assert read_json(tmp_path / "det" / "detector.json") == {"source": "weights", "imgsz": 96, "weights_sha256": sha256_file(trained.weights)}
    assert read_detector(tmp_path / "det").weights == tmp_path / "det" / "detector.pt"


def test_none_source_removes_the_detector_and_means_full_frames(tmp_path: Path) -> None:
    (tmp_path / "det").mkdir()
    (tmp_path / "det" / "detector.pt").write_bytes(b"an older detector")
    result = prepare_detector(DetectorConfig(source="none", imgsz=80), tmp_path, tmp_path / "det")
    assert result.weights is None and not (tmp_path / "det" / "detector.pt").exists()
    installed = read_detector(tmp_path / "det")
    assert (installed.source, installed.weights, installed.imgsz) == ("none", None, 80)
    # A stale file left beside a 'none' record is still not used.
    (tmp_path / "det" / "detector.pt").write_bytes(b"stale")
    assert read_detector(tmp_path / "det").weights is None


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"source": "weights"}, FileNotFoundError, "source='weights' needs weights_path"),
        ({"source": "weights", "weights_path": "/nonexistent/x.pt"}, FileNotFoundError, "x.pt"),
        ({"source": "dataset"}, ValueError, "source='dataset' needs dataset_yaml"),
        ({"source": "train", "box_file": "no_such_boxes.csv"}, FileNotFoundError, "box file not found"),
    ],
)
def test_bad_settings_fail_before_tracking_opens(
    settings: dict, error: type[Exception], match: str, tiny_data: Path, tmp_path: Path
) -> None:
    tracking = Tracking()
    with pytest.raises(error, match=match):
        prepare_detector(DetectorConfig(**settings), tiny_data, tmp_path / "det", tmp_path, tracking=tracking)
    assert tracking.opened == 0 and not (tmp_path / "det" / "detector.json").exists()


# ---------------------------------------------------------------- box summary


def _box_rows(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    records = [{"image": i, "split": s, "source": src, "confidence": c} for i, s, src, c in rows]
    return pd.DataFrame([{**r, "note": "" if r["source"] == "detector" else f"{r['image']}: why"} for r in records])


def test_photos_to_box_puts_train_first_and_hides_test_species(tiny_data: Path, tmp_path: Path) -> None:
    train, test = read_train_metadata(tiny_data), read_test_metadata(tiny_data, check_files=False)
    test.loc[0, "path"] = str(tmp_path / "missing.jpg")  # a listed test photo that is missing
    photos = photos_to_box(train, test)
    # No labels: a relabelled photo leaves the table as it was.
    assert photos.columns.tolist() == ["image", "path", "split", "species", "file_bytes", "file_mtime_ns"]
    first = Path(train["path"].iloc[0]).stat()
    assert (photos.loc[0, "file_bytes"], photos.loc[0, "file_mtime_ns"]) == (first.st_size, first.st_mtime_ns)
    assert (photos.loc[len(train), "file_bytes"], photos.loc[len(train), "file_mtime_ns"]) == (-1, -1)
    assert photos["image"].tolist() == train["image"].tolist() + test["image"].tolist()
    assert photos["split"].tolist() == ["train"] * len(train) + ["test"] * len(test)
    assert (photos.loc[photos["split"] == "test", "species"] == TEST_SPECIES).all()
    assert photos.loc[photos["split"] == "train", "species"].tolist() == train["species"].tolist()


def test_box_summary_shares_per_split_and_species() -> None:
    boxes = _box_rows(
        [
            ("a", "train", "detector", 0.9),
            ("b", "train", "detector", 0.5),
            ("c", "train", "full_frame", 0.1),
            ("d", "train", "detector", 0.7),
            ("e", "test", "full_frame", 0.0),
            ("f", "test", "unreadable", 0.0),
            ("g", "test", "detector", 0.4),
        ]
    )
    species = ["orca", "orca", "beluga", "beluga", TEST_SPECIES, TEST_SPECIES, TEST_SPECIES]
    summary = summarise_boxes(boxes, species, warn_share=0.3, detector=True)
    assert summary.per_split == pytest.approx({"test": 2 / 3, "train": 1 / 4}) and list(summary.per_split) == ["test", "train"]
    assert summary.full_frame_share == pytest.approx(3 / 7)
    assert summary.mean_confidence == pytest.approx((0.9 + 0.5 + 0.7 + 0.4) / 4)
    assert summary.too_high == pytest.approx({"test": 2 / 3}) and summary.too_high_text == "test 67%"
    assert summary.unreadable.to_dict("records") == [{"image": "f", "split": "test", "note": "f: why"}]
    table = summary.by_split_and_source.set_index("split")
    assert table.loc["train", "detector"] == 3 and table.loc["test", "unreadable"] == 1 and table.loc["train", "unreadable"] == 0
    by_species = summary.full_frame_by_species
    assert by_species[["split", "species"]].values.tolist() == [["test", TEST_SPECIES], ["train", "beluga"], ["train", "orca"]]
    assert by_species["photos"].tolist() == [3, 2, 2] and by_species["full_frame_share"].tolist() == pytest.approx([2 / 3, 0.5, 0.0])
    # The summary reads the table; it does not add columns to it.
    assert boxes.columns.tolist() == ["image", "split", "source", "confidence", "note"]


def test_box_summary_without_a_detector_warns_about_nothing() -> None:
    boxes = _box_rows([("a", "train", "full_frame", 0.0), ("b", "test", "full_frame", 0.0)])
    summary = summarise_boxes(boxes, ["orca", TEST_SPECIES], warn_share=0.3, detector=False)
    assert summary.per_split == {"test": 1.0, "train": 1.0} and summary.too_high == {} and summary.too_high_text == "none"
    assert summary.mean_confidence == 0.0 and summary.unreadable.empty
    assert summarise_boxes(boxes, ["orca", TEST_SPECIES], 0.3, detector=True).too_high_text == "test 100%, train 100%"


# ---------------------------------------------------------------- crops


@pytest.fixture
def cropped(tiny_data: Path, tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str], Path]:
    """Full-frame crops of three train and two test photos; one of each cannot be read."""
    train = read_train_metadata(tiny_data).head(3).copy()
    test = read_test_metadata(tiny_data, check_files=False).head(2).copy()
    for table, name in ((train, "bad_train.jpg"), (test, "bad_test.jpg")):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff not a jpeg")
        table.loc[table.index[-1], ["image", "path"]] = [name, str(tmp_path / name)]
    photos = photos_to_box(train, test)
    done = box_and_crop(photos[["image", "path", "split"]], None, BoxRule(0.25, 1.0, 64), CropRule(tmp_path / "crops", 32))
    split = photos["split"].to_numpy()
    return done.boxes.assign(split=split), done.crops.assign(split=split), photo_paths(photos), tmp_path / "crops"


def test_crops_of_every_split_go_to_their_folders(cropped: tuple) -> None:
    boxes, table, _, crops_dir = cropped
    assert table["image"].tolist() == boxes["image"].tolist() and table["split"].tolist() == boxes["split"].tolist()
    made = table[table["crop_path"] != ""]
    assert len(made) == 3 and all(Path(p).parent == crops_dir / s for p, s in zip(made["crop_path"], made["split"], strict=True))
    assert Image.open(made["crop_path"].iloc[0]).size == (32, 32)


def test_crop_report_fails_on_a_bad_training_photo_by_default(cropped: tuple) -> None:
    _, table, _, _ = cropped
    with pytest.raises(RuntimeError, match=r"1 training photo\(s\) could not be read .*bad_train_image.*bad_train\.jpg"):
        crop_report(table)


def test_crop_report_excludes_and_counts(cropped: tuple) -> None:
    boxes, table, paths, crops_dir = cropped
    report = crop_report(table, "exclude")
    assert report.train_failed["image"].tolist() == ["bad_train.jpg"] and report.test_failed["image"].tolist() == ["bad_test.jpg"]
    assert report.failed["image"].tolist() == ["bad_train.jpg", "bad_test.jpg"]
    assert (report.written, report.reused) == (3, 0)
    photos = pd.DataFrame({"image": boxes["image"], "path": boxes["image"].map(paths), "split": boxes["split"]})
    rerun = box_and_crop(photos, None, BoxRule(0.25, 1.0, 64), CropRule(crops_dir, 32)).crops
    again = crop_report(rerun.assign(split=boxes["split"].to_numpy()), "exclude")
    assert (again.written, again.reused) == (0, 3)
    assert crop_report(table[table["image"] != "bad_train.jpg"]).train_failed.empty  # nothing to fail on


def test_contact_sheet_is_written_and_draws_the_same_photos(cropped: tuple, tmp_path: Path) -> None:
    boxes, table, paths, _ = cropped
    sheet = write_contact_sheet(boxes, table, paths, 4, tmp_path / "sheet.png")
    assert sheet.size == (4 * 2 * 160, 160) and Image.open(tmp_path / "sheet.png").size == sheet.size
    again = write_contact_sheet(boxes, table, paths, 4, tmp_path / "again.png")
    assert list(again.getdata()) == list(sheet.getdata())
    small = write_contact_sheet(boxes, table, paths, 100, tmp_path / "all.png")  # never more than there are photos
    assert small.size == (4 * 2 * 160, 2 * 160)


def test_few_boxed_photos_train_for_more_epochs_to_reach_the_step_floor() -> None:
    """The demo's 113 training boxes keep their 50 epochs (8 batches a pass: 400 steps); 40
    boxes (3 batches a pass) train for 134; thousands are never raised; 0 keeps the epochs."""
    from whale_ml.detection.detector import detector_epochs

    assert detector_epochs(113, 16, 50, 400) == 50
    assert detector_epochs(40, 16, 50, 400) == 134
    assert detector_epochs(5000, 16, 50, 400) == 50
    assert detector_epochs(40, 16, 50, 0) == 50
    assert detector_epochs(0, 16, 5, 400) == 400  # an empty training set still counts one batch a pass
