"""Reading and validating train.csv / sample_submission.csv (whale_ml.data.metadata)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from whale_ml.data.metadata import (
    NEW_INDIVIDUAL,
    MetadataError,
    normalise_species,
    read_test_metadata,
    read_train_metadata,
)

# ---------------------------------------------------------------- helpers


def _write_jpeg(path: Path, colour: tuple[int, int, int] = (10, 80, 160)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path, format="JPEG")


def _make_train_set(
    root: Path,
    rows: Iterable[tuple[str, str, str]],
    header: str = "image,species,individual_id",
    images: Iterable[str] | None = None,
) -> Path:
    """Write train.csv from ``rows`` and a tiny JPEG for every image (or for ``images``)."""
    rows = list(rows)
    root.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(r) for r in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    names = [r[0] for r in rows] if images is None else list(images)
    (root / "train_images").mkdir(exist_ok=True)
    for name in names:
        _write_jpeg(root / "train_images" / name)
    return root


VALID_ROWS = [
    ("a1.jpg", "humpback_whale", "cc01"),
    ("a2.jpg", "humpback_whale", "cc01"),
    ("b1.jpg", "beluga", "aa07"),
    ("c1.jpg", "killer_whale", "bb03"),
    ("c2.jpg", "killer_whale", "bb03"),
    ("c3.jpg", "killer_whale", "bb03"),
]


def _raises(data_dir: Path, *needles: str, test: bool = False) -> str:
    """Read the set, expect MetadataError naming its CSV and every needle; return the message."""
    reader = read_test_metadata if test else read_train_metadata
    with pytest.raises(MetadataError) as info:
        reader(data_dir)
    message = str(info.value)
    csv = data_dir / ("sample_submission.csv" if test else "train.csv")
    assert str(csv) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- valid input


def test_valid_train_labels_are_sorted_id_order(tmp_path: Path) -> None:
    """Labels number the individuals 0..n-1 in sorted id order, one label per individual."""
    data = _make_train_set(tmp_path / "data", VALID_ROWS)
    df = read_train_metadata(data)
    assert list(df.columns) == ["image", "species", "species_raw", "individual_id", "label", "path"]
    assert df["image"].tolist() == [r[0] for r in VALID_ROWS]
    expected = {"aa07": 0, "bb03": 1, "cc01": 2}
    assert dict(zip(df["individual_id"], df["label"], strict=True)) == expected
    assert df["label"].dtype == "int64"
    assert sorted(df["label"].unique()) == list(range(3))
    assert df["path"].tolist() == [str(data / "train_images" / r[0]) for r in VALID_ROWS]


def test_labels_do_not_depend_on_row_order(tmp_path: Path) -> None:
    """The id -> label mapping is the same whatever order train.csv lists its rows in."""
    first = read_train_metadata(_make_train_set(tmp_path / "one", VALID_ROWS))
    second = read_train_metadata(_make_train_set(tmp_path / "two", list(reversed(VALID_ROWS))))
    map1 = dict(zip(first["individual_id"], first["label"], strict=True))
    map2 = dict(zip(second["individual_id"], second["label"], strict=True))
    assert map1 == map2


def test_whitespace_around_fields_is_stripped(tmp_path: Path) -> None:
    """Spaces around cells do not create new ids or break file lookup."""
    rows = [(" a1.jpg ", " humpback_whale", "cc01 "), ("a2.jpg", "humpback_whale", " cc01")]
    data = _make_train_set(tmp_path / "data", rows, images=["a1.jpg", "a2.jpg"])
    df = read_train_metadata(data)
    assert df["image"].tolist() == ["a1.jpg", "a2.jpg"]
    assert df["individual_id"].tolist() == ["cc01", "cc01"]
    assert df["label"].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("bottlenose_dolpin", "bottlenose_dolphin"),
        ("  Bottlenose_Dolpin ", "bottlenose_dolphin"),
        ("kiler_whale", "killer_whale"),
        ("KILER_WHALE", "killer_whale"),
        ("beluga", "beluga_whale"),
        ("Beluga ", "beluga_whale"),
        ("globis", "short_finned_pilot_whale"),
        (" GLOBIS", "short_finned_pilot_whale"),
        ("pilot_whale", "short_finned_pilot_whale"),
        ("Pilot Whale", "short_finned_pilot_whale"),
        ("humpback_whale", "humpback_whale"),
        ("Killer Whale", "killer_whale"),
    ],
)
def test_normalise_species_merges_aliases(raw: str, canonical: str) -> None:
    """Known misspellings/aliases map to one canonical species, whatever the case or spacing."""
    assert normalise_species(pd.Series([raw])).tolist() == [canonical]


def test_train_species_normalised_and_raw_kept(tmp_path: Path) -> None:
    """read_train_metadata normalises species and keeps the original label in species_raw."""
    rows = [
        ("a.jpg", "bottlenose_dolpin", "i1"),
        ("b.jpg", "Kiler_Whale", "i2"),
        ("c.jpg", " beluga ", "i3"),
        ("d.jpg", "globis", "i4"),
        ("e.jpg", "pilot_whale", "i5"),
    ]
    df = read_train_metadata(_make_train_set(tmp_path / "data", rows))
    assert df["species"].tolist() == [
        "bottlenose_dolphin",
        "killer_whale",
        "beluga_whale",
        "short_finned_pilot_whale",
        "short_finned_pilot_whale",
    ]
    assert df["species_raw"].tolist() == ["bottlenose_dolpin", "Kiler_Whale", "beluga", "globis", "pilot_whale"]


def test_check_files_false_skips_file_lookup(tmp_path: Path) -> None:
    """With check_files=False the images need not exist (used for metadata-only work)."""
    data = _make_train_set(tmp_path / "data", VALID_ROWS, images=[])
    assert len(read_train_metadata(data, check_files=False)) == len(VALID_ROWS)


# ---------------------------------------------------------------- bad train.csv


def test_missing_column(tmp_path: Path) -> None:
    """A missing column is named, with the file."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.csv").write_text("image,individual_id\na.jpg,x\n")
    _write_jpeg(root / "train_images" / "a.jpg")
    _raises(root, "missing column", "species")


