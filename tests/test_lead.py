"""The new_individual decision from the first candidate's lead over the second
(whale_ml.retrieval.lead, ranking.decision_scores): the rule by hand, exact tuning
per weight against brute force, and weight 0 as the plain rule to the last bit."""

from __future__ import annotations

import numpy as np
import pytest

from whale_ml.retrieval.lead import LEAD_WEIGHTS, check_lead_weights, tune_lead
from whale_ml.retrieval.ranking import (
    NEW_INDIVIDUAL,
    collapse_by_individual,
    decision_scores,
    map_at_5,
    predict_top5,
    query_thresholds,
    tune_species_thresholds,
    tune_threshold,
)
from whale_ml.stage_configs import ThresholdConfig

NEW = NEW_INDIVIDUAL

# A known query whose best match stands clear of the next, and a new one between two
# look-alikes with a higher best score: no threshold on s1 alone answers both right.
SIMS = np.array([[0.80, 0.40], [0.85, 0.83]])
IDS = np.array([["a", "b"], ["c", "d"]], dtype=object)
TRUTHS = ["a", NEW]
GALLERY = ["a", "b", "c", "d"]


def test_decision_scores_hand_worked() -> None:
    sims = np.array([[0.9, 0.5, 0.4], [0.7, -np.inf, -np.inf], [0.3, 0.3, 0.1]])
    d = decision_scores(sims, 0.5)
    np.testing.assert_array_equal(d[:, 0], [0.9 + 0.5 * 0.4, 0.7, 0.3])  # one candidate: no lead; a tie: none
    np.testing.assert_array_equal(d[:, 1:], sims[:, 1:])  # only the first candidate's score changes
    assert decision_scores(sims, 0.0) is sims  # the plain rule is the scores themselves
    assert decision_scores(sims[:, :1], 3.0)[0, 0] == 0.9  # lists of one candidate
    for bad in (-0.1, np.nan, np.inf):
        with pytest.raises(ValueError, match="lead weight"):
            decision_scores(sims, bad)


def test_predict_top5_with_lead_by_hand() -> None:
    # t = 0.88: plain, both are below it; with weight 1, d = 1.2 and 0.87 -> only the second is new.
    assert predict_top5(SIMS, IDS, 0.88) == [[NEW, "a", "b"], [NEW, "c", "d"]]
    assert predict_top5(SIMS, IDS, 0.88, lead_weight=1.0) == [["a", NEW, "b"], [NEW, "c", "d"]]
    # Known first: later candidates keep the plain rule (b >= 0.3 ranks before new_individual).
    assert predict_top5(SIMS, IDS, 0.3, lead_weight=1.0) == [["a", "b", NEW], ["c", "d", NEW]]
    # Equal counts as above, as for the plain rule: d = 0.8 + 0.25 * 0.4 = 0.9 exactly.
    assert predict_top5(SIMS[:1], IDS[:1], 0.9, lead_weight=0.25)[0][0] == "a"


def test_lead_strictly_beats_the_plain_threshold_hand_worked() -> None:
    """Plain: the best is t above 0.85 (both new first: (1/2 + 1) / 2 = 0.75). With any weight
    the known query's decision score passes the new one's: MAP@5 1, at the smallest weight."""
    plain = tune_threshold(SIMS, IDS, TRUTHS, gallery_ids=GALLERY)
    assert plain.map5 == pytest.approx(0.75, abs=1e-15)
    result = tune_lead(SIMS, IDS, TRUTHS, gallery_ids=GALLERY, weights=[4.0, 1.0, 0.25])
    assert result.weight == 0.25 and result.threshold.map5 == 1.0 and result.plain.map5 == plain.map5
    # d = 0.9 and 0.855: the midpoint of the best interval (0.855, 0.9].
    assert result.threshold.threshold == pytest.approx((0.9 + 0.855) / 2, abs=1e-12)
    assert result.threshold.new_share == 0.5
    assert result.table["weight"].tolist() == [0.0, 0.25, 1.0, 4.0]
    assert result.table["map5"].tolist() == [0.75, 1.0, 1.0, 1.0]
    preds = predict_top5(SIMS, IDS, result.threshold.threshold, lead_weight=result.weight)
    assert preds == [["a", NEW, "b"], [NEW, "c", "d"]] and map_at_5(preds, TRUTHS) == 1.0


def test_lead_kept_at_zero_when_it_does_not_help() -> None:
    # Both queries known: a plain threshold below every score is already perfect.
    result = tune_lead(SIMS, IDS, ["a", "c"], gallery_ids=GALLERY)
    assert result.weight == 0.0 and result.threshold.map5 == 1.0


