"""Bad input never loses the other photos: each bad file gets a message naming it, is listed
in the metadata, and the run fails or goes on as the documented setting says."""

from __future__ import annotations

import logging
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whale_assets.instance import prepare_dagster_home
from whale_assets.run import load_recipe, run_pipeline
from whale_ml.data.images import ImageReadError, load_rgb
from whale_ml.data.metadata import NEW_INDIVIDUAL, MetadataError, read_train_metadata
from whale_ml.detection.yolo import write_yolo_dataset
from whale_ml.home import HomeLayout
from whale_ml.retrieval.local_features import FeatureStore
from whale_ml.submission import prior_predictions

REPO = Path(__file__).resolve().parent.parent


def _png_bomb(path: Path, side: int = 30000) -> None:
    """A PNG whose header claims side x side pixels (900 MP) with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- one file at a time


def test_decompression_bomb_is_refused_without_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.jpg"
    _png_bomb(bomb)
    with pytest.raises(ImageReadError, match=r"bomb\.jpg: image too large"):
        load_rgb(bomb)


def test_png_with_a_jpg_name_is_read_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(path, format="PNG")
    assert load_rgb(path).getpixel((0, 0)) == (1, 2, 3)


def test_bad_boxes_are_skipped_with_their_reason(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        Image.new("RGB", (100, 80)).save(images / name)
    boxes = pd.DataFrame(
        [
            ("a.jpg", 10, 10, 50, 50),  # good
            ("b.jpg", 60, 10, 20, 50),  # x_min > x_max
            ("c.jpg", 500, 500, 600, 600),  # outside the 100x80 photo
            ("d.jpg", 10, np.nan, 50, 50),  # a missing coordinate
            ("gone.jpg", 1, 1, 5, 5),  # no such photo
        ],
        columns=["image", "x_min", "y_min", "x_max", "y_max"],
    )
    dataset = write_yolo_dataset(boxes, images, tmp_path / "ds", val_share=0.0, seed=0)
    reasons = dict(line.split(": ", 1) for line in dataset.skipped)
    assert set(reasons) == {"b.jpg", "c.jpg", "d.jpg", "gone.jpg"}
    assert "x_min >= x_max" in reasons["b.jpg"]
    assert "outside the 100x80 image" in reasons["c.jpg"]
    assert "missing coordinate" in reasons["d.jpg"]
    assert "file not found" in reasons["gone.jpg"]
    assert dataset.n_train == 1  # the good box still trains


def test_missing_training_photo_is_a_broken_data_set(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = pd.read_csv(data / "train.csv")["image"].iloc[3]
    (data / "train_images" / victim).unlink()
    with pytest.raises(MetadataError, match=victim):
        read_train_metadata(data)


# ---------------------------------------------------------------- through the pipeline


@pytest.fixture
def bad_data(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The tiny set with one bad file of each kind, and a fresh WHALE_HOME on it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train_names = pd.read_csv(data / "train.csv")["image"].tolist()
    test_names = pd.read_csv(data / "sample_submission.csv")["image"].tolist()
    bad_train = train_names[5]
    raw = (data / "train_images" / bad_train).read_bytes()
    (data / "train_images" / bad_train).write_bytes(raw[: len(raw) // 3])  # truncated JPEG
    bad_test = {"empty": test_names[0], "missing": test_names[1], "bomb": test_names[2], "png": test_names[3]}
    (data / "test_images" / bad_test["empty"]).write_bytes(b"")
    (data / "test_images" / bad_test["missing"]).unlink()
    _png_bomb(data / "test_images" / bad_test["bomb"])
    png = data / "test_images" / bad_test["png"]
    Image.open(png).convert("RGB").save(png, format="PNG")  # a PNG behind a .jpg name: a readable photo
    boxes = pd.read_csv(data / "fluke_boxes.csv")
    extra = pd.DataFrame(
        [(train_names[0], 90, 10, 10, 40), (train_names[1], 5000, 5000, 6000, 6000)], columns=list(boxes.columns)
    )  # x_min > x_max; outside the photo
    pd.concat([boxes, extra]).to_csv(data / "fluke_boxes.csv", index=False)
    home = tmp_path / "home"
    monkeypatch.setenv("WHALE_HOME", str(home))
    monkeypatch.setenv("WHALE_DATA_DIR", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    prepare_dagster_home()
    return {"data": data, "home": home, "bad_train": bad_train, "bad_test": bad_test, "box_rows": train_names[:2]}


@pytest.mark.e2e
def test_default_policy_fails_on_a_bad_training_photo_after_reading_all(bad_data: dict) -> None:
    """A training photo that cannot be read stops the run, naming it; the other photos were all processed."""
    from whale_assets.definitions import defs

    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    job = defs().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config={"ops": {k: v for k, v in recipe["ops"].items() if k in ("fluke_detector", "boxes_and_crops")}},
        instance=dg.DagsterInstance.get(),
        asset_selection=[dg.AssetKey(k) for k in ("train_metadata", "test_metadata", "photos", "fluke_detector", "bboxes", "crops")],
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "boxes_and_crops")
    message = failure.event_specific_data.error.to_string()  # the cause chain, with our RuntimeError
    assert bad_data["bad_train"] in message and "bad_train_image" in message
    # The boxes were materialised, for every photo, before the crops failed the step.
    (boxes,) = [m for m in result.asset_materializations_for_node("boxes_and_crops") if m.asset_key == dg.AssetKey("bboxes")]
    listed = {r.data["image"] for r in boxes.metadata["unreadable"].records}  # a table in the UI
    assert boxes.metadata["unreadable_photos"].value == 4  # truncated train, empty, missing, bomb
    for name in [bad_data["bad_train"], *(bad_data["bad_test"][k] for k in ("empty", "missing", "bomb"))]:
        assert name in listed
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "full_frame_share_is_low"]
    assert check.metadata["threshold"].value == 0.3 and "test_share" in check.metadata
    (detector,) = result.asset_materializations_for_node("fluke_detector")
    skipped = {r.data["image"] for r in detector.metadata["skipped_boxes"].records}
    assert all(name in skipped for name in bad_data["box_rows"])


@pytest.mark.e2e
def test_exclude_policy_trains_without_it_and_every_test_photo_gets_a_row(bad_data: dict) -> None:
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["ops"]["boxes_and_crops"]["config"]["crops"]["bad_train_image"] = "exclude"
    recipe["ops"]["arcface_model"]["config"]["epochs"] = 1
    run_pipeline(recipe, log=lambda _m: None)
    layout = HomeLayout(bad_data["home"])

    folds = pd.read_parquet(layout.tables / "cv_folds.parquet")
    assert bad_data["bad_train"] not in set(folds["image"])
    assert len(folds) == len(pd.read_csv(bad_data["data"] / "train.csv")) - 1

    sample = pd.read_csv(bad_data["data"] / "sample_submission.csv")
    sub = pd.read_csv(layout.submission, dtype=str, keep_default_na=False)
    assert sub["image"].tolist() == sample["image"].tolist()  # every listed photo has its row
    prior = " ".join(prior_predictions(folds["individual_id"].tolist()))
    by_image = dict(zip(sub["image"], sub["predictions"], strict=True))
    for kind in ("empty", "missing", "bomb"):
        assert by_image[bad_data["bad_test"][kind]] == prior, kind
    assert prior.startswith(NEW_INDIVIDUAL)
    # The PNG behind a .jpg name was read like any photo: it has a crop and a real prediction.
    crops = pd.read_parquet(layout.tables / "crops.parquet")
    assert crops.set_index("image").loc[bad_data["bad_test"]["png"], "crop_path"] != ""
    instance = dg.DagsterInstance.get()
    mat = instance.get_latest_materialization_event(dg.AssetKey("crops")).asset_materialization
    failed = {r.data["image"] for r in mat.metadata["failed_photos"].records}
    assert mat.metadata["excluded_train_photos"].value == 1
    for name in [bad_data["bad_train"], *(bad_data["bad_test"][k] for k in ("empty", "missing", "bomb"))]:
        assert name in failed
    assert "contact_sheet" in mat.metadata and (layout.crops_dir / "contact_sheet.png").exists()
    test_mat = instance.get_latest_materialization_event(dg.AssetKey("test_metadata")).asset_materialization
    assert test_mat.metadata["missing_files"].value == 1


# ---------------------------------------------------------------- many bad photos in one run

N_UNREADABLE = 12  # more than a warning lists by name (10)
LONG_NAME_BYTES = 244


def _long_name(tag: str) -> str:
    """A file name of LONG_NAME_BYTES bytes: the file fits the file system (255), a crop named after it did not."""
    stem = f"long_{tag}_"
    return stem + "x" * (LONG_NAME_BYTES - len(stem) - len(".jpg")) + ".jpg"


def _rename_photo(data: Path, folder: str, csv_names: tuple[str, ...], old: str, new: str) -> None:
    (data / folder / old).rename(data / folder / new)
    for csv_name in csv_names:
        df = pd.read_csv(data / csv_name, dtype=str, keep_default_na=False)
        df["image"] = df["image"].replace(old, new)
        df.to_csv(data / csv_name, index=False)


@pytest.fixture(scope="module")
def many_bad_photos(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One whole `whale run` (tiny recipe, one epoch) on the tiny set with: N_UNREADABLE test
    photos that cannot be read (half empty files, half missing), a test photo that is also a
    training photo (same name in both folders and both CSVs), and a test and a training photo
    whose names are 244 bytes long. The run's outcome (or its error) is shared by the tests below."""
    tmp = tmp_path_factory.mktemp("many_bad")
    data = tmp / "data"
    shutil.copytree(tiny_data, data)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    test_names = pd.read_csv(data / "sample_submission.csv")["image"].tolist()
    unreadable = test_names[:N_UNREADABLE]
    for i, name in enumerate(unreadable):
        if i % 2:
            (data / "test_images" / name).unlink()
        else:
            (data / "test_images" / name).write_bytes(b"")
    # The same photo listed in both splits, under the same name.
    shared = train["image"].iloc[0]
    shutil.copyfile(data / "train_images" / shared, data / "test_images" / shared)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    sample.loc[len(sample)] = [shared, sample["predictions"].iloc[0]]
    sample.to_csv(data / "sample_submission.csv", index=False)
    truth = pd.read_csv(data / "test_truth.csv", dtype=str, keep_default_na=False)
    truth.loc[len(truth)] = {**truth.iloc[0].to_dict(), "image": shared, "individual_id": train["individual_id"].iloc[0]}
    truth.to_csv(data / "test_truth.csv", index=False)
    # Long names: a test photo, and a training photo (one the box file does not list: the detector trains on the rest).
    long_test = _long_name("test")
    _rename_photo(data, "test_images", ("sample_submission.csv", "test_truth.csv"), test_names[N_UNREADABLE], long_test)
    boxed = set(pd.read_csv(data / "fluke_boxes.csv")["image"])
    old_train = next(n for n in train["image"].iloc[1:] if n not in boxed)
    long_train = _long_name("train")
    _rename_photo(data, "train_images", ("train.csv",), old_train, long_train)

    home = tmp / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALE_HOME", str(home))
        mp.setenv("WHALE_DATA_DIR", str(data))
        mp.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        prepare_dagster_home()
        recipe = load_recipe(REPO / "configs" / "tiny.yaml")
        recipe["ops"]["arcface_model"]["config"]["epochs"] = 1
        error: BaseException | None = None
        try:
            run_pipeline(recipe, log=lambda _m: None)
        except Exception as exc:  # each test below says what it needed from the run
            error = exc
        yield {
            "data": data,
            "home": home,
            "error": error,
            "unreadable": unreadable,
            "shared": shared,
            "long_test": long_test,
            "long_train": long_train,
        }


