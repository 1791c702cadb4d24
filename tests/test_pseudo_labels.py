"""Pseudo-label rounds: the calibrated confidence (against a brute-force oracle and a
hand-worked case), which test photos are chosen, that pseudo photos only ever train,
each fold's labels chosen against its own training photos only, the rounds' lineage in
the asset graph (each round on the one before it), and how a recipe says how many run."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from whale_ml.data.folds import fold_split, make_folds
from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.retrieval.pseudo_labels import (
    calibrate_confidence,
    pick_fold_pseudo_labels,
    precision_curve,
    pseudo_labelled_folds,
    select_pseudo_labels,
)
from whale_ml.retrieval.matcher import Matcher
from whale_ml.retrieval.store import save_embeddings
from whale_ml.retrieval.threshold import out_of_fold_top1

# Hand-worked: first-candidate scores of six validation photos and whether each was right.
SCORES = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5]
CORRECT = [True, True, False, True, False, False]


def test_precision_curve_by_hand() -> None:
    curve = precision_curve(SCORES, CORRECT)
    # Both photos at 0.8 are taken together (a score equal to the cutoff counts as above it).
    assert curve["cutoff"].tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert curve["photos"].tolist() == [1, 3, 4, 5, 6]
    assert curve["precision"].tolist() == [1.0, 2 / 3, 0.75, 0.6, 0.5]


@pytest.mark.parametrize(
    ("min_precision", "floor", "min_photos", "confidence", "photos"),
    [
        (0.75, -np.inf, 1, 0.7, 4),  # the smallest cutoff at 0.75, though 0.8 falls below it
        (0.6, -np.inf, 1, 0.6, 5),
        (0.8, -np.inf, 1, 0.9, 1),
        (0.75, 0.75, 1, 0.9, 1),  # below the new_individual threshold: not a known prediction
        (0.8, -np.inf, 2, float("inf"), 0),  # 1.0 over one photo is not enough
        (0.5, -np.inf, 1, 0.5, 6),
    ],
)
def test_calibrated_confidence_by_hand(min_precision: float, floor: float, min_photos: int, confidence: float, photos: int) -> None:
    found = calibrate_confidence(SCORES, CORRECT, min_precision, floor, min_photos)
    assert found.confidence == confidence
    assert found.photos == photos and found.queries == 6
    if photos:
        assert found.precision >= min_precision
    else:
        assert np.isnan(found.precision)


def test_calibrated_confidence_matches_brute_force_and_is_monotone() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(0, 1, 300), 2)  # rounded: many ties
    correct = rng.uniform(0, 1, 300) < scores  # more often right when the score is high
    floor = 0.2
    previous = -np.inf
    for target in np.linspace(0.3, 1.0, 29):
        found = calibrate_confidence(scores, correct, float(target), floor, min_photos=5)
        admissible = [
            c for c in np.unique(scores) if c >= floor and (scores >= c).sum() >= 5 and correct[scores >= c].mean() >= target
        ]
        assert found.confidence == (min(admissible) if admissible else np.inf), target
        if admissible:
            assert found.precision == correct[scores >= found.confidence].mean()
        assert found.confidence >= previous  # a stricter target never lowers the confidence
        previous = found.confidence


def test_bad_calibration_input_is_refused() -> None:
    with pytest.raises(ValueError, match="min_precision"):
        calibrate_confidence(SCORES, CORRECT, 0.0)
    with pytest.raises(ValueError, match="6 scores but 5"):
        precision_curve(SCORES, CORRECT[:5])
    with pytest.raises(ValueError, match="row 1 is not finite"):
        precision_curve([0.5, float("nan")], [True, False])


def test_out_of_fold_top1_counts_new_individuals_as_wrong() -> None:
    sims = np.array([[0.9, 0.5], [0.8, 0.1], [0.7, 0.6], [0.4, 0.3]])
    ids = np.array([["a", "b"], ["c", "a"], ["b", "a"], ["d", "a"]], dtype=object)
    truths = ["a", NEW_INDIVIDUAL, "a", "d"]
    assert out_of_fold_top1(sims, ids, truths) == {"score": [0.9, 0.8, 0.7, 0.4], "correct": [True, False, False, True]}
    with pytest.raises(ValueError, match="do not match"):
        out_of_fold_top1(sims, ids, truths[:3])


def test_selection_takes_known_first_predictions_at_or_above_the_confidence() -> None:
    images = ["t1", "t2", "t3", "t4"]
    ids = np.array([["a", "b"], ["b", "a"], ["c", "a"], ["a", "c"]], dtype=object)
    sims = np.array([[0.9, 0.2], [0.7, 0.1], [0.95, 0.3], [0.69, 0.2]])
    predictions = [["a", NEW_INDIVIDUAL], ["b", NEW_INDIVIDUAL], [NEW_INDIVIDUAL, "c"], ["a", NEW_INDIVIDUAL]]
    table = select_pseudo_labels(images, ids, sims, predictions, confidence=0.7)
    # t3 is predicted new first (whatever its score), t4 is below; t2 is exactly at it.
    assert table.to_dict("records") == [{"image": "t1", "individual_id": "a", "score": 0.9}, {"image": "t2", "individual_id": "b", "score": 0.7}]
    assert select_pseudo_labels(images, ids, sims, predictions, confidence=float("inf")).empty


def _folds() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small fold table (30 individuals, some held out) and test crops."""
    rng = np.random.default_rng(1)
    ids = [f"w{i:02d}" for i in range(30) for _ in range(int(rng.integers(1, 5)))]
    train = pd.DataFrame({"image": [f"tr{i}.jpg" for i in range(len(ids))], "individual_id": ids, "species": "beluga"})
    train["label"] = train["individual_id"].str[1:].astype(int)
    train["crop_path"] = "/crops/" + train["image"]
    folds = make_folds(train, 3, 0.2, seed=0)
    crops = pd.DataFrame({"image": [f"te{i}.jpg" for i in range(30)], "split": "test", "crop_path": [f"/crops/te{i}.jpg" for i in range(30)]})
    return folds, crops


