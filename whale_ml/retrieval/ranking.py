"""MAP@5, the new_individual rule, and exact threshold tuning.

The rule (the reference notebook's, in similarity terms): rank the gallery's
individuals by their best similarity to the query, insert ``new_individual``
before the first individual whose similarity is below the threshold, and keep
the first five.

Because only the five best individuals of a query can ever appear, each
query's score is a step function of the threshold with at most five steps, at
its five best similarities. :func:`tune_threshold` therefore evaluates MAP@5
on *every* interval between consecutive step positions of all queries -- the
exact optimum, not a grid -- with one sort and one cumulative sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL

TOP = 5


def map_at_5(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> float:
    """Kaggle's MAP@5 with one true label per query.

    Args:
        predictions: up to five ids per query, best first.
        truths: the true id of each query, or ``"new_individual"``.

    Returns:
        The mean over queries of 1/rank of the first correct id in the first
        five (0 when absent).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} prediction lists for {len(truths)} truths")
    if len(truths) == 0:
        raise ValueError("map_at_5 needs at least one query")
    total = 0.0
    for preds, truth in zip(predictions, truths, strict=True):
        for rank, pred in enumerate(list(preds)[:TOP], start=1):
            if pred == truth:
                total += 1.0 / rank
                break
    return total / len(truths)


