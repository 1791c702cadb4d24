"""The synthetic Kaggle-layout data set (whale_ml.data.demo) and safe image loading (whale_ml.data.images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from whale_ml.data.demo import (
    PRESETS,
    SPECIES_LABELS,
    DemoDataConfig,
    _individuals,
    ensure_demo_data,
    generate_demo_data,
)
from whale_ml.data.images import ImageReadError, eval_transform, load_rgb
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_test_metadata, read_train_metadata

PRESET = PRESETS["tiny"]  # the product's tiny preset: the thing under test here
MISSPELLINGS = {label for label, canonical, _ in SPECIES_LABELS if label != canonical}


@pytest.fixture(scope="module")
def two_tiny_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny preset generated twice with the same seed, in two separate folders."""
    a = generate_demo_data(tmp_path_factory.mktemp("demo_a") / "data", PRESET)
    b = generate_demo_data(tmp_path_factory.mktemp("demo_b") / "data", PRESET)
    return a, b


# ---------------------------------------------------------------- determinism and layout


def test_same_seed_identical_sets(two_tiny_sets: tuple[Path, Path]) -> None:
    """Same seed -> byte-identical CSVs and photos."""
    a, b = two_tiny_sets
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) > 20
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_different_seed_differs(tmp_path: Path) -> None:
    """Another seed gives another set (ids and photos)."""
    other = generate_demo_data(tmp_path / "data", PRESET.model_copy(update={"seed": 1}))
    first = generate_demo_data(tmp_path / "data0", PRESET)
    assert set(pd.read_csv(other / "train.csv")["individual_id"]).isdisjoint(pd.read_csv(first / "train.csv")["individual_id"])


def test_kaggle_layout(two_tiny_sets: tuple[Path, Path]) -> None:
    """The files and columns of the Kaggle layout, consistent with the image folders."""
    data, _ = two_tiny_sets
    train = pd.read_csv(data / "train.csv", dtype=str)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str)
    boxes = pd.read_csv(data / "fluke_boxes.csv")
    truth = pd.read_csv(data / "test_truth.csv", dtype=str)
    assert list(train.columns) == ["image", "species", "individual_id"]
    assert list(sample.columns) == ["image", "predictions"]
    assert list(boxes.columns) == ["image", "x_min", "y_min", "x_max", "y_max"]
    assert list(truth.columns)[:2] == ["image", "individual_id"]

    train_files = sorted(p.name for p in (data / "train_images").iterdir())
    test_files = sorted(p.name for p in (data / "test_images").iterdir())
    assert sorted(train["image"]) == train_files
    assert sorted(sample["image"]) == test_files
    assert sorted(truth["image"]) == test_files
    assert set(train_files).isdisjoint(test_files)
    assert set(boxes["image"]) <= set(train["image"])
    assert len(boxes) > 0
    # Every sample row is a well-formed five-id answer.
    assert all(len(set(p.split())) == 5 for p in sample["predictions"])
    # The set passes the project's own strict readers.
    assert len(read_train_metadata(data)) == len(train)
    assert read_test_metadata(data)["image"].tolist() == sample["image"].tolist()
    # No half-written temp folder is left beside it.
    assert [p.name for p in data.parent.iterdir()] == ["data"]


def test_boxes_inside_their_images(two_tiny_sets: tuple[Path, Path]) -> None:
    """Every box is non-empty and lies inside its photo."""
    data, _ = two_tiny_sets
    boxes = pd.read_csv(data / "fluke_boxes.csv", dtype={"image": str})
    for row in boxes.itertuples():
        with Image.open(data / "train_images" / row.image) as im:
            w, h = im.size
        assert 0 <= row.x_min < row.x_max <= w, row
        assert 0 <= row.y_min < row.y_max <= h, row


def test_photo_sizes_follow_config(two_tiny_sets: tuple[Path, Path]) -> None:
    """Photo widths stay within the preset's min/max width."""
    data, _ = two_tiny_sets
    for p in list((data / "train_images").iterdir())[:10]:
        with Image.open(p) as im:
            assert PRESET.min_width <= im.width <= PRESET.max_width
            assert im.mode == "RGB"


def test_misspelled_species_present(two_tiny_sets: tuple[Path, Path]) -> None:
    """train.csv carries at least one of the real data set's misspellings, for the normaliser."""
    data, _ = two_tiny_sets
    labels = set(pd.read_csv(data / "train.csv", dtype=str)["species"])
    assert labels & MISSPELLINGS
    assert labels <= {label for label, _, _ in SPECIES_LABELS}


def test_new_individuals_absent_from_train(two_tiny_sets: tuple[Path, Path]) -> None:
    """Some test truths are new_individual; hidden new ids never appear in train; known truths do."""
    data, _ = two_tiny_sets
    train_ids = set(pd.read_csv(data / "train.csv", dtype=str)["individual_id"])
    truth = pd.read_csv(data / "test_truth.csv", dtype=str)
    is_new = truth["individual_id"] == NEW_INDIVIDUAL
    assert is_new.sum() >= PRESET.n_new_individuals
    assert set(truth.loc[~is_new, "individual_id"]) <= train_ids
    assert NEW_INDIVIDUAL not in train_ids
    # Rebuild the generator's individuals from the seed: the new ones are not in train.csv.
    rng = np.random.default_rng(PRESET.seed)
    known = _individuals(PRESET, rng, PRESET.n_individuals)
    new = _individuals(PRESET, rng, PRESET.n_new_individuals)
    assert {i.individual_id for i in known} == train_ids
    assert {i.individual_id for i in new}.isdisjoint(train_ids)


