"""Reading and validating the Kaggle CSVs.

Validation is strict and specific: every problem names the file and the rows
or images at fault, and all problems of a file are reported together so that
one fix-and-rerun is enough.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pandas as pd

from whale_ml.io import sha256_file

NEW_INDIVIDUAL = "new_individual"

# Misspellings and aliases of the real train.csv, merged as the top teams did.
SPECIES_ALIASES: dict[str, str] = {
    "bottlenose_dolpin": "bottlenose_dolphin",
    "kiler_whale": "killer_whale",
    "beluga": "beluga_whale",
    "globis": "short_finned_pilot_whale",
    "pilot_whale": "short_finned_pilot_whale",
}

TRAIN_COLUMNS = ("image", "species", "individual_id")
SUBMISSION_COLUMNS = ("image", "predictions")

# A plain file name: no folders, no "..", no hidden files, no control characters.
_PLAIN_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]+")
_MAX_LISTED = 10
# Characters an individual id cannot contain: the submission separates ids by whitespace
# (any Unicode whitespace, as str.split() sees it), and control characters do not survive
# a round trip through text tools.
_ID_BREAKING = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

WarnFn = Callable[[str], None]
_log = logging.getLogger(__name__)


class MetadataError(ValueError):
    """A data set file is malformed; the message says which file and rows."""


def normalise_species(species: pd.Series) -> pd.Series:
    """Lower-case, trim and merge known aliases (``globis`` -> ``short_finned_pilot_whale``)."""
    cleaned = species.astype(str).str.strip().str.lower().str.replace(r"[\s-]+", "_", regex=True)
    return cleaned.replace(SPECIES_ALIASES)


def _listed(values: list[object]) -> str:
    shown = ", ".join(map(str, values[:_MAX_LISTED]))
    more = len(values) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _warn_by_default(message: str) -> None:
    _log.warning(message)


def read_csv_rows(path: Path, required: tuple[str, ...], warn: WarnFn | None = None) -> pd.DataFrame:
    """A CSV as strings, indexed by line number in the file; required columns stripped.

    Parsed with the ``csv`` module rather than pandas: pandas silently shifts every
    column when the first row has one field too many (it takes the first column as
    the index), silently renames a repeated header name, and its row index stops
    matching the file's lines after a quoted line break.

    Args:
        warn: receives a line for what is accepted but ignored (extra columns,
            blank rows); the module's logger by default.

    Raises:
        MetadataError: naming the file: missing, empty, not UTF-8, a missing or
            repeated column, rows with a wrong number of fields (with their lines).
    """
    warn = warn or _warn_by_default
    if not path.exists():
        raise MetadataError(f"{path}: file not found")
    try:
        # utf-8-sig: a byte-order mark (Excel's UTF-8 export) is not part of the first column name.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            records: list[tuple[int, list[str]]] = []  # (first line of the record, its fields)
            end = reader.line_num
            for fields in reader:
                records.append((end + 1, fields))  # a quoted line break makes a record span lines
                end = reader.line_num
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8") from exc
    except csv.Error as exc:
        raise MetadataError(f"{path}: not a readable CSV ({exc})") from exc
    if header is None or not any(h.strip() for h in header):
        _refuse_blank_header(path, records, required)
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise MetadataError(f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once in the header")
    missing = [c for c in required if c not in header]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}")

    rows: list[list[str]] = []
    lines: list[int] = []
    blank: list[int] = []
    ragged: list[str] = []
    for line, fields in records:
        if not any(v.strip() for v in fields):
            blank.append(line)
            continue
        # Trailing empty fields (a trailing comma) carry nothing; any other count mismatch
        # means the columns of this row cannot be trusted.
        while len(fields) > len(header) and fields[-1].strip() == "":
            fields = fields[:-1]
        if len(fields) != len(header):
            ragged.append(f"line {line} ({len(fields)})")
            continue
        rows.append(fields)
        lines.append(line)
    if ragged:
        raise MetadataError(
            f"{path}: row(s) with a different number of fields than the {len(header)} columns of the header "
            f"(an unquoted comma in a value?): {_listed(ragged)}"
        )
    if not rows:
        raise MetadataError(f"{path}: no rows")
    extra = [c for c in header if c not in required]
    if extra:
        warn(f"{path}: extra column(s) {', '.join(extra)} ignored (used: {', '.join(required)})")
    if blank:
        warn(f"{path}: {len(blank)} blank row(s) skipped (line(s) {_listed(blank)})")
    df = pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=str)
    for col in required:
        df[col] = df[col].str.strip()
    return df


def _refuse_blank_header(path: Path, records: list[tuple[int, list[str]]], required: tuple[str, ...]) -> NoReturn:
    """Line 1 of ``path`` is blank: the file is empty, or its header comes later.

    pandas would skip the blank lines and take the first non-blank one as the header; this
    reader refuses instead, naming the lines. A blank line above the header is not part of
    any export Kaggle or a spreadsheet makes: it says the file was edited or pasted
    together by hand, and a later tool that takes line 1 as the header (``csv``, Kaggle's
    own checker) would misread the file. One deleted line is the whole fix.

    Raises:
        MetadataError: always.
    """
    first = next(((line, fields) for line, fields in records if any(v.strip() for v in fields)), None)
    if first is None:
        raise MetadataError(f"{path}: file is empty (expected columns {', '.join(required)})")
    line, fields = first
    blank = _listed(list(range(1, line)))
    raise MetadataError(
        f"{path}: line(s) {blank} are blank; the header must be on line 1 (columns {', '.join(required)}; the first "
        f"text is found on line {line}: {','.join(fields)!r}): delete the blank line(s) above it"
    )


def _row_numbers(mask: pd.Series) -> list[int]:
    """The file line numbers of the rows where ``mask`` holds (frames are indexed by line)."""
    return [int(i) for i in mask[mask].index]


def lines_listed(mask: pd.Series) -> str:
    """``3, 7, 9`` (at most ten, then how many more): the lines where ``mask`` holds."""
    return _listed(_row_numbers(mask))


def values_listed(df: pd.DataFrame, mask: pd.Series, col: str) -> str:
    """``line 3: 'a b', line 7: ...``: the offending values of ``col`` with their lines."""
    return _listed([f"line {n}: {v!r}" for n, v in zip(_row_numbers(mask), df.loc[mask, col], strict=True)])


def label_individuals(ids: pd.Series) -> pd.Series:
    """One integer label per individual, 0..n-1 in sorted id order (stable across reruns)."""
    order = {k: i for i, k in enumerate(sorted(ids.unique()))}
    return ids.map(order).astype("int64")


def is_plain_file_name(names: pd.Series) -> pd.Series:
    """True where a name can only mean a file directly inside its image folder: no
    folder parts (``/`` or ``\\``), no ``..``, not hidden, no control characters, not empty.

    A name failing this is refused before any path is built from it, so a CSV cannot
    make the pipeline open (or write next to) a file outside the data set.
    """
    names = names.astype(str)
    return names.str.fullmatch(_PLAIN_NAME) & ~names.str.startswith(".")


def image_name_problems(df: pd.DataFrame) -> list[str]:
    """Empty and non-plain image names of a line-indexed table, with their lines."""
    problems = []
    empty = df["image"] == ""
    bad = ~is_plain_file_name(df["image"]) & ~empty
    if empty.any():
        problems.append(f"empty image name on line(s) {lines_listed(empty)}")
    if bad.any():
        problems.append("image names must be plain file names (no folders, '..' or hidden files): " + values_listed(df, bad, "image"))
    return problems


def check_names_and_files(df: pd.DataFrame, image_dir: Path, check_files: bool) -> list[str]:
    """The problems of a line-indexed table's ``image`` column: empty or non-plain names,
    repeated rows, and (with ``check_files``, when the names are sound) photos missing
    from ``image_dir``. Empty when there are none."""
    problems = image_name_problems(df)
    empty = df["image"] == ""
    dup = df["image"].duplicated(keep=False) & ~empty
    if dup.any():
        lines_of = df.loc[dup, "image"].groupby(df.loc[dup, "image"]).groups
        problems.append(
            "duplicate image rows: " + _listed([f"{name} (lines {', '.join(str(n) for n in lines_of[name])})" for name in sorted(lines_of)])
        )
    if check_files and not problems:
        if not image_dir.is_dir():
            problems.append(f"image folder {image_dir} not found")
        else:
            present = {p.name for p in image_dir.iterdir()}
            missing = sorted(set(df["image"]) - present)
            if missing:
                problems.append(f"{len(missing)} image(s) listed but not in {image_dir}: {_listed(missing)}")
    return problems


def image_folder_problems(image_dir: Path, require: bool) -> list[str]:
    """``image folder ... not found`` when ``require`` and the folder is missing, else nothing.

    Checked before any photo is looked up: a missing folder is one error naming it, not a
    missing file (or an unreadable photo further on) per listed row.
    """
    return [f"image folder {image_dir} not found"] if require and not image_dir.is_dir() else []


def id_breaks_submission(ids: pd.Series) -> pd.Series:
    """True where an individual id holds whitespace or control characters: the submission
    separates ids by spaces, so such an id could never be written back correctly."""
    return ids.astype(str).str.contains(_ID_BREAKING)


def _check_ids(df: pd.DataFrame) -> list[str]:
    problems = []
    for col in ("species", "individual_id"):
        blank = df[col] == ""
        if blank.any():
            problems.append(f"empty {col} on line(s) {lines_listed(blank)}")
    breaking = id_breaks_submission(df["individual_id"])
    if breaking.any():
        problems.append(
            "individual_id with whitespace or control characters inside (the submission separates ids by spaces): "
            + values_listed(df, breaking, "individual_id")
        )
    control = df["species"].str.contains(_CONTROL)
    if control.any():
        problems.append("species with control characters: " + values_listed(df, control, "species"))
    reserved = df["individual_id"] == NEW_INDIVIDUAL
    if reserved.any():
        problems.append(f"'{NEW_INDIVIDUAL}' is reserved and cannot be a training id (line(s) {lines_listed(reserved)})")
    return problems


def read_train_metadata(
    data_dir: str | Path, check_files: bool = True, warn: WarnFn | None = None, require_folder: bool = False
) -> pd.DataFrame:
    """Read ``train.csv``: validated, species normalised, one integer label per individual.

    Ids may hold any printable characters but whitespace (commas, quotes and
    non-ASCII letters survive the submission CSV); species are normalised.

    Args:
        check_files: also require every listed photo in ``train_images/``.
        warn: receives a line for what is accepted but ignored (extra columns,
            blank rows); the module's logger by default.
        require_folder: require ``train_images/`` even without ``check_files`` (the
            pipeline reads the photos; metadata-only work does not).

    Returns:
        Columns ``image, species, species_raw, individual_id, label, path``;
        ``label`` numbers the individuals 0..n-1 in sorted id order, so it is
        stable for a given set of individuals.

    Raises:
        MetadataError: naming the file and every row at fault.
    """
    data_dir = Path(data_dir)
    csv_file = data_dir / "train.csv"
    df = read_csv_rows(csv_file, TRAIN_COLUMNS, warn)
    problems = image_folder_problems(data_dir / "train_images", require_folder and not check_files)
    problems += check_names_and_files(df, data_dir / "train_images", check_files)
    problems += _check_ids(df)
    if problems:
        raise MetadataError(f"{csv_file}: " + "; ".join(problems))

    out = df[list(TRAIN_COLUMNS)].rename(columns={"species": "species_raw"})
    out["species"] = normalise_species(out["species_raw"])
    out["label"] = label_individuals(out["individual_id"])
    out["path"] = [str(data_dir / "train_images" / name) for name in out["image"]]
    return out[["image", "species", "species_raw", "individual_id", "label", "path"]].reset_index(drop=True)


def read_test_metadata(
    data_dir: str | Path, check_files: bool = True, warn: WarnFn | None = None, require_folder: bool = False
) -> pd.DataFrame:
    """Read the test images in ``sample_submission.csv`` order (the submission's order).

    When the data set has no ``sample_submission.csv`` (a folder of new
    photos, say), every image file in ``test_images/`` is used, sorted by name.

    Args:
        check_files: also require every listed photo in ``test_images/``.
        warn: as in :func:`read_train_metadata`.
        require_folder: require ``test_images/`` even without ``check_files`` (the
            pipeline keeps a missing photo's row, but a missing folder is a broken data set).

    Returns:
        Columns ``image, path``.
    """
    data_dir = Path(data_dir)
    csv_file = data_dir / "sample_submission.csv"
    image_dir = data_dir / "test_images"
    if csv_file.exists():
        df = read_csv_rows(csv_file, SUBMISSION_COLUMNS, warn)[["image"]]
    elif image_dir.is_dir():
        names = sorted(p.name for p in image_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if not names:
            raise MetadataError(f"{image_dir}: no images and no {csv_file.name}")
        df = pd.DataFrame({"image": names})
    else:
        raise MetadataError(f"{data_dir}: neither {csv_file.name} nor test_images/ found")
    problems = image_folder_problems(image_dir, require_folder and not check_files)
    problems += check_names_and_files(df, image_dir, check_files)
    if problems:
        raise MetadataError(f"{csv_file}: " + "; ".join(problems))
    df = df.reset_index(drop=True)
    df["path"] = [str(image_dir / name) for name in df["image"]]
    return df


def read_truth(data_dir: str | Path, warn: WarnFn | None = None) -> pd.DataFrame | None:
    """``test_truth.csv`` (``image,individual_id``) when the data set has one, else None."""
    csv_file = Path(data_dir) / "test_truth.csv"
    if not csv_file.exists():
        return None
    df = read_csv_rows(csv_file, ("image", "individual_id"), warn)
    problems = check_names_and_files(df, Path(data_dir) / "test_images", check_files=False)
    if problems:
        raise MetadataError(f"{csv_file}: " + "; ".join(problems))
    return df[["image", "individual_id"]].reset_index(drop=True)


def find_train_overlap(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Test photos that are also training photos: by file name, or by identical bytes.

    Only files whose sizes match are hashed, so a full Kaggle set costs a ``stat``
    per file plus a few hashes, not a read of every photo.

    Args:
        train, test: ``image, path`` rows (missing files are ignored).

    Returns:
        ``test_image, train_image, match`` rows, ``match`` being ``name``,
        ``bytes`` or ``name and bytes``; empty when the splits are disjoint.
    """

    def sizes(df: pd.DataFrame) -> dict[str, int]:
        out = {}
        for image, path in zip(df["image"], df["path"], strict=True):
            try:
                out[image] = os.stat(path).st_size
            except OSError:
                continue
        return out

    train_paths = dict(zip(train["image"], train["path"], strict=True))
    test_paths = dict(zip(test["image"], test["path"], strict=True))
    train_sizes, test_sizes = sizes(train), sizes(test)
    by_size: dict[int, list[str]] = {}
    for image, size in train_sizes.items():
        by_size.setdefault(size, []).append(image)
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = sha256_file(path)
        return digests[path]

    rows = []
    for image in test["image"]:
        same_bytes = set()
        if image in test_sizes:
            for candidate in by_size.get(test_sizes[image], []):
                if digest(train_paths[candidate]) == digest(test_paths[image]):
                    same_bytes.add(candidate)
        if image in train_paths:
            rows.append((image, image, "name and bytes" if image in same_bytes else "name"))
            same_bytes.discard(image)
        rows += [(image, other, "bytes") for other in sorted(same_bytes)]
    return pd.DataFrame(rows, columns=["test_image", "train_image", "match"])


def training_data_fingerprint(data_dir: str | Path) -> str:
    """A digest of ``train.csv`` (its bytes) and of every file in ``train_images/`` (name,
    size, modification time): it changes with a new row, a new photo or a replaced one."""
    data_dir = Path(data_dir)
    h = hashlib.sha1()
    csv_file = data_dir / "train.csv"
    h.update(csv_file.read_bytes() if csv_file.exists() else b"<no train.csv>")
    image_dir = data_dir / "train_images"
    if image_dir.is_dir():
        for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                h.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
