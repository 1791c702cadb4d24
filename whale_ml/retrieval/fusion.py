"""Calibrated fusion of the embedding similarity with local-feature evidence.

WildFusion's recipe (wildlife-tools): each matcher's raw score is turned into a
probability that the pair shows the same individual by a calibration fitted out of
fold, and the probabilities are averaged. Here the two matchers are the ensemble's
cosine similarity to a candidate individual's best photo and the RANSAC inlier count
of local features (:mod:`whale_ml.retrieval.local_features`); the calibrations are
logistic (strictly monotone, so each matcher's own order is kept and no plateau of
an isotonic fit turns distinct scores into ties), and the fused score is

    (1 - w) * P_global(similarity) + w * P_local(log1p(inliers))

The weight ``w`` is chosen out of fold together with the new_individual threshold:
for each weight on a grid, the exact best threshold (:func:`tune_threshold`, every
distinct value) and its MAP@5; the best pair wins, the smallest weight among equals
(so local matching is only used where it helps). The rule downstream is unchanged:
individuals ranked by the fused score, ``new_individual`` inserted before the first
below the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.retrieval.local_features import inlier_evidence
from whale_ml.retrieval.ranking import ThresholdResult, _known_truths, tune_threshold


class NotCalibratable(ValueError):
    """The pairs cannot calibrate a matcher (none, or all of one kind)."""


@dataclass(frozen=True)
class Calibration:
    """P(same individual | score) = sigmoid(slope * score + intercept), with slope >= 0.

    A matcher whose score does not rise with the truth gets slope 0: a constant, which
    neither helps nor reorders anything.
    """

    slope: float
    intercept: float

    def __call__(self, score: np.ndarray) -> np.ndarray:
        z = self.slope * np.asarray(score, dtype=np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    @classmethod
    def fit(cls, scores: np.ndarray, same: np.ndarray) -> Calibration:
        """Logistic regression of ``same`` (bool) on one score, by scikit-learn.

        Raises:
            NotCalibratable: no pair, or the pairs hold only one class.
        """
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
        y = np.asarray(same, dtype=bool)
        if len(x) != len(y) or len(x) == 0:
            raise NotCalibratable(f"calibration needs one label per score and at least one pair, got {len(x)} scores, {len(y)} labels")
        if y.all() or not y.any():
            raise NotCalibratable(f"calibration needs both same and different pairs, got {int(y.sum())} same of {len(y)}")
        model = LogisticRegression(C=1e4, max_iter=1000).fit(x, y)
        slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
        if slope <= 0.0:  # uninformative (or inverted) evidence: the base rate, order-neutral
            p = float(y.mean())
            return cls(0.0, float(np.log(p / (1.0 - p))))
        return cls(slope, intercept)

    def to_dict(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(float(d["slope"]), float(d["intercept"]))


@dataclass(frozen=True)
class Fusion:
    """The tuned fusion: weight of the local evidence and the two calibrations."""

    weight: float
    global_calibration: Calibration
    local_calibration: Calibration

    def scores(self, sims: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        """Fused scores, ``-inf`` where ``sims`` is (padding)."""
        sims = np.asarray(sims, dtype=np.float64)
        fused = (1.0 - self.weight) * self.global_calibration(np.where(np.isfinite(sims), sims, 0.0))
        fused = fused + self.weight * self.local_calibration(inlier_evidence(inliers))
        return np.where(np.isfinite(sims), fused, -np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "global": self.global_calibration.to_dict(), "local": self.local_calibration.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        return cls(float(d["weight"]), Calibration.from_dict(d["global"]), Calibration.from_dict(d["local"]))


def sort_rows(scores: np.ndarray, ids: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row sorted by descending score (stable: equal scores keep the embedding's order)."""
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
    return tuple(np.take_along_axis(np.asarray(a), order, axis=1) for a in (scores, ids, *extra))


def fused_ranking(sims: np.ndarray, ids: np.ndarray, inliers: np.ndarray, fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """Candidates re-ranked by the fused score: ``(scores, ids)``, each row descending,
    ready for :func:`~whale_ml.retrieval.ranking.predict_top5` at the fused threshold."""
    scores, ranked = sort_rows(fusion.scores(sims, inliers), ids)[:2]
    return scores, ranked


@dataclass
class FusionResult:
    fusion: Fusion
    threshold: ThresholdResult  # the exact best threshold at the chosen weight
    table: pd.DataFrame  # per weight: its best threshold, MAP@5, new share


def tune_fusion(
    sims: np.ndarray,
    ids: np.ndarray,
    inliers: np.ndarray,
    truths: Sequence[str],
    gallery_ids: Sequence[str],
    weights: Sequence[float] | int = 21,
) -> FusionResult:
    """The calibrations, fusion weight and new_individual threshold that maximise MAP@5.

    Both calibrations are fitted on every (query, candidate) pair, labelled by whether
    the candidate is the query's individual; then :func:`tune_weight`.

    Args:
        sims: (n, K) best similarity of each candidate individual, descending per row
            (``-inf`` padding).
        ids: (n, K) the candidates.
        inliers: (n, K) local-feature inliers of each candidate.
        truths: each query's individual (``new_individual`` where unknown).
        gallery_ids: every known individual (a truth outside them scores as new).
        weights: the weights tried, or how many evenly spaced in [0, 1].
    """
    sims, ids = np.asarray(sims, dtype=np.float64), np.asarray(ids, dtype=object)
    truth_arr = _known_truths(truths, len(sims), ids, gallery_ids)
    valid = np.isfinite(sims)
    same = (ids == truth_arr[:, None])[valid]
    global_cal = Calibration.fit(sims[valid], same)
    local_cal = Calibration.fit(inlier_evidence(inliers)[valid], same)
    return tune_weight(sims, ids, inliers, truth_arr.tolist(), gallery_ids, global_cal, local_cal, weights)


def tune_weight(
    sims: np.ndarray,
    ids: np.ndarray,
    inliers: np.ndarray,
    truths: Sequence[str],
    gallery_ids: Sequence[str],
    global_calibration: Calibration,
    local_calibration: Calibration,
    weights: Sequence[float] | int = 21,
) -> FusionResult:
    """For each weight, the exact best threshold of the fused ranking; the best weight
    (the smallest among equally good ones: local matching only where it helps)."""
    grid = np.linspace(0.0, 1.0, weights) if isinstance(weights, int) else np.asarray(weights, dtype=np.float64)
    if len(grid) == 0 or (grid < 0).any() or (grid > 1).any():
        raise ValueError(f"fusion weights must be a non-empty list in [0, 1], got {grid.tolist()}")
    rows, best = [], None
    for w in np.sort(grid):
        fusion = Fusion(float(w), global_calibration, local_calibration)
        scores, ranked = fused_ranking(sims, ids, inliers, fusion)
        result = tune_threshold(scores, ranked, truths, gallery_ids=gallery_ids)
        rows.append({"weight": float(w), "threshold": result.threshold, "map5": result.map5, "new_share": result.new_share})
        if best is None or result.map5 > best[1].map5 + 1e-12:
            best = (fusion, result)
    assert best is not None
    return FusionResult(best[0], best[1], pd.DataFrame(rows))
