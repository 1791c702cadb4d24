"""Gallery versions: every gallery a researcher identified against, kept.

A version is a folder ``gallery/versions/vNNNN/`` holding the index, the
embeddings (to find each candidate's best-matching photo), one row per photo
(``gallery.csv``) and ``version.json`` (counts, where it came from, its
:class:`~whale_ml.gallery.lineage.GalleryLineage`). The folder is written under
a temp name and renamed into place whole; ``current.json`` names the newest and is
replaced atomically, so a reader sees the old version or the new one, never half.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whale_ml.retrieval.faiss_import import faiss
import numpy as np
import pandas as pd

from whale_ml.gallery.lineage import GalleryLineage, LineageError
from whale_ml.io import read_json, staging_dir, write_error, write_json
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.retrieval.faiss_index import build_index, load_index
from whale_ml.home import HomeLayout

GALLERY_COLUMNS = ("image", "individual_id", "species", "crop_path", "source")
CENTRES_DIR = "centres"  # one folder per fold model: its ArcFace class centres
_VERSION = re.compile(r"^v(\d{4,})$")


@dataclass
class GalleryVersion:
    """One gallery version, loaded."""

    name: str
    folder: Path
    table: pd.DataFrame  # GALLERY_COLUMNS, one row per index row
    embeddings: np.ndarray
    index: faiss.Index
    info: dict[str, Any]

    @property
    def lineage(self) -> GalleryLineage:
        return GalleryLineage(**self.info["lineage"])

    @property
    def k(self) -> int:
        """Neighbours fetched per query (the lineage's)."""
        return self.lineage.k

    @property
    def centres(self) -> list[ClassCentres | None]:
        """Each fold model's class centres, in the lineage's model order (None: a model
        without them, or a version written before they were kept)."""
        return [ClassCentres.load(self.folder / CENTRES_DIR / m.fold) for m in self.lineage.models]


def _names(layout: HomeLayout) -> list[str]:
    root = layout.gallery_versions_dir
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name)), key=lambda n: int(n[1:]))


def current_version(layout: HomeLayout) -> str | None:
    """The name of the newest gallery version, or None when there is none yet."""
    pointer = layout.gallery_versions_dir / "current.json"
    if pointer.exists():
        return str(read_json(pointer)["version"])
    names = _names(layout)
    return names[-1] if names else None


def load_version(layout: HomeLayout, name: str | None = None) -> GalleryVersion:
    """A gallery version (default: the current one)."""
    name = name or current_version(layout)
    if name is None:
        raise LineageError(f"no gallery in {layout.home}: materialise the pipeline (whale run) first")
    folder = layout.gallery_versions_dir / name
    if not folder.is_dir():
        raise LineageError(f"gallery version {name} not found in {layout.gallery_versions_dir}")
    table = pd.read_csv(folder / "gallery.csv", dtype=str, keep_default_na=False)
    return GalleryVersion(
        name, folder, table, np.load(folder / "embeddings.npy"), load_index(folder / "index.faiss"), read_json(folder / "version.json")
    )


def list_versions(layout: HomeLayout) -> pd.DataFrame:
    """One row per version, oldest first: when and how it was made, and its counts."""
    rows = []
    current = current_version(layout)
    for name in _names(layout):
        info = read_json(layout.gallery_versions_dir / name / "version.json")
        rows.append(
            {
                "version": name,
                "current": name == current,
                "created": info.get("created", ""),
                "made_by": info.get("made_by", ""),
                "photos": info.get("photos", 0),
                "individuals": info.get("individuals", 0),
                "enrolled_photos": info.get("enrolled_photos", 0),
                "enrolled_individuals": info.get("enrolled_individuals", 0),
            }
        )
    return pd.DataFrame(
        rows, columns=["version", "current", "created", "made_by", "photos", "individuals", "enrolled_photos", "enrolled_individuals"]
    )


