"""The new_individual decision from the first candidate's lead over the second.

A query of a known individual usually finds it well ahead of everyone else; a new
individual's best match is often one of several look-alikes at about the same score.
So the decision "is the first candidate known?" compares

    d = s1 + lead_weight * (s1 - s2)

with the threshold instead of ``s1`` alone (``s1``, ``s2``: the first two candidates'
scores, after any fusion; :func:`~whale_ml.retrieval.ranking.decision_scores`). The
weight is chosen out of fold with the threshold, as the fusion weight is: for each
weight on a small grid the exact best threshold on ``d``
(:func:`~whale_ml.retrieval.ranking.tune_threshold`, every distinct value); the best
pair wins, the smallest weight among equally good ones, so a weight of 0 -- the plain
rule, exactly -- is kept wherever the lead does not help.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from whale_ml.retrieval.ranking import ThresholdResult, known_truths, tune_collapsed, collapse_by_individual, decision_scores

# Leads are on the scores' own scale (cosines, or fused probabilities), like the scores:
# weights from a quarter to four times the lead, and 0 (the plain rule).
LEAD_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class LeadResult:
    """The chosen weight, the exact best threshold at it, and each weight's best."""

    weight: float
    threshold: ThresholdResult  # on the decision score at ``weight``
    plain: ThresholdResult  # weight 0 (the plain rule), for comparison
    table: pd.DataFrame = field(repr=False)  # per weight: its best threshold, MAP@5, new share


def check_lead_weights(weights: Sequence[float]) -> np.ndarray:
    """The weights as a sorted array; an error naming them unless non-empty, finite and >= 0."""
    grid = np.asarray(list(weights), dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0 or not np.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"lead weight must be a non-empty list of finite numbers >= 0, got {list(weights)}")
    return np.unique(grid)


def tune_lead(
    similarities: np.ndarray,
    neighbor_ids: np.ndarray,
    truths: Sequence[str],
    gallery_ids: Sequence[str] | None = None,
    weights: Sequence[float] = LEAD_WEIGHTS,
) -> LeadResult:
    """The lead weight and new_individual threshold that maximise MAP@5.

    Args:
        similarities: (n, k) scores sorted descending per row (the fused ones when
            re-ranked): what the rule ranks by.
        neighbor_ids: (n, k) the gallery individual of each.
        truths: per query, its individual id or ``"new_individual"``.
        gallery_ids: the known individuals (a truth outside them scores as new);
            default: every id in ``neighbor_ids``.
        weights: the weights tried (0 is always tried too, as the baseline).

    Returns:
        The smallest weight among the best; ``predict_top5(..., threshold, lead_weight=weight)``
        scores exactly ``.threshold.map5``.
    """
    grid = check_lead_weights([0.0, *weights])
    sims, ids, _ = collapse_by_individual(similarities, neighbor_ids)
    truths_arr = known_truths(truths, len(sims), neighbor_ids, gallery_ids)
    rows, results = [], []
    for w in grid:
        result = tune_collapsed(decision_scores(sims, float(w)), ids, truths_arr)
        rows.append({"weight": float(w), "threshold": result.threshold, "map5": result.map5, "new_share": result.new_share})
        results.append(result)
    best = 0
    for i, result in enumerate(results):
        if result.map5 > results[best].map5 + 1e-12:  # ascending weights: ties keep the smaller
            best = i
    return LeadResult(float(grid[best]), results[best], results[0], pd.DataFrame(rows))
