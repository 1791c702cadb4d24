"""MAP@5, the new_individual rule and exact threshold tuning (whale_ml.retrieval.ranking)."""

from __future__ import annotations

import numpy as np
import pytest

from whale_ml.retrieval.ranking import (
    NEW_INDIVIDUAL,
    collapse_by_individual,
    map_at_5,
    nearest_species,
    predict_top5,
    query_thresholds,
    tune_species_thresholds,
    tune_threshold,
)

NEW = NEW_INDIVIDUAL


def _row(pairs: list[tuple[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    """One query's neighbours as (1, k) sims and ids."""
    ids = np.array([[p[0] for p in pairs]], dtype=object)
    sims = np.array([[p[1] for p in pairs]], dtype=np.float64)
    return sims, ids


# ---------------------------------------------------------------- map_at_5


@pytest.mark.parametrize(
    ("preds", "truth", "score"),
    [
        (["a", "b", "c", "d", "e"], "a", 1.0),
        (["b", "a", "c", "d", "e"], "a", 0.5),
        (["b", "c", "a", "d", "e"], "a", 1 / 3),
        (["b", "c", "d", "a", "e"], "a", 0.25),
        (["b", "c", "d", "e", "a"], "a", 0.2),
        (["b", "c", "d", "e", "f"], "a", 0.0),
        (["b", "c", "d", "e", "f", "a"], "a", 0.0),  # rank 6 does not count
        ([], "a", 0.0),
        ([NEW, "a"], NEW, 1.0),
    ],
)
def test_map_at_5_single_query(preds: list[str], truth: str, score: float) -> None:
    """1/rank of the truth in the first five, 0 when absent."""
    assert map_at_5([preds], [truth]) == pytest.approx(score, abs=1e-15)


def test_map_at_5_only_first_occurrence_counts() -> None:
    """A repeated correct id is counted once, at its first rank."""
    assert map_at_5([["x", "a", "a", "a", "a"]], ["a"]) == pytest.approx(0.5)
    assert map_at_5([["a", "a", "b"]], ["a"]) == pytest.approx(1.0)


def test_map_at_5_mean_over_queries() -> None:
    """The mean over queries, hand-worked: (1 + 1/2 + 1/5 + 0) / 4."""
    preds = [["a", "x"], ["x", "b"], ["x", "y", "z", "w", "c"], ["x", "y"]]
    assert map_at_5(preds, ["a", "b", "c", "d"]) == pytest.approx((1 + 0.5 + 0.2 + 0) / 4, abs=1e-15)


def test_map_at_5_errors() -> None:
    """Mismatched lengths and empty input are errors, not silent zeros."""
    with pytest.raises(ValueError):
        map_at_5([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError):
        map_at_5([["a"]], ["a", "b"])
    with pytest.raises(ValueError):
        map_at_5([], [])


# ---------------------------------------------------------------- collapse_by_individual


def test_collapse_best_similarity_per_individual() -> None:
    """Repeated ids keep their first (best) similarity; padding is '' / -inf."""
    sims, ids = _row([("a", 0.9), ("a", 0.8), ("b", 0.7), ("a", 0.6), ("c", 0.5), ("", -np.inf)])
    out_sims, out_ids, counts = collapse_by_individual(sims, ids)
    assert out_ids.tolist() == [["a", "b", "c", "", ""]]
    np.testing.assert_array_equal(out_sims, [[0.9, 0.7, 0.5, -np.inf, -np.inf]])
    assert counts.tolist() == [3]


# ---------------------------------------------------------------- predict_top5


SIX = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6), ("e", 0.5), ("f", 0.4)]


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.95, [NEW, "a", "b", "c", "d"]),  # above everything: new first
        (0.85, ["a", NEW, "b", "c", "d"]),
        (0.75, ["a", "b", NEW, "c", "d"]),
        (0.65, ["a", "b", "c", NEW, "d"]),
        (0.55, ["a", "b", "c", "d", NEW]),
        (0.45, ["a", "b", "c", "d", "e"]),  # five above: new disappears
        (-1.0, ["a", "b", "c", "d", "e"]),
    ],
)
def test_predict_top5_insertion_rule(threshold: float, expected: list[str]) -> None:
    """Individuals at/above the threshold, then new_individual, then the rest; five kept."""
    sims, ids = _row(SIX)
    assert predict_top5(sims, ids, threshold) == [expected]


