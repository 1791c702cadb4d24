"""Cross-validation folds by individual, with whole individuals held out.

A random image split (the reference notebook's: docs/training.md) leaves no ``new_individual``
case in validation, so the threshold that decides "new" is never learnt. Here
each fold's validation set has two parts:

* images of known individuals: the images of every individual with at least
  two photos are dealt round-robin over the folds, so each fold's training
  set keeps at least one photo of each of them;
* images of held-out individuals: a random set of individuals, spread over
  the folds, whose photos are *all* in that fold's validation set, so their
  truth there is ``new_individual`` -- as for ~16% of Kaggle's test photos.

Individuals with a single photo that are not held out are never validated
(there is nothing left to match them against) and train in every fold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL


def fold_names(n_folds: int) -> list[str]:
    """Partition keys of the fold models: ``fold0``, ``fold1``, ..."""
    return [f"fold{i}" for i in range(n_folds)]


def make_folds(train: pd.DataFrame, n_folds: int, new_individual_share: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """Assign each training image the fold it is validated in.

    Args:
        train: at least ``image`` and ``individual_id`` columns.
        n_folds: number of folds (>= 2).
        new_individual_share: target share of validation images whose
            individual is held out whole.
        seed: makes the assignment reproducible.

    Returns:
        ``train`` with ``fold`` (validation fold, -1 = never validated) and
        ``held_out`` (True when the whole individual is held out in its fold).
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    rng = np.random.default_rng(seed)
    df = train.reset_index(drop=True).copy()
    counts = df["individual_id"].value_counts()
    individuals = np.array(sorted(counts.index))
    rng.shuffle(individuals)

    # Held-out individuals: drawn at random until their photos reach the target
    # share of all photos that get validated.
    validated = int(counts[counts >= 2].sum())
    held: list[str] = []
    held_images = 0
    for ind in individuals:
        if validated + held_images == 0 or held_images / (validated + held_images) >= new_individual_share:
            break
        held.append(ind)
        held_images += int(counts[ind])
        if counts[ind] >= 2:
            validated -= int(counts[ind])
    held_fold = {ind: i % n_folds for i, ind in enumerate(held)}

    fold = np.full(len(df), -1, dtype=np.int64)
    order = rng.permutation(len(df))
    position: dict[str, int] = {}
    offset = {ind: int(rng.integers(0, n_folds)) for ind in individuals}
    for row in order:
        ind = df.at[row, "individual_id"]
        if ind in held_fold:
            fold[row] = held_fold[ind]
        elif counts[ind] >= 2:
            i = position.get(ind, 0)
            position[ind] = i + 1
            fold[row] = (offset[ind] + i) % n_folds
    df["fold"] = fold
    df["held_out"] = df["individual_id"].isin(held_fold)
    return df


def fold_split(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation rows of one fold.

    The validation rows get a ``truth`` column: the individual id, or
    ``new_individual`` when the fold's training set has no photo of it.
    """
    is_val = folds["fold"] == fold
    train = folds[~is_val].reset_index(drop=True)
    val = folds[is_val].reset_index(drop=True).copy()
    known = set(train["individual_id"])
    val["truth"] = np.where(val["individual_id"].isin(known), val["individual_id"], NEW_INDIVIDUAL)
    return train, val


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: training and validation images, and the share of new individuals."""
    rows = []
    for k in sorted(f for f in folds["fold"].unique() if f >= 0):
        train, val = fold_split(folds, k)
        rows.append(
            {
                "fold": int(k),
                "train_images": len(train),
                "train_individuals": train["individual_id"].nunique(),
                "val_images": len(val),
                "val_new_share": float((val["truth"] == NEW_INDIVIDUAL).mean()) if len(val) else 0.0,
            }
        )
    return pd.DataFrame(rows)
