"""Calibrated fusion of the embedding similarity with other evidence of identity.

WildFusion's recipe (wildlife-tools): each matcher's raw score is turned into a
probability that the pair shows the same individual by a calibration fitted out of
fold, and the probabilities are averaged with weights. The matchers, by name:

* ``global``: the ensemble's cosine similarity to a candidate individual's best photo
  (always present);
* ``local``: the RANSAC inlier count of local features
  (:mod:`whale_ml.retrieval.local_features`), as ``log1p(inliers)``;
* ``centre``: the cosine similarity to the candidate's best ArcFace sub-centre
  (:mod:`whale_ml.retrieval.centres`).

The calibrations are logistic (strictly monotone, so each matcher's own order is kept
and no plateau of an isotonic fit turns distinct scores into ties), and the fused score
is ``sum_c w_c * P_c(score_c)`` with weights summing to 1. A candidate without a class
centre (an individual no fold model trained on, e.g. enrolled later) takes its
``global`` probability in place of the centre's: it is scored by its photos alone,
neither rewarded nor punished for the missing evidence.

:meth:`Fusion.parts` gives each matcher's raw score, probability and weighted
contribution (:class:`ScorePart`); the fused score is their sum (:func:`fused_scores`,
the one sum :meth:`Fusion.scores` computes), so a ranking can be explained term by term.

The weights are chosen out of fold together with the new_individual threshold: for
each point of a grid on the simplex, the exact best threshold (:func:`tune_threshold`,
every distinct value) and its MAP@5; the best point wins, and among equally good ones
the one with the largest embedding weight, then the smallest class-centre weight (so
extra evidence is used only where it helps). The rule downstream is unchanged: individuals ranked by the
fused score, ``new_individual`` inserted before the first below the threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.retrieval.local_features import inlier_evidence
from whale_ml.retrieval.ranking import ThresholdResult, known_truths, tune_threshold


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


GLOBAL, LOCAL, CENTRE = "global", "local", "centre"
COMPONENTS = (GLOBAL, LOCAL, CENTRE)


@dataclass(frozen=True)
class ScorePart:
    """One matcher's share of a ranking score, per (query, candidate): what a reviewer reads
    to see why one candidate stands above another.

    Attributes:
        weight: the matcher's weight in the fusion (1 for the plain similarity).
        value: (n, K) its raw score: the best-photo cosine (``global``, ``-inf`` padding),
            the inlier count (``local``), the class-centre cosine (``centre``; NaN where the
            candidate has no centre, and its probability is then the ``global`` one).
        probability: (n, K) the calibrated probability of the same individual (NaN on
            padding); None when the score is the plain similarity (no fusion: ``value``
            enters uncalibrated).
    """

    weight: float
    value: np.ndarray
    probability: np.ndarray | None

    @property
    def contribution(self) -> np.ndarray:
        """(n, K) what it adds to the score: ``weight * probability`` (``weight * value`` uncalibrated)."""
        return self.weight * (self.value if self.probability is None else self.probability)

    def take(self, order: np.ndarray) -> ScorePart:
        """The part with each row's candidates in ``order`` (row-wise indices, as :func:`row_order`)."""

        def pick(a: np.ndarray) -> np.ndarray:
            return np.take_along_axis(np.asarray(a), order, axis=1)

        return ScorePart(self.weight, pick(self.value), None if self.probability is None else pick(self.probability))


def plain_parts(sims: np.ndarray) -> dict[str, ScorePart]:
    """The parts of the plain similarity (no fusion): ``global`` alone, weight 1, uncalibrated."""
    return {GLOBAL: ScorePart(1.0, np.asarray(sims, dtype=np.float64), None)}


def fused_scores(parts: dict[str, ScorePart]) -> np.ndarray:
    """The score the parts make: their contributions summed in order, ``-inf`` where the
    ``global`` value is not finite (padding). The one sum :meth:`Fusion.scores` and the
    explanations of a ranking both read, so the contributions add up to it exactly."""
    total: np.ndarray | None = None
    for part in parts.values():
        total = part.contribution if total is None else total + part.contribution
    assert total is not None, "a score needs at least its global part"
    return np.where(np.isfinite(parts[GLOBAL].value), total, -np.inf)