def write_version(
    layout: HomeLayout,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    lineage: GalleryLineage,
    made_by: str,
    extra: dict[str, Any] | None = None,
    index: faiss.Index | None = None,
    centres: Sequence[ClassCentres | None] = (),
) -> GalleryVersion:
    """Write a new gallery version and make it the current one.

    Args:
        table: one row per embedding, with :data:`GALLERY_COLUMNS` (``source`` is
            ``pipeline`` or ``enrolled``).
        embeddings: (n, d) unit-length ensemble embeddings, in the table's order.
        made_by: what made it (``gallery asset``, ``whale enroll``), shown in the version list.
        index: the index of exactly these embeddings when the caller has built it
            already; otherwise one is built with the lineage's index kind and settings.
        centres: each lineage model's class centres (None or nothing: none), stored in
            ``centres/<fold>/`` for class-centre scores.
    """
    if len(table) != len(embeddings):
        raise ValueError(f"{len(table)} gallery rows for {len(embeddings)} embeddings")
    missing = [c for c in GALLERY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"gallery table lacks column(s) {', '.join(missing)}")
    table = table[list(GALLERY_COLUMNS)].reset_index(drop=True)
    enrolled = table[table["source"] == "enrolled"]
    info = {
        "made_by": made_by,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": current_version(layout),
        "photos": len(table),
        "individuals": int(table["individual_id"].nunique()),
        "enrolled_photos": len(enrolled),
        "enrolled_individuals": int(enrolled["individual_id"].nunique()),
        "dimension": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0,
        "lineage": lineage.model_dump(),
        **(extra or {}),
    }
    root = layout.gallery_versions_dir
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(root, "staging")
    except OSError as exc:  # name the folder that refused, not the one below it
        raise write_error(Path(exc.filename) if exc.filename else root, exc) from exc
    try:
        if index is None:
            index = build_index(embeddings, lineage.index, **lineage.index_options)
        writers: dict[str, Callable[[Path], object]] = {
            "index.faiss": lambda p: faiss.write_index(index, str(p)),
            "embeddings.npy": lambda p: np.save(p, np.ascontiguousarray(embeddings, dtype=np.float32)),
            "gallery.csv": lambda p: table.to_csv(p, index=False),
        }
        for file_name, write in writers.items():
            try:
                write(staging / file_name)
            except (OSError, RuntimeError) as exc:  # faiss reports a failed write as a RuntimeError
                raise write_error(staging / file_name, exc) from exc
        for model, model_centres in zip(lineage.models, centres, strict=False):
            if model_centres is not None:
                (staging / CENTRES_DIR / model.fold).mkdir(parents=True, exist_ok=True)
                model_centres.save(staging / CENTRES_DIR / model.fold)
        # The name is claimed by the rename itself: a parallel writer that took the same
        # number makes ours fail, and we take the next one.
        while True:
            names = _names(layout)
            name = f"v{int(names[-1][1:]) + 1 if names else 1:04d}"
            info["version"] = name
            write_json(staging / "version.json", info)
            try:
                os.rename(staging, root / name)
                break
            except OSError:
                if not (root / name).exists():
                    raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json(root / "current.json", {"version": name})
    return load_version(layout, name)


def prune_versions(layout: HomeLayout, keep: int, dry_run: bool = False) -> list[str]:
    """Delete every gallery version but the newest ``keep``, never the current one.

    Versions are derived (the ledger and the registry hold what made them) but large:
    each has its own index and embeddings. A version is renamed to a hidden name before
    it is deleted, so nothing finds half of one under its name, even if this is killed.

    Returns:
        The deleted versions' names (with ``dry_run``: those it would delete), oldest first.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    root = layout.gallery_versions_dir
    current = current_version(layout)
    doomed = [name for name in _names(layout)[:-keep] if name != current]
    for name in [] if dry_run else doomed:
        trash = staging_dir(root, "deleting", name)
        os.rename(root / name, trash)
        shutil.rmtree(trash)
    return doomed