def _finished(run: dict) -> HomeLayout:
    assert run["error"] is None, f"the run failed: {run['error']!r}"
    return HomeLayout(run["home"])


def _materialization(key: str) -> dg.AssetMaterialization:
    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey.from_user_string(key))
    assert event is not None, key
    return event.asset_materialization


@pytest.mark.e2e
def test_test_photo_also_in_train_gets_its_row_and_both_keep_their_features(many_bad_photos: dict) -> None:
    layout = _finished(many_bad_photos)
    shared = many_bad_photos["shared"]
    sample = pd.read_csv(many_bad_photos["data"] / "sample_submission.csv", dtype=str)
    sub = pd.read_csv(layout.submission, dtype=str, keep_default_na=False)
    assert sub["image"].tolist() == sample["image"].tolist()
    assert shared in set(pd.read_parquet(layout.tables / "cv_folds.parquet")["image"])
    for split in ("train", "test"):
        images = FeatureStore([layout.local_features_dir(split)]).images
        assert shared in images, split
    feats = _materialization("local_features").metadata
    assert feats["train_photos"].value == len(pd.read_csv(many_bad_photos["data"] / "train.csv"))
    assert feats["test_photos"].value == len(sample)


@pytest.mark.e2e
def test_photos_with_244_byte_names_are_cropped_and_answered(many_bad_photos: dict) -> None:
    layout = _finished(many_bad_photos)
    crops = pd.read_parquet(layout.tables / "crops.parquet").set_index(["split", "image"])
    for split, name in (("test", many_bad_photos["long_test"]), ("train", many_bad_photos["long_train"])):
        crop = Path(crops.loc[(split, name), "crop_path"])
        assert crop.is_file() and len(crop.name.encode()) <= 128, (split, crop.name)
    assert many_bad_photos["long_train"] in set(pd.read_parquet(layout.tables / "cv_folds.parquet")["image"])
    folds = pd.read_parquet(layout.tables / "cv_folds.parquet")
    prior = " ".join(prior_predictions(folds["individual_id"].tolist()))
    sub = pd.read_csv(layout.submission, dtype=str, keep_default_na=False).set_index("image")
    assert many_bad_photos["long_test"] in sub.index
    unreadable_rows = sub.loc[many_bad_photos["unreadable"], "predictions"]
    assert (unreadable_rows == prior).all()
    assert _materialization("submission_csv").metadata["prior_only_rows"].value == N_UNREADABLE


