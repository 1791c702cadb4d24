"""Out-of-fold threshold tuning (whale_ml.retrieval.threshold) against a brute-force oracle:
every fold's validation photos scored by hand-written search, new_individual rule and
MAP@5 at every threshold that can change an answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whale_ml.data.folds import make_folds
from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.retrieval.store import save_embeddings
from whale_ml.retrieval.matcher import Matcher, TunedMatcher
from whale_ml.retrieval.threshold import tune_out_of_fold
from whale_ml.stage_configs import ThresholdConfig

FOLDS = ["fold0", "fold1", "fold2"]


def plain(**settings: object) -> ThresholdConfig:
    """Tuning on the embedding similarity alone (no local features, no class centres here)."""
    return ThresholdConfig(rerank=False, class_centres=False, **settings)


def _home(tmp_path: Path, seed: int) -> tuple[pd.DataFrame, object]:
    """cv_folds of 30 individuals (1-4 photos, two species) and each fold model's
    embeddings of every photo: the individual's centre plus noise, different per fold."""
    rng = np.random.default_rng(seed)
    rows = [(f"i{i:02d}_{j}.jpg", f"i{i:02d}", "sp_a" if i % 2 else "sp_b") for i in range(30) for j in range(int(rng.integers(1, 5)))]
    cv = make_folds(pd.DataFrame(rows, columns=["image", "individual_id", "species"]), len(FOLDS), seed=seed)
    centres = {ind: rng.normal(size=8) for ind in cv["individual_id"].unique()}
    for fold in FOLDS:
        shuffled = cv.sample(frac=1.0, random_state=int(rng.integers(1 << 30)))  # files in another order than cv_folds
        emb = np.stack([centres[ind] + rng.normal(scale=0.8, size=8) for ind in shuffled["individual_id"]])
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        save_embeddings(tmp_path / fold, "train", emb, shuffled["image"].tolist())
    return cv, lambda fold: tmp_path / fold


def _oracle_fold(cv: pd.DataFrame, folder: Path, i: int) -> tuple[list[list[tuple[str, float]]], list[str], set[str]]:
    """One fold by hand: each validation photo's five best individuals (best similarity
    each, float64 cosine over every training photo) and its truth."""
    emb = np.load(folder / "train.npy").astype(np.float64)
    images = pd.read_csv(folder / "train_images.csv")["image"].tolist()
    vec = dict(zip(images, emb, strict=True))
    train, val = cv[cv["fold"] != i], cv[cv["fold"] == i]
    known = set(train["individual_id"])
    lists, truths = [], []
    for image, ind in zip(val["image"], val["individual_id"], strict=True):
        best: dict[str, float] = {}
        for g_image, g_ind in zip(train["image"], train["individual_id"], strict=True):
            sim = float(vec[image] @ vec[g_image])
            best[g_ind] = max(best.get(g_ind, -np.inf), sim)
        lists.append(sorted(best.items(), key=lambda kv: -kv[1])[:5])
        truths.append(ind if ind in known else NEW_INDIVIDUAL)
    return lists, truths, known


def _score(ranked: list[tuple[str, float]], truth: str, threshold: float) -> float:
    """MAP@5 of one photo: the individuals at or above the threshold, then new_individual, then the rest."""
    above = [ind for ind, sim in ranked if sim >= threshold]
    preds = ([*above, NEW_INDIVIDUAL] + [ind for ind, sim in ranked if sim < threshold])[:5]
    return 1.0 / (preds.index(truth) + 1) if truth in preds else 0.0


def _map5(lists: list, truths: list[str], thresholds: list[float]) -> float:
    return float(np.mean([_score(r, t, th) for r, t, th in zip(lists, truths, thresholds, strict=True)]))


def _best(lists: list, truths: list[str]) -> float:
    """The best MAP@5 over every threshold: the answers change only at a similarity."""
    cuts = {np.inf} | {sim for ranked in lists for _, sim in ranked}
    return max(_map5(lists, truths, [t] * len(truths)) for t in cuts)


