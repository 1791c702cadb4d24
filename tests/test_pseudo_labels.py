"""The pseudo-label round: the calibrated confidence (against a brute-force oracle and a
hand-worked case), which test photos are chosen, that pseudo photos only ever train,
each fold's labels chosen against its own training photos only, and the round's lineage
in the asset graph."""

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


def test_the_round_has_its_own_lineage_in_the_asset_graph() -> None:
    """round2/ fold models train on pseudo_labelled_folds, made from pseudo_labels, made from the
    first round's threshold and gallery; the round's stages are its own, and the first
    round's jobs and rebuild never reach into it."""
    from whale_assets.definitions import defs
    from whale_assets.stages import ENSEMBLE_AND_SUBMIT, RETHRESHOLD_AND_SUBMIT, STAGES, TRAIN_FOLDS, asset_names

    graph = defs().resolve_asset_graph()

    def parents(key: str) -> set[str]:
        return {p.to_user_string() for p in graph.get(dg.AssetKey.from_user_string(key)).parent_keys}

    # Test photos matched per fold, as the fold's validation photos were: never by the submission's gallery.
    assert parents("pseudo_labels") == {"match_threshold", "fold_embeddings", "local_features", "cv_folds"}
    assert parents("pseudo_labelled_folds") == {"cv_folds", "pseudo_labels", "crops"}
    assert parents("round2/arcface_model") == {"pseudo_labelled_folds", "arcface_model"}  # a warm start begins from the first round's
    assert parents("round2/fold_embeddings") == {"round2/arcface_model", "crops"}
    assert parents("round2/gallery") == {"round2/fold_embeddings", "train_metadata", "crops"}
    # The second round's threshold is tuned on the first round's validation photos (cv_folds).
    assert parents("round2/match_threshold") == {"round2/fold_embeddings", "local_features", "cv_folds"}
    assert parents("round2/submission_csv") >= {"round2/gallery", "round2/match_threshold"}
    assert parents("round2/submission_score") == {"round2/submission_csv"}
    assert graph.get(dg.AssetKey.from_user_string("round2/arcface_model")).partitions_def is not None

    round_stages = [s.name for s in STAGES if s.pseudo_label_round]
    assert round_stages == ["pick_pseudo_labels", "train_round2_folds", "round2_ensemble_and_submit"]
    first = set(asset_names(TRAIN_FOLDS)) | set(asset_names(ENSEMBLE_AND_SUBMIT)) | set(asset_names(RETHRESHOLD_AND_SUBMIT))
    assert not {n for n in first if n.startswith(("round2/", "pseudo_"))}
    assert set(asset_names(RETHRESHOLD_AND_SUBMIT)) == {"match_threshold", "submission_csv", "submission_score"}
    for name in ("round2/gallery", "round2/match_threshold", "round2/submission_csv"):
        assert graph.get(dg.AssetKey.from_user_string(name)).automation_condition is None  # runs only when asked


def test_whale_run_runs_the_round_only_when_the_recipe_enables_it() -> None:
    from whale_assets.run import pseudo_label_round_enabled, with_round_ops

    assert not pseudo_label_round_enabled({})
    assert not pseudo_label_round_enabled({"ops": {"pseudo_labels": {"config": {"min_precision": 0.9}}}})
    assert pseudo_label_round_enabled({"ops": {"pseudo_labels": {"config": {"enabled": True}}}})
    ops = {"arcface_model": {"config": {"epochs": 2}}, "round2__gallery": {"config": {"k": 10}}, "gallery": {"config": {"k": 20}}}
    merged = with_round_ops(ops, ["arcface_model", "round2__arcface_model", "round2__gallery", "round2__fold_embeddings"])
    assert merged["round2__arcface_model"] == {"config": {"epochs": 2}}  # inherited
    assert merged["round2__gallery"] == {"config": {"k": 10}}  # its own kept
    assert "round2__fold_embeddings" not in merged  # nothing to inherit


def test_a_warm_started_round_begins_from_the_first_round_s_model_of_the_same_fold(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from whale_assets.defs.training import round_recipe
    from whale_assets.launchpad import TrainSettings
    from whale_assets.resources import WhaleHome
    from whale_assets.rounds import FIRST_ROUND, PSEUDO_LABEL_ROUND

    whale = WhaleHome(home=str(tmp_path))
    warm = TrainSettings(epochs=60, warm_start_epochs=15)
    assert round_recipe(warm, FIRST_ROUND, whale, "fold1") is warm  # the first round ignores it
    assert round_recipe(TrainSettings(epochs=60), PSEUDO_LABEL_ROUND, whale, "fold1").init_weights is None  # 0: from scratch
    second = round_recipe(warm, PSEUDO_LABEL_ROUND, whale, "fold1")
    assert second.epochs == 15 and second.init_weights == str(tmp_path / "models" / "fold1" / "best.pt")
    assert warm.epochs == 60 and warm.init_weights is None  # the recipe itself is unchanged