@pytest.mark.e2e
def test_many_unreadable_photos_make_a_few_warnings_and_full_lists(many_bad_photos: dict) -> None:
    _finished(many_bad_photos)
    bad = set(many_bad_photos["unreadable"])
    instance = dg.DagsterInstance.get()
    warnings = [
        e.user_message
        for run in instance.get_runs()
        for e in instance.all_logs(run.run_id)
        if e.dagster_event is None and e.level >= logging.WARNING
    ]
    naming = [w for w in warnings if any(name in w for name in bad)]
    # One summary per kind (missing files, unreadable, without crop, without local features,
    # prior-only rows), never one per photo; each names at most ten photos.
    assert 0 < len(naming) <= 5, naming
    assert max(sum(name in w for name in bad) for w in naming) <= 10
    assert all(f"{N_UNREADABLE} " in w or f"{N_UNREADABLE // 2} " in w for w in naming), naming
    # The full lists are files under the home, linked from the metadata.
    lists = {
        ("bboxes", "unreadable_list"): bad,
        ("crops", "failed_photos_list"): bad,
        ("local_features", "without_features_list"): bad,
        ("submission_csv", "prior_only_list"): bad,
        ("test_metadata", "missing_list"): set(many_bad_photos["unreadable"][1::2]),
    }
    home = many_bad_photos["home"].resolve()
    for (key, entry), expected in lists.items():
        path = Path(_materialization(key).metadata[entry].value)
        assert path.resolve().is_relative_to(home), (key, path)
        listed = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert set(listed["image"]) == expected, key
        assert (listed["reason"] != "").all(), key