@pytest.mark.parametrize("seed", range(4))
def test_tune_out_of_fold_is_the_pooled_optimum(tmp_path: Path, seed: int) -> None:
    cv, embeddings_dir = _home(tmp_path, seed)
    tuned = tune_out_of_fold(cv, embeddings_dir, FOLDS, plain())
    lists, truths = [], []
    for i, fold in enumerate(FOLDS):
        fold_lists, fold_truths, _ = _oracle_fold(cv, tmp_path / fold, i)
        (row,) = [r for r in tuned.per_fold if r["fold"] == fold]
        assert row["queries"] == len(fold_truths)
        assert row["best_map5"] == pytest.approx(_best(fold_lists, fold_truths), abs=1e-9)
        assert _map5(fold_lists, fold_truths, [row["best_threshold"]] * len(fold_truths)) == pytest.approx(row["best_map5"], abs=1e-9)
        lists += fold_lists
        truths += fold_truths
    assert tuned.truths == truths and tuned.queries == len(truths) == int((cv["fold"] >= 0).sum())
    assert tuned.result.map5 == pytest.approx(_best(lists, truths), abs=1e-9)
    assert _map5(lists, truths, [tuned.result.threshold] * len(truths)) == pytest.approx(tuned.result.map5, abs=1e-9)
    assert tuned.result.new_share == pytest.approx(np.mean([r[0][1] < tuned.result.threshold for r in lists]))
    assert [[ind for ind in row if ind] for row in tuned.ids.tolist()] == [[ind for ind, _ in r] for r in lists]
    assert tuned.species is None and tuned.map5 == tuned.result.map5
    assert tuned.matcher == Matcher(tuned.result.threshold, {}, 50, None, None, 5, 0.0)
    stored = tuned.tuned()
    assert TunedMatcher.from_dict(stored.to_dict()) == stored  # what is stored reads back the same
    assert stored.map5 == tuned.result.map5 and stored.queries == len(truths) and stored.without == {}


@pytest.mark.parametrize("seed", range(3))
def test_per_species_thresholds_are_each_species_optimum(tmp_path: Path, seed: int) -> None:
    cv, embeddings_dir = _home(tmp_path, seed)
    tuned = tune_out_of_fold(cv, embeddings_dir, FOLDS, plain(per_species=True, species_min_queries=3))
    species_of = dict(zip(cv["individual_id"], cv["species"], strict=True))
    lists, truths = [], []
    for i, fold in enumerate(FOLDS):
        fold_lists, fold_truths, _ = _oracle_fold(cv, tmp_path / fold, i)
        lists += fold_lists
        truths += fold_truths
    group = [species_of[ranked[0][0]] for ranked in lists]  # the nearest individual's species
    thresholds = [tuned.species.by_species.get(g, tuned.result.threshold) for g in group]
    assert tuned.map5 == tuned.species.map5 == pytest.approx(_map5(lists, truths, thresholds), abs=1e-9)
    for name, own in tuned.species.by_species.items():  # each own threshold is optimal on its species' photos
        mine = [k for k, g in enumerate(group) if g == name]
        assert len(mine) >= 3
        assert _map5([lists[k] for k in mine], [truths[k] for k in mine], [own] * len(mine)) == pytest.approx(
            _best([lists[k] for k in mine], [truths[k] for k in mine]), abs=1e-9
        )
    assert tuned.map5 >= tuned.result.map5 - 1e-12
    assert tuned.tuned().map5 == tuned.species.map5 and tuned.matcher.species_thresholds == tuned.species.by_species


def _score_with_lead(ranked: list[tuple[str, float]], truth: str, threshold: float, lead_weight: float) -> float:
    """:func:`_score` with the first individual judged by s1 + lead_weight * (s1 - s2), by hand."""
    (first, s1), rest = ranked[0], ranked[1:]
    d = s1 + lead_weight * (s1 - rest[0][1]) if rest else s1
    if d < threshold:
        preds = [NEW_INDIVIDUAL, first, *[ind for ind, _ in rest]][:5]
    else:
        preds = ([first, *[ind for ind, sim in rest if sim >= threshold], NEW_INDIVIDUAL] + [ind for ind, sim in rest if sim < threshold])[:5]
    return 1.0 / (preds.index(truth) + 1) if truth in preds else 0.0


