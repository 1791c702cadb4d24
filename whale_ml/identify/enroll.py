"""Enrollment: confirmed photos join the catalogue without retraining.

A file of confirmed identities (``image,individual_id``, optionally ``species``;
new ids allowed) is checked as strictly as ``train.csv``; its photos are copied
into the home's ledger (``enrolled/images/`` and ``enrolled/enrolled.csv``),
embedded with the very models the current gallery was built with, and added to a
new gallery version. The ledger is the record: the ``train_metadata`` stage reads
it, so the next retraining trains on the enrolled photos too, and the gallery stage
carries any enrolled photo its fold embeddings do not cover into every new version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.data.images import ImageReadError, load_rgb
from whale_ml.data.metadata import (
    NEW_INDIVIDUAL,
    MetadataError,
    check_names_and_files,
    id_breaks_submission,
    label_individuals,
    lines_listed,
    normalise_species,
    read_csv_rows,
    values_listed,
)
from whale_ml.identify.lineage import GalleryLineage
from whale_ml.identify.photos import crop_photos, embed_crops
from whale_ml.identify.registry import ResolvedModel
from whale_ml.identify.versions import GalleryVersion, write_version
from whale_ml.io import atomic_path
from whale_ml.settings import HomeLayout

CONFIRMED_COLUMNS = ("image", "individual_id")
LEDGER_COLUMNS = ("image", "individual_id", "species", "new_individual", "enrolled_at", "source_path")
UNKNOWN_SPECIES = "unknown"


def ledger_path(layout: HomeLayout) -> Path:
    return layout.enrolled_dir / "enrolled.csv"


def read_ledger(layout: HomeLayout) -> pd.DataFrame:
    """Every enrolled photo so far (empty when nothing was enrolled)."""
    path = ledger_path(layout)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=str) for c in LEDGER_COLUMNS})
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def ledger_train_rows(layout: HomeLayout) -> pd.DataFrame:
    """The ledger as ``train.csv`` rows with paths (``image, species, species_raw,
    individual_id, path``), for the training metadata."""
    ledger = read_ledger(layout)
    return pd.DataFrame(
        {
            "image": ledger["image"],
            "species": normalise_species(ledger["species"]) if len(ledger) else ledger["species"],
            "species_raw": ledger["species"],
            "individual_id": ledger["individual_id"],
            "path": [str(layout.enrolled_dir / "images" / name) for name in ledger["image"]],
        }
    )


def with_ledger(train: pd.DataFrame, layout: HomeLayout, train_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training metadata (:func:`read_train_metadata`'s columns) plus the enrolled
    photos, with the labels renumbered over both; and the enrolled rows on their own.

    Raises:
        MetadataError: an enrolled photo has the name of a photo in ``train_csv``.
    """
    enrolled = ledger_train_rows(layout)
    if enrolled.empty:
        return train, enrolled
    clash = sorted(set(enrolled["image"]) & set(train["image"]))
    if clash:
        raise MetadataError(f"{ledger_path(layout)}: enrolled photo name(s) also in {train_csv}: {', '.join(clash[:10])}")
    out = pd.concat([train.drop(columns="label"), enrolled], ignore_index=True)
    out["label"] = label_individuals(out["individual_id"])  # over the enrolled individuals too
    return out[list(train.columns)], enrolled


def ledger_fingerprint(layout: HomeLayout) -> str:
    """A digest of the ledger file: it changes with every enrollment."""
    path = ledger_path(layout)
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else "no enrollments"


