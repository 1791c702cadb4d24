"""The enrollment ledger: every photo a researcher confirmed (``whale enroll``), kept.

The ledger (``enrolled/enrolled.csv`` and the photos copied to ``enrolled/images/``)
is the record of enrollment, and every stage reads it: ``train_metadata`` trains on
its photos, the gallery carries any of them its fold embeddings do not cover yet
into every new version, and the retraining sensor watches its digest. See
docs/identify.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from whale_ml.data.images import ImageReadError
from whale_ml.data.metadata import MetadataError, label_individuals, normalise_species
from whale_ml.gallery.embed import crop_photos, embed_crops
from whale_ml.gallery.lineage import GalleryLineage
from whale_ml.io import atomic_path
from whale_ml.home import HomeLayout
from whale_ml.progress import PhaseProgress, phase
from whale_ml.retrieval.local_features import add_enrolled_features

if TYPE_CHECKING:
    from whale_ml.gallery.models import ResolvedModel

LEDGER_COLUMNS = ("image", "individual_id", "species", "new_individual", "enrolled_at", "source_path")


def ledger_path(layout: HomeLayout) -> Path:
    return layout.enrolled_dir / "enrolled.csv"


def read_ledger(layout: HomeLayout) -> pd.DataFrame:
    """Every enrolled photo so far (empty when nothing was enrolled)."""
    path = ledger_path(layout)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=str) for c in LEDGER_COLUMNS})
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def write_ledger(layout: HomeLayout, ledger: pd.DataFrame) -> Path:
    """Replace the ledger file atomically with ``ledger`` (:data:`LEDGER_COLUMNS`).

    A read-modify-write: the caller holds the catalogue's writer lock
    (:func:`whale_ml.gallery.catalogue.catalogue_lock`) from its :func:`read_ledger` on."""
    with atomic_path(ledger_path(layout)) as tmp:
        ledger[list(LEDGER_COLUMNS)].to_csv(tmp, index=False)
    return ledger_path(layout)


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


def ledger_gallery_rows(
    rows: pd.DataFrame,
    layout: HomeLayout,
    lineage: GalleryLineage,
    models: Sequence[ResolvedModel],
    device: str,
    progress: PhaseProgress | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Gallery rows (``source`` ``enrolled``) and their ensemble embeddings for ledger
    photos, cropped and embedded exactly as the gallery ``lineage`` says. Their local
    features join the enrolled feature store (a read-modify-write: the caller holds the
    catalogue's writer lock).

    Args:
        rows: ledger rows (``image, individual_id, species``) whose photos are in the ledger.
        progress: the callbacks of the phases ``cropping``, ``embedding`` and ``local features``.

    Raises:
        ImageReadError: a ledger photo could not be cropped.
    """
    paths = [layout.enrolled_dir / "images" / name for name in rows["image"]]
    photos = crop_photos(paths, lineage, layout, layout.enrolled_dir / "crops", device, phase(progress, "cropping"))
    failed = photos[photos["crop_path"] == ""]
    if len(failed):
        raise ImageReadError("enrolled photo(s) could not be cropped: " + "; ".join(failed["error"].head(10)))
    emb = embed_crops(photos["crop_path"].tolist(), models, device, progress=phase(progress, "embedding"))
    # Their local features too, so that re-ranking sees enrolled photos as it sees the catalogue's.
    boxes = [list(b) for b in photos["box"]]
    add_enrolled_features(layout, rows["image"].tolist(), [str(p) for p in paths], boxes, phase(progress, "local features"))
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