@dataclass(frozen=True)
class Fusion:
    """The tuned fusion: a weight and a calibration per matcher (``global`` always).

    Attributes:
        weights: matcher -> weight, each in [0, 1], summing to 1.
        calibrations: matcher -> its calibration, for the same matchers.
    """

    weights: dict[str, float]
    calibrations: dict[str, Calibration]

    def __post_init__(self) -> None:
        names = set(self.weights)
        if GLOBAL not in names or not names <= set(COMPONENTS) or names != set(self.calibrations):
            raise ValueError(f"a fusion needs 'global' and only {COMPONENTS}, one calibration a weight; got {sorted(names)}")
        w = np.array(list(self.weights.values()))
        if (w < 0).any() or (w > 1).any() or abs(w.sum() - 1.0) > 1e-9:
            raise ValueError(f"fusion weights must lie in [0, 1] and sum to 1, got {self.weights}")

    @classmethod
    def of(cls, calibrations: dict[str, Calibration], **extra_weights: float) -> Fusion:
        """The fusion giving ``global`` what the other weights leave: ``Fusion.of(cals, local=0.25)``."""
        rest = max(0.0, 1.0 - sum(extra_weights.values()))
        weights = {GLOBAL: rest, **{k: float(v) for k, v in extra_weights.items()}}
        return cls(weights, {k: calibrations[k] for k in weights})

    @property
    def local_weight(self) -> float:
        """The local evidence's weight (0 without it)."""
        return self.weights.get(LOCAL, 0.0)

    @property
    def centre_weight(self) -> float:
        """The class centres' weight (0 without them)."""
        return self.weights.get(CENTRE, 0.0)

    def parts(self, sims: np.ndarray, inliers: np.ndarray | None = None, centre_sims: np.ndarray | None = None) -> dict[str, ScorePart]:
        """Each weighed matcher's share of the fused scores, ``global`` first: its raw score,
        calibrated probability and weighted contribution (:class:`ScorePart`).

        :meth:`scores` is :func:`fused_scores` of these parts, so the contributions sum to
        the fused score exactly (in this order: ``global``, ``local``, ``centre``). A
        matcher of weight 0 (tuned out: it did not help) is left out and needs no
        evidence; ``global`` is always there (a missing centre takes its probability).
        Arguments as :meth:`scores`.
        """
        sims = np.asarray(sims, dtype=np.float64)
        valid = np.isfinite(sims)

        def part(name: str, value: np.ndarray, probability: np.ndarray) -> ScorePart:
            # Padding (no candidate) has no probability: NaN there, never a number to show.
            return ScorePart(self.weights[name], value, np.where(valid, probability, np.nan))

        p_global = self.calibrations[GLOBAL](np.where(valid, sims, 0.0))
        out = {GLOBAL: part(GLOBAL, sims, p_global)}
        if self.weights.get(LOCAL, 0.0) > 0:
            if inliers is None:
                raise ValueError("this fusion weighs local-feature inliers: pass them")
            counts = np.asarray(inliers)
            out[LOCAL] = part(LOCAL, counts, self.calibrations[LOCAL](inlier_evidence(counts)))
        if self.weights.get(CENTRE, 0.0) > 0:
            if centre_sims is None:
                raise ValueError("this fusion weighs class-centre similarities: pass them")
            centre = np.asarray(centre_sims, dtype=np.float64)
            has = np.isfinite(centre)
            p_centre = np.where(has, self.calibrations[CENTRE](np.where(has, centre, 0.0)), p_global)
            out[CENTRE] = part(CENTRE, centre, p_centre)
        return out

    def scores(self, sims: np.ndarray, inliers: np.ndarray | None = None, centre_sims: np.ndarray | None = None) -> np.ndarray:
        """Fused scores, ``-inf`` where ``sims`` is (padding).

        Args:
            sims: (n, K) each candidate's best-photo similarity.
            inliers: (n, K) its local-feature inliers; needed when ``local`` has weight.
            centre_sims: (n, K) its class-centre similarity, NaN where it has no centre;
                needed when ``centre`` has weight.
        """
        return fused_scores(self.parts(sims, inliers, centre_sims))

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "calibrations": {k: c.to_dict() for k, c in self.calibrations.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        return cls({k: float(v) for k, v in d["weights"].items()}, {k: Calibration.from_dict(c) for k, c in d["calibrations"].items()})


def row_order(scores: np.ndarray) -> np.ndarray:
    """Per row, the indices that sort it by descending score (stable: equal scores keep the embedding's order)."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def sort_rows(scores: np.ndarray, ids: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row sorted by descending score (:func:`row_order`)."""
    order = row_order(scores)
    return tuple(np.take_along_axis(np.asarray(a), order, axis=1) for a in (scores, ids, *extra))


def fused_ranking(
    sims: np.ndarray, ids: np.ndarray, inliers: np.ndarray | None, fusion: Fusion, centre_sims: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates re-ranked by the fused score: ``(scores, ids)``, each row descending,
    ready for :func:`~whale_ml.retrieval.ranking.predict_top5` at the fused threshold."""
    scores, ranked = sort_rows(fusion.scores(sims, inliers, centre_sims), ids)[:2]
    return scores, ranked


@dataclass
class FusionResult:
    fusion: Fusion
    threshold: ThresholdResult  # the exact best threshold at the chosen weights
    table: pd.DataFrame  # per grid point: each matcher's weight, its best threshold, MAP@5, new share


def tune_fusion(
    sims: np.ndarray,
    ids: np.ndarray,
    inliers: np.ndarray | None,
    truths: Sequence[str],
    gallery_ids: Sequence[str],
    weights: Sequence[float] | int = 21,
    centre_sims: np.ndarray | None = None,
) -> FusionResult:
    """The calibrations, fusion weights and new_individual threshold that maximise MAP@5.

    Each calibration is fitted on every (query, candidate) pair that has its score,
    labelled by whether the candidate is the query's individual; then :func:`tune_weights`.

    Args:
        sims: (n, K) best similarity of each candidate individual, descending per row
            (``-inf`` padding).
        ids: (n, K) the candidates.
        inliers: (n, K) local-feature inliers of each candidate, or None (no local matcher).
        truths: each query's individual (``new_individual`` where unknown).
        gallery_ids: every known individual (a truth outside them scores as new).
        weights: the weights tried per matcher, or how many evenly spaced in [0, 1].
        centre_sims: (n, K) class-centre similarity of each candidate (NaN: none), or None.

    Raises:
        NotCalibratable: a matcher's pairs hold only one kind (or none).
        ValueError: neither ``inliers`` nor ``centre_sims``: nothing to fuse.
    """
    sims, ids = np.asarray(sims, dtype=np.float64), np.asarray(ids, dtype=object)
    truth_arr = known_truths(truths, len(sims), ids, gallery_ids)
    valid = np.isfinite(sims)
    same = ids == truth_arr[:, None]
    cals = {GLOBAL: Calibration.fit(sims[valid], same[valid])}
    if inliers is not None:
        cals[LOCAL] = Calibration.fit(inlier_evidence(inliers)[valid], same[valid])
    if centre_sims is not None:
        centre = np.asarray(centre_sims, dtype=np.float64)
        has = valid & np.isfinite(centre)
        cals[CENTRE] = Calibration.fit(centre[has], same[has])
    if len(cals) == 1:
        raise ValueError("nothing to fuse the similarity with: give inliers, class-centre similarities or both")
    return tune_weights(sims, ids, truth_arr.tolist(), gallery_ids, cals, weights, inliers, centre_sims)


def weight_grid(matchers: Sequence[str], weights: Sequence[float] | int = 21) -> list[dict[str, float]]:
    """The points tried: each non-``global`` matcher's weight from ``weights`` (values in
    [0, 1], or how many evenly spaced), ``global`` what is left, points with a negative
    rest left out; in the order ties are broken in: the largest ``global`` weight first
    (the extra evidence only where it helps), then the smallest ``centre`` weight, then
    the smallest ``local``."""
    if isinstance(weights, int):
        if weights < 2:
            raise ValueError(f"at least 2 fusion weights are needed, got {weights}")
        steps = weights - 1  # multiples of 1/steps: exact sums, so the rest is exact too
        grid = [i / steps for i in range(weights)]
    else:
        grid = sorted(float(w) for w in weights)
        steps = 0
    if len(grid) == 0 or min(grid) < 0 or max(grid) > 1:
        raise ValueError(f"fusion weights must be a non-empty list in [0, 1], got {grid}")
    extra = [m for m in (CENTRE, LOCAL) if m in matchers]
    points: list[tuple[tuple[float, ...], dict[str, float]]] = []
    for combo in itertools.product(range(len(grid)), repeat=len(extra)):
        w = {m: grid[i] for m, i in zip(extra, combo, strict=True)}
        rest = (steps - sum(combo)) / steps if steps else 1.0 - sum(w.values())
        if rest < -1e-12:
            continue
        # Ties go to the largest embedding weight: only the ratios of the weights order a
        # query's candidates (a threshold absorbs a common scale), so a constant piece of
        # evidence with a large weight can imitate a smaller weight of the others.
        points.append(((-rest, *w.values()), {GLOBAL: max(rest, 0.0), **w}))
    return [point for _, point in sorted(points, key=lambda p: p[0])]


def tune_weights(
    sims: np.ndarray,
    ids: np.ndarray,
    truths: Sequence[str],
    gallery_ids: Sequence[str],
    calibrations: dict[str, Calibration],
    weights: Sequence[float] | int = 21,
    inliers: np.ndarray | None = None,
    centre_sims: np.ndarray | None = None,
) -> FusionResult:
    """For each point of :func:`weight_grid`, the exact best threshold of the fused ranking;
    the best point (the first of equally good ones in the grid's order: the extra
    evidence only where it helps)."""
    rows, best = [], None
    extra = [m for m in calibrations if m != GLOBAL]
    for point in weight_grid(list(calibrations), weights):
        fusion = Fusion(point, calibrations)
        scores, ranked = fused_ranking(sims, ids, inliers, fusion, centre_sims)
        result = tune_threshold(scores, ranked, truths, gallery_ids=gallery_ids)
        row = {f"{m}_weight": point[m] for m in extra}
        rows.append({**row, "threshold": result.threshold, "map5": result.map5, "new_share": result.new_share})
        if best is None or result.map5 > best[1].map5 + 1e-12:
            best = (fusion, result)
    assert best is not None
    return FusionResult(best[0], best[1], pd.DataFrame(rows))