def test_predict_top5_threshold_equal_to_similarity_counts_as_above() -> None:
    """'at or above': a similarity equal to the threshold ranks before new_individual."""
    sims, ids = _row(SIX)
    assert predict_top5(sims, ids, 0.7) == [["a", "b", "c", NEW, "d"]]


def test_predict_top5_repeated_ids_collapse() -> None:
    """Several gallery photos of one individual give one entry, at its best similarity."""
    sims, ids = _row([("a", 0.9), ("a", 0.85), ("b", 0.8), ("a", 0.7), ("c", 0.6), ("d", 0.5), ("e", 0.4), ("f", 0.3)])
    assert predict_top5(sims, ids, 0.82) == [["a", NEW, "b", "c", "d"]]
    assert predict_top5(sims, ids, 0.0) == [["a", "b", "c", "d", "e"]]
    # The collapsed individual's later photos (0.85, 0.7) do not count as more individuals above.
    assert predict_top5(sims, ids, 0.65) == [["a", "b", NEW, "c", "d"]]


def test_predict_top5_four_individuals_below_everything_puts_new_fifth() -> None:
    """Threshold below every similarity with exactly four individuals: new_individual is 5th."""
    sims, ids = _row([("a", 0.9), ("b", 0.8), ("a", 0.75), ("c", 0.7), ("d", 0.6)])
    assert predict_top5(sims, ids, -10.0) == [["a", "b", "c", "d", NEW]]


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(0.95, [NEW, "a", "b"]), (0.85, ["a", NEW, "b"]), (0.0, ["a", "b", NEW])],
)
def test_predict_top5_fewer_than_five_individuals(threshold: float, expected: list[str]) -> None:
    """Two individuals: a three-entry list that always holds new_individual; padding ignored."""
    sims, ids = _row([("a", 0.9), ("b", 0.8), ("a", 0.5), ("", -np.inf), ("", -np.inf)])
    assert predict_top5(sims, ids, threshold) == [expected]


def test_predict_top5_ties_between_individuals() -> None:
    """Individuals tied on similarity fall on the same side of the threshold together."""
    sims, ids = _row([("a", 0.9), ("b", 0.7), ("c", 0.7), ("d", 0.5), ("e", 0.4)])
    assert predict_top5(sims, ids, 0.7) == [["a", "b", "c", NEW, "d"]]
    assert predict_top5(sims, ids, 0.70001) == [["a", NEW, "b", "c", "d"]]


def test_predict_top5_several_queries_independent() -> None:
    """Each row gets its own list."""
    sims = np.array([[0.9, 0.2], [0.3, 0.1]])
    ids = np.array([["a", "b"], ["c", "a"]], dtype=object)
    assert predict_top5(sims, ids, 0.5) == [["a", NEW, "b"], [NEW, "c", "a"]]


def test_predict_top5_rejects_unsorted_rows() -> None:
    """Rows must be sorted in descending order, else the rule would be silently wrong."""
    sims = np.array([[0.9, 0.8], [0.5, 0.7]])
    ids = np.array([["a", "b"], ["a", "b"]], dtype=object)
    with pytest.raises(ValueError, match="row 1"):
        predict_top5(sims, ids, 0.5)


def test_predict_top5_rejects_zero_columns() -> None:
    """A query with no neighbour column at all is an error."""
    with pytest.raises(ValueError):
        predict_top5(np.zeros((3, 0)), np.zeros((3, 0), dtype=object), 0.5)


@pytest.mark.parametrize("empty", [-np.inf, np.inf])
def test_predict_top5_rejects_empty_rows(empty: float) -> None:
    """A query row without one finite similarity (e.g. searched in an empty gallery) is an error naming the row."""
    sims = np.array([[0.9, 0.8], [empty, -np.inf], [0.5, 0.4]])
    ids = np.array([["a", "b"], ["", ""], ["a", "b"]], dtype=object)
    with pytest.raises(ValueError, match="row 1 has no neighbour"):
        predict_top5(sims, ids, 0.5)
    with pytest.raises(ValueError, match="row 1 has no neighbour"):
        tune_threshold(sims, ids, ["a", NEW, "b"])


