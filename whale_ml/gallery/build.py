"""The ensemble gallery: every training photo, embedded by all fold models, as a gallery version.

The fold models' normalised embeddings are concatenated (:func:`ensemble`: the cosine
of two ensemble vectors is the mean of the models' cosines). The gallery stage writes
the result as a new gallery version (:mod:`whale_ml.gallery.versions`), the one artifact
that the submission and ``whale identify`` both search. Test queries are not stored
with it: :func:`query_embeddings` ensembles the folds' test embeddings when they are needed,
after checking that they come from the models the version was built with. See
docs/retrieval.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from whale_ml.stage_configs import GalleryConfig
from whale_ml.gallery.catalogue import catalogue_lock
from whale_ml.gallery.ledger import ledger_gallery_rows, read_ledger
from whale_ml.gallery.release import record_release, served_line
from whale_ml.gallery.lineage import EMBEDDINGS_RECORD, FoldModel, GalleryLineage, LineageError, gather_lineage
from whale_ml.gallery.versions import GalleryVersion, prune_versions, write_version
from whale_ml.io import read_json
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.retrieval.faiss_index import INDEX_OPTIONS, build_index, index_recall
from whale_ml.retrieval.store import ensemble, load_embeddings
from whale_ml.home import HomeLayout

if TYPE_CHECKING:
    from whale_ml.gallery.models import ResolvedModel


@dataclass
class GalleryStats:
    """What :func:`build_gallery` built, beside the version itself."""

    photos: int  # training photos from the fold embeddings (enrolled ones carried here excluded)
    individuals: int
    models: list[str]
    dimension: int
    index: str
    recall: dict[str, float] | None = None  # index_recall against flat, for an approximate index
    carried_enrolled: int = 0
    pruned: list[str] = field(default_factory=list)


def fold_ensemble(layout: HomeLayout, folds: Sequence[str], split: str) -> tuple[np.ndarray, list[str]]:
    """The ensemble embeddings of one split (``train`` or ``test``) over ``folds``, in order.

    Returns:
        The (n, folds * d) unit-length float32 embeddings and the images of their rows.

    Raises:
        ValueError: the folds' embeddings cover different images (one fold was embedded
            on other crops: all must be redone).
    """
    parts, images = [], None
    layout = layout.with_current_embeddings(folds)  # no-op for folds the caller pinned already
    for fold in folds:
        emb, fold_images = load_embeddings(layout.embeddings_dir(fold), split)
        if images is not None and fold_images != images:
            raise ValueError(f"{fold}'s embeddings cover other images than {folds[0]}'s; re-materialise fold_embeddings for all folds")
        images = fold_images
        parts.append(emb)
    return ensemble(parts), images or []


def query_embeddings(layout: HomeLayout, version: GalleryVersion) -> tuple[np.ndarray, list[str]]:
    """The test photos embedded into ``version``'s space: the ensemble of its fold models'
    test embeddings, in its fold order.

    Raises:
        LineageError: a fold's embeddings were made since by another checkpoint (or flip
            TTA setting) than the version's: they would not be comparable with it.
    """
    # The record checked and the embeddings read must be of one set: resolved once.
    layout = layout.with_current_embeddings([m.fold for m in version.lineage.models])
    for want in version.lineage.models:
        record = layout.embeddings_dir(want.fold) / EMBEDDINGS_RECORD
        found = FoldModel(**read_json(record)) if record.exists() else None
        if found is None or (found.checkpoint_sha256, found.flip_tta) != (want.checkpoint_sha256, want.flip_tta):
            raise LineageError(
                f"the {want.fold} embeddings were not made by the model gallery {version.name} was built with: "
                "rematerialise the gallery (it uses the current fold embeddings) before the submission"
            )
    return fold_ensemble(layout, [m.fold for m in version.lineage.models], "test")


def gallery_table(train_metadata: pd.DataFrame, crops: pd.DataFrame, images: list[str]) -> pd.DataFrame:
    """The version's rows for pipeline photos: image, individual, species and crop of each."""
    by_image = train_metadata.set_index("image")
    crop_of = dict(zip(crops["image"], crops["crop_path"], strict=True))
    return pd.DataFrame(
        {
            "image": images,
            "individual_id": by_image.loc[images, "individual_id"].to_numpy(dtype=object),
            "species": by_image.loc[images, "species"].to_numpy(),
            "crop_path": [crop_of.get(img, "") for img in images],
            "source": "pipeline",
        }
    )