@contextlib.contextmanager
def _ledger_lock(layout: HomeLayout) -> Iterator[None]:
    """One enrollment at a time per home (two would each miss the other's photos)."""
    layout.enrolled_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.enrolled_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_confirmed(csv: str | Path, image_dir: str | Path, catalogue: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """The confirmed identities, checked: plain unique names present in ``image_dir``,
    readable photos, an id on every row (not ``new_individual``), no photo already in
    the catalogue, and a species (when given) that agrees with the catalogue's.

    Args:
        catalogue: the current gallery's rows (``image, individual_id, species``).

    Returns:
        ``image, individual_id, species, new_individual, source_path``.

    Raises:
        MetadataError: every problem of the file, naming its lines.
    """
    csv, image_dir = Path(csv), Path(image_dir)
    df = read_csv_rows(csv, CONFIRMED_COLUMNS)  # indexed by line number in the file
    problems = check_names_and_files(df, image_dir, check_files=True)
    blank = df["individual_id"] == ""
    if blank.any():
        problems.append(f"empty individual_id on line(s) {lines_listed(blank)}")
    breaking = id_breaks_submission(df["individual_id"]) & ~blank
    if breaking.any():
        problems.append(
            "individual_id with whitespace or control characters (the submission separates ids by spaces): "
            + values_listed(df, breaking, "individual_id")
        )
    reserved = df["individual_id"] == NEW_INDIVIDUAL
    if reserved.any():
        problems.append(f"'{NEW_INDIVIDUAL}' is not an identity: give the new animal an id (line(s) {lines_listed(reserved)})")
    known_images = set(catalogue["image"]) | set(ledger["image"])
    again = df["image"].isin(known_images)
    if again.any():
        problems.append("already in the catalogue (rename the file if it is another photo): " + ", ".join(df.loc[again, "image"].head(10)))
    species_of = dict(zip(catalogue["individual_id"], catalogue["species"], strict=True))
    # (a blank species stays blank: normalise_species("") is "")
    given = normalise_species(df["species"]) if "species" in df.columns else pd.Series("", index=df.index)
    clash = [
        f"line {int(i)}: {ind} is a {species_of[ind]}, not {sp}"
        for i, ind, sp in zip(df.index, df["individual_id"], given, strict=True)
        if sp and ind in species_of and species_of[ind] != sp
    ]
    if clash:
        problems.append("species disagree with the catalogue: " + "; ".join(clash[:10]))
    if not problems:
        for i, name in zip(df.index, df["image"], strict=True):
            try:
                load_rgb(image_dir / name)
            except ImageReadError as exc:
                problems.append(f"line {int(i)}: {exc}")
    if problems:
        raise MetadataError(f"{csv}: " + "; ".join(problems))
    out = pd.DataFrame({"image": df["image"], "individual_id": df["individual_id"]}).reset_index(drop=True)
    out["species"] = [sp or species_of.get(ind, UNKNOWN_SPECIES) for sp, ind in zip(given, df["individual_id"], strict=True)]
    out["new_individual"] = ~out["individual_id"].isin(species_of)
    out["source_path"] = [str((image_dir / n).resolve()) for n in out["image"]]
    return out


def _embed_ledger_rows(
    rows: pd.DataFrame, layout: HomeLayout, lineage: GalleryLineage, models: list[ResolvedModel], device: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """Gallery rows (and ensemble embeddings) for ledger photos."""
    paths = [layout.enrolled_dir / "images" / name for name in rows["image"]]
    photos = crop_photos(paths, lineage, layout, layout.enrolled_dir / "crops", device)
    failed = photos[photos["crop_path"] == ""]
    if len(failed):
        raise ImageReadError("enrolled photo(s) could not be cropped: " + "; ".join(failed["error"].head(10)))
    emb = embed_crops(photos["crop_path"].tolist(), models, device)
    table = pd.DataFrame(
        {
            "image": rows["image"].to_numpy(),
            "individual_id": rows["individual_id"].to_numpy(),
            "species": rows["species"].to_numpy(),
            "crop_path": photos["crop_path"].to_numpy(),
            "source": "enrolled",
        }
    )
    return table, emb


def enroll(
    csv: str | Path,
    image_dir: str | Path,
    layout: HomeLayout,
    gallery: GalleryVersion,
    models: list[ResolvedModel],
    device: str = "cpu",
) -> dict[str, Any]:
    """Add confirmed photos to the ledger and to a new gallery version (no retraining).

    Args:
        gallery: the current gallery version (the new one extends it).
        models: the models ``gallery`` was built with (:func:`gallery_models`).

    Returns:
        A summary: the new version, what was enrolled, the gallery's counts.
    """
    with _ledger_lock(layout):
        ledger = read_ledger(layout)
        confirmed = read_confirmed(csv, image_dir, gallery.table, ledger)
        images_dir = layout.enrolled_dir / "images"
        for row in confirmed.itertuples():
            with atomic_path(images_dir / row.image) as tmp:
                shutil.copyfile(row.source_path, tmp)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # The ledger first: should the gallery write fail, the gallery stage still
        # carries these photos into its next version.
        entries = confirmed.assign(enrolled_at=now, new_individual=confirmed["new_individual"].map({True: "true", False: "false"}))
        with atomic_path(ledger_path(layout)) as tmp:
            pd.concat([ledger, entries[list(LEDGER_COLUMNS)]], ignore_index=True).to_csv(tmp, index=False)
        table, emb = _embed_ledger_rows(confirmed, layout, gallery.lineage, models, device)
        version = write_version(
            layout,
            pd.concat([gallery.table, table], ignore_index=True),
            np.concatenate([gallery.embeddings, emb]),
            gallery.lineage,
            made_by="whale enroll",
            extra={
                "enrolled_now": len(confirmed),
                "new_individuals_now": int(confirmed.loc[confirmed["new_individual"], "individual_id"].nunique()),
            },
        )
    return {
        "version": version.name,
        "parent": gallery.name,
        "enrolled_photos_now": len(confirmed),
        "enrolled_individuals_now": int(confirmed["individual_id"].nunique()),
        "new_individuals_now": sorted(set(confirmed.loc[confirmed["new_individual"], "individual_id"])),
        "gallery_photos": int(version.info["photos"]),
        "gallery_individuals": int(version.info["individuals"]),
        "enrolled_photos": int(version.info["enrolled_photos"]),
        "enrolled_individuals": int(version.info["enrolled_individuals"]),
    }


def with_enrolled(
    layout: HomeLayout,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    lineage: GalleryLineage,
    models: Callable[[], list[ResolvedModel]],
    device: str = "cpu",
) -> tuple[pd.DataFrame, np.ndarray, int]:
    """A pipeline-built gallery plus every ledger photo it lacks (embedded now with its
    models, fetched only then), and its enrolled photos marked as such (for the gallery stage).

    Returns:
        The table, the embeddings, and how many ledger photos were embedded here.
    """
    ledger = read_ledger(layout)
    table = table.copy()
    table.loc[table["image"].isin(ledger["image"]), "source"] = "enrolled"
    missing = ledger[~ledger["image"].isin(table["image"])]
    if missing.empty:
        return table, embeddings, 0
    extra, emb = _embed_ledger_rows(missing, layout, lineage, models(), device)
    return pd.concat([table, extra], ignore_index=True), np.concatenate([embeddings, emb]), len(missing)