def test_predict_top5_float32_input_same_as_float64() -> None:
    """float32 similarities (faiss's output) are used as they are, without a float64 copy changing a decision."""
    rng = np.random.default_rng(3)
    sims, ids, _, _ = _random_problem(rng, n=30)
    s32 = sims.astype(np.float32)
    t = float(np.median(s32[np.isfinite(s32)]))
    assert predict_top5(s32, ids, t) == predict_top5(s32.astype(np.float64), ids, t)


def test_predict_top5_one_threshold_per_query() -> None:
    """An array of thresholds applies one to each query; its length must match."""
    sims = np.array([[0.9, 0.5], [0.9, 0.5]])
    ids = np.array([["a", "b"], ["a", "b"]], dtype=object)
    assert predict_top5(sims, ids, np.array([0.95, 0.4])) == [[NEW, "a", "b"], ["a", "b", NEW]]
    assert predict_top5(sims, ids, [0.95, 0.4]) == predict_top5(sims, ids, np.array([0.95, 0.4]))
    with pytest.raises(ValueError, match="3 thresholds for 2 queries"):
        predict_top5(sims, ids, np.array([0.1, 0.2, 0.3]))


def test_predict_top5_rejects_nan() -> None:
    """NaN similarities are an error (they would compare false with any threshold)."""
    sims, ids = _row([("a", 0.9), ("b", np.nan)])
    with pytest.raises(ValueError, match="NaN"):
        predict_top5(sims, ids, 0.5)


def test_predict_top5_rejects_shape_mismatch() -> None:
    """Similarities and ids must have the same shape."""
    with pytest.raises(ValueError):
        predict_top5(np.array([[0.9, 0.8]]), np.array([["a"]], dtype=object), 0.5)


# ---------------------------------------------------------------- tune_threshold


