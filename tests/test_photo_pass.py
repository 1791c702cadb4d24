"""The one pass over the photos (whale_ml/detection/photo_pass.py): each photo decoded once,
small (JPEG draft), on a pool of threads, with the same boxes and crops for any number of
workers; sizes read from headers where only the size is needed. The detector's training
images, decoded once at the training size.

Decodes are counted by wrapping Pillow's ``ImageFile.load`` (where a file's pixels are
decoded); the pass itself, Pillow and the detector are real.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from whale_ml.data.images import decode_photo, photo_size, reduction_for
from whale_ml.data.kaggle_shape import KaggleShapeConfig, generate_kaggle_shape
from whale_ml.detection.crops import crop_reduction, cut_crop
from whale_ml.detection.photo_pass import DECODE_COST, BoxRule, CropRule, ScalePlan, expand_box
from whale_ml.detection.yolo import box_and_crop, read_box_file, train_yolo, write_yolo_dataset
from whale_ml.progress import progress_printer

# Survey-like photos, narrower than the real 1,500-4,000 px so that the tests stay quick;
# wide enough that the pass decodes them at 1/4 and 1/8 scale.
BIG = KaggleShapeConfig(scale=0.0002, min_width=1200, max_width=2000, seed=5)


@pytest.fixture(scope="module")
def big_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_kaggle_shape(tmp_path_factory.mktemp("big") / "data", BIG, workers=1)


@pytest.fixture(scope="module")
def photos(big_data: Path) -> pd.DataFrame:
    train = sorted((big_data / "train_images").glob("*.jpg"))
    test = sorted((big_data / "test_images").glob("*.jpg"))
    return pd.DataFrame(
        {
            "image": [p.name for p in train + test],
            "path": [str(p) for p in train + test],
            "split": ["train"] * len(train) + ["test"] * len(test),
        }
    )


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """File name -> how many times its pixels were decoded."""
    counts: Counter[str] = Counter()
    load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> object:
        if self.tile and getattr(self, "filename", ""):  # pixels still to decode (not a loaded image)
            counts[Path(self.filename).name] += 1
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    yield counts


def test_one_decode_per_photo_for_boxes_and_crops(photos: pd.DataFrame, decodes: Counter[str], tmp_path: Path) -> None:
    """Without a detector every box is the full frame: one draft decode per photo, never a second."""
    done = box_and_crop(photos, None, BoxRule(0.25, 1.2, 128), CropRule(tmp_path, 64), batch=4, workers=2)
    assert len(photos) >= 8
    assert dict(decodes) == {name: 1 for name in photos["image"]}
    assert done.stats.decodes == len(photos) and done.stats.redecodes == 0
    assert set(done.stats.by_reduction) <= {4, 8} and sum(done.stats.by_reduction.values()) == len(photos)
    crops = done.crops
    assert crops is not None and (crops["crop_path"] != "").all() and crops["written"].all()
    for row in crops.itertuples():
        split = photos.set_index("image").loc[row.image, "split"]
        assert Path(row.crop_path).parent == tmp_path / split
        assert Image.open(row.crop_path).size == (64, 64)
    # A second pass finds every crop written: it decodes for the boxes only, once each.
    decodes.clear()
    again = box_and_crop(photos, None, BoxRule(0.25, 1.2, 128), CropRule(tmp_path, 64), batch=4, workers=2)
    assert dict(decodes) == {name: 1 for name in photos["image"]}
    assert again.crops is not None and not again.crops["written"].any()


def test_the_decode_scale_gives_the_detector_and_the_crop_their_sizes(photos: pd.DataFrame) -> None:
    for path in photos["path"]:
        full = photo_size(path)
        for imgsz, size in [(128, 64), (640, 256), (640, 512), (4000, 64)]:
            photo = decode_photo(path, min_size=(max(imgsz, size), size))
            assert photo.full_size == full
            assert max(photo.image.size) >= min(imgsz, max(full)) and min(photo.image.size) >= min(size, min(full))
            assert photo.reduction == reduction_for(full, max(imgsz, size), size)
            if photo.reduction < 8:  # the next coarser scale would have been too small
                coarser = -(-np.array(full) // (photo.reduction * 2))
                assert coarser.max() < max(imgsz, size) or coarser.min() < size


def test_the_first_scale_weighs_a_second_decode_against_a_finer_first_one() -> None:
    """Coarsest allowed scale without boxes or when every box fills the photo; finer when
    most boxes seen so far are too small for the crop at the coarsest scale."""
    stored = (4000, 2667)
    assert ScalePlan(640, 512, 512)(stored) == 4  # 1000 x 667: both sides hold 512 and 640
    assert ScalePlan(640, 512, 512, shares=(1.0,) * 50)(stored) == 4
    # Boxes of half the short side: 333 px at 1/4, 667 at 1/2. Decoding at 1/2 first is cheaper
    # than 1/4 and then 1/2 again for nearly every photo.
    assert ScalePlan(640, 512, 512, shares=(0.5,) * 50)(stored) == 2
    assert ScalePlan(640, 512, 512, shares=sorted((0.5,) * 5 + (1.0,) * 95))(stored) == 4  # rarely: decode again
    assert ScalePlan(128, 64, 64, shares=(0.1,) * 50)(stored) == 4  # 267 px boxes at full scale: 67 px at 1/4
    assert DECODE_COST[8] < DECODE_COST[4] < DECODE_COST[2] < DECODE_COST[1] == 1.0


def test_draft_decoded_crops_are_within_a_small_difference_of_fully_decoded_ones(big_data: Path) -> None:
    """Crops cut from the draft decode the pass uses differ from crops of the fully decoded
    photo by under 2 grey levels (of 255) per photo on average, under 1 over the set."""
    boxes = read_box_file(big_data / "fluke_boxes.csv")
    diffs = []
    for size, imgsz in [(64, 128), (256, 640), (512, 640)]:
        for row in boxes.itertuples():
            path = big_data / "train_images" / row.image
            full = decode_photo(path)
            box = expand_box((row.x_min, row.y_min, row.x_max, row.y_max), 1.2, *full.full_size)
            first = decode_photo(path, min_size=(max(imgsz, size), size))
            needed = crop_reduction(box, size)
            source = first if needed >= first.reduction else decode_photo(path, needed)
            assert source.reduction > 1 or needed == 1
            reference = np.asarray(cut_crop(full.image, box, size, full_size=full.full_size), dtype=float)
            drafted = np.asarray(cut_crop(source.image, box, size, full_size=source.full_size), dtype=float)
            diffs.append(np.abs(reference - drafted).mean())
    assert max(diffs) < 2.0 and np.mean(diffs) < 1.0, diffs


def test_exif_orientation_is_applied_to_draft_decodes_and_header_sizes(tmp_path: Path, decodes: Counter[str]) -> None:
    stored = Image.linear_gradient("L").resize((1600, 1000)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "turned.jpg"
    stored.save(path, exif=exif.tobytes(), quality=90)
    assert photo_size(path) == (1000, 1600)
    assert decodes[path.name] == 0  # the header was enough
    photo = decode_photo(path, min_size=(128, 64))
    assert photo.reduction == 8 and photo.full_size == (1000, 1600) and photo.image.size == (125, 200)
    assert photo.image.size == decode_photo(path).image.reduce(8).size


def test_yolo_dataset_decodes_each_boxed_photo_once_at_the_training_size(big_data: Path, tmp_path: Path, decodes: Counter[str]) -> None:
    """Each boxed photo decoded once (at a reduced JPEG scale) and written with its long side
    at the training size; the labels are those of the photos linked at full size (a uniform
    resize keeps fractions of the width and height); the same bytes for 1 and 2 workers."""
    boxes = read_box_file(big_data / "fluke_boxes.csv")
    names = boxes["image"].unique().tolist()
    seen: list[tuple[int, int]] = []
    small = write_yolo_dataset(boxes, big_data / "train_images", tmp_path / "small", 0.25, 0, imgsz=128, workers=2, progress=lambda *a: seen.append(a))
    assert dict(decodes) == dict.fromkeys(names, 1) and seen[-1] == (len(names), len(names))
    decodes.clear()
    full = write_yolo_dataset(boxes, big_data / "train_images", tmp_path / "full", 0.25, 0)
    assert sum(decodes.values()) == 0  # without imgsz: the photos linked, only their headers read
    one = write_yolo_dataset(boxes, big_data / "train_images", tmp_path / "one", 0.25, 0, imgsz=128, workers=1)
    assert (small.n_train, small.n_val, small.val_images, small.imgsz, full.imgsz) == (full.n_train, full.n_val, full.val_images, 128, None)
    for name in names:
        split = "val" if name in small.val_images else "train"
        image = tmp_path / "small" / "images" / split / name
        assert not image.is_symlink() and (tmp_path / "full" / "images" / split / name).is_symlink()
        w, h = photo_size(big_data / "train_images" / name)
        assert Image.open(image).size == ((128, round(h * 128 / w)) if w >= h else (round(w * 128 / h), 128))
        assert image.read_bytes() == (tmp_path / "one" / "images" / split / name).read_bytes()
        label = Path("labels", split, name).with_suffix(".txt")
        assert (tmp_path / "small" / label).read_text() == (tmp_path / "full" / label).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "one", "small"]  # no staging folder left


def test_yolo_dataset_images_are_upright_and_unreadable_photos_are_skipped(tmp_path: Path) -> None:
    """A photo stored on its side (EXIF orientation 6) is written upright, as the photo pass
    sees it, its labels over its upright size; a photo that cannot be decoded (a truncated
    JPEG, whose header reads fine) is skipped and named."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (400, 200), "white").save(images / "turned.jpg", exif=exif.tobytes())
    Image.new("RGB", (300, 300), "white").save(images / "fine.png")
    raw = (images / "turned.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    boxes = pd.DataFrame(
        [("turned.jpg", 0, 0, 100, 200), ("cut.jpg", 0, 0, 10, 10), ("cut.jpg", 5, 5, 20, 20), ("fine.png", 0, 0, 150, 300)],
        columns=["image", "x_min", "y_min", "x_max", "y_max"],
    )
    dataset = write_yolo_dataset(boxes, images, tmp_path / "ds", 0.0, 0, imgsz=64)
    assert photo_size(images / "turned.jpg") == (200, 400)
    assert Image.open(tmp_path / "ds" / "images" / "train" / "turned.jpg").size == (32, 64)
    assert Image.open(tmp_path / "ds" / "images" / "train" / "fine.png").format == "PNG"
    label = (tmp_path / "ds" / "labels" / "train" / "turned.txt").read_text().split()
    assert [float(v) for v in label[1:]] == pytest.approx([0.25, 0.25, 0.5, 0.5])
    assert dataset.n_train == 2 and len(dataset.skipped) == 1  # named once, for its first box
    assert dataset.skipped[0].startswith("cut.jpg: ") and str(images / "cut.jpg") in dataset.skipped[0]


