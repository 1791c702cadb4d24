"""Cross-validation folds by individual with held-out individuals (whale_ml.data.folds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whale_ml.data.demo import PRESETS, generate_demo_data
from whale_ml.data.folds import fold_names, fold_split, fold_summary, make_folds
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_train_metadata


def _table(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{ind}_{j}.jpg", ind) for ind, n in counts.items() for j in range(n)]
    return pd.DataFrame(rows, columns=["image", "individual_id"])


# Singletons, pairs and larger groups: every branch of the assignment.
HAND_COUNTS = {
    "s1": 1, "s2": 1, "s3": 1, "s4": 1,
    "p1": 2, "p2": 2, "p3": 2,
    "t1": 3, "t2": 3,
    "q1": 4, "q2": 5, "q3": 6, "q4": 7,
    "r1": 2, "r2": 3, "r3": 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def hand_table() -> pd.DataFrame:
    return _table(HAND_COUNTS)


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """train.csv of the generated tiny set, read through the real reader."""
    data = generate_demo_data(tmp_path_factory.mktemp("folds_tiny") / "data", PRESETS["tiny"])
    return read_train_metadata(data)


def _check_invariants(train: pd.DataFrame, folds: pd.DataFrame, n_folds: int) -> None:
    """Every property a fold assignment must have, whatever the data."""
    assert len(folds) == len(train)
    assert folds["image"].tolist() == train["image"].tolist()
    assert set(folds["fold"].unique()) <= set(range(-1, n_folds))
    counts = folds["individual_id"].value_counts()

    for k in range(n_folds):
        tr, val = fold_split(folds, k)
        assert len(val) > 0, f"fold {k} has no validation photos"
        assert len(tr) + len(val) == len(folds)
        assert set(tr["image"]).isdisjoint(val["image"])
        train_ids = set(tr["individual_id"])
        # Held-out individuals of this fold: none of their photos train here.
        held_here = set(val.loc[val["held_out"], "individual_id"])
        assert held_here.isdisjoint(train_ids)
        # Known individuals validated here keep a photo in this fold's training set.
        known_here = set(val.loc[~val["held_out"], "individual_id"])
        assert known_here <= train_ids
        # truth is new_individual exactly when the fold's train lacks the individual.
        expected = np.where(val["individual_id"].isin(train_ids), val["individual_id"], NEW_INDIVIDUAL)
        assert val["truth"].tolist() == expected.tolist()
        assert ((val["truth"] == NEW_INDIVIDUAL) == val["held_out"]).all()

    held = folds[folds["held_out"]]
    # A held-out individual: all its photos in one fold's validation set, never -1.
    assert (held["fold"] >= 0).all()
    assert (held.groupby("individual_id")["fold"].nunique() == 1).all()
    # held_out is a property of the whole individual.
    assert (folds.groupby("individual_id")["held_out"].nunique() == 1).all()
    # Singletons that are not held out are never validated.
    singles = folds["individual_id"].map(counts) == 1
    assert (folds.loc[singles & ~folds["held_out"], "fold"] == -1).all()
    # Everything else (known, >= 2 photos) is validated somewhere.
    assert (folds.loc[~singles, "fold"] >= 0).all()


@pytest.mark.parametrize("n_folds", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_invariants_hand_table(hand_table: pd.DataFrame, n_folds: int, seed: int) -> None:
    """Fold invariants on a hand-made table with singletons, pairs and large groups."""
    folds = make_folds(hand_table, n_folds, new_individual_share=0.25, seed=seed)
    assert folds["held_out"].any(), "this table and share should hold out someone"
    _check_invariants(hand_table, folds, n_folds)


@pytest.mark.parametrize("n_folds", [2, 3])
@pytest.mark.parametrize("seed", [0, 3])
def test_invariants_tiny_generated_set(tiny_train: pd.DataFrame, n_folds: int, seed: int) -> None:
    """Fold invariants on the generated tiny demo set."""
    folds = make_folds(tiny_train, n_folds, new_individual_share=0.2, seed=seed)
    _check_invariants(tiny_train, folds, n_folds)
    assert folds["held_out"].any()


def test_input_not_modified(hand_table: pd.DataFrame) -> None:
    """make_folds returns a new table and leaves the caller's untouched."""
    before = hand_table.copy()
    folds = make_folds(hand_table, 3, seed=0)
    pd.testing.assert_frame_equal(hand_table, before)
    assert "fold" not in hand_table.columns and "fold" in folds.columns


