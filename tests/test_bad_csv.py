"""Bad CSVs: each case is a clear error naming the file and line, or an accepted input whose
ignored part is logged and listed in the asset's metadata. The cases of tests/test_metadata.py
(missing column, empty file, duplicates, missing files, plain names) are not repeated here."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from whale_assets.defs import raw
from whale_assets.io_manager import TableIOManager
from whale_assets.resources import WhaleHome
from whale_ml.data.metadata import MetadataError, find_train_overlap, read_test_metadata, read_train_metadata
from whale_ml.detection.yolo import read_box_file, write_yolo_dataset
from whale_ml.submission import make_submission, score_submission, submission_problems, write_submission

HEADER = "image,species,individual_id"


def _jpeg(path: Path, colour: tuple[int, int, int] = (10, 80, 160)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path, format="JPEG")


def _data_set(root: Path, train_csv: str, images: list[str], test_csv: str | None = None, test_images: list[str] = ()) -> Path:
    """train.csv (and sample_submission.csv) written verbatim, with a tiny JPEG per named image."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(train_csv, encoding="utf-8")
    (root / "train_images").mkdir(exist_ok=True)
    for i, name in enumerate(images):
        _jpeg(root / "train_images" / name, (10 * i % 255, 80, 160))
    if test_csv is not None:
        (root / "sample_submission.csv").write_text(test_csv, encoding="utf-8")
    (root / "test_images").mkdir(exist_ok=True)
    for i, name in enumerate(test_images):
        _jpeg(root / "test_images" / name, (200, 10 * i % 255, 30))
    return root


