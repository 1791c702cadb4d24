"""Reading and validating the Kaggle CSVs.

Validation is strict and specific: every problem names the file and the rows
or images at fault, and all problems of a file are reported together so that
one fix-and-rerun is enough.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

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
_PLAIN_NAME = re.compile(r"^[^/\\\x00-\x1f]+$")
_MAX_LISTED = 10


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


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists():
        raise MetadataError(f"{path}: file not found")
    try:
        # Blank lines kept (then dropped) so that row index + 2 is the line number in the file.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError as exc:
        raise MetadataError(f"{path}: file is empty (expected columns {', '.join(required)})") from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    df = df[~(df == "").all(axis=1)]
    if df.empty:
        raise MetadataError(f"{path}: no rows")
    for col in required:
        df[col] = df[col].str.strip()
    return df


def _row_numbers(mask: pd.Series) -> list[int]:
    # +2: the header is line 1 and pandas counts from 0, so this is the line in the file.
    return [int(i) + 2 for i in mask[mask].index]


def _check_names_and_files(df: pd.DataFrame, csv: Path, image_dir: Path, check_files: bool) -> list[str]:
    problems = []
    empty = df["image"] == ""
    bad = ~df["image"].str.match(_PLAIN_NAME) | df["image"].isin([".", ".."]) | df["image"].str.startswith(".")
    bad &= ~empty
    if empty.any():
        problems.append(f"empty image name on line(s) {_listed(_row_numbers(empty))}")
    if bad.any():
        problems.append(
            "image names must be plain file names (no folders, '..' or hidden files): "
            + _listed([f"line {n}: {v!r}" for n, v in zip(_row_numbers(bad), df.loc[bad, "image"], strict=True)])
        )
    dup = df["image"].duplicated(keep=False) & ~empty
    if dup.any():
        problems.append(f"duplicate image rows: {_listed(sorted(set(df.loc[dup, 'image'])))}")
    if check_files and not problems:
        if not image_dir.is_dir():
            problems.append(f"image folder {image_dir} not found")
        else:
            present = {p.name for p in image_dir.iterdir()}
            missing = sorted(set(df["image"]) - present)
            if missing:
                problems.append(f"{len(missing)} image(s) listed but not in {image_dir}: {_listed(missing)}")
    return problems


def read_train_metadata(data_dir: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read ``train.csv``: validated, species normalised, one integer label per individual.

    Returns:
        Columns ``image, species, species_raw, individual_id, label, path``;
        ``label`` numbers the individuals 0..n-1 in sorted id order, so it is
        stable for a given set of individuals.

    Raises:
        MetadataError: naming the file and every row at fault.
    """
    data_dir = Path(data_dir)
    csv = data_dir / "train.csv"
    df = _read_csv(csv, TRAIN_COLUMNS)
    problems = _check_names_and_files(df, csv, data_dir / "train_images", check_files)
    for col in ("species", "individual_id"):
        blank = df[col] == ""
        if blank.any():
            problems.append(f"empty {col} on line(s) {_listed(_row_numbers(blank))}")
    reserved = df["individual_id"] == NEW_INDIVIDUAL
    if reserved.any():
        problems.append(f"'{NEW_INDIVIDUAL}' is reserved and cannot be a training id (line(s) {_listed(_row_numbers(reserved))})")
    if problems:
        raise MetadataError(f"{csv}: " + "; ".join(problems))

    out = df[list(TRAIN_COLUMNS)].rename(columns={"species": "species_raw"})
    out["species"] = normalise_species(out["species_raw"])
    ids = sorted(out["individual_id"].unique())
    out["label"] = out["individual_id"].map({k: i for i, k in enumerate(ids)}).astype("int64")
    out["path"] = [str(data_dir / "train_images" / name) for name in out["image"]]
    return out[["image", "species", "species_raw", "individual_id", "label", "path"]].reset_index(drop=True)


def read_test_metadata(data_dir: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read the test images in ``sample_submission.csv`` order (the submission's order).

    When the data set has no ``sample_submission.csv`` (a folder of new
    photos, say), every image file in ``test_images/`` is used, sorted by name.

    Returns:
        Columns ``image, path``.
    """
    data_dir = Path(data_dir)
    csv = data_dir / "sample_submission.csv"
    image_dir = data_dir / "test_images"
    if csv.exists():
        df = _read_csv(csv, SUBMISSION_COLUMNS)[["image"]]
    elif image_dir.is_dir():
        names = sorted(p.name for p in image_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if not names:
            raise MetadataError(f"{image_dir}: no images and no {csv.name}")
        df = pd.DataFrame({"image": names})
    else:
        raise MetadataError(f"{data_dir}: neither {csv.name} nor test_images/ found")
    problems = _check_names_and_files(df, csv, image_dir, check_files)
    if problems:
        raise MetadataError(f"{csv}: " + "; ".join(problems))
    df = df.reset_index(drop=True)
    df["path"] = [str(image_dir / name) for name in df["image"]]
    return df


def read_truth(data_dir: str | Path) -> pd.DataFrame | None:
    """``test_truth.csv`` (``image,individual_id``) when the data set has one, else None."""
    csv = Path(data_dir) / "test_truth.csv"
    if not csv.exists():
        return None
    return _read_csv(csv, ("image", "individual_id"))


def training_data_fingerprint(data_dir: str | Path) -> str:
    """A digest of ``train.csv`` (its bytes) and of every file in ``train_images/`` (name,
    size, modification time): it changes with a new row, a new photo or a replaced one."""
    import hashlib

    data_dir = Path(data_dir)
    h = hashlib.sha1()
    csv = data_dir / "train.csv"
    h.update(csv.read_bytes() if csv.exists() else b"<no train.csv>")
    image_dir = data_dir / "train_images"
    if image_dir.is_dir():
        for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                h.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
