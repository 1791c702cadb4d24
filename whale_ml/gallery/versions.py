"""Gallery versions: every gallery a researcher identified against, kept.

A version is a folder ``gallery/versions/vNNNN/`` holding the index, the
embeddings (to find each candidate's best-matching photo), one row per photo
(``gallery.csv``) and ``version.json`` (counts, where it came from, its
:class:`~whale_ml.gallery.lineage.GalleryLineage`). The folder is written under
a temp name, flushed to disk, and renamed into place whole; ``current.json`` names the
current one and is replaced atomically after that, so a reader (even after a power cut)
sees the old version or the new one, never half. Every change of versions or of the
pointer happens under the catalogue's writer lock (:mod:`whale_ml.gallery.catalogue`),
held from reading the current version to publishing the next, so "current" only moves
forward and no version is published from a stale parent.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whale_ml.retrieval.faiss_import import faiss
import numpy as np
import pandas as pd

from whale_ml.gallery.catalogue import catalogue_lock, versions_lock
from whale_ml.gallery.lineage import GalleryLineage, LineageError
from whale_ml.gallery.matchers import models_key as key_of
from whale_ml.io import flush_tree, fsync_dir, fsync_enabled, read_json, staging_dir, write_error, write_json
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
    # Each fold model's class centres, in the lineage's model order (None: a model without
    # them, or a version written before they were kept). Read with the rest of the version,
    # so that a version pruned after loading keeps them.
    centres: list[ClassCentres | None] = field(default_factory=list)
    # The version asked for when it could not be read and this older one was loaded instead.
    fallback_from: str | None = None

    @property
    def lineage(self) -> GalleryLineage:
        return GalleryLineage(**self.info["lineage"])

    @property
    def k(self) -> int:
        """Neighbours fetched per query (the lineage's)."""
        return self.lineage.k


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


class BrokenVersionError(LineageError):
    """A gallery version's files cannot be read back (a disk fault, or a version written
    without flushing and cut by a power loss)."""


def _read_version(layout: HomeLayout, name: str) -> GalleryVersion:
    folder = layout.gallery_versions_dir / name
    if not folder.is_dir():
        raise LineageError(f"gallery version {name} not found in {layout.gallery_versions_dir}")
    try:
        info = read_json(folder / "version.json")
        table = pd.read_csv(folder / "gallery.csv", dtype=str, keep_default_na=False)
        embeddings = np.load(folder / "embeddings.npy", allow_pickle=False)
        index = load_index(folder / "index.faiss")
        lineage = GalleryLineage(**info["lineage"])
        centres = [ClassCentres.load(folder / CENTRES_DIR / m.fold) for m in lineage.models]
    except (OSError, EOFError, ValueError, KeyError, RuntimeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BrokenVersionError(f"gallery version {name} ({folder}) cannot be read: {type(exc).__name__}: {exc}") from exc
    if not (len(table) == len(embeddings) == index.ntotal):
        raise BrokenVersionError(
            f"gallery version {name} ({folder}) is not whole: {len(table)} rows, {len(embeddings)} embeddings, {index.ntotal} indexed"
        )
    return GalleryVersion(name, folder, table, embeddings, index, info, centres)


def load_version(layout: HomeLayout, name: str | None = None, models_key: str | None = None) -> GalleryVersion:
    """A gallery version (default: the current one), read whole into memory.

    The version is read under the versions' shared lock, so a prune waits until it is
    read (:func:`whale_ml.gallery.catalogue.versions_lock`). When the current version
    cannot be read (its files damaged), the newest older version that reads whole is
    returned instead, with ``fallback_from`` naming the broken one; a version asked for
    by name is returned or raises.

    Args:
        models_key: instead of the current version, the newest built with the model set of
            this key (:func:`whale_ml.gallery.matchers.models_key`): the champion release's
            line of versions, enrolments on it included, whatever a later release built since.

    Raises:
        LineageError: no gallery yet, the named version does not exist, no version was built
            with those models, or none can be read.
    """
    with versions_lock(layout.gallery_versions_dir, exclusive=False):
        if name is not None:
            return _read_version(layout, name)
        line = _names(layout) if models_key is None else line_versions(layout, models_key)
        current = current_version(layout) if models_key is None else (line[-1] if line else None)
        if current is None:
            if models_key is not None:
                raise LineageError(
                    f"no gallery version in {layout.gallery_versions_dir} was built with the champion release's models "
                    f"(key {models_key}): rematerialise the release (job ensemble_and_submit), or name one with --gallery-version"
                )
            raise LineageError(f"no gallery in {layout.home}: materialise the pipeline (whale run) first")
        try:
            return _read_version(layout, current)
        except BrokenVersionError as broken:
            for older in reversed([n for n in line if int(n[1:]) < int(current[1:])]):
                try:
                    version = _read_version(layout, older)
                except BrokenVersionError:
                    continue
                version.fallback_from = current
                return version
            raise broken


def line_versions(layout: HomeLayout, models_key: str) -> list[str]:
    """The versions built with the model set of ``models_key``, oldest first (the newest is
    the line's head). A version whose record cannot be read belongs to no line."""
    found = []
    for name in _names(layout):
        try:
            models = GalleryLineage(**read_json(layout.gallery_versions_dir / name / "version.json")["lineage"]).models
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if key_of(models) == models_key:
            found.append(name)
    return found


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
    on_step: Callable[[str], None] | None = None,
) -> GalleryVersion:
    """Write a new gallery version and make it the current one, under the catalogue's
    writer lock (taken here if the caller does not hold it already; a caller that read
    the version it extends must hold it from that read on).

    Publishing goes: the files are written into a hidden staging folder (``staged``),
    flushed to disk with the folder (``flushed``), the folder is renamed to its
    ``vNNNN`` name and its parent flushed (``renamed``), and ``current.json`` is replaced
    (``current``). A process killed before ``current`` leaves the previous version
    current; a ``vNNNN`` renamed but never made current is listed, never served.

    Args:
        table: one row per embedding, with :data:`GALLERY_COLUMNS` (``source`` is
            ``pipeline`` or ``enrolled``).
        embeddings: (n, d) unit-length ensemble embeddings, in the table's order.
        made_by: what made it (``gallery asset``, ``whale enroll``), shown in the version list.
        index: the index of exactly these embeddings when the caller has built it
            already; otherwise one is built with the lineage's index kind and settings.
        centres: each lineage model's class centres (None or nothing: none), stored in
            ``centres/<fold>/`` for class-centre scores.
        on_step: called with each step's name once it is done (progress, and the tests'
            kill points).
    """
    with catalogue_lock(layout, made_by):
        return _write_version(layout, table, embeddings, lineage, made_by, extra, index, centres, on_step or (lambda _step: None))


def _write_version(
    layout: HomeLayout,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    lineage: GalleryLineage,
    made_by: str,
    extra: dict[str, Any] | None,
    index: faiss.Index | None,
    centres: Sequence[ClassCentres | None],
    on_step: Callable[[str], None],
) -> GalleryVersion:
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
        # One writer at a time: the next number is free. (A name taken all the same, by a
        # writer that ignores the lock, makes the rename fail: then the next one.)
        names = _names(layout)
        number = int(names[-1][1:]) + 1 if names else 1
        info["version"] = name = f"v{number:04d}"
        write_json(staging / "version.json", info)
        on_step("staged")
        flush_tree(staging)  # a power cut after the rename must not find empty files
        on_step("flushed")
        while True:
            try:
                os.rename(staging, root / name)
                break
            except OSError:
                if not (root / name).exists():
                    raise
                number += 1
                info["version"] = name = f"v{number:04d}"
                write_json(staging / "version.json", info)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if fsync_enabled():
        fsync_dir(root)
    on_step("renamed")
    write_json(root / "current.json", {"version": name})
    on_step("current")
    return load_version(layout, name)


def prune_versions(layout: HomeLayout, keep: int, dry_run: bool = False, keep_line: str | None = None) -> list[str]:
    """Delete every gallery version but the newest ``keep``, never the current one, and never
    the newest of the line ``keep_line`` names (the champion release's models' key: the
    version ``whale identify`` serves).

    Versions are derived (the ledger and the registry hold what made them) but large:
    each has its own index and embeddings. A version is renamed to a hidden name before
    it is deleted, so nothing finds half of one under its name, even if this is killed.

    Returns:
        The deleted versions' names (with ``dry_run``: those it would delete), oldest first.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    root = layout.gallery_versions_dir
    with catalogue_lock(layout, "prune"):  # the current version cannot move meanwhile
        kept = {current_version(layout), *(line_versions(layout, keep_line)[-1:] if keep_line else [])}
        doomed = [name for name in _names(layout)[:-keep] if name not in kept]
        if dry_run or not doomed:
            return doomed
        # Renamed away while no reader is reading a version (readers hold this lock shared
        # while they read one), deleted after: a reader has its version whole or not at all.
        with versions_lock(root, exclusive=True):
            trash = []
            for name in doomed:
                trash.append(staging_dir(root, "deleting", name))
                os.rename(root / name, trash[-1])
    for folder in trash:
        shutil.rmtree(folder)
    return doomed
