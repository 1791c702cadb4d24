"""Queries against a gallery version: the five predictions per query, by one rule.

The submission and ``whale identify`` both call :func:`match_queries`, so a test photo
gets the same answer from either: the same index, search depth (the version's
``k``), per-query threshold (:func:`query_thresholds`, the species of a candidate
taken from the version's rows), the fusion the threshold was tuned with (local-feature
re-ranking, :mod:`whale_ml.retrieval.rerank`; class-centre scores from the version's fold
models, :mod:`whale_ml.retrieval.centres`) and new_individual rule (:func:`predict_top5`, with
the margin weight the threshold was tuned at).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from whale_ml.retrieval.centres import ClassCentres, ensemble_centre_similarity
from whale_ml.retrieval.faiss_index import l2_normalise, search_gallery
from whale_ml.retrieval.fusion import Fusion, sort_rows
from whale_ml.retrieval.local_features import FeatureStore, PhotoFeatures
from whale_ml.retrieval.ranking import TOP, decision_scores, predict_top5, query_thresholds
from whale_ml.retrieval.rerank import LocalRerank, match_candidates


class Searchable(Protocol):
    """What :func:`match_queries` searches: a gallery version
    (:class:`~whale_ml.gallery.versions.GalleryVersion`), or one fold's training photos
    under that fold's model (:class:`whale_ml.retrieval.pseudo_labels.FoldGallery`)."""

    @property
    def name(self) -> str: ...

    @property
    def table(self) -> pd.DataFrame: ...  # image, individual_id, species: one row per index row

    @property
    def embeddings(self) -> np.ndarray: ...

    @property
    def index(self) -> Any: ...  # the faiss index of ``embeddings``

    @property
    def k(self) -> int: ...  # neighbours fetched per query before collapsing to individuals

    @property
    def centres(self) -> list[ClassCentres | None]: ...  # each model's class centres, in the embeddings' model order


@dataclass
class Matches:
    """What :func:`match_queries` found, row for row with the queries."""

    sims: np.ndarray  # (q, 5) each candidate individual's score (the fused one when re-ranked), best first
    ids: np.ndarray  # (q, 5) the candidates ("" where the gallery has fewer individuals)
    thresholds: np.ndarray  # (q,) each query's new_individual threshold
    predictions: list[list[str]]  # five ids per query, new_individual placed by the threshold
    inliers: np.ndarray | None = None  # (q, 5) local-feature inliers of each candidate, when re-ranked
    rerank_ms_per_query: float | None = None
    margin: float = 0.0  # the weight of the first candidate's lead in its decision score

    @property
    def decisions(self) -> np.ndarray:
        """(q, 5) what each candidate's score is compared with the threshold as: the first
        candidate's plus ``margin`` times its lead over the second, the others' own."""
        return decision_scores(self.sims, self.margin)


def match_queries(
    version: Searchable,
    queries: np.ndarray,
    match_threshold: dict[str, Any],
    query_features: Sequence[PhotoFeatures | None] | None = None,
    gallery_features: FeatureStore | None = None,
    workers: int = 0,
) -> Matches:
    """Search ``queries`` in ``version`` and decide new_individual for each.

    Args:
        queries: (q, d) embeddings in the version's space (its fold models' ensemble).
        match_threshold: the ``match_threshold`` asset's value (``threshold``, optional
            ``species_thresholds``, ``margin`` (0 when absent); ``fusion`` with ``rerank``
            and/or ``class_centres`` when it was tuned on fused scores).
        query_features: with re-ranking, each query's local features (``None`` for none).
        gallery_features: with re-ranking, the store holding the gallery photos' features
            (a photo it lacks, e.g. one enrolled later, gives no local evidence).

    Raises:
        ValueError: the threshold was tuned with re-ranking but no features were given, or
            with class centres but the version holds none.
    """
    gallery_ids = version.table["individual_id"].to_numpy(dtype=object)
    rerank, fusion = match_threshold.get("rerank"), Fusion.of_threshold(match_threshold)
    if fusion is None:
        sims, ids = search_gallery(version.index, gallery_ids, queries, k=version.k)
        inliers, cost = None, None
    else:
        if rerank is not None and (query_features is None or gallery_features is None):
            raise ValueError(
                "this match_threshold was tuned with local-feature re-ranking: its threshold applies to fused scores, "
                "so the queries' and the gallery's local features are needed"
            )
        settings = LocalRerank.from_dict(rerank, workers) if rerank is not None else None
        top = settings.candidates if settings is not None else int(match_threshold["class_centres"]["candidates"])
        raw, cand = search_gallery(version.index, gallery_ids, queries, k=version.k, top=top)
        counts, cost = None, None
        if settings is not None:
            assert query_features is not None and gallery_features is not None
            found = match_candidates(
                settings,
                version.embeddings,
                gallery_ids,
                [gallery_features.get(img) for img in version.table["image"]],
                l2_normalise(queries),
                query_features,
                cand,
            )
            counts, cost = found.counts, found.ms_per_query
        centre_sims = None
        if fusion.centre_weight > 0:
            centres = version.centres
            if all(c is None for c in centres):
                raise ValueError(
                    f"this match_threshold was tuned with class-centre scores, but gallery version {version.name} holds no "
                    "class centres: rematerialise fold_embeddings and the gallery"
                )
            centre_sims = ensemble_centre_similarity(queries, centres, cand)
        scores = fusion.scores(raw, counts, centre_sims)
        extra = () if counts is None else (counts,)
        sims, ids, *rest = sort_rows(scores, cand, *extra)
        sims, ids = sims[:, :TOP], ids[:, :TOP]
        inliers = rest[0][:, :TOP] if rest else None
    thresholds = _thresholds(version, ids, match_threshold)
    margin = float(match_threshold.get("margin") or 0.0)
    return Matches(sims, ids, thresholds, predict_top5(sims, ids, thresholds, margin=margin), inliers, cost, margin)


def _thresholds(version: Searchable, ids: np.ndarray, match_threshold: dict[str, Any]) -> np.ndarray:
    species_of = dict(zip(version.table["individual_id"], version.table["species"], strict=True))
    return query_thresholds(ids, species_of, match_threshold["threshold"], match_threshold.get("species_thresholds"))
