"""The new_individual threshold, tuned on out-of-fold predictions.

Each fold's validation photos are searched against that fold's training photos with
that fold's model (whose training never saw them), so a validation photo of an
individual missing from the fold's training is a true ``new_individual`` case. The
searches of all folds are pooled and the threshold that maximises their MAP@5 is
found exactly (:func:`tune_threshold`: every distinct threshold, no grid); optionally
one per species (:func:`tune_species_thresholds`). See docs/retrieval.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.data.folds import fold_split
from whale_ml.retrieval.faiss_index import build_index, search_gallery
from whale_ml.retrieval.ranking import SpeciesThresholds, ThresholdResult, nearest_species, tune_species_thresholds, tune_threshold
from whale_ml.retrieval.store import load_embeddings


def out_of_fold_search(
    folds: pd.DataFrame, embeddings_dir: Callable[[str], Path], fold_keys: Sequence[str], k: int = 50
) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]]:
    """Per fold with validation photos: its training and validation rows, and the validation
    photos' best five individuals among that fold's training photos, by that fold's model.

    Args:
        folds: the ``cv_folds`` table.
        embeddings_dir: fold key -> the folder of its ``train`` embeddings.
        fold_keys: ``fold0``, ``fold1``, ... in order.

    Yields:
        ``(fold, train, val, sims, ids)`` as :func:`search_gallery` returns them; ``val``
        has the ``truth`` column (``new_individual`` where the fold's training lacks the id).
    """
    for i, fold in enumerate(fold_keys):
        train, val = fold_split(folds, i)
        if val.empty:
            continue
        emb, images = load_embeddings(embeddings_dir(fold), "train")
        row_of = {img: r for r, img in enumerate(images)}
        gallery = emb[[row_of[x] for x in train["image"]]]
        queries = emb[[row_of[x] for x in val["image"]]]
        sims, ids = search_gallery(build_index(gallery), train["individual_id"].to_numpy(), queries, k=k)
        yield fold, train, val, sims, ids


@dataclass
class OutOfFoldThreshold:
    """The tuned threshold(s) and the pooled out-of-fold searches they were tuned on."""

    result: ThresholdResult  # the global threshold over all folds' validation photos
    per_fold: list[dict[str, Any]]  # fold, queries, and each fold's own best threshold and MAP@5
    species: SpeciesThresholds | None  # per-species thresholds, when asked for
    sims: np.ndarray  # (n, 5) pooled over folds, in fold order
    ids: np.ndarray
    truths: list[str]

    @property
    def queries(self) -> int:
        return len(self.truths)

    @property
    def map5(self) -> float:
        """Out-of-fold MAP@5 of the thresholds in use (the species' own where tuned)."""
        return self.species.map5 if self.species is not None else self.result.map5

    def value(self) -> dict[str, Any]:
        """The ``match_threshold`` asset's value: what the submission and ``whale identify`` read."""
        return {
            "threshold": self.result.threshold,
            "map5": self.map5,
            "new_share": self.result.new_share,
            "queries": self.queries,
            "per_fold": self.per_fold,
            "species_thresholds": self.species.by_species if self.species is not None else {},
        }


def tune_out_of_fold(
    cv_folds: pd.DataFrame,
    embeddings_dir: Callable[[str], Path],
    folds: Sequence[str],
    k: int = 50,
    per_species: bool = False,
    species_min_queries: int = 100,
) -> OutOfFoldThreshold:
    """The new_individual threshold that maximises out-of-fold MAP@5 (see the module docstring).

    Args:
        cv_folds: the ``cv_folds`` table (``image, individual_id, species, fold``).
        embeddings_dir: fold key -> the folder of its ``train`` embeddings.
        folds: the fold keys, in order.
        k: neighbours fetched per validation photo at first.
        per_species: also tune a threshold per species (of the nearest individual).
        species_min_queries: the fewest validation photos for a species' own threshold.

    Raises:
        ValueError: no fold has validation photos.
    """
    sims_all, ids_all, truths, per_fold = [], [], [], []
    for fold, train, val, sims, ids in out_of_fold_search(cv_folds, embeddings_dir, folds, k=k):
        own = tune_threshold(sims, ids, val["truth"].tolist(), gallery_ids=train["individual_id"].tolist())
        per_fold.append({"fold": fold, "queries": len(val), "best_threshold": own.threshold, "best_map5": own.map5})
        sims_all.append(sims)
        ids_all.append(ids)
        truths += val["truth"].tolist()
    if not sims_all:
        raise ValueError("no fold has validation photos: cannot tune the threshold")
    sims, ids = np.concatenate(sims_all), np.concatenate(ids_all)
    # 'truth' is already new_individual where the fold's gallery lacks the individual, so
    # every other truth is known. Passing all ids matters: by default only ids found in
    # the (top-5) lists count as known, and a missed known individual would score as new.
    known = cv_folds["individual_id"].unique().tolist()
    result = tune_threshold(sims, ids, truths, gallery_ids=known)
    species = None
    if per_species:
        species_of = dict(zip(cv_folds["individual_id"], cv_folds["species"], strict=True))
        species = tune_species_thresholds(
            sims, ids, truths, nearest_species(ids, species_of), gallery_ids=known, min_queries=species_min_queries
        )
    return OutOfFoldThreshold(result, per_fold, species, sims, ids, truths)