def test_pseudo_photos_only_train_and_never_change_a_validation_truth() -> None:
    folds, crops = _folds()
    pseudo = pd.DataFrame({"image": crops["image"], "individual_id": [f"w{i:02d}" for i in range(30)], "score": 0.9})
    table = pseudo_labelled_folds(folds, pseudo, crops)
    assert table["pseudo"].sum() == 30 and (table.loc[table["pseudo"], "fold"] == -1).all()
    assert (table["pseudo_fold"] == -1).all()  # no fold named: any fold that knows the individual
    row = table[table["pseudo"]].set_index("image").loc["te3.jpg"]
    assert (row["individual_id"], row["label"], row["crop_path"]) == ("w03", 3, "/crops/te3.jpg")
    held_somewhere = 0
    for k in range(3):
        train_before, val_before = fold_split(folds, k)
        train, val = fold_split(table, k)
        assert not val["pseudo"].any()
        pd.testing.assert_frame_equal(val.drop(columns=["pseudo", "pseudo_fold"]), val_before)  # same photos, same truths
        joined = set(train.loc[train["pseudo"], "individual_id"])
        assert joined == set(pseudo["individual_id"]) & set(train_before["individual_id"])
        held_somewhere += len(set(pseudo["individual_id"]) - joined)
    assert held_somewhere > 0  # some pseudo photo was kept out of a fold that validates its individual as new


def test_a_fold_s_pseudo_labels_train_in_that_fold_only() -> None:
    folds, crops = _folds()
    known = [set(fold_split(folds, k)[0]["individual_id"]) for k in range(3)]
    rows = [(k, f"te{i}.jpg", ind) for k in range(3) for i, ind in enumerate(sorted(known[k])[:4])]
    rows.append((1, "te0.jpg", sorted(known[1])[-1]))  # the same photo, another individual, in another fold
    pseudo = pd.DataFrame(rows, columns=["fold", "image", "individual_id"]).assign(score=0.9)
    table = pseudo_labelled_folds(folds, pseudo, crops)
    for k in range(3):
        train, val = fold_split(table, k)
        got = sorted(train.loc[train["pseudo"], ["image", "individual_id"]].itertuples(index=False, name=None))
        assert got == sorted((img, ind) for f, img, ind in rows if f == k)
        assert not val["pseudo"].any()


