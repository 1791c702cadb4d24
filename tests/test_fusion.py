"""Calibrated fusion of embedding and local-feature scores (whale_ml/retrieval/fusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from whale_ml.retrieval.fusion import Calibration, Fusion, NotCalibratable, fused_ranking, tune_fusion, tune_weights
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
    result = tune_weights(SIMS, IDS, TRUTHS, ["a", "b", "c"], {"global": G, "local": L}, weights=21, inliers=INLIERS)
    assert result.fusion.local_weight == pytest.approx(0.25)
    assert result.threshold.map5 == pytest.approx(1.0)
    table = result.table.set_index("local_weight")["map5"]
    assert table[table.index <= 0.2326].eq(0.75).all() and table[table.index > 0.2326].eq(1.0).all()
    # The chosen threshold, applied as the submission applies it, scores what tuning said.
    scores, ranked = fused_ranking(SIMS, IDS, INLIERS, result.fusion)
    assert map_at_5(predict_top5(scores, ranked, result.threshold.threshold), TRUTHS) == pytest.approx(1.0)


def _random_lists(seed: int) -> tuple[np.random.Generator, int, int, np.ndarray, np.ndarray, list[str]]:
    """300 queries' 6 candidates among 40 individuals, descending similarities, and truths:
    the first candidate 60% of the time, else new or the second candidate."""
    rng = np.random.default_rng(seed)
    n, k = 300, 6
    ids = np.array([[f"i{(q + j) % 40}" for j in range(k)] for q in range(n)], dtype=object)
    sims = -np.sort(-rng.random((n, k)), axis=1)
    truths = [ids[q, 0] if rng.random() < 0.6 else ("new_individual" if rng.random() < 0.5 else ids[q, 1]) for q in range(n)]
    return rng, n, k, ids, sims, truths


def test_without_local_evidence_fusion_is_the_plain_threshold():
    rng, n, k, ids, sims, truths = _random_lists(1)
    noise = rng.integers(0, 30, size=(n, k))  # inliers unrelated to the truth
    result = tune_fusion(sims, ids, noise, truths, [f"i{i}" for i in range(40)], weights=11)
    plain = tune_threshold(sims, ids, truths, gallery_ids=[f"i{i}" for i in range(40)])
    assert result.threshold.map5 >= plain.map5 - 1e-12
    w0 = result.table.iloc[0]
    assert w0["local_weight"] == 0.0 and w0["map5"] == pytest.approx(plain.map5)


def test_fused_scores_keep_padding_last():
    fusion = Fusion.of({"global": G, "local": L}, local=0.5)
    scores, ranked = fused_ranking(SIMS, IDS, INLIERS, fusion)
    assert np.isneginf(scores[1, 1]) and ranked[1, 1] == ""
    assert Fusion.from_dict(fusion.to_dict()) == fusion


# Three matchers, hand-worked. P_centre(c) = sigmoid(10 c - 5), like P_global.
# Query 1 (truth a): b (s=0.6, no inliers, centre 0.5) ahead of a (s=0.5, e=log1p(inliers)=2,
# centre 0.5): equal centres, so only local evidence can lift a: a first iff
#   w_local (P_L(2) - P_L(0)) > w_global (P_G(0.6) - P_G(0.5)).
# Query 2 (truth d): e (s=0.6, centre 0.3) ahead of d (s=0.5, centre 0.7), one inlier each: d first iff
#   w_centre (P_C(0.7) - P_C(0.3)) > w_global (P_G(0.6) - P_G(0.5)).
# Query 3 (truth new): one candidate f, no inliers, below each query's truth in every matcher, so a threshold
# answers it "new" while queries 1 and 2 keep their first candidate: each of them scores 1 when
# its truth is first, 1/2 when second. MAP@5 = (m1 + m2 + 1) / 3, and 1 needs both matchers.
# Both conditions read w > 0.3035 w_global; on the 0.05 grid the largest w_global that meets
# them is 0.6, with w_local = w_centre = 0.2 (0.15 + 0.25 fails query 1).
C = Calibration(10.0, -5.0)
SIMS3 = np.array([[0.6, 0.5], [0.6, 0.5], [0.2, -np.inf]])
IDS3 = np.array([["b", "a"], ["e", "d"], ["f", ""]], dtype=object)
INLIERS3 = np.array([[0, np.e**2 - 1], [1, 1], [0, 0]])
CENTRES3 = np.array([[0.5, 0.5], [0.3, 0.7], [0.2, np.nan]])
TRUTHS3 = ["a", "d", "new_individual"]
CALS3 = {"global": G, "local": L, "centre": C}


def _expected_map5(w: dict[str, float]) -> float:
    gap = w["global"] * (G(0.6) - G(0.5))
    m1 = 1.0 if w["local"] * (L(2.0) - L(0.0)) > gap else 0.5
    m2 = 1.0 if w["centre"] * (C(0.7) - C(0.3)) > gap else 0.5
    return (m1 + m2 + 1.0) / 3


def test_three_matcher_weights_exact_on_a_hand_worked_case():
    from whale_ml.retrieval.fusion import tune_weights, weight_grid

    grid = weight_grid(["global", "local", "centre"], 21)
    assert len(grid) == 231  # every point of the 0.05 grid on the simplex
    assert all(abs(sum(p.values()) - 1) < 1e-12 and min(p.values()) >= 0 for p in grid)
    result = tune_weights(SIMS3, IDS3, TRUTHS3, ["a", "b", "d", "e", "f"], CALS3, 21, INLIERS3, CENTRES3)
    assert result.fusion.weights == pytest.approx({"global": 0.6, "local": 0.2, "centre": 0.2})
    assert result.threshold.map5 == pytest.approx(1.0)
    # Every grid point's MAP@5 is the hand-worked one.
    for row in result.table.itertuples():
        w = {"local": row.local_weight, "centre": row.centre_weight}
        w["global"] = 1 - w["local"] - w["centre"]
        assert row.map5 == pytest.approx(_expected_map5(w)), w
    # Applied as the submission applies it, the chosen threshold scores what tuning said.
    scores, ranked = fused_ranking(SIMS3, IDS3, INLIERS3, result.fusion, CENTRES3)
    assert map_at_5(predict_top5(scores, ranked, result.threshold.threshold), TRUTHS3) == pytest.approx(1.0)
    assert Fusion.from_dict(result.fusion.to_dict()) == result.fusion


def test_centre_alone_and_its_smallest_helpful_weight():
    from whale_ml.retrieval.fusion import tune_weights

    # Without local evidence only query 2 can be fixed: w_centre (P_C(0.7) - P_C(0.3)) > (1 - w_centre) 0.2311,
    # i.e. w_centre > 0.2328: 0.25 is the smallest grid weight that does it.
    result = tune_weights(SIMS3, IDS3, TRUTHS3, ["a", "b", "d", "e", "f"], {"global": G, "centre": C}, 21, centre_sims=CENTRES3)
    assert result.fusion.weights == pytest.approx({"global": 0.75, "centre": 0.25})
    assert result.threshold.map5 == pytest.approx(2.5 / 3)
    assert list(result.table.columns[:1]) == ["centre_weight"] and len(result.table) == 21


def test_a_missing_centre_scores_the_candidate_by_its_photos():
    fusion = Fusion.of({"global": G, "centre": C}, centre=0.4)
    with_centre = fusion.scores(np.array([[0.5]]), centre_sims=np.array([[0.5]]))
    missing = fusion.scores(np.array([[0.5]]), centre_sims=np.array([[np.nan]]))
    assert missing[0, 0] == pytest.approx(G(0.5)) and with_centre[0, 0] == pytest.approx(0.6 * G(0.5) + 0.4 * C(0.5))
    with pytest.raises(ValueError, match="class-centre"):
        fusion.scores(np.array([[0.5]]))
    # Tuned out (weight 0), the centres are not needed: what the submission reads then.
    tuned_out = Fusion({"global": 0.8, "local": 0.2, "centre": 0.0}, {"global": G, "local": L, "centre": C})
    assert tuned_out.scores(SIMS, INLIERS) == pytest.approx(Fusion.of({"global": G, "local": L}, local=0.2).scores(SIMS, INLIERS))


def test_uninformative_centres_get_no_weight():
    rng, n, k, ids, sims, truths = _random_lists(2)
    known = [f"i{i}" for i in range(40)]
    noise = rng.integers(0, 30, size=(n, k))
    two = tune_fusion(sims, ids, noise, truths, known, weights=11)
    three = tune_fusion(sims, ids, noise, truths, known, weights=11, centre_sims=rng.random((n, k)))
    assert three.threshold.map5 >= two.threshold.map5 - 1e-12  # the grid holds every two-matcher point
    zero = three.table[three.table["centre_weight"] == 0].reset_index(drop=True)
    assert np.allclose(zero["map5"].to_numpy(), two.table["map5"].to_numpy())


def test_a_fusion_reads_back_what_it_stored():
    fusion = Fusion.of({"global": G, "local": L}, local=0.25)
    assert Fusion.from_dict(fusion.to_dict()) == fusion
    assert fusion.weights == {"global": 0.75, "local": 0.25} and fusion.local_weight == 0.25 and fusion.centre_weight == 0