def _random_problem(rng: np.random.Generator, n: int = 40, k: int = 7, individuals: int = 9) -> tuple:
    """Lists with repeated ids (several photos per individual), ties, and new queries."""
    sims = -np.sort(-np.round(rng.uniform(-0.2, 1.0, (n, k)), 2), axis=1)
    ids = rng.choice([f"i{j}" for j in range(individuals)], size=(n, k)).astype(object)
    gallery = [f"i{j}" for j in range(individuals - 2)]  # two ids in the lists are not known
    truths = [str(ids[q, rng.integers(0, 3)]) if rng.random() < 0.7 else NEW for q in range(n)]
    return sims, ids, truths, gallery


def _scored(truths: list[str], gallery: list[str]) -> list[str]:
    return [t if t in set(gallery) else NEW for t in truths]


@pytest.mark.parametrize("seed", range(6))
def test_weight_zero_is_the_plain_rule_to_the_last_bit(seed: int) -> None:
    sims, ids, truths, gallery = _random_problem(np.random.default_rng(seed))
    plain = tune_threshold(sims, ids, truths, gallery_ids=gallery)
    zero = tune_lead(sims, ids, truths, gallery_ids=gallery, weights=[0.0])
    assert zero.weight == 0.0 and zero.threshold.threshold == plain.threshold and zero.threshold.map5 == plain.map5
    np.testing.assert_array_equal(zero.threshold.map5_curve, plain.map5_curve)
    np.testing.assert_array_equal(zero.threshold.thresholds, plain.thresholds)
    for t in plain.thresholds:
        assert predict_top5(sims, ids, float(t), lead_weight=0.0) == predict_top5(sims, ids, float(t))


@pytest.mark.parametrize("seed", range(6))
def test_each_weight_is_tuned_exactly(seed: int) -> None:
    """At every weight the threshold is the best of a grid holding a point in every interval of
    the decision scores, predict_top5 reproduces its MAP@5, and the weight chosen is the best."""
    sims, ids, truths, gallery = _random_problem(np.random.default_rng(10 + seed))
    scored = _scored(truths, gallery)
    result = tune_lead(sims, ids, truths, gallery_ids=gallery, weights=LEAD_WEIGHTS)
    collapsed, _, _ = collapse_by_individual(sims, ids)
    best_by_weight = []
    for row in result.table.itertuples():
        values = np.unique(decision_scores(collapsed, row.weight)[np.isfinite(collapsed)])
        grid = np.concatenate([values, (values[:-1] + values[1:]) / 2, [values[0] - 1, values[-1] + 1]])
        brute = max(map_at_5(predict_top5(sims, ids, float(t), lead_weight=row.weight), scored) for t in grid)
        assert row.map5 == pytest.approx(brute, abs=1e-12)
        assert map_at_5(predict_top5(sims, ids, row.threshold, lead_weight=row.weight), scored) == pytest.approx(row.map5, abs=1e-12)
        best_by_weight.append(brute)
    assert result.threshold.map5 == pytest.approx(max(best_by_weight), abs=1e-12)
    assert result.weight == min(w for w, m in zip(result.table["weight"], best_by_weight, strict=True) if m >= max(best_by_weight) - 1e-12)
    first = [p[0] for p in predict_top5(sims, ids, result.threshold.threshold, lead_weight=result.weight)]
    assert result.threshold.new_share == pytest.approx(np.mean([p == NEW for p in first]))


@pytest.mark.parametrize("seed", range(3))
def test_species_thresholds_on_the_decision_score(seed: int) -> None:
    """Per-species thresholds at a lead weight: what they score is what the rule gives."""
    rng = np.random.default_rng(20 + seed)
    sims, ids, truths, gallery = _random_problem(rng, n=60)
    species_of = {f"i{j}": ("orca" if j % 2 else "beluga") for j in range(9)}
    collapsed_ids = collapse_by_individual(sims, ids)[1]
    species = [species_of[i] for i in collapsed_ids[:, 0]]
    tuned = tune_species_thresholds(sims, ids, truths, species, gallery_ids=gallery, min_queries=5, lead_weight=1.0)
    thresholds = query_thresholds(collapsed_ids, species_of, tuned.default, tuned.by_species)
    preds = predict_top5(sims, ids, thresholds, lead_weight=1.0)
    assert map_at_5(preds, _scored(truths, gallery)) == pytest.approx(tuned.map5, abs=1e-12)
    assert tuned.global_map5 == pytest.approx(tune_threshold(sims, ids, truths, gallery_ids=gallery, lead_weight=1.0).map5, abs=1e-15)


@pytest.mark.parametrize("bad", [[], [-1.0], [0.0, float("nan")], [float("inf")]])
def test_bad_lead_weights_are_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="lead weight"):
        check_lead_weights(bad)
    with pytest.raises(ValueError, match="lead_weights"):
        ThresholdConfig(lead_weights=bad)
