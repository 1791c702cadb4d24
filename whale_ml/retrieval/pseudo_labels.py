"""Pseudo-labels: confident test predictions, calibrated out of fold, for a second training round.

A test photo is pseudo-labelled with its first prediction when that prediction is a
known individual (the new_individual rule put no ``new_individual`` before it) and its
score, the score the threshold applies to (the fused score when local re-ranking is
on), reaches a *confidence* calibrated on the out-of-fold searches that tuned the
threshold: the smallest score at which the validation photos whose first candidate
scores at least that much have a top-1 precision of at least ``min_precision``. A
validation photo counts as right only when its first candidate is its individual;
a ``new_individual`` truth is always wrong (no known candidate is right for it). Test
truth is never read.

The pseudo-labelled photos then join the training side of the second round's folds
(:func:`pseudo_labelled_folds`), never a validation side, and only folds whose
training photos already hold their individual (:func:`whale_ml.data.folds.fold_split`),
so that no validation truth changes from ``new_individual`` to known and the second
round's out-of-fold threshold stays honest. See docs/retrieval.md ("Pseudo-label round").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL

PSEUDO_COLUMNS = ["image", "individual_id", "score"]


def out_of_fold_top1(sims: np.ndarray, ids: np.ndarray, truths: Sequence[str]) -> dict[str, list[Any]]:
    """The out-of-fold searches reduced to what calibration needs: each validation photo's
    first candidate's score and whether that candidate is its individual.

    Args:
        sims: (n, k) scores, best first (``OutOfFoldThreshold.sims``: fused when re-ranked).
        ids: (n, k) the candidates.
        truths: each photo's individual, or ``new_individual``.

    Returns:
        ``{"score": [...], "correct": [...]}``, JSON-ready (what ``match_threshold`` stores).
    """
    sims, ids = np.asarray(sims, dtype=np.float64), np.asarray(ids, dtype=object)
    if sims.ndim != 2 or sims.shape != ids.shape or len(sims) != len(truths):
        raise ValueError(f"sims {sims.shape}, ids {ids.shape} and {len(truths)} truths do not match")
    truth = np.asarray(list(truths), dtype=object)
    correct = (ids[:, 0] == truth) & (truth != NEW_INDIVIDUAL) if len(truth) else np.zeros(0, dtype=bool)
    return {"score": sims[:, 0].tolist() if len(sims) else [], "correct": [bool(c) for c in correct]}


@dataclass(frozen=True)
class Calibration:
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
) -> Calibration:
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
        return Calibration(float("inf"), min_precision, float(floor), float("nan"), 0, len(scores), curve)
    best = ok.iloc[-1]
    return Calibration(float(best["cutoff"]), min_precision, float(floor), float(best["precision"]), int(best["photos"]), len(scores), curve)


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


def pseudo_labelled_folds(cv_folds: pd.DataFrame, pseudo: pd.DataFrame, crops: pd.DataFrame) -> pd.DataFrame:
    """The second round's fold table: ``cv_folds`` plus one row per pseudo-labelled test photo.

    A pseudo row has its test crop, its pseudo individual's label and species, ``fold = -1``
    (never validated) and ``pseudo = True``; :func:`whale_ml.data.folds.fold_split` puts it
    on the training side of exactly the folds whose own training photos hold that individual.

    Raises:
        ValueError: a pseudo individual has no training photo, or a pseudo photo no crop.
    """
    folds = cv_folds.assign(pseudo=False)
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
    if "path" in rows:
        rows["path"] = rows["crop_path"]
    return pd.concat([folds, rows[folds.columns]], ignore_index=True)
