"""Calibrated fusion of embedding and local-feature scores (whale_ml/retrieval/fusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from whale_ml.retrieval.fusion import Calibration, Fusion, NotCalibratable, fused_ranking, tune_fusion, tune_weight
from whale_ml.retrieval.ranking import map_at_5, predict_top5, tune_threshold


def test_calibration_is_monotone_and_a_probability():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    same = rng.random(400) < 1 / (1 + np.exp(-3 * x))
    cal = Calibration.fit(x, same)
    grid = np.linspace(-4, 4, 101)
    p = cal(grid)
    assert cal.slope > 0 and np.all(np.diff(p) > 0) and p.min() > 0 and p.max() < 1
    # Evidence that falls as the truth rises is not used: a constant at the base rate.
    inverted = Calibration.fit(-x, same)
    assert inverted.slope == 0.0
    assert np.allclose(inverted(grid), same.mean())
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_calibration_needs_both_classes():
    with pytest.raises(NotCalibratable, match="both same and different"):
        Calibration.fit(np.arange(3.0), np.ones(3, bool))


# A hand-worked case. Calibrations: P_global(s) = sigmoid(10 s - 5), P_local(e) = sigmoid(2 e - 2),
# e = log1p(inliers). Query 1 (truth a): a has s=0.5 and e=2 (0.5 and 0.881), b has s=0.6 and
# e=0 (0.731 and 0.119). a outranks b when 0.5 + 0.381 w > 0.731 - 0.612 w, i.e. w > 0.2326.
# Query 2 (truth new): its one candidate c (s=0.2, e=0) fuses below 0.12 at any weight, so a
# threshold between it and query 1's scores answers it "new" first. MAP@5: 0.75 (1/2 + 1) / 2
# for w <= 0.2326, 1.0 above; on the grid 0, 0.05, ..., 1 the smallest such weight is 0.25.
G, L = Calibration(10.0, -5.0), Calibration(2.0, -2.0)
SIMS = np.array([[0.6, 0.5], [0.2, -np.inf]])
IDS = np.array([["b", "a"], ["c", ""]], dtype=object)
INLIERS = np.array([[0, np.e**2 - 1], [0, 0]])
TRUTHS = ["a", "new_individual"]


def test_weight_tuning_exact_on_a_hand_worked_case():
    result = tune_weight(SIMS, IDS, INLIERS, TRUTHS, ["a", "b", "c"], G, L, weights=21)
    assert result.fusion.weight == pytest.approx(0.25)
    assert result.threshold.map5 == pytest.approx(1.0)
    table = result.table.set_index("weight")["map5"]
    assert table[table.index <= 0.2326].eq(0.75).all() and table[table.index > 0.2326].eq(1.0).all()
    # The chosen threshold, applied as the submission applies it, scores what tuning said.
    scores, ranked = fused_ranking(SIMS, IDS, INLIERS, result.fusion)
    assert map_at_5(predict_top5(scores, ranked, result.threshold.threshold), TRUTHS) == pytest.approx(1.0)


def test_without_local_evidence_fusion_is_the_plain_threshold():
    rng = np.random.default_rng(1)
    n, k = 300, 6
    ids = np.array([[f"i{(q + j) % 40}" for j in range(k)] for q in range(n)], dtype=object)
    sims = -np.sort(-rng.random((n, k)), axis=1)
    truths = [ids[q, 0] if rng.random() < 0.6 else ("new_individual" if rng.random() < 0.5 else ids[q, 1]) for q in range(n)]
    noise = rng.integers(0, 30, size=(n, k))  # inliers unrelated to the truth
    result = tune_fusion(sims, ids, noise, truths, [f"i{i}" for i in range(40)], weights=11)
    plain = tune_threshold(sims, ids, truths, gallery_ids=[f"i{i}" for i in range(40)])
    assert result.threshold.map5 >= plain.map5 - 1e-12
    w0 = result.table.iloc[0]
    assert w0["weight"] == 0.0 and w0["map5"] == pytest.approx(plain.map5)


def test_fused_scores_keep_padding_last():
    fusion = Fusion(0.5, G, L)
    scores, ranked = fused_ranking(SIMS, IDS, INLIERS, fusion)
    assert np.isneginf(scores[1, 1]) and ranked[1, 1] == ""
    assert Fusion.from_dict(fusion.to_dict()) == fusion