def _error(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(MetadataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


class _Opened(Exception):
    pass


@contextmanager
def _fails_if_it_blocks(seconds: int = 5) -> Iterator[None]:
    """Opening a named pipe with no writer blocks: an alarm turns that into a test failure."""

    def on_alarm(_sig: int, _frame: object) -> None:
        raise _Opened("a named pipe was opened: the traversal target was read")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _bait(path: Path) -> Path:
    """A named pipe where a traversal would land: opening it for reading blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _materialize(assets: list, data: Path, home: Path, run_config: dict | None = None) -> tuple[dg.ExecuteInProcessResult, list[str]]:
    """A real in-process Dagster run of the raw assets on ``data``; the result and its WARNING log lines."""
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        assets,
        resources={"whale": WhaleHome(data_dir=str(data), home=str(home)), "io_manager": TableIOManager(base_dir=str(home / "tables"))},
        run_config=run_config,
        instance=instance,
        raise_on_error=False,
    )
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    return result, warnings


def _failure_message(result: dg.ExecuteInProcessResult, step: str) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == step)
    return failure.event_specific_data.error.to_string()


# ---------------------------------------------------------------- columns and rows


def test_extra_columns_are_ignored_and_reported(tmp_path: Path) -> None:
    """Extra columns (Kaggle's own files have none) are accepted, dropped from the table and named in a warning."""
    csv = f"{HEADER},notes,photographer\na.jpg,beluga,i1,left fluke,Ann\nb.jpg,beluga,i2,,Bob\n"
    data = _data_set(tmp_path / "data", csv, ["a.jpg", "b.jpg"], "image,predictions,usage\nt.jpg,new_individual,Public\n", ["t.jpg"])
    notes: list[str] = []
    df = read_train_metadata(data, warn=notes.append)
    assert list(df.columns) == ["image", "species", "species_raw", "individual_id", "label", "path"]
    assert df["individual_id"].tolist() == ["i1", "i2"]
    assert notes == [f"{data / 'train.csv'}: extra column(s) notes, photographer ignored (used: image, species, individual_id)"]
    test_notes: list[str] = []
    assert read_test_metadata(data, warn=test_notes.append)["image"].tolist() == ["t.jpg"]
    assert "extra column(s) usage ignored" in test_notes[0] and "sample_submission.csv" in test_notes[0]


def test_repeated_header_column_is_an_error(tmp_path: Path) -> None:
    """pandas would rename the second 'image' to 'image.1' silently; here it is an error."""
    data = _data_set(tmp_path / "data", "image,species,individual_id,image\na.jpg,beluga,i1,b.jpg\n", ["a.jpg"])
    message = _error(read_train_metadata, data)
    assert str(data / "train.csv") in message and "'image' appear more than once" in message


@pytest.mark.parametrize(
    ("rows", "line"),
    [
        # One field too many on the first row: pandas would take the first column as the index
        # and shift every column left (image='beluga', individual_id='extra'), silently.
        ("a.jpg,beluga,i1,extra\nb.jpg,beluga,i2\n", "line 2 (4)"),
        ("a.jpg,beluga,i1\nb.jpg,beluga,i2,extra\n", "line 3 (4)"),
        ("a.jpg,beluga,i1\nb.jpg,i2\n", "line 3 (2)"),
        ('a.jpg,beluga,i1\nb.jpg,"bel\nuga",i2,x\nc.jpg,beluga,i3,x\n', "line 3 (4), line 5 (4)"),  # a record over two lines
    ],
)
def test_rows_with_a_wrong_number_of_fields_name_their_line(tmp_path: Path, rows: str, line: str) -> None:
    data = _data_set(tmp_path / "data", f"{HEADER}\n{rows}", ["a.jpg", "b.jpg"])
    message = _error(read_train_metadata, data)
    assert str(data / "train.csv") in message and "different number of fields" in message and line in message


def test_trailing_commas_are_accepted(tmp_path: Path) -> None:
    """An empty field after the last column (a trailing comma) carries nothing and is not an error."""
    data = _data_set(tmp_path / "data", f"{HEADER}\na.jpg,beluga,i1,\nb.jpg,beluga,i2,,\n", ["a.jpg", "b.jpg"])
    assert read_train_metadata(data)["individual_id"].tolist() == ["i1", "i2"]


def test_blank_rows_are_skipped_and_reported(tmp_path: Path) -> None:
    data = _data_set(tmp_path / "data", f"{HEADER}\na.jpg,beluga,i1\n\n,,\nb.jpg,beluga,i2\n", ["a.jpg", "b.jpg"])
    notes: list[str] = []
    assert len(read_train_metadata(data, warn=notes.append)) == 2
    assert notes == [f"{data / 'train.csv'}: 2 blank row(s) skipped (line(s) 3, 4)"]


def test_whitespace_only_file_is_empty(tmp_path: Path) -> None:
    data = _data_set(tmp_path / "data", "\n\n", [])
    assert "file is empty" in _error(read_train_metadata, data)


def test_blank_lines_before_the_header_name_the_header_line(tmp_path: Path) -> None:
    """A blank first line is not an empty file: the error names the file, the blank line(s)
    and the line the header is on, and says the header must be on line 1."""
    data = _data_set(tmp_path / "data", f"\n  \n{HEADER}\na.jpg,beluga,i1\n", ["a.jpg"], "\nimage,predictions\nt.jpg,x\n", ["t.jpg"])
    message = _error(read_train_metadata, data)
    assert str(data / "train.csv") in message and "file is empty" not in message
    assert "header must be on line 1" in message and "line(s) 1, 2 are blank" in message and "found on line 3" in message
    message = _error(read_test_metadata, data)
    assert str(data / "sample_submission.csv") in message and "found on line 2" in message


def test_not_utf8_is_an_error_and_a_bom_is_not(tmp_path: Path) -> None:
    """A Latin-1 file is refused with the offending byte; Excel's UTF-8 BOM is accepted."""
    data = _data_set(tmp_path / "data", "", ["a.jpg"])
    (data / "train.csv").write_bytes(f"{HEADER}\na.jpg,beluga,Sébastien\n".encode("latin-1"))
    message = _error(read_train_metadata, data)
    assert str(data / "train.csv") in message and "not UTF-8" in message and "0xe9" in message
    (data / "train.csv").write_bytes(f"{HEADER}\na.jpg,beluga,Sébastien\n".encode("utf-8-sig"))
    assert read_train_metadata(data)["individual_id"].tolist() == ["Sébastien"]


# ---------------------------------------------------------------- odd ids and species

ODD_BUT_LEGAL_IDS = ["o'brien", "fluke,left", 'said"hi"', "Sébastien", "鯨-01", "NA", "null", "007", "1e5", "#7", "a;b", "x\u200by"]


def test_odd_but_legal_ids_round_trip_through_the_submission(tmp_path: Path) -> None:
    """Commas, quotes, non-ASCII letters and strings pandas would turn into NaN or numbers come
    back exactly: read from train.csv, written into a submission, read and scored again."""
    ids = ODD_BUT_LEGAL_IDS
    lines = [HEADER] + [f'img{i}.jpg,beluga,"{v.replace(chr(34), chr(34) * 2)}"' for i, v in enumerate(ids)]
    data = _data_set(tmp_path / "data", "\n".join(lines) + "\n", [f"img{i}.jpg" for i in range(len(ids))])
    df = read_train_metadata(data)
    assert df["individual_id"].tolist() == ids
    assert df["label"].tolist() == [sorted(ids).index(v) for v in ids]

    queries = [f"q{i}.jpg" for i in range(len(ids))]
    preds = [[v, *[w for w in ids if w != v][:4]] for v in ids]  # the right id first
    path = write_submission(make_submission(queries, preds), tmp_path / "submission.csv")
    assert submission_problems(path, queries) == []
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert [p.split() for p in back["predictions"]] == preds
    assert score_submission(path, pd.DataFrame({"image": queries, "individual_id": ids})) == 1.0


@pytest.mark.parametrize(
    ("bad_id", "whitespace"),
    [("a b", True), ("a\tb", True), ("a\u00a0b", True), ("a\u2003b", True), ("a\nb", True), ("a\x01b", False), ("a\x7fb", False)],
)
def test_ids_that_would_break_the_submission_are_refused_with_their_line(tmp_path: Path, bad_id: str, whitespace: bool) -> None:
    """The submission separates ids by whitespace: an id with whitespace inside would become two
    ids (str.split, as the scorer reads it). Control characters are refused too."""
    assert (len(f"new_individual {bad_id}".split()) == 3) is whitespace
    data = _data_set(tmp_path / "data", f'{HEADER}\na.jpg,beluga,ok\nb.jpg,beluga,"{bad_id}"\n', ["a.jpg", "b.jpg"])
    message = _error(read_train_metadata, data)
    assert "individual_id with whitespace or control characters" in message and f"line 3: {bad_id!r}" in message
    assert "'ok'" not in message


def test_species_with_odd_characters(tmp_path: Path) -> None:
    """Species are free text normalised to one spelling; only control characters are refused."""
    rows = 'a.jpg,"Killer Whale",i1\nb.jpg,"rorqual, minke",i2\nc.jpg,Béluga,i3\n'
    data = _data_set(tmp_path / "data", f"{HEADER}\n{rows}", ["a.jpg", "b.jpg", "c.jpg"])
    assert read_train_metadata(data)["species"].tolist() == ["killer_whale", "rorqual,_minke", "béluga"]
    (data / "train.csv").write_text(f'{HEADER}\na.jpg,"beluga\x07",i1\n')
    assert "species with control characters: line 2" in _error(read_train_metadata, data)


# ---------------------------------------------------------------- path traversal: refused, never opened

TRAVERSALS = ["../bait.jpg", "../../bait.jpg", "train_images/../../bait.jpg", "sub/x.jpg", "..\\bait.jpg", "C:\\bait.jpg"]


def test_the_bait_blocks_when_opened(tmp_path: Path) -> None:
    """The named pipe the traversal tests rely on does block a reader: the check below can fail."""
    bait = _bait(tmp_path / "bait.jpg")
    assert stat.S_ISFIFO(bait.stat().st_mode)
    with pytest.raises(_Opened), _fails_if_it_blocks(1):
        bait.open("rb")


@pytest.mark.parametrize("name", [*TRAVERSALS, "ABSOLUTE"])
def test_traversal_in_train_csv_is_refused_before_any_file_is_opened(tmp_path: Path, name: str) -> None:
    bait = _bait(tmp_path / "bait.jpg")
    name = str(bait) if name == "ABSOLUTE" else name
    data = _data_set(tmp_path / "data", f'{HEADER}\nok.jpg,beluga,i1\n"{name}",beluga,i2\n', ["ok.jpg"])
    with _fails_if_it_blocks():
        message = _error(read_train_metadata, data)
    assert "plain file name" in message and f"line 3: {name!r}" in message


@pytest.mark.parametrize("name", ["../bait.jpg", "ABSOLUTE"])
def test_traversal_in_sample_submission_is_refused_before_any_file_is_opened(tmp_path: Path, name: str) -> None:
    bait = _bait(tmp_path / "data" / "bait.jpg")
    name = str(bait) if name == "ABSOLUTE" else name
    data = _data_set(tmp_path / "data", f"{HEADER}\nok.jpg,beluga,i1\n", ["ok.jpg"], f"image,predictions\n{name},x\n", [])
    with _fails_if_it_blocks():
        message = _error(read_test_metadata, data, check_files=False)
    assert str(data / "sample_submission.csv") in message and f"line 2: {name!r}" in message


def test_traversal_in_the_box_file_is_refused_before_any_file_is_opened_or_written(tmp_path: Path) -> None:
    """The detector's data set opens train_images/<image> and writes labels/<image>.txt:
    a '../' name would read and write outside the data set."""
    _bait(tmp_path / "bait.jpg")
    images = tmp_path / "data" / "train_images"
    _jpeg(images / "ok.jpg")
    boxes = tmp_path / "data" / "fluke_boxes.csv"
    boxes.write_text("image,x_min,y_min,x_max,y_max\nok.jpg,1,1,5,5\n../../bait.jpg,1,1,5,5\n")
    with _fails_if_it_blocks():
        message = _error(read_box_file, boxes)
        assert str(boxes) in message and "line 3: '../../bait.jpg'" in message
        # A box table built in code goes through the same check inside write_yolo_dataset.
        table = pd.DataFrame(
            [("ok.jpg", 1, 1, 5, 5), ("../../bait.jpg", 1, 1, 5, 5)], columns=["image", "x_min", "y_min", "x_max", "y_max"]
        )
        ds = write_yolo_dataset(table, images, tmp_path / "ds", val_share=0.0, seed=0)
    assert ds.skipped == ["../../bait.jpg: not a plain file name (never opened)"] and ds.n_train == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bait.jpg", "data", "ds"]  # nothing written beside the bait


def test_traversal_error_reaches_the_user_through_dagster(tmp_path: Path) -> None:
    """A real materialisation of train_metadata fails, and the step failure names file, line and name."""
    bait = _bait(tmp_path / "bait.jpg")
    data = _data_set(tmp_path / "data", f"{HEADER}\nok.jpg,beluga,i1\n../bait.jpg,beluga,i2\n", ["ok.jpg"])
    with _fails_if_it_blocks(30):
        result, _ = _materialize([raw.train_metadata], data, tmp_path / "home")
    assert not result.success
    message = _failure_message(result, "train_metadata")
    assert "MetadataError" in message and str(data / "train.csv") in message and "line 3: '../bait.jpg'" in message
    assert stat.S_ISFIFO(bait.stat().st_mode)


# ---------------------------------------------------------------- test photos: missing, or also in train


def test_missing_test_photos_prior_warns_and_fail_stops(tmp_path: Path) -> None:
    """missing_test_images='prior' (default) keeps the row with a warning and lists it;
    'fail' stops the run naming the photo. Both through real materialisations."""
    data = _data_set(tmp_path / "data", f"{HEADER}\na.jpg,beluga,i1\n", ["a.jpg"], "image,predictions\nt1.jpg,x\ngone.jpg,x\n", ["t1.jpg"])
    prior, warnings = _materialize([raw.test_metadata], data, tmp_path / "home1")
    assert prior.success
    (mat,) = prior.asset_materializations_for_node("test_metadata")
    assert mat.metadata["dagster/row_count"].value == 2 and mat.metadata["missing_files"].value == 1
    assert "gone.jpg" in mat.metadata["missing"].value and "prior answer" in mat.metadata["warnings"].value
    assert prior.output_for_node("test_metadata")["image"].tolist() == ["t1.jpg", "gone.jpg"]
    assert any(w.startswith("1 photo(s) listed in sample_submission.csv but missing") and "gone.jpg" in w for w in warnings)

    fail, _ = _materialize(
        [raw.test_metadata], data, tmp_path / "home2", {"ops": {"test_metadata": {"config": {"missing_test_images": "fail"}}}}
    )
    assert not fail.success
    message = _failure_message(fail, "test_metadata")
    assert str(data / "sample_submission.csv") in message and "gone.jpg" in message and "t1.jpg" not in message


@pytest.mark.parametrize("folder", ["test_images", "train_images"])
def test_a_missing_image_folder_is_named_when_the_metadata_is_read(tmp_path: Path, folder: str) -> None:
    """The CSVs list photos but their folder is not there: one error naming the folder, at
    once (missing_test_images 'prior' would otherwise give every test row the prior answer,
    and check_files false would leave it to the detector), rather than a warning per photo."""
    data = _data_set(tmp_path / "data", f"{HEADER}\na.jpg,beluga,i1\n", ["a.jpg"], "image,predictions\nt1.jpg,x\nt2.jpg,x\n", ["t1.jpg", "t2.jpg"])
    shutil.rmtree(data / folder)
    read = read_test_metadata if folder == "test_images" else read_train_metadata
    for check_files in (True, False):
        message = _error(read, data, check_files=check_files, require_folder=True)
        assert f"image folder {data / folder} not found" in message, message
    assert len(read(data, check_files=False)) > 0  # metadata-only work needs no photos
    asset = raw.test_metadata if folder == "test_images" else raw.train_metadata
    # The default settings read test photos without checking each (a missing one gets the prior answer);
    # check_files: false does the same for training photos. Neither makes the folder optional.
    run_config = {"ops": {asset.key.path[-1]: {"config": {"check_files": False}}}}
    result, warnings = _materialize([asset], data, tmp_path / "home", run_config)
    assert not result.success
    assert f"image folder {data / folder} not found" in _failure_message(result, asset.key.path[-1])
    assert not any("t1.jpg" in w for w in warnings)


def test_test_photo_also_in_train_is_kept_warned_and_listed(tmp_path: Path) -> None:
    """A test photo with a training photo's name, or with its bytes under another name, is
    predicted like any other (never dropped) and listed in the metadata with a warning."""
    data = _data_set(
        tmp_path / "data",
        f"{HEADER}\na.jpg,beluga,i1\nb.jpg,beluga,i2\nc.jpg,beluga,i3\n",
        ["a.jpg", "b.jpg", "c.jpg"],
        "image,predictions\na.jpg,x\ncopy_of_b.jpg,x\nnew.jpg,x\nc.jpg,x\n",
        ["new.jpg"],
    )
    (data / "test_images" / "a.jpg").write_bytes((data / "train_images" / "a.jpg").read_bytes())  # same name, same bytes
    (data / "test_images" / "copy_of_b.jpg").write_bytes((data / "train_images" / "b.jpg").read_bytes())  # renamed copy
    _jpeg(data / "test_images" / "c.jpg", (1, 2, 3))  # same name, another photo
    overlap = find_train_overlap(read_train_metadata(data), read_test_metadata(data))
    assert overlap.values.tolist() == [
        ["a.jpg", "a.jpg", "name and bytes"],
        ["copy_of_b.jpg", "b.jpg", "bytes"],
        ["c.jpg", "c.jpg", "name"],
    ]

    result, warnings = _materialize([raw.test_metadata], data, tmp_path / "home")
    assert result.success
    assert result.output_for_node("test_metadata")["image"].tolist() == ["a.jpg", "copy_of_b.jpg", "new.jpg", "c.jpg"]
    (mat,) = result.asset_materializations_for_node("test_metadata")
    assert mat.metadata["also_in_train"].value == 3
    pairs = [r.data for r in mat.metadata["also_in_train_pairs"].records]  # a table in the UI
    assert {"test_image": "copy_of_b.jpg", "train_image": "b.jpg", "match": "bytes"} in pairs
    assert "3 test photo(s) share a name or identical bytes" in mat.metadata["warnings"].value
    assert any("copy_of_b.jpg = train b.jpg (bytes)" in w for w in warnings)
