"""Pseudo-labels: confident test predictions, calibrated out of fold, for a second training round.

Each fold gets its own pseudo-labels, chosen as its validation photos were matched out
of fold: fold ``k``'s model searches the test photos among fold ``k``'s *training* photos
only (:func:`fold_test_matches`, the same fusion, re-ranking and threshold as the
out-of-fold searches). A test photo is pseudo-labelled for fold ``k`` with its first
prediction there when that prediction is a known individual (the new_individual rule put
no ``new_individual`` before it) and its score, the one the threshold applies to (fused
when local re-ranking is on), reaches a *confidence* calibrated on the out-of-fold
searches that tuned the threshold: the smallest score at which the validation photos whose
first candidate scores at least that much have a top-1 precision of at least
``min_precision``. A validation photo counts as right only when its first candidate is its
individual; a ``new_individual`` truth is always wrong. Test truth is never read.

Why per fold: a label chosen against a gallery that holds fold ``k``'s validation photos
(the submission's, which every photo built) is evidence *from* those photos; training fold
``k``'s next model on it lets the validation photos vote for their own answers, and the
next round's out-of-fold MAP@5 -- and the threshold tuned on it -- would be too
optimistic (measured: docs/benchmarks.md). Per fold, nothing a fold validates on has
touched what it trains on, so the next round's out-of-fold threshold is honest; the
calibration is also applied to the very scores it was measured on (one fold model
against its own training photos), not to the ensemble's.

The pseudo-labelled photos then join the training side of their own fold only
(:func:`pseudo_labelled_folds`, ``pseudo_fold``), never a validation side
(:func:`whale_ml.data.folds.fold_split`). See docs/retrieval.md ("Pseudo-label round").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.retrieval.local_features import FeatureStore
from whale_ml.retrieval.matcher import Matcher, Matches, match_queries
from whale_ml.retrieval.store import load_embeddings
from whale_ml.retrieval.threshold import fold_gallery

PSEUDO_COLUMNS = ["image", "individual_id", "score"]
FOLD_PSEUDO_COLUMNS = ["fold", *PSEUDO_COLUMNS]  # fold: the index of the fold whose training the photo joins


@dataclass(frozen=True)
class PseudoLabelConfidence:
    """The confidence a test prediction must reach, and what it meant out of fold."""

    confidence: float  # inf: no cutoff reaches the precision (no photo is pseudo-labelled)
    min_precision: float
    floor: float  # the new_individual threshold: a cutoff below it would not be a known prediction
    precision: float  # out-of-fold top-1 precision of the photos at or above ``confidence`` (nan: none)
    photos: int  # validation photos at or above it
    queries: int  # validation photos in all
    curve: pd.DataFrame  # cutoff, photos, precision at every distinct score >= floor, best first

    def to_dict(self) -> dict[str, float | int]:
        return {
            "confidence": self.confidence,
            "min_precision": self.min_precision,
            "floor": self.floor,
            "oof_precision": self.precision,
            "oof_photos": self.photos,
            "oof_queries": self.queries,
        }


def precision_curve(scores: Sequence[float], correct: Sequence[bool], floor: float = -np.inf) -> pd.DataFrame:
    """Top-1 precision of the photos at or above each cutoff: one row per distinct score at
    or above ``floor``, highest first (a score equal to the cutoff counts as above it, as
    in the new_individual rule). Exact, one sort."""
    s, c = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    if s.shape != c.shape:
        raise ValueError(f"{len(s)} scores but {len(c)} correct flags")
    if not np.isfinite(s).all():
        raise ValueError(f"out-of-fold score row {int(np.flatnonzero(~np.isfinite(s))[0])} is not finite")
    order = np.argsort(-s, kind="stable")
    s, hits = s[order], np.cumsum(c[order])
    # A cutoff takes every photo of its score: the last of each run of equal scores.
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if len(s) else np.zeros(0, dtype=np.int64)
    last = last[s[last] >= floor]
    return pd.DataFrame({"cutoff": s[last], "photos": last + 1, "precision": hits[last] / (last + 1)})


def calibrate_confidence(
    scores: Sequence[float], correct: Sequence[bool], min_precision: float = 0.95, floor: float = -np.inf, min_photos: int = 10
) -> PseudoLabelConfidence:
    """The smallest cutoff, at or above ``floor``, whose out-of-fold top-1 precision is at
    least ``min_precision`` over at least ``min_photos`` validation photos.

    The smallest such cutoff keeps the most photos; the photos it keeps are right at the
    asked rate, whatever stricter cutoffs score. A higher ``min_precision`` never gives a
    lower confidence (its admissible cutoffs are a subset).

    Args:
        scores: each validation photo's first-candidate score (:func:`out_of_fold_top1`).
        correct: whether that candidate is its individual.
        floor: the new_individual threshold (a photo below it is predicted new first).
        min_photos: fewer validation photos than this say too little about a precision.
    """
    if not 0.0 < min_precision <= 1.0:
        raise ValueError(f"min_precision must be in (0, 1], got {min_precision}")
    curve = precision_curve(scores, correct, floor)
    ok = curve[(curve["precision"] >= min_precision) & (curve["photos"] >= min_photos)]
    if ok.empty:
        return PseudoLabelConfidence(float("inf"), min_precision, float(floor), float("nan"), 0, len(scores), curve)
    best = ok.iloc[-1]
    return PseudoLabelConfidence(float(best["cutoff"]), min_precision, float(floor), float(best["precision"]), int(best["photos"]), len(scores), curve)


def select_pseudo_labels(images: Sequence[str], ids: np.ndarray, sims: np.ndarray, predictions: Sequence[Sequence[str]], confidence: float) -> pd.DataFrame:
    """The test photos whose first prediction is a known individual scoring at least ``confidence``.

    Args:
        images: the test photos, row for row with the rest.
        ids: (q, k) each photo's candidates, best first (``Matches.ids``).
        sims: (q, k) their scores (``Matches.sims``: fused when re-ranked).
        predictions: the five predictions of each photo (``new_individual`` placed by the threshold).

    Returns:
        ``image, individual_id, score``, highest score first.
    """
    if not (len(images) == len(ids) == len(sims) == len(predictions)):
        raise ValueError(f"{len(images)} images, {len(ids)} id rows, {len(sims)} score rows, {len(predictions)} predictions")
    rows = [
        (img, str(cand[0]), float(score[0]))
        for img, cand, score, pred in zip(images, ids, sims, predictions, strict=True)
        if len(pred) and pred[0] != NEW_INDIVIDUAL and pred[0] == cand[0] and float(score[0]) >= confidence
    ]
    table = pd.DataFrame(rows, columns=PSEUDO_COLUMNS)
    return table.sort_values(["score", "image"], ascending=[False, True], kind="stable").reset_index(drop=True)


def fold_test_matches(
    cv_folds: pd.DataFrame,
    embeddings_dir: Callable[[str], Path],
    fold_keys: Sequence[str],
    matcher: Matcher,
    features: FeatureStore | None = None,
) -> Iterator[tuple[int, list[str], Matches]]:
    """Each fold model's matches of the test photos among that fold's training photos only.

    The searches of :func:`whale_ml.retrieval.threshold.fold_searches` with the test photos
    as queries: the fold's embeddings of its training rows as the gallery (never its
    validation rows), its class centres, and the fusion, re-ranking, lead weight and threshold of
    ``matcher`` (tuned on exactly such searches).

    Yields:
        ``(fold index, test images, matches)``, row for row.

    Raises:
        ValueError: re-ranking was tuned but ``features`` is missing (from ``match_queries``).
    """
    for i, fold in enumerate(fold_keys):
        folder = embeddings_dir(fold)
        # The fold's out-of-fold gallery, as its validation photos were searched (at the matcher's depth).
        gallery, _ = fold_gallery(cv_folds, i, fold, folder, matcher.k, ClassCentres.load(folder) if matcher.uses_centres else None)
        queries, test_images = load_embeddings(folder, "test")
        query_features = None if features is None or matcher.rerank is None else [features.get(img) for img in test_images]
        yield i, test_images, match_queries(gallery, queries, matcher, query_features, features)


def pick_fold_pseudo_labels(
    cv_folds: pd.DataFrame,
    embeddings_dir: Callable[[str], Path],
    fold_keys: Sequence[str],
    matcher: Matcher,
    confidence: float,
    features: FeatureStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, int]:
    """Every fold's pseudo-labels (:func:`fold_test_matches`, :func:`select_pseudo_labels`).

    Returns:
        ``fold, image, individual_id, score``: by fold, then highest score first (a test
        photo may be chosen by several folds, even with different individuals: each fold
        trains on its own choice only); and how many test photos were searched.
    """
    tables, searched = [], 0
    for i, images, matches in fold_test_matches(cv_folds, embeddings_dir, fold_keys, matcher, features):
        chosen = select_pseudo_labels(images, matches.ids, matches.sims, matches.predictions, confidence)
        tables.append(chosen.assign(fold=i)[FOLD_PSEUDO_COLUMNS])
        searched = max(searched, len(images))
        if progress is not None:
            progress(i + 1, len(fold_keys))
    if not tables:
        empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(FOLD_PSEUDO_COLUMNS, ["int64", object, object, "float64"], strict=True)})
        return empty, 0
    return pd.concat(tables, ignore_index=True), searched


def pseudo_labelled_folds(cv_folds: pd.DataFrame, pseudo: pd.DataFrame, crops: pd.DataFrame) -> pd.DataFrame:
    """A later round's fold table: ``cv_folds`` plus one row per pseudo-label.

    A pseudo row has its test crop, its pseudo individual's label and species, ``fold = -1``
    (never validated), ``pseudo = True`` and ``pseudo_fold``, the fold whose training it
    joins (``pseudo``'s ``fold`` column; -1 when it has none: every fold whose own training
    photos hold the individual); :func:`whale_ml.data.folds.fold_split` puts it there.

    Raises:
        ValueError: a pseudo individual has no training photo, or a pseudo photo no crop.
    """
    folds = cv_folds.assign(pseudo=False, pseudo_fold=-1)
    if pseudo.empty:
        return folds
    per_individual = cv_folds.drop_duplicates("individual_id").set_index("individual_id")
    unknown = sorted(set(pseudo["individual_id"]) - set(per_individual.index))
    if unknown:
        raise ValueError(f"pseudo-labels name individuals with no training photo: {', '.join(unknown[:5])}")
    crop_of = dict(zip(crops.loc[crops["split"] == "test", "image"], crops.loc[crops["split"] == "test", "crop_path"], strict=True))
    missing = [img for img in pseudo["image"] if not crop_of.get(img)]
    if missing:
        raise ValueError(f"pseudo-labelled test photos without a crop: {', '.join(missing[:5])}")
    rows = per_individual.loc[pseudo["individual_id"]].reset_index()
    rows["image"] = pseudo["image"].to_numpy()
    rows["crop_path"] = [crop_of[img] for img in pseudo["image"]]
    rows["fold"], rows["held_out"], rows["pseudo"] = -1, False, True
    rows["pseudo_fold"] = pseudo["fold"].to_numpy(dtype=np.int64) if "fold" in pseudo else -1
    if "path" in rows:
        rows["path"] = rows["crop_path"]
    return pd.concat([folds, rows[folds.columns]], ignore_index=True)