def collapse_by_individual(similarities: np.ndarray, neighbor_ids: np.ndarray, top: int = TOP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best similarity per individual: the first ``top`` distinct ids of each row.

    Args:
        similarities: (n, k), each row sorted in descending order; ``-inf``
            marks padding (no neighbour).
        neighbor_ids: (n, k) gallery individual id of each neighbour; repeats allowed.
        top: distinct individuals kept per row.

    Returns:
        ``(sims, ids, counts)``: (n, top) best similarities (``-inf`` padded),
        (n, top) ids (``""`` padded, object dtype), and (n,) distinct ids seen
        (at least ``top`` whenever the row holds that many).
    """
    sims = np.asarray(similarities, dtype=np.float64)
    ids = np.asarray(neighbor_ids)
    if sims.ndim != 2 or ids.shape != sims.shape:
        raise ValueError(f"similarities {sims.shape} and neighbor_ids {ids.shape} must be the same 2-D shape")
    n, k = sims.shape
    if k == 0:
        raise ValueError("similarities has no columns: every query needs at least one neighbour")
    if np.isnan(sims).any():
        raise ValueError("similarities contain NaN")
    with np.errstate(invalid="ignore"):  # -inf padding: -inf - -inf is nan, which compares False
        rising = (np.diff(sims, axis=1) > 0).any(axis=1) if k > 1 else np.zeros(n, dtype=bool)
    if rising.any():
        raise ValueError(f"similarities must be sorted in descending order per row (row {int(np.argmax(rising))} is not)")

    # Only the first ``top`` distinct ids matter, and they almost always sit in the
    # first few columns: collapse a narrow prefix, and widen it only for the rows
    # that need more (k=750 lists cost no more than k=32 ones).
    out_sims = np.full((n, top), -np.inf)
    out_ids = np.full((n, top), "", dtype=object)
    counts = np.zeros(n, dtype=np.int64)
    pending = np.arange(n)
    width = min(k, max(8 * top, 32))
    while len(pending):
        b_sims, b_ids, b_counts = _collapse_block(sims[pending, :width], ids[pending, :width], top)
        done = (b_counts >= top) | (width >= k)
        rows = pending[done]
        out_sims[rows], out_ids[rows], counts[rows] = b_sims[done], b_ids[done], b_counts[done]
        pending = pending[~done]
        width = min(k, width * 4)
    return out_sims, out_ids, counts


def _collapse_block(sims: np.ndarray, ids: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k = sims.shape
    valid = np.isfinite(sims)
    codes, uniques = pd.factorize(np.asarray(ids, dtype=object).ravel())
    codes = np.where(valid, codes.reshape(n, k), -1)
    # First occurrence of each id in a row = its best similarity (rows are sorted).
    order = np.argsort(codes, axis=1, kind="stable")
    sorted_codes = np.take_along_axis(codes, order, axis=1)
    first_sorted = np.ones_like(sorted_codes, dtype=bool)
    first_sorted[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    is_first = np.zeros_like(first_sorted)
    np.put_along_axis(is_first, order, first_sorted, axis=1)
    is_first &= valid
    slot = np.cumsum(is_first, axis=1) - 1
    keep = is_first & (slot < top)
    rows, cols = np.nonzero(keep)
    out_sims = np.full((n, top), -np.inf)
    out_ids = np.full((n, top), "", dtype=object)
    out_sims[rows, slot[rows, cols]] = sims[rows, cols]
    out_ids[rows, slot[rows, cols]] = np.asarray(uniques, dtype=object)[codes[rows, cols]]
    return out_sims, out_ids, is_first.sum(axis=1)


def _insert_new(ids: np.ndarray, n_above: int, n_found: int) -> list[str]:
    found = [str(i) for i in ids[: min(n_found, TOP)]]
    return (found[:n_above] + [NEW_INDIVIDUAL] + found[n_above:])[:TOP]


def predict_top5(similarities: np.ndarray, neighbor_ids: np.ndarray, threshold: float) -> list[list[str]]:
    """Five predictions per query by the new_individual rule.

    Args:
        similarities: (n, k) sorted descending per row.
        neighbor_ids: (n, k) gallery individual id per neighbour (repeats allowed).
        threshold: individuals at or above it rank before ``new_individual``.

    Returns:
        Per query, five distinct ids (fewer only when the neighbours hold
        fewer than four individuals).
    """
    sims, ids, counts = collapse_by_individual(similarities, neighbor_ids)
    n_above = (sims >= threshold).sum(axis=1)
    return [_insert_new(ids[q], int(n_above[q]), int(counts[q])) for q in range(len(sims))]


@dataclass
class ThresholdResult:
    """The chosen threshold and the whole MAP@5 curve it was chosen from."""

    threshold: float
    map5: float
    thresholds: np.ndarray = field(repr=False)  # one per interval, descending
    map5_curve: np.ndarray = field(repr=False)
    new_share: float = 0.0  # share of queries whose first prediction is new_individual

    def curve(self) -> pd.DataFrame:
        return pd.DataFrame({"threshold": self.thresholds, "map5": self.map5_curve})


def _scores_by_cut(ids: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """score[q, r]: query q's score when ``r`` individuals precede new_individual."""
    n = len(truths)
    r = np.arange(TOP + 1)
    is_new = truths == NEW_INDIVIDUAL
    match = ids == truths[:, None]
    has = match.any(axis=1) & ~is_new
    p = np.where(has, match.argmax(axis=1) + 1, 0)  # 1-based rank among individuals, 0 = absent
    # Known truth at rank p: before the cut it keeps rank p; after, new_individual pushes it to p+1.
    known = np.where(p[:, None] <= r[None, :], 1.0 / np.maximum(p, 1)[:, None], 1.0 / (p + 1)[:, None])
    known = np.where((p[:, None] > r[None, :]) & (p[:, None] + 1 > TOP), 0.0, known)
    known = np.where(has[:, None], known, 0.0)
    new = np.where(r < TOP, 1.0 / (r + 1), 0.0)[None, :].repeat(n, axis=0)
    # Entries for r beyond a query's number of individuals are never reached:
    # its events stop there.
    return np.where(is_new[:, None], new, known)


def tune_threshold(
    similarities: np.ndarray,
    neighbor_ids: np.ndarray,
    truths: Sequence[str],
    gallery_ids: Sequence[str] | None = None,
) -> ThresholdResult:
    """The threshold that maximises MAP@5, found exactly.

    Args:
        similarities: (n, k) sorted descending per row.
        neighbor_ids: (n, k) gallery individual id per neighbour.
        truths: per query, its individual id or ``"new_individual"``.
        gallery_ids: the gallery's id per image; a truth not among them is
            scored as ``new_individual``. Default: every id in ``neighbor_ids``.

    Returns:
        The threshold (the midpoint of the best interval, so that small
        changes in similarity do not flip decisions), its MAP@5, and the curve
        over all intervals.
        ``predict_top5`` at ``.threshold`` scores exactly ``.map5``.
    """
    sims, ids, _ = collapse_by_individual(similarities, neighbor_ids)
    truths_arr = np.asarray(truths, dtype=object)
    if len(truths_arr) != len(sims):
        raise ValueError(f"{len(truths_arr)} truths for {len(sims)} queries")
    known = set(np.asarray(neighbor_ids, dtype=object).ravel()) if gallery_ids is None else set(gallery_ids)
    truths_arr = np.array([t if t in known else NEW_INDIVIDUAL for t in truths_arr], dtype=object)

    scores = _scores_by_cut(ids, truths_arr)
    n = len(sims)
    base = scores[:, 0].sum()
    # Event (q, j): as the threshold falls past sims[q, j], r_q goes from j to j+1.
    q_idx, j_idx = np.nonzero(np.isfinite(sims))
    values = sims[q_idx, j_idx]
    deltas = scores[q_idx, j_idx + 1] - scores[q_idx, j_idx]
    order = np.argsort(-values, kind="stable")
    values, deltas = values[order], deltas[order]
    totals = base + np.cumsum(deltas)
    # Ties: the interval (next value, v] includes every event at v.
    last_of_value = np.ones(len(values), dtype=bool)
    last_of_value[:-1] = values[:-1] != values[1:]
    cut_values = values[last_of_value]
    curve = np.concatenate([[base], totals[last_of_value]]) / n
    # One representative threshold per interval: midpoints, and a small step beyond the ends.
    if len(cut_values):
        step = 1e-6 * max(1.0, float(np.abs(cut_values).max()))
        upper, lower = cut_values[:-1], cut_values[1:]
        mid = (upper + lower) / 2
        # Adjacent floats have no midpoint strictly above the lower one: take the upper
        # value, which belongs to the interval (lower, upper] too.
        mid = np.where(mid > lower, mid, upper)
        thresholds = np.concatenate([[cut_values[0] + step], mid, [cut_values[-1] - step]])
    else:
        thresholds = np.array([0.0])
    best_val = curve.max()
    best = np.flatnonzero(curve >= best_val - 1e-12)
    pick = int(best[len(best) // 2])  # the middle of equally good intervals: least on the edge
    threshold = float(thresholds[pick])
    new_share = float((sims[:, 0] < threshold).mean())
    return ThresholdResult(threshold, float(curve[pick]), thresholds, curve, new_share)