def _write_fold(folder, vectors: dict[str, list[float]], test: dict[str, list[float]]) -> None:  # type: ignore[no-untyped-def]
    save_embeddings(folder, "train", np.array(list(vectors.values()), dtype=np.float32), list(vectors))
    save_embeddings(folder, "test", np.array(list(test.values()), dtype=np.float32), list(test))


def test_each_fold_labels_test_photos_against_its_own_training_photos_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A test photo identical to fold 0's validation photo of A: fold 1, whose training holds
    that photo, labels it A; fold 0 must not (its training photo of A looks nothing like it).
    Against every photo -- the submission's gallery -- fold 0 would have labelled it A from
    its own validation photo."""
    e = np.eye(4).tolist()
    folds = pd.DataFrame(
        {
            "image": ["a1", "a2", "b1", "b2", "c1", "c2"],
            "individual_id": ["A", "A", "B", "B", "C", "C"],
            "species": "beluga",
            "fold": [1, 0, 0, 1, 0, 1],
        }
    )
    vectors = {"a1": e[1], "a2": e[0], "b1": e[2], "b2": e[2], "c1": e[3], "c2": e[3]}
    for fold in ("fold0", "fold1"):  # the same "model" in both folds: only the galleries differ
        _write_fold(tmp_path / fold, vectors, {"t": e[0], "u": e[2]})
    table, searched = pick_fold_pseudo_labels(folds, lambda f: tmp_path / f, ["fold0", "fold1"], Matcher(0.5), confidence=0.9)
    assert searched == 2
    assert table.to_dict("records") == [
        {"fold": 0, "image": "u", "individual_id": "B", "score": 1.0},
        {"fold": 1, "image": "t", "individual_id": "A", "score": 1.0},
        {"fold": 1, "image": "u", "individual_id": "B", "score": 1.0},
    ]
    strict, _ = pick_fold_pseudo_labels(folds, lambda f: tmp_path / f, ["fold0", "fold1"], Matcher(0.5), confidence=1.5)
    assert strict.empty and list(strict.columns) == ["fold", "image", "individual_id", "score"]


def test_pseudo_rows_must_name_known_individuals_and_have_crops() -> None:
    folds, crops = _folds()
    with pytest.raises(ValueError, match="no training photo: w99"):
        pseudo_labelled_folds(folds, pd.DataFrame({"image": ["te0.jpg"], "individual_id": ["w99"], "score": [1.0]}), crops)
    with pytest.raises(ValueError, match="without a crop: te99.jpg"):
        pseudo_labelled_folds(folds, pd.DataFrame({"image": ["te99.jpg"], "individual_id": ["w01"], "score": [1.0]}), crops)
    empty = pd.DataFrame(columns=["image", "individual_id", "score"])
    assert not pseudo_labelled_folds(folds, empty, crops)["pseudo"].any()


def _graph(rounds: int) -> object:
    from whale_assets.stages import asset_graph

    return asset_graph(rounds)


def _parents(graph: object, key: str) -> set[str]:
    return {p.to_user_string() for p in graph.get(dg.AssetKey.from_user_string(key)).parent_keys}  # type: ignore[attr-defined]


def test_each_round_chains_on_the_one_before_it() -> None:
    """Three rounds, asked for by count alone: round k's pseudo-labels come from round k-1's
    threshold and fold embeddings (round 3's from round 2's), its fold models train on its
    own pseudo-labelled folds (the input ``training_folds``) and warm-start from round
    k-1's; every round's threshold is tuned on ``cv_folds``' validation photos."""
    graph = _graph(3)
    # Round 2 on round 1: test photos matched per fold, as the fold's validation photos were.
    assert _parents(graph, "round2/pseudo_labels") == {"match_threshold", "fold_embeddings", "local_features", "cv_folds"}
    # Round 3 on round 2, never on round 1.
    assert _parents(graph, "round3/pseudo_labels") == {"round2/match_threshold", "round2/fold_embeddings", "local_features", "cv_folds"}
    for k, before in ((2, ""), (3, "round2/")):
        r = f"round{k}/"
        assert _parents(graph, f"{r}pseudo_labelled_folds") == {"cv_folds", f"{r}pseudo_labels", "crops"}
        assert _parents(graph, f"{r}arcface_model") == {f"{r}pseudo_labelled_folds", f"{before}arcface_model"}
        assert _parents(graph, f"{r}fold_embeddings") == {f"{r}arcface_model", "crops"}
        assert _parents(graph, f"{r}gallery") == {f"{r}fold_embeddings", "train_metadata", "crops"}
        assert _parents(graph, f"{r}match_threshold") == {f"{r}fold_embeddings", "local_features", "cv_folds"}
        assert _parents(graph, f"{r}submission_csv") >= {f"{r}gallery", f"{r}match_threshold"}
        assert _parents(graph, f"{r}submission_score") == {f"{r}submission_csv"}
        assert graph.get(dg.AssetKey.from_user_string(f"{r}arcface_model")).partitions_def is not None  # type: ignore[attr-defined]
    # The fold models' fold table arrives under one name, whichever table it is.
    from whale_assets.defs.training import arcface_model_asset
    from whale_assets.rounds import Round

    for rnd, table in ((Round(1, 3), "cv_folds"), (Round(3, 3), "round3/pseudo_labelled_folds")):
        asset = arcface_model_asset(rnd)
        assert asset.keys_by_input_name["training_folds"].to_user_string() == table
    # No pseudo-labels for the first round; the stages in order, one set per round.
    assert not {n for n in _names(3) if n.startswith("pseudo_")}
    from whale_assets.rounds import graph_rounds
    from whale_assets.stages import stages

    assert [s.name for s in stages(graph_rounds(3))] == [
        "prepare_data",
        "train_folds",
        "ensemble_and_submit",
        *(f"round{k}_{stage}" for k in (2, 3) for stage in ("pick_pseudo_labels", "train_folds", "ensemble_and_submit")),
    ]