def test_same_seed_same_folds(hand_table: pd.DataFrame) -> None:
    """The assignment is reproducible from the seed."""
    a = make_folds(hand_table, 3, seed=42)
    b = make_folds(hand_table, 3, seed=42)
    pd.testing.assert_frame_equal(a, b)


def test_different_seed_different_folds() -> None:
    """Another seed gives another assignment."""
    table = _table({f"ind{i:03d}": 1 + i % 6 for i in range(60)})
    a = make_folds(table, 3, seed=1)
    b = make_folds(table, 3, seed=2)
    assert not (a["fold"].equals(b["fold"]) and a["held_out"].equals(b["held_out"]))


@pytest.mark.parametrize("n_folds", [1, 0, -3])
def test_too_few_folds_raise(hand_table: pd.DataFrame, n_folds: int) -> None:
    """Fewer than two folds cannot keep a training photo of each validated individual."""
    with pytest.raises(ValueError, match="n_folds"):
        make_folds(hand_table, n_folds)


@pytest.mark.parametrize("share", [1.0, 1.5, -0.1])
def test_share_outside_zero_one_raises(hand_table: pd.DataFrame, share: float) -> None:
    """A share of 1 would leave no known validation case (and no fold target to balance against)."""
    with pytest.raises(ValueError, match="new_individual_share"):
        make_folds(hand_table, 3, new_individual_share=share)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.35])
def test_new_individual_share_close_to_target(target: float) -> None:
    """On 500 individuals the share of validation photos with truth new_individual is ~ the target, in every fold."""
    rng = np.random.default_rng(123)
    counts = {f"w{i:04d}": int(c) for i, c in enumerate(rng.integers(1, 9, size=500))}
    table = _table(counts)
    folds = make_folds(table, 5, new_individual_share=target, seed=0)
    _check_invariants(table, folds, 5)
    validated = folds[folds["fold"] >= 0]
    share = validated["held_out"].mean()
    assert abs(share - target) < 0.02, share

    summary = fold_summary(folds)
    assert summary["fold"].tolist() == list(range(5))
    assert (summary["train_images"] + summary["val_images"] == len(folds)).all()
    weighted = (summary["val_new_share"] * summary["val_images"]).sum() / summary["val_images"].sum()
    assert weighted == pytest.approx(share)
    # Held-out individuals are spread over the folds so that each fold, not only the pool, is at the target.
    assert (summary["val_new_share"] - target).abs().max() < 0.02, summary


def test_zero_share_holds_out_nobody(hand_table: pd.DataFrame) -> None:
    """A target share of 0 holds nobody out: every validation truth is a known id."""
    folds = make_folds(hand_table, 3, new_individual_share=0.0, seed=0)
    assert not folds["held_out"].any()
    for k in range(3):
        _, val = fold_split(folds, k)
        assert (val["truth"] != NEW_INDIVIDUAL).all()


def test_fold_summary_hand_table(hand_table: pd.DataFrame) -> None:
    """fold_summary agrees with fold_split fold by fold."""
    folds = make_folds(hand_table, 3, new_individual_share=0.25, seed=5)
    summary = fold_summary(folds)
    for row in summary.itertuples():
        tr, val = fold_split(folds, row.fold)
        assert row.train_images == len(tr)
        assert row.val_images == len(val)
        assert row.train_individuals == tr["individual_id"].nunique()
        assert row.val_new_share == pytest.approx((val["truth"] == NEW_INDIVIDUAL).mean())


def test_the_fold_check_fails_plainly_when_no_photo_is_in_a_fold(hand_table: pd.DataFrame) -> None:
    """Every photo excluded (fold -1): the blocking check fails with its counts, not a KeyError."""
    from whale_assets.defs.splits import folds_hold_out_individuals

    folds = make_folds(hand_table, 3, new_individual_share=0.25, seed=5).assign(fold=-1)
    assert list(fold_summary(folds).columns) == ["fold", "train_images", "train_individuals", "val_images", "val_new_share"]
    result = folds_hold_out_individuals(folds)
    assert not result.passed and result.metadata["folds_with_validation"].value == 0


def test_fold_names() -> None:
    """Partition keys of the fold models."""
    assert fold_names(3) == ["fold0", "fold1", "fold2"]


def test_tiny_fixture_is_a_real_file_set(tiny_train: pd.DataFrame) -> None:
    """The generated set used above really has singletons and multi-photo individuals."""
    counts = tiny_train["individual_id"].value_counts()
    assert (counts >= 2).any()
    assert all(Path(p).is_file() for p in tiny_train["path"])