@pytest.mark.parametrize("seed", range(3))
def test_lead_weight_and_threshold_are_the_pooled_optimum(tmp_path: Path, seed: int) -> None:
    """With lead weight the pair (weight, threshold) is the best over every weight tried and
    every threshold that can change an answer, the smallest weight among equals; weight 0 alone
    is the plain tuning."""
    cv, embeddings_dir = _home(tmp_path, seed)
    weights = [0.0, 0.5, 2.0]
    tuned = tune_out_of_fold(cv, embeddings_dir, FOLDS, plain(lead_weights=weights[1:], per_species=True, species_min_queries=3))
    lists, truths = [], []
    for i, fold in enumerate(FOLDS):
        fold_lists, fold_truths, _ = _oracle_fold(cv, tmp_path / fold, i)
        lists += fold_lists
        truths += fold_truths

    def score(t: float, w: float) -> float:
        return float(np.mean([_score_with_lead(r, tr, t, w) for r, tr in zip(lists, truths, strict=True)]))

    best = []
    for w in weights:
        decisions = {sim for r in lists for _, sim in r} | {r[0][1] + w * (r[0][1] - r[1][1]) for r in lists if len(r) > 1}
        best.append(max(score(t, w) for t in {np.inf} | decisions))
    assert tuned.lead is not None and tuned.lead.table["map5"].tolist() == pytest.approx(best, abs=1e-9)
    assert tuned.lead.weight == min(w for w, m in zip(weights, best, strict=True) if m >= max(best) - 1e-9)
    assert tuned.result.map5 == pytest.approx(max(best), abs=1e-9)
    assert score(tuned.result.threshold, tuned.lead.weight) == pytest.approx(tuned.result.map5, abs=1e-9)
    assert tuned.lead.plain.map5 == pytest.approx(tune_out_of_fold(cv, embeddings_dir, FOLDS, plain()).result.map5, abs=1e-12)
    stored = tuned.tuned()
    assert stored.matcher.lead_weight == tuned.lead.weight and stored.without == {"lead": tuned.lead.plain.map5}
    assert stored.matcher.threshold == tuned.result.threshold
    # Per-species thresholds apply to the same decision score.
    species_of = dict(zip(cv["individual_id"], cv["species"], strict=True))
    own = [tuned.species.by_species.get(species_of[r[0][0]], tuned.result.threshold) for r in lists]
    mine = np.mean([_score_with_lead(r, tr, t, tuned.lead.weight) for r, tr, t in zip(lists, truths, own, strict=True)])
    assert tuned.species.map5 == pytest.approx(float(mine), abs=1e-9)


def test_lead_weight_zero_is_the_plain_tuning(tmp_path: Path) -> None:
    cv, embeddings_dir = _home(tmp_path, 5)
    plain_, zero = tune_out_of_fold(cv, embeddings_dir, FOLDS, plain()), tune_out_of_fold(cv, embeddings_dir, FOLDS, plain(lead_weights=[0.0]))
    assert zero.lead is None and zero.tuned() == plain_.tuned()
    with pytest.raises(ValueError, match="lead_weights"):
        tune_out_of_fold(cv, embeddings_dir, FOLDS, plain(lead_weights=[-1.0]))


def test_folds_without_validation_photos_are_skipped(tmp_path: Path) -> None:
    cv, embeddings_dir = _home(tmp_path, 0)
    cv = cv.assign(fold=cv["fold"].replace(1, -1))  # fold1 validates nothing
    assert [row["fold"] for row in tune_out_of_fold(cv, embeddings_dir, FOLDS, plain()).per_fold] == ["fold0", "fold2"]


def test_no_validation_photos_at_all_is_an_error(tmp_path: Path) -> None:
    cv, embeddings_dir = _home(tmp_path, 0)
    with pytest.raises(ValueError, match="no fold has validation photos"):
        tune_out_of_fold(cv.assign(fold=-1), embeddings_dir, FOLDS, plain())


def test_a_matcher_stored_without_a_format_reads_as_the_same_rule() -> None:
    """A home's matcher file written before the format was versioned (margin, class_centres,
    rerank kept at local weight 0) reads as the matcher it describes; a file of neither form
    is refused with a message that says what to do."""
    from whale_ml.retrieval.fusion import Calibration, Fusion
    from whale_ml.retrieval.matcher import MatcherFormatError

    cal = {"slope": 10.0, "intercept": -5.0}
    fusion = {"weights": {"global": 0.7, "local": 0.0, "centre": 0.3}, "calibrations": {"global": cal, "local": cal, "centre": cal}}
    rerank = {"features": {}, "candidates": 12, "photos_per_candidate": 4}
    old = {"threshold": 0.4, "species_thresholds": {"orca": 0.5}, "k": 40, "fusion": fusion, "rerank": rerank, "margin": 0.5,
           "class_centres": {"candidates": 12}, "map5": 0.7, "new_share": 0.2, "queries": 9, "map5_without_margin": 0.6}
    tuned = TunedMatcher.from_dict(old)
    c = Calibration(10.0, -5.0)
    fusion = Fusion({"global": 0.7, "local": 0.0, "centre": 0.3}, {"global": c, "local": c, "centre": c})
    want = Matcher(0.4, {"orca": 0.5}, 40, fusion, None, 12, 0.5)
    assert tuned.matcher == want and tuned.without == {"lead": 0.6}
    assert TunedMatcher.from_dict(tuned.to_dict()) == tuned
    with pytest.raises(MatcherFormatError, match="rematerialise match_threshold"):
        Matcher.from_dict({"threshold": 0.4})
    with pytest.raises(MatcherFormatError, match="rematerialise match_threshold"):
        Matcher.from_dict({"format": 99, "threshold": 0.4, "k": 50})