def _random_problem(
    rng: np.random.Generator, n: int = 25, k: int = 12, n_ids: int = 9, quantum: float | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Random sorted neighbours, and truths mixing top-5 hits, misses, new and unknown ids."""
    gallery = [f"id{i}" for i in range(n_ids)]
    sims = np.sort(rng.uniform(-0.2, 1.0, size=(n, k)), axis=1)[:, ::-1]
    if quantum is not None:  # many exact ties, within and across rows
        sims = np.round(sims / quantum) * quantum
        sims = np.sort(sims, axis=1)[:, ::-1]
    ids = rng.choice(gallery, size=(n, k)).astype(object)
    # Some padded rows: fewer neighbours than k.
    for q in rng.choice(n, size=max(1, n // 6), replace=False):
        cut = int(rng.integers(1, 4))
        sims[q, cut:] = -np.inf
        ids[q, cut:] = ""
    truths: list[str] = []
    for q in range(n):
        kind = rng.random()
        if kind < 0.25:
            truths.append(NEW)
        elif kind < 0.35:
            truths.append("ghost")  # not in the gallery at all: scored as new
        elif kind < 0.85:
            row = [i for i in ids[q] if i]
            truths.append(str(rng.choice(row)))
        else:
            truths.append(str(rng.choice(gallery)))
    return np.ascontiguousarray(sims), ids, truths, gallery


def _scored_truths(truths: list[str], known: set[str]) -> list[str]:
    return [t if t in known else NEW for t in truths]


def _brute_force_grid(sims: np.ndarray) -> np.ndarray:
    """A dense grid plus every similarity and every midpoint: covers every interval."""
    values = np.unique(sims[np.isfinite(sims)])
    mids = (values[:-1] + values[1:]) / 2
    dense = np.linspace(values.min() - 0.5, values.max() + 0.5, 301)
    return np.unique(np.concatenate([dense, values, mids, [values.max() + 1e-3, values.min() - 1e-3]]))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("quantum", [None, 0.05])
def test_tune_threshold_is_exact_optimum(seed: int, quantum: float | None) -> None:
    """The exact optimum beats every grid threshold, and predict_top5 reproduces it exactly."""
    rng = np.random.default_rng(seed)
    sims, ids, truths, gallery = _random_problem(rng, quantum=quantum)
    use_gallery = seed % 2 == 0
    result = tune_threshold(sims, ids, truths, gallery_ids=gallery if use_gallery else None)
    known = set(gallery) if use_gallery else {i for i in ids.ravel()}
    scored = _scored_truths(truths, known)

    grid = _brute_force_grid(sims)
    grid_scores = np.array([map_at_5(predict_top5(sims, ids, t), scored) for t in grid])
    assert result.map5 >= grid_scores.max() - 1e-12
    # The grid holds a point in every interval, so its best is the optimum itself.
    assert result.map5 == pytest.approx(grid_scores.max(), abs=1e-12)
    # And the chosen threshold really scores what it claims.
    assert map_at_5(predict_top5(sims, ids, result.threshold), scored) == pytest.approx(result.map5, abs=1e-12)
    # The threshold sits strictly between similarities, not on one.
    assert not np.any(sims == result.threshold)


@pytest.mark.parametrize("seed", range(6))
def test_tune_threshold_curve_matches_predict_top5(seed: int) -> None:
    """Every point of the returned curve is what predict_top5 scores at that threshold."""
    rng = np.random.default_rng(100 + seed)
    sims, ids, truths, gallery = _random_problem(rng, n=15, k=8, quantum=0.1 if seed % 2 else None)
    result = tune_threshold(sims, ids, truths, gallery_ids=gallery)
    scored = _scored_truths(truths, set(gallery))
    assert len(result.thresholds) == len(result.map5_curve)
    assert np.all(np.diff(result.thresholds) < 0), "thresholds are one per interval, descending"
    for t, m in zip(result.thresholds, result.map5_curve, strict=True):
        assert map_at_5(predict_top5(sims, ids, float(t)), scored) == pytest.approx(m, abs=1e-12)
    assert result.map5 == pytest.approx(result.map5_curve.max(), abs=1e-12)
    assert result.curve()["map5"].tolist() == result.map5_curve.tolist()
    first = [p[0] for p in predict_top5(sims, ids, result.threshold)]
    assert result.new_share == pytest.approx(np.mean([p == NEW for p in first]))


def test_tune_threshold_unknown_truth_scored_as_new() -> None:
    """A truth absent from gallery_ids counts as new_individual, even if it is a neighbour id."""
    rng = np.random.default_rng(5)
    sims, ids, truths, gallery = _random_problem(rng, n=20)
    # Query 0's truth is its top neighbour, but that id is removed from the gallery.
    truths = list(truths)
    truths[0] = str(ids[0, 0])
    smaller_gallery = [g for g in gallery if g != truths[0]]
    as_new = [t if t in smaller_gallery else NEW for t in truths]
    a = tune_threshold(sims, ids, truths, gallery_ids=smaller_gallery)
    b = tune_threshold(sims, ids, as_new, gallery_ids=smaller_gallery)
    assert a.threshold == b.threshold
    assert a.map5 == b.map5
    np.testing.assert_array_equal(a.map5_curve, b.map5_curve)
    # And it differs from treating that id as known (the curve changes).
    c = tune_threshold(sims, ids, truths, gallery_ids=gallery)
    assert not np.array_equal(a.map5_curve, c.map5_curve)


def test_tune_threshold_default_gallery_is_neighbour_ids() -> None:
    """Without gallery_ids, an id never seen among the neighbours is scored as new."""
    sims, ids = _row([("a", 0.9), ("b", 0.3)])
    r_ghost = tune_threshold(sims, ids, ["ghost"])
    r_new = tune_threshold(sims, ids, [NEW])
    assert r_ghost.map5 == r_new.map5 == 1.0
    assert predict_top5(sims, ids, r_ghost.threshold)[0][0] == NEW


def test_tune_threshold_all_new_validation_set() -> None:
    """When every truth is new, the best threshold puts new_individual first for every query."""
    rng = np.random.default_rng(11)
    sims, ids, _, gallery = _random_problem(rng, n=12)
    truths = [NEW] * len(sims)
    result = tune_threshold(sims, ids, truths, gallery_ids=gallery)
    assert result.map5 == 1.0
    assert result.new_share == 1.0
    assert all(p[0] == NEW for p in predict_top5(sims, ids, result.threshold))


def test_tune_threshold_all_known_top1() -> None:
    """When every truth is each query's top neighbour, the best rule never says new first."""
    rng = np.random.default_rng(12)
    sims, ids, _, gallery = _random_problem(rng, n=12)
    truths = [str(ids[q, 0]) for q in range(len(sims))]
    result = tune_threshold(sims, ids, truths, gallery_ids=gallery)
    assert result.map5 == 1.0
    assert result.new_share == 0.0


def test_tune_threshold_hand_worked() -> None:
    """Two queries: a known id at 0.8 and a new one whose best neighbour is 0.6 -> t in (0.6, 0.8]."""
    sims = np.array([[0.8, 0.1], [0.6, 0.2]])
    ids = np.array([["a", "b"], ["b", "a"]], dtype=object)
    result = tune_threshold(sims, ids, ["a", NEW])
    assert result.map5 == 1.0
    assert 0.6 < result.threshold <= 0.8
    assert predict_top5(sims, ids, result.threshold) == [["a", NEW, "b"], [NEW, "b", "a"]]


def test_tune_threshold_truth_count_mismatch() -> None:
    """One truth per query."""
    sims, ids = _row([("a", 0.9)])
    with pytest.raises(ValueError):
        tune_threshold(sims, ids, ["a", "b"])


def test_tune_threshold_adjacent_float64_similarities() -> None:
    """The documented contract 'predict_top5 at .threshold scores exactly .map5' for adjacent floats."""
    low = 0.5
    high = float(np.nextafter(low, 1.0))
    sims = np.array([[high], [low]])
    ids = np.array([["x"], ["y"]], dtype=object)
    truths = ["x", NEW]  # best interval: (low, high]
    result = tune_threshold(sims, ids, truths)
    assert result.map5 == 1.0
    assert map_at_5(predict_top5(sims, ids, result.threshold), truths) == result.map5


# ---------------------------------------------------------------- per-species thresholds


def test_nearest_species_is_first_neighbours_species() -> None:
    ids = np.array([["a", "b"], ["c", "a"], ["zz", "a"]], dtype=object)
    assert nearest_species(ids, {"a": "humpback", "b": "orca", "c": "orca"}) == ["humpback", "orca", ""]


def test_species_thresholds_hand_worked() -> None:
    """Species x needs a high threshold, species y a low one; one global value cannot serve both.

    x: a known query at 0.9 and a new one at 0.85 -> own threshold in (0.85, 0.9].
    y: a known query at 0.5 and a new one at 0.3 -> own threshold in (0.3, 0.5].
    """
    sims = np.array([[0.9], [0.85], [0.5], [0.3]])
    ids = np.array([["a"], ["b"], ["c"], ["d"]], dtype=object)
    truths = ["a", NEW, "c", NEW]
    species = ["x", "x", "y", "y"]
    result = tune_species_thresholds(sims, ids, truths, species, min_queries=2)
    assert result.map5 == 1.0
    assert result.global_map5 < 1.0
    per_query = result.for_queries(species)
    assert 0.85 < per_query[0] <= 0.9
    assert 0.3 < per_query[2] <= 0.5
    assert len(result.by_species) == 1, "the species the global threshold already serves keeps it"
    assert map_at_5(predict_top5(sims, ids, per_query), truths) == 1.0
    # Too few queries: every species keeps the global threshold.
    fallback = tune_species_thresholds(sims, ids, truths, species, min_queries=3)
    assert fallback.by_species == {}
    assert fallback.map5 == fallback.global_map5
    assert set(fallback.for_queries(["x", "y", "unseen"])) == {fallback.default}


@pytest.mark.parametrize("seed", range(4))
def test_species_thresholds_reproduce_their_map5(seed: int) -> None:
    """The reported MAP@5 is what predict_top5 scores with the per-query thresholds, and never below the global one."""
    rng = np.random.default_rng(200 + seed)
    sims, ids, truths, gallery = _random_problem(rng, n=60)
    species = [["x", "y", "z"][int(i)] for i in rng.integers(0, 3, size=len(sims))]
    result = tune_species_thresholds(sims, ids, truths, species, gallery_ids=gallery, min_queries=15)
    scored = _scored_truths(truths, set(gallery))
    assert result.map5 >= result.global_map5 - 1e-12
    assert map_at_5(predict_top5(sims, ids, result.for_queries(species)), scored) == pytest.approx(result.map5, abs=1e-12)
    assert result.global_map5 == pytest.approx(tune_threshold(sims, ids, truths, gallery_ids=gallery).map5, abs=1e-12)
    assert result.table["queries"].sum() == len(sims)


# ---------------------------------------------------------------- query_thresholds (the rule the submission and whale identify use)


def _brute_force_query_thresholds(
    ids: np.ndarray, species_of: dict[str, str], threshold: float, by_species: dict[str, float]
) -> list[float]:
    """Row by row: the species of the first neighbour, its own threshold if tuned, else the global one."""
    out = []
    for row in ids:
        species = species_of[row[0]] if row[0] in species_of else None
        out.append(by_species[species] if species in by_species else threshold)
    return out


def test_query_thresholds_hand_worked() -> None:
    """Nearest individual a (humpback, tuned) -> 0.8; b (orca, not tuned) and an unknown id -> global 0.5."""
    ids = np.array([["a", "b"], ["b", "a"], ["zz", "a"], ["a", ""]], dtype=object)
    species_of = {"a": "humpback", "b": "orca"}
    got = query_thresholds(ids, species_of, 0.5, {"humpback": 0.8, "beluga": 0.1})
    assert got.dtype == np.float64 and got.tolist() == [0.8, 0.5, 0.5, 0.8]
    # Only the first neighbour decides: a tuned species further down the row changes nothing.
    assert query_thresholds(np.array([["b", "a", "a"]], dtype=object), species_of, 0.5, {"humpback": 0.8}).tolist() == [0.5]


@pytest.mark.parametrize("by_species", [None, {}])
def test_query_thresholds_without_species_thresholds_is_the_global_one(by_species: dict[str, float] | None) -> None:
    ids = np.array([["a"], ["b"], ["zz"]], dtype=object)
    assert query_thresholds(ids, {"a": "x", "b": "y"}, 0.3, by_species).tolist() == [0.3, 0.3, 0.3]


def test_query_thresholds_no_queries() -> None:
    got = query_thresholds(np.empty((0, 5), dtype=object), {"a": "x"}, 0.3, {"x": 0.9})
    assert got.shape == (0,) and got.dtype == np.float64


@pytest.mark.parametrize("seed", range(6))
def test_query_thresholds_matches_brute_force(seed: int) -> None:
    """Random neighbour ids (some unknown to species_of, some padded rows) and random tuned species."""
    rng = np.random.default_rng(300 + seed)
    _, ids, _, gallery = _random_problem(rng, n=40)
    species_names = ["x", "y", "z", "w"]
    known = gallery[: len(gallery) - 2]  # the last two ids have no species
    species_of = {g: str(rng.choice(species_names)) for g in known}
    tuned = [s for s in species_names if rng.random() < 0.5]
    by_species = {s: float(rng.uniform(-0.2, 1.0)) for s in tuned}
    threshold = float(rng.uniform(-0.2, 1.0))
    got = query_thresholds(ids, species_of, threshold, by_species)
    assert got.tolist() == _brute_force_query_thresholds(ids, species_of, threshold, by_species)


@pytest.mark.parametrize("seed", [1, 2, 3])  # seeds where some species gets its own threshold
def test_query_thresholds_apply_what_species_tuning_scored(seed: int) -> None:
    """Tuned on validation queries grouped by nearest_species, the thresholds production applies through
    query_thresholds are the tuner's own per query, and predict_top5 with them scores the tuner's MAP@5;
    each query's prediction is the one a scalar threshold gives that query alone."""
    rng = np.random.default_rng(400 + seed)
    sims, ids, truths, gallery = _random_problem(rng, n=60)
    species_of = {g: ["x", "y", "z"][i % 3] for i, g in enumerate(gallery)}
    species = nearest_species(ids, species_of)
    tuned = tune_species_thresholds(sims, ids, truths, species, gallery_ids=gallery, min_queries=10)
    assert tuned.by_species, "a species with its own threshold, or the test shows nothing"
    applied = query_thresholds(ids, species_of, tuned.default, tuned.by_species)
    assert applied.tolist() == tuned.for_queries(species).tolist()
    predictions = predict_top5(sims, ids, applied)
    assert map_at_5(predictions, _scored_truths(truths, set(gallery))) == pytest.approx(tuned.map5, abs=1e-12)
    for q in range(len(sims)):
        assert predictions[q] == predict_top5(sims[q : q + 1], ids[q : q + 1], float(applied[q]))[0]