def test_empty_file(tmp_path: Path) -> None:
    """A 0-byte train.csv is reported as empty, not as a pandas traceback."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.csv").write_bytes(b"")
    _raises(root, "empty")


def test_header_only(tmp_path: Path) -> None:
    """A header with no rows is an error naming the file."""
    root = _make_train_set(tmp_path / "data", [])
    _raises(root, "no rows")


def test_missing_train_csv(tmp_path: Path) -> None:
    """No train.csv at all is a MetadataError naming the path."""
    (tmp_path / "data").mkdir()
    _raises(tmp_path / "data", "not found")


def test_duplicate_image_rows(tmp_path: Path) -> None:
    """Two rows for the same image are reported with the image name."""
    rows = [*VALID_ROWS, ("c2.jpg", "killer_whale", "bb03")]
    root = _make_train_set(tmp_path / "data", rows, images=[r[0] for r in VALID_ROWS])
    message = _raises(root, "duplicate", "c2.jpg")
    assert "a1.jpg" not in message


@pytest.mark.parametrize("bad_name", ["sub/x.jpg", "../x.jpg", "..", ".hidden.jpg", "a\\b.jpg"])
def test_image_name_must_be_plain(tmp_path: Path, bad_name: str) -> None:
    """Folder parts, '..', backslashes and hidden names are refused, naming the line and the name."""
    rows = [("ok.jpg", "beluga", "i1"), (bad_name, "beluga", "i2")]
    root = _make_train_set(tmp_path / "data", rows, images=["ok.jpg"])
    message = _raises(root, "plain file name", "line 3", repr(bad_name))
    assert "ok.jpg" not in message


def test_empty_image_name(tmp_path: Path) -> None:
    """An empty image cell is reported with its line."""
    rows = [("ok.jpg", "beluga", "i1"), ("", "beluga", "i2")]
    root = _make_train_set(tmp_path / "data", rows, images=["ok.jpg"])
    _raises(root, "empty image name", "3")


def test_listed_image_missing_on_disk(tmp_path: Path) -> None:
    """An image in train.csv with no file is named."""
    root = _make_train_set(tmp_path / "data", VALID_ROWS, images=[r[0] for r in VALID_ROWS if r[0] != "b1.jpg"])
    message = _raises(root, "b1.jpg", "not in")
    assert "a1.jpg" not in message


def test_missing_image_folder(tmp_path: Path) -> None:
    """No train_images/ folder is an error naming the folder."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.csv").write_text("image,species,individual_id\na.jpg,beluga,x\n")
    _raises(root, "train_images")