def test_generate_refuses_existing_folder(tmp_path: Path) -> None:
    """An existing folder is never overwritten."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_demo_data(out, PRESET)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_ensure_demo_data_idempotent(tmp_path: Path) -> None:
    """First call generates, second call reuses the same files untouched."""
    out = tmp_path / "data"
    folder, made = ensure_demo_data(out, "tiny")
    assert (folder, made) == (out, True)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    folder, made = ensure_demo_data(out, "tiny")
    assert (folder, made) == (out, False)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_custom_config_counts(tmp_path: Path) -> None:
    """A custom config's individual counts are honoured (no singletons, two new ones)."""
    cfg = DemoDataConfig(
        n_individuals=4, n_new_individuals=2, min_images=2, max_images=2, test_share=0.0,
        singleton_share=0.0, min_width=64, max_width=64, box_share=1.0, seed=9,
    )  # fmt: skip
    data = generate_demo_data(tmp_path / "data", cfg)
    train = pd.read_csv(data / "train.csv", dtype=str)
    assert train["individual_id"].nunique() == 4
    assert (train["individual_id"].value_counts() == 2).all()
    truth = pd.read_csv(data / "test_truth.csv", dtype=str)
    assert (truth["individual_id"] == NEW_INDIVIDUAL).all()
    assert 2 <= len(truth) <= 2 * cfg.new_images_max
    assert len(pd.read_csv(data / "fluke_boxes.csv")) == len(train)


# ---------------------------------------------------------------- load_rgb


def test_exif_orientation_applied(tmp_path: Path) -> None:
    """EXIF orientation 6 (rotate 90 CW): a 40x20 stored image loads as 20x40, left half on top."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    loaded = load_rgb(path)
    assert loaded.size == (20, 40)
    arr = np.asarray(loaded, dtype=np.float64)
    top, bottom = arr[:16].mean(axis=(0, 1)), arr[24:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_no_exif_keeps_size(tmp_path: Path) -> None:
    """Without an orientation tag nothing is rotated."""
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (40, 20), (1, 2, 3)).save(path)
    assert load_rgb(path).size == (40, 20)


@pytest.mark.parametrize(
    ("mode", "fmt", "colour"),
    [
        ("L", "JPEG", 128),
        ("P", "PNG", 3),
        ("CMYK", "JPEG", (0, 255, 255, 0)),
        ("RGBA", "PNG", (10, 20, 30, 128)),
        ("1", "PNG", 1),
    ],
)
def test_any_mode_comes_back_rgb(tmp_path: Path, mode: str, fmt: str, colour: object) -> None:
    """Grayscale, palette, CMYK, alpha and bilevel images all load as RGB of the same size."""
    path = tmp_path / f"img.{fmt.lower()}"
    im = Image.new(mode, (12, 9), colour)
    if mode == "P":
        im.putpalette([0, 0, 0, 255, 255, 255, 10, 10, 10, 200, 30, 40] + [0] * (256 * 3 - 12))
    im.save(path, format=fmt)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert loaded.size == (12, 9)
    if mode == "P":
        assert loaded.getpixel((0, 0)) == (200, 30, 40)
    if mode == "CMYK":
        r, g, b = loaded.getpixel((5, 5))
        assert r > 200 and g < 60 and b < 60  # C=0, M=Y=255: red


def test_zero_byte_file_raises(tmp_path: Path) -> None:
    """An empty file is an ImageReadError naming it."""
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    """A JPEG cut in half is refused (not silently padded grey), naming the file."""
    full = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full, quality=95)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        load_rgb(cut)
    assert str(cut) in str(info.value)
    assert load_rgb(full).size == (64, 64)


def test_not_an_image_and_missing_file_raise(tmp_path: Path) -> None:
    """A text file and a missing path both give ImageReadError naming the path."""
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    missing = tmp_path / "missing.jpg"
    for path in (text, missing):
        with pytest.raises(ImageReadError) as info:
            load_rgb(path)
        assert str(path) in str(info.value)
    assert issubclass(ImageReadError, OSError)


def test_eval_transform_deterministic(tmp_path: Path) -> None:
    """Same photo twice -> identical uint8 tensor of the requested size."""
    path = tmp_path / "p.jpg"
    noise = np.random.default_rng(1).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    t1 = eval_transform(24)(load_rgb(path))
    t2 = eval_transform(24)(load_rgb(path))
    assert t1.shape == (3, 24, 24) and t1.dtype == torch.uint8
    assert torch.equal(t1, t2)


def test_model_normalises_its_input_on_the_device() -> None:
    """uint8 images and [0, 1] floats give the same embedding: the model applies mean/std."""
    from whale_ml.stage_configs import TrainConfig
    from whale_ml.models.embedding import create_embedding_model

    model = create_embedding_model(TrainConfig(backbone="test_resnet", embedding_size=8)).eval()
    white = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(white), model(white.float() / 255)
    torch.testing.assert_close(a, b)
    assert model.mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])  # test_resnet's pretrained cfg
