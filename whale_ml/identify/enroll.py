"""Enrollment: confirmed photos join the catalogue without retraining.

A file of confirmed identities (``image,individual_id``, optionally ``species``;
new ids allowed) is checked as strictly as ``train.csv``; its photos are copied
into the home's ledger (:mod:`whale_ml.gallery.ledger`), embedded with the very
models the current gallery was built with, and added to a new gallery version.
The ledger is the record: the next retraining trains on the enrolled photos too,
and the gallery stage carries them into every new version. See docs/identify.md.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
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
    lines_listed,
    normalise_species,
    read_csv_rows,
    values_listed,
)
from whale_ml.gallery.catalogue import catalogue_lock
from whale_ml.gallery.ledger import ledger_gallery_rows, read_ledger, write_ledger
from whale_ml.gallery.lineage import GalleryLineage
from whale_ml.gallery.models import ResolvedModel
from whale_ml.gallery.release import read_release
from whale_ml.gallery.versions import load_version, write_version
from whale_ml.home import HomeLayout
from whale_ml.io import atomic_path
from whale_ml.progress import PhaseProgress, ProgressFn, phase

CONFIRMED_COLUMNS = ("image", "individual_id")
UNKNOWN_SPECIES = "unknown"


def read_confirmed(
    csv: str | Path, image_dir: str | Path, catalogue: pd.DataFrame, ledger: pd.DataFrame, progress: ProgressFn | None = None
) -> pd.DataFrame:
    """The confirmed identities of a file, checked: plain unique names present in
    ``image_dir``, then :func:`check_confirmed`'s checks.

    Args:
        catalogue: the current gallery's rows (``image, individual_id, species``).
        progress: called with (photos read, total) as each photo is decoded, once the
            file itself passed its checks.

    Returns:
        ``image, individual_id, species, new_individual, source_path``.

    Raises:
        MetadataError: every problem of the file, naming its lines.
    """
    csv, image_dir = Path(csv), Path(image_dir)
    df = read_csv_rows(csv, CONFIRMED_COLUMNS)  # indexed by line number in the file
    problems = check_names_and_files(df, image_dir, check_files=True)
    if problems:
        raise MetadataError(f"{csv}: " + "; ".join(problems))
    df = df.assign(source_path=[str((image_dir / n).resolve()) for n in df["image"]])
    return check_confirmed(df, catalogue, ledger, str(csv), progress)


def check_confirmed(
    df: pd.DataFrame, catalogue: pd.DataFrame, ledger: pd.DataFrame, where: str, progress: ProgressFn | None = None
) -> pd.DataFrame:
    """Confirmed identities checked as strictly as ``train.csv``: an id on every row (not
    ``new_individual``, no whitespace), no photo already in the catalogue, a species (when
    given) that agrees with the catalogue's, and every photo readable. The one check of
    ``whale enroll``'s file and of the review page's decisions.

    Args:
        df: ``image, individual_id, source_path`` and optionally ``species``, indexed by
            what the messages call a line (the file's line numbers).
        where: what the messages name (the file).

    Returns:
        ``image, individual_id, species, new_individual, source_path``.

    Raises:
        MetadataError: every problem, naming its lines.
    """
    problems: list[str] = []
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
        for k, (i, path) in enumerate(zip(df.index, df["source_path"], strict=True)):
            try:
                load_rgb(path)
            except ImageReadError as exc:
                problems.append(f"line {int(i)}: {exc}")
            if progress is not None:
                progress(k + 1, len(df))
    if problems:
        raise MetadataError(f"{where}: " + "; ".join(problems))
    out = pd.DataFrame({"image": df["image"], "individual_id": df["individual_id"]}).reset_index(drop=True)
    out["species"] = [sp or species_of.get(ind, UNKNOWN_SPECIES) for sp, ind in zip(given, df["individual_id"], strict=True)]
    out["new_individual"] = ~out["individual_id"].isin(species_of)
    out["source_path"] = list(df["source_path"])
    return out


ConfirmedRows = Callable[[pd.DataFrame, pd.DataFrame, ProgressFn | None], pd.DataFrame]


def enroll(
    csv: str | Path,
    image_dir: str | Path,
    layout: HomeLayout,
    models_for: Callable[[HomeLayout, GalleryLineage], list[ResolvedModel]],
    device: str = "cpu",
    on_step: Callable[[str], None] | None = None,
    progress: PhaseProgress | None = None,
) -> dict[str, Any]:
    """Add the photos of a file of confirmed identities (``image,individual_id[,species]``,
    the photos in ``image_dir``) to the ledger and a new gallery version: :func:`enroll_rows`
    with :func:`read_confirmed`."""

    def rows(catalogue: pd.DataFrame, ledger: pd.DataFrame, checking: ProgressFn | None) -> pd.DataFrame:
        return read_confirmed(csv, image_dir, catalogue, ledger, checking)

    return enroll_rows(rows, layout, models_for, device, on_step, progress)


def enroll_rows(
    confirmed_rows: ConfirmedRows,
    layout: HomeLayout,
    models_for: Callable[[HomeLayout, GalleryLineage], list[ResolvedModel]],
    device: str = "cpu",
    on_step: Callable[[str], None] | None = None,
    progress: PhaseProgress | None = None,
) -> dict[str, Any]:
    """Add confirmed photos to the ledger and to a new gallery version (no retraining).

    Everything happens under the catalogue's writer lock, from reading the current
    gallery to publishing the new one (:mod:`whale_ml.gallery.catalogue`): two
    enrolments at once take turns, and the second extends the first's version. The new
    version is the current one plus every ledger photo it lacks: these photos, and any
    an earlier enrolment recorded but did not publish (it was killed, or its gallery
    write failed).

    The gallery extended is the one ``whale identify`` serves by default (:mod:`whale_ml.gallery.release`):
    the champion release's newest version, resolved once the lock is held, so an enrolment is
    seen by the next identify even when a later release lost the champion decision. A gallery
    build that publishes meanwhile carries these photos from the ledger.

    Args:
        confirmed_rows: (the current gallery's rows, the ledger, a progress callback) ->
            the checked confirmed photos (:func:`check_confirmed`'s columns); asked once
            the lock is held, so its checks see every earlier enrolment.
        layout: the home (any round: the release's is resolved here).
        models_for: the release round's layout and its current gallery's lineage -> the
            very models it was built with (:func:`whale_ml.gallery.models.gallery_models`),
            asked once the lock is held.
        on_step: passed to :func:`~whale_ml.gallery.versions.write_version`, and told
            ``ledger`` once the ledger is written.
        progress: the callbacks of the phases, in order: ``checking`` (each photo
            decoded once), ``cropping``, ``embedding`` and ``local features``.

    Returns:
        A summary: the new version, what was enrolled, the gallery's counts.
    """
    step = on_step or (lambda _step: None)
    with catalogue_lock(layout, "whale enroll"):
        release = read_release(layout)
        layout = release.layout
        gallery = load_version(layout, models_key=release.models_key)  # the champion's line (the newest version without one)
        models = models_for(layout, gallery.lineage)
        ledger = read_ledger(layout)
        confirmed = confirmed_rows(gallery.table, ledger, phase(progress, "checking"))
        images_dir = layout.enrolled_dir / "images"
        for row in confirmed.itertuples():
            with atomic_path(images_dir / row.image) as tmp:
                shutil.copyfile(row.source_path, tmp)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # The ledger first: should the gallery write fail, the next enrolment or gallery
        # build carries these photos into its version.
        entries = confirmed.assign(enrolled_at=now, new_individual=confirmed["new_individual"].map({True: "true", False: "false"}))
        ledger = pd.concat([ledger, entries], ignore_index=True)
        write_ledger(layout, ledger)
        step("ledger")
        pending = ledger[~ledger["image"].isin(gallery.table["image"])]
        carried = len(pending) - len(confirmed)  # recorded by an earlier enrolment, never published
        table, emb = ledger_gallery_rows(pending, layout, gallery.lineage, models, device, progress)
        version = write_version(
            layout,
            pd.concat([gallery.table, table], ignore_index=True),
            np.concatenate([gallery.embeddings, emb]),
            gallery.lineage,
            made_by="whale enroll",
            centres=gallery.centres,  # the same models: enrolled individuals have no centre and are scored by their photos
            extra={
                "parent": gallery.name,  # the version extended, whichever a later release made current
                "enrolled_now": len(confirmed),
                "carried_enrolled": carried,
                "new_individuals_now": int(confirmed.loc[confirmed["new_individual"], "individual_id"].nunique()),
            },
            on_step=on_step,
        )
    return {
        "version": version.name,
        "round": release.number,
        "parent": gallery.name,
        "parent_unreadable": gallery.fallback_from,
        "enrolled_photos_now": len(confirmed),
        "enrolled_individuals_now": int(confirmed["individual_id"].nunique()),
        "new_individuals_now": sorted(set(confirmed.loc[confirmed["new_individual"], "individual_id"])),
        "carried_enrolled": carried,
        "gallery_photos": int(version.info["photos"]),
        "gallery_individuals": int(version.info["individuals"]),
        "enrolled_photos": int(version.info["enrolled_photos"]),
        "enrolled_individuals": int(version.info["enrolled_individuals"]),
        "models": [m.describe() for m in models],
    }