def _names(rounds: int) -> list[str]:
    from whale_assets.stages import all_asset_names

    return all_asset_names(rounds)


def test_each_round_s_stages_hold_that_round_only() -> None:
    """A round's jobs and its re-threshold selection reach no other round's assets; the
    stages together hold every asset once, the partitioned ones in per-fold stages."""
    from whale_assets.rounds import graph_rounds
    from whale_assets.stages import asset_names, ensemble_and_submit, pseudo_labels, rethreshold_and_submit, stages, train_folds

    first, second = graph_rounds(2)
    assert set(asset_names(train_folds(first), 2)) == {"arcface_model", "fold_embeddings"}
    assert set(asset_names(ensemble_and_submit(first), 2)) == {"gallery", "match_threshold", "submission_csv", "submission_score"}
    assert set(asset_names(rethreshold_and_submit(first), 2)) == {"match_threshold", "submission_csv", "submission_score"}
    assert set(asset_names(pseudo_labels(second), 2)) == {"round2/pseudo_labels", "round2/pseudo_labelled_folds"}
    assert set(asset_names(train_folds(second), 2)) == {"round2/arcface_model", "round2/fold_embeddings"}
    assert set(asset_names(ensemble_and_submit(second), 2)) == {
        "round2/release", "round2/gallery", "round2/match_threshold", "round2/submission_csv", "round2/submission_score"
    }  # fmt: skip
    staged = [n for stage in stages(graph_rounds(2)) for n in asset_names(stage.selection, 2)]
    assert sorted(staged) == _names(2)
    per_fold = {n for stage in stages(graph_rounds(2)) if stage.per_fold for n in asset_names(stage.selection, 2)}
    assert per_fold == {"arcface_model", "fold_embeddings", "round2/arcface_model", "round2/fold_embeddings"}