@pytest.mark.slow
def test_with_a_trained_detector_results_do_not_depend_on_workers(
    tiny_data: Path, photos: pd.DataFrame, tmp_path: Path, decodes: Counter[str]
) -> None:
    """A real YOLO model (one epoch): identical boxes and crop files for 1 and 2 workers;
    a photo is decoded a second time only when its box is too small for the crop at the first scale."""
    work = tmp_path / "yolo"
    dataset = write_yolo_dataset(read_box_file(tiny_data / "fluke_boxes.csv"), tiny_data / "train_images", work / "ds", 0.25, 0)
    weights, _ = train_yolo(dataset, work, epochs=1, imgsz=64, batch=8, device="cpu")
    rule = BoxRule(0.0, 1.2, 64)  # every detection is used, however unsure: boxes of all sizes
    decodes.clear()
    one = box_and_crop(photos, weights, rule, CropRule(tmp_path / "one", 160), batch=4, device="cpu", workers=1)
    counted = dict(decodes)
    two = box_and_crop(photos, weights, rule, CropRule(tmp_path / "two", 160), batch=4, device="cpu", workers=2)
    pd.testing.assert_frame_equal(one.boxes, two.boxes)
    assert (one.boxes["source"] == "detector").any()
    for a, b in zip(one.crops["crop_path"], two.crops["crop_path"], strict=True):  # type: ignore[index]
        assert Path(a).name == Path(b).name and Path(a).read_bytes() == Path(b).read_bytes()
    # Decodes: one per photo, plus one for each box too small at the first scale.
    for row, path in zip(one.boxes.itertuples(), photos["path"], strict=True):
        box = (row.x_min, row.y_min, row.x_max, row.y_max)
        assert counted[row.image] == 1 + (crop_reduction(box, 160) < row.decode_reduction), row
        assert row.decode_reduction <= reduction_for(photo_size(path), 160, 160)  # never coarser than the crop allows
    assert one.stats.decodes == sum(counted.values()) and one.stats.redecodes == sum(counted.values()) - len(photos)


def test_progress_lines_give_the_rate_and_the_time_left() -> None:
    clock = iter([100.0, 110.0, 120.0, 130.0])
    lines: list[str] = []
    progress = progress_printer(lines.append, "boxes", every_s=5.0, clock=lambda: next(clock))
    for done in (10, 30, 50, 90):
        progress(done, 90)
    assert lines[0] == "boxes: 10/90 (11%)"
    assert re.fullmatch(r"boxes: 30/90 \(33%\), 2\.0/s, ETA 30 s", lines[1]), lines
    assert re.fullmatch(r"boxes: 90/90 \(100%\), 2\.7/s over 30 s", lines[3]), lines
