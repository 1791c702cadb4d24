"""Cross-validation folds by individual, with whole individuals held out.

A random image split (the reference notebook's: docs/training.md) leaves no ``new_individual``
case in validation, so the threshold that decides "new" is never learnt. Here
each fold's validation set has two parts:

* images of known individuals: the images of every individual with at least
  two photos are dealt round-robin over the folds, so each fold's training
  set keeps at least one photo of each of them;
* images of held-out individuals: whole individuals whose photos are *all*
  in that fold's validation set, so their truth there is ``new_individual``
  -- as for ~16% of Kaggle's test photos. Singletons are held out first
  (they can never be known validation cases), other individuals only when
  the singletons fall short; each is placed so that every fold's share of
  new-individual photos meets the target, not only the pooled share.

Singletons that are not held out are never validated (there is nothing left
to match them against) and train in every fold. Measured at the real
competition's long tail: docs/retrieval.md ("Folds at the real long tail").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL


def fold_names(n_folds: int) -> list[str]:
    """Partition keys of the fold models: ``fold0``, ``fold1``, ..."""
    return [f"fold{i}" for i in range(n_folds)]


def make_folds(train: pd.DataFrame, n_folds: int, new_individual_share: float = 0.16, seed: int = 0) -> pd.DataFrame:
    """Assign each training image the fold it is validated in.

    Args:
        train: at least ``image`` and ``individual_id`` columns.
        n_folds: number of folds (>= 2).
        new_individual_share: target share of each fold's validation images
            whose individual is held out whole (Kaggle's test: ~16%).
        seed: makes the assignment reproducible.

    Returns:
        ``train`` with ``fold`` (validation fold, -1 = never validated) and
        ``held_out`` (True when the whole individual is held out in its fold).
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if not 0.0 <= new_individual_share < 1.0:
        raise ValueError(f"new_individual_share must be in [0, 1), got {new_individual_share}")
    rng = np.random.default_rng(seed)
    df = train.reset_index(drop=True).copy()
    counts = df["individual_id"].value_counts()
    individuals = np.array(sorted(counts.index))
    rng.shuffle(individuals)
    held = held_out_individuals(individuals, counts, new_individual_share)

    # Known individuals (>= 2 photos, not held out): photos dealt round-robin from a
    # random offset, in a random photo order, so each fold's training keeps some of them.
    order = rng.permutation(len(df))
    offset = {ind: int(rng.integers(0, n_folds)) for ind in individuals}
    ids = df["individual_id"].to_numpy()[order]
    position = pd.Series(ids).groupby(ids, sort=False).cumcount().to_numpy()
    dealt = ((np.array([offset[i] for i in ids]) + position) % n_folds).astype(np.int64)
    known = (counts.reindex(ids).to_numpy() >= 2) & ~pd.Series(ids).isin(held).to_numpy()
    fold = np.full(len(df), -1, dtype=np.int64)
    fold[order[known]] = dealt[known]

    held_fold = balance_held_out(held, counts, np.bincount(fold[fold >= 0], minlength=n_folds), new_individual_share)
    is_held = df["individual_id"].isin(held_fold).to_numpy()
    fold[is_held] = df.loc[is_held, "individual_id"].map(held_fold).to_numpy()
    df["fold"] = fold
    df["held_out"] = is_held
    return df


def held_out_individuals(individuals: np.ndarray, counts: pd.Series, share: float) -> list[str]:
    """The individuals held out whole: singletons first, then others, in the given (shuffled) order.

    Taken until their photos reach ``share`` of all validated photos (held-out
    photos plus the photos of the remaining individuals with two or more).
    Singletons come first because they can never be known validation cases (no
    photo would be left to train on): holding one out adds a new-individual case
    and takes no known case away, and an animal seen once is the closest thing
    a catalogue has to an animal not seen yet. Others are taken only when the
    singletons fall short of the share (small sets such as the demo's).
    """
    n = counts.reindex(individuals).to_numpy()
    ordered = np.concatenate([individuals[n == 1], individuals[n >= 2]])
    validated = int(n[n >= 2].sum())
    held: list[str] = []
    held_images = 0
    for ind, photos in zip(ordered, counts.reindex(ordered).to_numpy().tolist(), strict=True):
        if validated + held_images == 0 or held_images / (validated + held_images) >= share:
            break
        held.append(ind)
        held_images += photos
        if photos >= 2:
            validated -= photos
    return held


def balance_held_out(held: list[str], counts: pd.Series, known_per_fold: np.ndarray, share: float) -> dict[str, int]:
    """The validation fold of each held-out individual, so that every fold's new-individual share is ``share``.

    Fold ``k`` validates ``known_per_fold[k]`` photos of known individuals; its
    share is ``h / (h + known)`` with ``h`` its held-out photos, so its target is
    ``h = share / (1 - share) * known``. Individuals are placed largest first,
    each in the fold furthest below its target (lowest index on ties): the usual
    greedy for balancing sums, with singletons last filling the remaining gaps
    photo by photo. Deterministic: ties in size keep the order of ``held``.
    """
    target = share / (1.0 - share) * known_per_fold.astype(np.float64)
    placed = np.zeros(len(known_per_fold), dtype=np.float64)
    sizes = counts.reindex(held).to_numpy(dtype=np.int64)
    result: dict[str, int] = {}
    for i in np.argsort(-sizes, kind="stable"):
        k = int(np.argmax(target - placed))
        result[held[i]] = k
        placed[k] += sizes[i]
    return result


def fold_split(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation rows of one fold.

    The validation rows get a ``truth`` column: the individual id, or
    ``new_individual`` when the fold's training set has no photo of it.

    Rows marked ``pseudo`` (pseudo-labelled test photos, a later round's:
    :mod:`whale_ml.retrieval.pseudo_labels`) are never validation rows. One with a
    ``pseudo_fold`` of 0 or more trains in that fold only (its label was chosen there,
    against that fold's training photos); and any trains only in folds whose other training
    photos hold its individual: a pseudo photo of an individual held out in this fold would
    turn its validation truth from ``new_individual`` into known.
    """
    pseudo = folds["pseudo"].to_numpy(dtype=bool) if "pseudo" in folds else np.zeros(len(folds), dtype=bool)
    own_fold = folds["pseudo_fold"].fillna(-1).to_numpy(dtype=np.int64) if "pseudo_fold" in folds else np.full(len(folds), -1)
    is_val = (folds["fold"] == fold).to_numpy() & ~pseudo
    known = set(folds.loc[~is_val & ~pseudo, "individual_id"])
    here = (own_fold < 0) | (own_fold == fold)
    keep = ~is_val & (~pseudo | (folds["individual_id"].isin(known).to_numpy() & here))
    train = folds[keep].reset_index(drop=True)
    val = folds[is_val].reset_index(drop=True).copy()
    val["truth"] = np.where(val["individual_id"].isin(known), val["individual_id"], NEW_INDIVIDUAL)
    return train, val


def validation_digest(folds: pd.DataFrame, fold_indices: Sequence[int]) -> str:
    """A short digest of what the folds' validation photos ask and of the right answers: each
    fold's validation images with their truth (an individual, or ``new_individual``).

    Two releases with the same digest were scored out of fold on the same questions, so their
    MAP@5 compare. Crops and training photos do not enter it: a better detector, or a later
    round's pseudo-labelled training photos (never validation rows), are what a release may
    improve on the same validation data.
    """
    digest = hashlib.sha256()
    for index in fold_indices:
        _, val = fold_split(folds, index)
        rows = val[["image", "truth"]].astype(str).sort_values("image", kind="stable")
        digest.update(f"fold {index}\n".encode())
        digest.update(rows.to_csv(index=False).encode())
    return digest.hexdigest()[:16]


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
    # The columns even without a fold (every photo excluded): readers index them.
    return pd.DataFrame(rows, columns=["fold", "train_images", "train_individuals", "val_images", "val_new_share"])