def test_a_recipe_says_how_many_rounds_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``rounds`` at the top of a recipe; without it, ``$WHALE_ROUNDS`` or the default (2).
    A bad count, a count that disagrees with ``$WHALE_ROUNDS``, and the ``enabled`` switch
    that ``rounds`` replaces are refused with what to write instead."""
    import yaml

    from whale_assets.run import load_recipe, recipe_rounds
    from whale_ml.environment import DEFAULT_ROUNDS

    def recipe(content: dict) -> object:
        path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    monkeypatch.delenv("WHALE_ROUNDS", raising=False)
    assert DEFAULT_ROUNDS == 2 and recipe_rounds({}) == 2
    assert recipe_rounds(load_recipe(recipe({"rounds": 3}))) == 3
    # A one-round recipe may carry the pseudo-label settings a later round would read.
    assert load_recipe(recipe({"rounds": 1, "ops": {"pseudo_labels": {"config": {"min_precision": 0.9}}}}))
    for bad in (0, "two", True, 1.5):
        with pytest.raises(ValueError, match=r"rounds: expected a whole number >= 1"):
            load_recipe(recipe({"rounds": bad}))
    with pytest.raises(ValueError, match=r"enabled is not a setting: .*top-level `rounds`"):
        load_recipe(recipe({"ops": {"pseudo_labels": {"config": {"enabled": True}}}}))
    with pytest.raises(ValueError, match=r"unknown op\(s\) in ops: round3__gallery"):
        load_recipe(recipe({"rounds": 2, "ops": {"round3__gallery": {"config": {"k": 10}}}}))
    monkeypatch.setenv("WHALE_ROUNDS", "2")
    assert recipe_rounds({}) == 2 and recipe_rounds({"rounds": 2}) == 2
    with pytest.raises(ValueError, match=r"rounds: 3 but WHALE_ROUNDS=2"):
        recipe_rounds({"rounds": 3})


def test_a_later_round_s_ops_take_the_settings_of_the_round_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Op config inheritance, mapped by the rounds (not parsed out of op names): round 2's op
    takes round 1's settings, round 3's round 2's (inherited or its own); a setting given
    to the later round's op itself is kept; the pseudo-labels' plain name configures every
    round's; and a stage's run config holds only the ops of its assets."""
    monkeypatch.delenv("WHALE_ROUNDS")  # the suite's one-round setting: the recipes below decide
    from whale_assets.run import round_ops, stage_run_config

    ops = {
        "arcface_model": {"config": {"epochs": 2}},
        "gallery": {"config": {"k": 20}},
        "round2__gallery": {"config": {"k": 10}},
        "pseudo_labels": {"config": {"min_precision": 0.5}},
    }
    merged = round_ops(ops, 3)
    assert merged["round2__arcface_model"] == merged["round3__arcface_model"] == {"config": {"epochs": 2}}
    assert merged["round2__gallery"] == merged["round3__gallery"] == {"config": {"k": 10}}  # its own, then passed on
    assert merged["round2__pseudo_labels"] == merged["round3__pseudo_labels"] == {"config": {"min_precision": 0.5}}
    assert "round2__fold_embeddings" not in merged  # nothing to inherit
    config = stage_run_config({"rounds": 3, "ops": ops}, ["round3/arcface_model", "round3/fold_embeddings"])
    assert config["ops"] == {"round3__arcface_model": {"config": {"epochs": 2}}}


def test_a_warm_started_round_begins_from_the_previous_round_s_model_of_the_same_fold(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from whale_assets.defs.training import round_recipe
    from whale_assets.launchpad import TrainSettings
    from whale_assets.resources import WhaleHome
    from whale_assets.rounds import Round

    whale = WhaleHome(home=str(tmp_path))
    warm = TrainSettings(epochs=60, warm_start_epochs=15)
    assert round_recipe(warm, Round(1, 3), whale, "fold1") is warm  # the first round ignores it
    assert round_recipe(TrainSettings(epochs=60), Round(2, 3), whale, "fold1").init_weights is None  # 0: from scratch
    second = round_recipe(warm, Round(2, 3), whale, "fold1")
    assert second.epochs == 15 and second.init_weights == str(tmp_path / "models" / "fold1" / "best.pt")
    third = round_recipe(warm, Round(3, 3), whale, "fold1")
    assert third.init_weights == str(tmp_path / "rounds" / "round2" / "models" / "fold1" / "best.pt")
    assert warm.epochs == 60 and warm.init_weights is None  # the recipe itself is unchanged
