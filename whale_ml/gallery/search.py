"""Queries against a gallery version: the five predictions per query, by one rule.

The submission and ``whale identify`` both call :func:`match_queries`, so a test photo
gets the same answer from either: the same index, search depth (the version's
``k``), per-query threshold (:func:`query_thresholds`, the species of a candidate
taken from the version's rows) and new_individual rule (:func:`predict_top5`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from whale_ml.gallery.versions import GalleryVersion
from whale_ml.retrieval.faiss_index import search_gallery
from whale_ml.retrieval.ranking import predict_top5, query_thresholds


@dataclass
class Matches:
    """What :func:`match_queries` found, row for row with the queries."""

    sims: np.ndarray  # (q, 5) best similarity of each candidate individual, best first
    ids: np.ndarray  # (q, 5) the candidates ("" where the gallery has fewer individuals)
    thresholds: np.ndarray  # (q,) each query's new_individual threshold
    predictions: list[list[str]]  # five ids per query, new_individual placed by the threshold


def match_queries(version: GalleryVersion, queries: np.ndarray, match_threshold: dict[str, Any]) -> Matches:
    """Search ``queries`` in ``version`` and decide new_individual for each.

    Args:
        queries: (q, d) embeddings in the version's space (its fold models' ensemble).
        match_threshold: the ``match_threshold`` asset's value (``threshold`` and
            optional ``species_thresholds``).
    """
    gallery_ids = version.table["individual_id"].to_numpy(dtype=object)
    sims, ids = search_gallery(version.index, gallery_ids, queries, k=version.lineage.k)
    species_of = dict(zip(version.table["individual_id"], version.table["species"], strict=True))
    thresholds = query_thresholds(ids, species_of, match_threshold["threshold"], match_threshold.get("species_thresholds"))
    return Matches(sims, ids, thresholds, predict_top5(sims, ids, thresholds))
