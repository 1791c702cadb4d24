"""Re-ranking a query's first candidates by local features, fused with the embedding score.

The one place the out-of-fold tuning (``match_threshold``), the submission and
``whale identify`` re-rank through, so that all three rank a photo alike: the first
``candidates`` individuals of the embedding search, each one's ``photos_per_candidate``
gallery photos most like the query matched by keypoints
(:mod:`~whale_ml.retrieval.local_features`), the best inlier count fused with the
similarity by the tuned :class:`~whale_ml.retrieval.fusion.Fusion`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from whale_ml.progress import ProgressFn
from whale_ml.retrieval.local_features import PhotoFeatures, candidate_inliers, candidate_photos
from whale_ml.stage_configs import LocalFeatureConfig


@dataclass
class LocalRerank:
    """The re-ranking settings (``ThresholdConfig``'s) and the features' own."""

    features: LocalFeatureConfig = field(default_factory=LocalFeatureConfig)
    candidates: int = 10
    photos_per_candidate: int = 4
    workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features.model_dump(), "candidates": self.candidates, "photos_per_candidate": self.photos_per_candidate}

    @classmethod
    def from_dict(cls, d: dict[str, Any], workers: int = 0) -> LocalRerank:
        return cls(LocalFeatureConfig(**d["features"]), int(d["candidates"]), int(d["photos_per_candidate"]), workers)


@dataclass
class Inliers:
    """Inliers of every (query, candidate), and what finding them cost."""

    counts: np.ndarray  # (n, K)
    seconds: float
    pairs: int  # photo pairs matched
    photos: np.ndarray | None = None  # (n, K) the gallery row that gave each count (-1: none)

    @property
    def ms_per_query(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.counts))


def match_candidates(
    rerank: LocalRerank,
    gallery_embeddings: np.ndarray,
    gallery_ids: np.ndarray,
    gallery_features: Sequence[PhotoFeatures | None],
    queries: np.ndarray,
    query_features: Sequence[PhotoFeatures | None],
    candidate_ids: np.ndarray,
    progress: ProgressFn | None = None,
) -> Inliers:
    """Local-feature inliers of each query against each of its candidate individuals.

    Args:
        gallery_embeddings: (g, d) unit-length, row for row with ``gallery_ids`` and ``gallery_features``.
        queries: (n, d) unit-length, row for row with ``query_features`` and ``candidate_ids``.
        candidate_ids: (n, K) from the embedding search (``""`` padding).
    """
    start = time.perf_counter()
    rows = candidate_photos(gallery_embeddings, gallery_ids, queries, candidate_ids, rerank.photos_per_candidate)
    counts, photos = candidate_inliers(query_features, rows, gallery_features, rerank.features, rerank.workers, progress)
    pairs = sum(len(r) for per_query in rows for r in per_query)
    return Inliers(counts, time.perf_counter() - start, pairs, photos)