def with_enrolled(
    layout: HomeLayout,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    lineage: GalleryLineage,
    models: Callable[[GalleryLineage], Sequence[ResolvedModel]],
    device: str = "cpu",
) -> tuple[pd.DataFrame, np.ndarray, int]:
    """A pipeline-built gallery plus every ledger photo it lacks (embedded now with the
    lineage's models, ``models(lineage)``, fetched only then), and its enrolled photos
    marked as such. The caller holds the catalogue's writer lock until it publishes the
    result (:func:`whale_ml.gallery.catalogue.catalogue_lock`).

    Returns:
        The table, the embeddings, and how many ledger photos were embedded here.
    """
    ledger = read_ledger(layout)
    table = table.copy()
    table.loc[table["image"].isin(ledger["image"]), "source"] = "enrolled"
    missing = ledger[~ledger["image"].isin(table["image"])]
    if missing.empty:
        return table, embeddings, 0
    extra, emb = ledger_gallery_rows(missing, layout, lineage, models(lineage), device)
    return pd.concat([table, extra], ignore_index=True), np.concatenate([embeddings, emb]), len(missing)


def build_gallery(
    layout: HomeLayout,
    folds: Sequence[str],
    train_metadata: pd.DataFrame,
    crops: pd.DataFrame,
    settings: GalleryConfig,
    models: Callable[[GalleryLineage], Sequence[ResolvedModel]],
    device: str = "cpu",
    on_step: Callable[[str], None] | None = None,
    release: int | None = None,
) -> tuple[GalleryVersion, GalleryStats]:
    """Build the ensemble gallery of every training photo and write it as the new current
    gallery version, with every enrolled photo the fold embeddings do not cover yet.

    Args:
        folds: the fold models of the ensemble, in order (their ``train`` embeddings).
        train_metadata: ``image, individual_id, species`` of every training photo.
        crops: ``image, crop_path`` (the version's rows point at the crops).
        settings: the index kind and options, the search depth ``k``, and how many
            versions to keep (older ones are deleted; None keeps all).
        models: the gallery's lineage -> the fold models it was built with; called only
            when an enrolled photo must be embedded here (:func:`whale_ml.gallery.models.gallery_models`).
        device: where such photos are embedded.
        on_step: told each publishing step (:func:`~whale_ml.gallery.versions.write_version`).
        release: the number of ``layout``'s round when it is the release: recorded as the
            home's release (:mod:`whale_ml.gallery.release`) once the version is published,
            before the writer lock is let go. None: a round before the release.
    """
    # Every fold's embeddings, record and centres from one set each, even if a fold is re-embedded meanwhile.
    layout = layout.with_current_embeddings(folds)
    embeddings, images = fold_ensemble(layout, folds, "train")
    table = gallery_table(train_metadata, crops, images)
    options = settings.model_dump(include=set(INDEX_OPTIONS))
    index = build_index(embeddings, settings.index, **options)
    stats = GalleryStats(
        photos=len(table),
        individuals=int(table["individual_id"].nunique()),
        models=list(folds),
        dimension=int(embeddings.shape[1]),
        index=settings.index,
    )
    if settings.index != "flat":  # what the approximate index loses, measured on the test queries
        queries, _ = fold_ensemble(layout, folds, "test")
        probe = queries if len(queries) else embeddings
        stats.recall = index_recall(index, embeddings, table["individual_id"].to_numpy(), probe, max_queries=settings.recall_queries)
    lineage = gather_lineage(layout, list(folds), settings.index, settings.k, options)
    # From reading the ledger to publishing (and pruning): one writer at a time, so an
    # enrolment either lands before (and its photos are carried here) or extends this version.
    with catalogue_lock(layout, "gallery asset"):
        table, version_emb, stats.carried_enrolled = with_enrolled(layout, table, embeddings, lineage, models, device)
        version = write_version(
            layout,
            table,
            version_emb,
            lineage,
            made_by="gallery asset",
            extra={"carried_enrolled": stats.carried_enrolled},
            index=index if stats.carried_enrolled == 0 else None,  # the same vectors: no second build
            centres=[ClassCentres.load(layout.embeddings_dir(f)) for f in folds],  # written with the embeddings, by the same checkpoints
            on_step=on_step,
        )
        if release is not None:
            record_release(layout, release)
        if settings.keep_versions:  # never the champion's newest version, which whale identify serves
            stats.pruned = prune_versions(layout, settings.keep_versions, keep_line=served_line(layout))
    return version, stats
