"""The Kaggle-shaped synthetic set (whale_ml.data.kaggle_shape) and its ``whale demo-data --preset kaggle`` path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whale_assets.cli import main as whale_main
from whale_ml.data.kaggle_shape import (
    KAGGLE_SPECIES,
    KaggleShapeConfig,
    generate_kaggle_shape,
    long_tail_counts,
    photos_per_individual_law,
    plan_kaggle_shape,
)
from whale_ml.data.metadata import NEW_INDIVIDUAL, SPECIES_ALIASES, read_test_metadata, read_train_metadata

SMALL = KaggleShapeConfig(scale=0.002, min_width=48, max_width=96, seed=3)


@pytest.fixture(scope="module")
def full_plan() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan at the real counts (F = 1): no photos drawn, about a second."""
    return plan_kaggle_shape(KaggleShapeConfig(scale=1.0))


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same small set drawn by one process and by two."""
    one = generate_kaggle_shape(tmp_path_factory.mktemp("one") / "data", SMALL, workers=1)
    two = generate_kaggle_shape(tmp_path_factory.mktemp("two") / "data", SMALL, workers=2)
    return one, two


def _train_counts(individuals: pd.DataFrame, photos: pd.DataFrame) -> pd.Series:
    return photos.loc[photos["split"] == "train", "individual"].value_counts()


# ---------------------------------------------------------------- the counts and their law


def test_real_counts_at_scale_one(full_plan: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """F = 1: 51,033 training photos of 15,587 individuals, 27,956 test photos, 30 raw labels."""
    individuals, photos = full_plan
    train = photos[photos["split"] == "train"]
    assert len(train) == 51_033
    assert train["individual"].nunique() == 15_587
    assert (photos["split"] == "test").sum() == 27_956
    assert photos["image"].is_unique and individuals["individual_id"].is_unique
    assert individuals["label"].nunique() == 30
    assert individuals.loc[individuals["known"], "species"].nunique() == 26


def test_long_tail_like_the_real_one(full_plan: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """About 9,258 singletons, many pairs, a few individuals with hundreds of photos."""
    counts = _train_counts(*full_plan)
    assert abs((counts == 1).sum() - 9_258) <= 20
    assert (counts == 2).sum() > 1_500
    assert 300 <= counts.max() <= 400
    assert 5 <= (counts >= 100).sum() <= 100


def test_new_individuals_share_of_test(full_plan: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """About 16% of test photos show individuals absent from train; known ones are in train."""
    individuals, photos = full_plan
    test = photos[photos["split"] == "test"]
    known = individuals["known"].to_numpy()
    assert abs((~known[test["individual"]]).mean() - 0.16) < 0.002
    train_ids = set(photos.loc[photos["split"] == "train", "individual"])
    assert set(test.loc[known[test["individual"]], "individual"]) <= train_ids
    assert train_ids == set(np.flatnonzero(known))


@pytest.mark.parametrize("scale", [0.01, 0.125])
def test_any_scale_keeps_the_shape(scale: float) -> None:
    """Counts scale with F; the singleton share and the new share stay the real ones."""
    individuals, photos = plan_kaggle_shape(KaggleShapeConfig(scale=scale))
    counts = _train_counts(individuals, photos)
    assert counts.sum() == round(51_033 * scale)
    assert len(counts) == round(15_587 * scale)
    assert (photos["split"] == "test").sum() == round(27_956 * scale)
    assert abs((counts == 1).mean() - 9_258 / 15_587) < 0.01
    test = photos[photos["split"] == "test"]
    assert abs((~individuals["known"].to_numpy()[test["individual"]]).mean() - 0.16) < 0.01


def test_law_fits_its_facts() -> None:
    """The law has the real singleton share and mean, nothing above 400, and falls like a power law."""
    p = photos_per_individual_law()
    k = np.arange(len(p))
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == 0 and p[1] == pytest.approx(9_258 / 15_587)
    assert (p * k).sum() == pytest.approx(51_033 / 15_587, rel=1e-6)
    assert len(p) == 401
    assert np.all(np.diff(p[2:]) < 0)
    exponent = np.log(p[2] / p[4]) / np.log(2)
    assert 2.0 < exponent < 2.3
    with pytest.raises(ValueError):
        photos_per_individual_law(mean=500.0)


@pytest.mark.parametrize(("n", "total"), [(1, 1), (3, 3), (5, 8), (31, 102), (10, 11), (4, 40), (2000, 6500)])
def test_long_tail_counts_exact_total(n: int, total: int) -> None:
    """Any feasible (individuals, photos): exactly that many, everyone at least one photo."""
    counts = long_tail_counts(n, total, photos_per_individual_law())
    assert len(counts) == n and counts.sum() == total and counts.min() >= 1
    with pytest.raises(ValueError):
        long_tail_counts(5, 4, photos_per_individual_law())


def test_misspellings_and_aliases_present(full_plan: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """All five raw aliases of the real train.csv appear, and the table merges to real species."""
    individuals, _ = full_plan
    assert set(SPECIES_ALIASES) <= set(individuals["label"])
    for label, species, _, _ in KAGGLE_SPECIES:
        assert SPECIES_ALIASES.get(label, label) == species
    assert sum(count for *_, count in KAGGLE_SPECIES) == 51_033


def test_seed_changes_the_plan() -> None:
    """Same seed, same plan; another seed, other ids."""
    a = plan_kaggle_shape(KaggleShapeConfig(scale=0.01, seed=1))
    b = plan_kaggle_shape(KaggleShapeConfig(scale=0.01, seed=1))
    c = plan_kaggle_shape(KaggleShapeConfig(scale=0.01, seed=2))
    pd.testing.assert_frame_equal(a[1], b[1])
    assert set(a[0]["individual_id"]).isdisjoint(c[0]["individual_id"])


# ---------------------------------------------------------------- the written set


def test_identical_for_any_worker_count(small_sets: tuple[Path, Path]) -> None:
    """One worker or two: byte-identical files."""
    one, two = small_sets
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert len(files) > 150
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def test_tables_only_are_the_full_sets_tables(small_sets: tuple[Path, Path], tmp_path: Path) -> None:
    """``images=False``: the same CSV bytes as the drawn set, no photo and no box file (boxes come from drawing)."""
    drawn, _ = small_sets
    tables = generate_kaggle_shape(tmp_path / "tables", SMALL, images=False)
    assert sorted(p.name for p in tables.iterdir()) == ["sample_submission.csv", "test_truth.csv", "train.csv"]
    for name in ("train.csv", "test_truth.csv", "sample_submission.csv"):
        assert (tables / name).read_bytes() == (drawn / name).read_bytes(), name
    assert len(read_train_metadata(tables, check_files=False)) == 102
    assert len(read_test_metadata(tables, check_files=False)) == 56


def test_written_set_is_the_plan_in_kaggle_layout(small_sets: tuple[Path, Path]) -> None:
    """Counts, columns, readers, new share and boxes of a written set."""
    data, _ = small_sets
    train = pd.read_csv(data / "train.csv", dtype=str)
    truth = pd.read_csv(data / "test_truth.csv", dtype=str)
    assert list(train.columns) == ["image", "species", "individual_id"]
    assert len(train) == 102 and train["individual_id"].nunique() == 31 and len(truth) == 56
    assert sorted(train["image"]) == sorted(p.name for p in (data / "train_images").iterdir())
    assert len(read_train_metadata(data)) == 102 and len(read_test_metadata(data)) == 56
    is_new = truth["individual_id"] == NEW_INDIVIDUAL
    assert is_new.sum() == 9
    assert set(truth.loc[~is_new, "individual_id"]) <= set(train["individual_id"])
    assert set(truth.loc[is_new, "animal_id"]).isdisjoint(train["individual_id"])
    boxes = pd.read_csv(data / "fluke_boxes.csv", dtype={"image": str})
    assert len(boxes) == 50 and set(boxes["image"]) <= set(train["image"])
    for row in boxes.itertuples():
        with Image.open(data / "train_images" / row.image) as im:
            assert 0 <= row.x_min < row.x_max <= im.width and 0 <= row.y_min < row.y_max <= im.height


def test_photo_widths_from_jpeg_headers(small_sets: tuple[Path, Path]) -> None:
    """Every photo is a JPEG within the configured widths (sizes read from headers only)."""
    data, _ = small_sets
    widths = []
    for path in [*(data / "train_images").iterdir(), *(data / "test_images").iterdir()]:
        with Image.open(path) as im:  # opening reads the header; no pixels are decoded
            assert im.format == "JPEG"
            widths.append(im.width)
    assert SMALL.min_width <= min(widths) and max(widths) <= SMALL.max_width
    assert max(widths) - min(widths) > 20


def test_survey_sized_photo_is_enlarged_with_its_box(tmp_path: Path) -> None:
    """Above the drawing width a photo is enlarged: width in range, box scaled inside it, default 1,500-4,000 px."""
    assert (KaggleShapeConfig().min_width, KaggleShapeConfig().max_width) == (1500, 4000)
    cfg = KaggleShapeConfig(scale=0.00002, min_width=1500, max_width=1600, seed=5)
    data = generate_kaggle_shape(tmp_path / "data", cfg, workers=1)
    boxes = pd.read_csv(data / "fluke_boxes.csv", dtype={"image": str})
    for row in boxes.itertuples():
        with Image.open(data / "train_images" / row.image) as im:
            assert 1500 <= im.width <= 1600
            assert 0 <= row.x_min < row.x_max <= im.width and 0 <= row.y_min < row.y_max <= im.height
            assert row.x_max - row.x_min > 100  # the animal fills 30-65% of the frame


def test_refuses_existing_folder_and_bad_options(tmp_path: Path) -> None:
    """An existing folder is never touched; bad widths and worker counts are refused."""
    out = tmp_path / "data"
    out.mkdir()
    with pytest.raises(FileExistsError):
        generate_kaggle_shape(out, SMALL)
    with pytest.raises(ValueError):
        generate_kaggle_shape(tmp_path / "other", SMALL, workers=0)
    with pytest.raises(ValueError):
        KaggleShapeConfig(min_width=200, max_width=100)
    assert list(tmp_path.iterdir()) == [out]


def test_cli_writes_the_kaggle_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``whale demo-data OUT --preset kaggle --scale F --photo-px MIN MAX`` writes the same set as the core call."""
    args = ["demo-data", str(tmp_path / "cli"), "--preset", "kaggle", "--scale", "0.002", "--photo-px", "48", "96", "--seed", "3"]
    assert whale_main([*args, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "photos" in out and "/s" in out and "ETA" in out
    core = generate_kaggle_shape(tmp_path / "core", SMALL, workers=1)
    for name in ("train.csv", "test_truth.csv", "fluke_boxes.csv", "sample_submission.csv"):
        assert (tmp_path / "cli" / name).read_bytes() == (core / name).read_bytes()
    # The kaggle options do not silently apply to the other presets.
    assert whale_main(["demo-data", str(tmp_path / "tiny"), "--preset", "tiny", "--scale", "0.5"]) == 2
    assert not (tmp_path / "tiny").exists()