def test_empty_individual_id(tmp_path: Path) -> None:
    """A blank individual_id is reported with its line number."""
    rows = [("a.jpg", "beluga", "i1"), ("b.jpg", "beluga", "i1"), ("c.jpg", "beluga", "")]
    root = _make_train_set(tmp_path / "data", rows)
    _raises(root, "empty individual_id", "line(s) 4")


def test_empty_species(tmp_path: Path) -> None:
    """A blank species is reported with its line number."""
    rows = [("a.jpg", "", "i1"), ("b.jpg", "beluga", "i1")]
    root = _make_train_set(tmp_path / "data", rows)
    _raises(root, "empty species", "line(s) 2")


def test_reserved_new_individual_id(tmp_path: Path) -> None:
    """'new_individual' cannot be a training id: it is the answer for unseen animals."""
    rows = [("a.jpg", "beluga", "i1"), ("b.jpg", "beluga", NEW_INDIVIDUAL)]
    root = _make_train_set(tmp_path / "data", rows)
    _raises(root, NEW_INDIVIDUAL, "reserved", "line(s) 3")


def test_all_problems_reported_together(tmp_path: Path) -> None:
    """Several faults of one file come back in one error, so one fix-and-rerun is enough."""
    rows = [("a.jpg", "beluga", ""), ("b.jpg", "beluga", NEW_INDIVIDUAL), ("b.jpg", "beluga", "i1")]
    root = _make_train_set(tmp_path / "data", rows, images=["a.jpg", "b.jpg"])
    _raises(root, "duplicate", "empty individual_id", "reserved")


# ---------------------------------------------------------------- test metadata


def _make_test_set(root: Path, listed: list[str] | None, files: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        _write_jpeg(root / "test_images" / name)
    if listed is not None:
        lines = ["image,predictions"] + [f"{n},new_individual a b c d" for n in listed]
        (root / "sample_submission.csv").write_text("\n".join(lines) + "\n")
    return root


def test_test_metadata_keeps_sample_submission_order(tmp_path: Path) -> None:
    """The order of sample_submission.csv (the submission's order) is kept, not sorted."""
    order = ["zz.jpg", "aa.jpg", "mm.jpg"]
    root = _make_test_set(tmp_path / "data", order, files=sorted(order) + ["extra.jpg"])
    df = read_test_metadata(root)
    assert df["image"].tolist() == order
    assert df["path"].tolist() == [str(root / "test_images" / n) for n in order]


def test_test_metadata_falls_back_to_folder_listing(tmp_path: Path) -> None:
    """Without sample_submission.csv every visible file of test_images/ is used, sorted by name."""
    root = _make_test_set(tmp_path / "data", None, files=["b.jpg", "c.jpg", "a.jpg", ".hidden.jpg"])
    df = read_test_metadata(root)
    assert df["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert df["path"].tolist() == [str(root / "test_images" / n) for n in ["a.jpg", "b.jpg", "c.jpg"]]


def test_test_metadata_missing_image(tmp_path: Path) -> None:
    """A sample_submission image without a file is named."""
    root = _make_test_set(tmp_path / "data", ["a.jpg", "gone.jpg"], files=["a.jpg"])
    _raises(root, "gone.jpg", test=True)


def test_test_metadata_nothing_to_read(tmp_path: Path) -> None:
    """Neither sample_submission.csv nor test_images/ is an error, as is an empty folder."""
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(MetadataError, match="neither"):
        read_test_metadata(root)
    (root / "test_images").mkdir()
    with pytest.raises(MetadataError, match="no images"):
        read_test_metadata(root)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    """Reported line numbers are the lines of the file, even after a blank line."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.csv").write_text("image,species,individual_id\na.jpg,beluga,x\n\nb.jpg,beluga,\n")
    for name in ("a.jpg", "b.jpg"):
        _write_jpeg(root / "train_images" / name)
    # The row with the empty id is line 4 of the file (line 3 is blank).
    _raises(root, "empty individual_id on line(s) 4")
