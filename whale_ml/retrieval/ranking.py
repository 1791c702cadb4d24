"""MAP@5, the new_individual rule, and exact threshold tuning.

The rule (the reference notebook's, in similarity terms: docs/retrieval.md): rank the gallery's
individuals by their best similarity to the query, insert ``new_individual``
before the first individual whose similarity is below the threshold, and keep
the first five.

Because only the five best individuals of a query can ever appear, each
query's score is a step function of the threshold with at most five steps, at
its five best similarities. :func:`tune_threshold` therefore evaluates MAP@5
on *every* interval between consecutive step positions of all queries -- the
exact optimum, not a grid -- with one sort and one cumulative sum.

Optionally the first candidate is judged by more than its own score: its lead over
the second counts too (:func:`decision_scores`, weight ``lead_weight``; tuned in
:mod:`whale_ml.retrieval.lead`). The tuning stays exact at each weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    sims = np.asarray(similarities)
    ids = np.asarray(neighbor_ids)
    if sims.ndim != 2 or ids.shape != sims.shape:
        raise ValueError(f"similarities {sims.shape} and neighbor_ids {ids.shape} must be the same 2-D shape")
    n, k = sims.shape
    if k == 0:
        raise ValueError("similarities has no columns: every query needs at least one neighbour")
    if not np.issubdtype(sims.dtype, np.floating):
        sims = sims.astype(np.float64)
    _check_rows(sims)
    # Only the first ``top`` distinct ids matter, and they almost always sit in the
    # first few columns: collapse a narrow prefix, and widen it (x4) only for the rows
    # that need more, so k=750 lists cost about what k=20 ones do.
    out_sims = np.full((n, top), -np.inf)
    out_ids = np.full((n, top), "", dtype=object)
    counts = np.zeros(n, dtype=np.int64)
    pending = np.arange(n)
    width = min(k, 4 * top)
    while len(pending):
        b_sims, b_ids, b_counts = _collapse_block(sims[pending, :width], ids[pending, :width], top)
        done = (b_counts >= top) | (width >= k)
        rows = pending[done]
        out_sims[rows], out_ids[rows], counts[rows] = b_sims[done], b_ids[done], b_counts[done]
        pending = pending[~done]
        width = min(k, width * 4)
    return out_sims, out_ids, counts


def _check_rows(sims: np.ndarray) -> None:
    """Reject input the rule would silently get wrong; names the first bad row.

    Written as reductions and one comparison in the input's own dtype: on
    notebook-sized lists (2,552 x 750) this check is most of the cost of tuning.
    """
    if np.isnan(sims.max()):  # NaN propagates through max: one pass, no temporary
        row = int(np.flatnonzero(np.isnan(sims).any(axis=1))[0])
        raise ValueError(f"similarities contain NaN (row {row})")
    empty = ~np.isfinite(sims[:, 0])  # sorted rows: a non-finite first column means no neighbour at all
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"similarity row {row} has no neighbour (first similarity {sims[row, 0]}): "
            "every query needs at least one finite similarity; was the gallery empty?"
        )
    if sims.shape[1] > 1:
        rising = np.less(sims[:, :-1], sims[:, 1:])  # -inf padding never compares less than -inf
        if rising.any():
            row = int(np.flatnonzero(rising.any(axis=1))[0])
            raise ValueError(f"similarities must be sorted in descending order per row (row {row} is not)")


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


def decision_scores(sims: np.ndarray, lead_weight: float = 0.0) -> np.ndarray:
    """What the threshold is compared with, per candidate of collapsed lists.

    The first candidate's score plus ``lead_weight`` times its lead over the second
    (``d = s1 + lead_weight * (s1 - s2)``): a query whose best individual stands clear of the
    next is more likely to be that individual than one whose first two are close, at
    the same ``s1``. The other candidates keep their own scores: the lead of the third
    over the fourth says nothing about whether the query is new. Since ``d >= s1 >= s2``
    the rows stay sorted, so ``new_individual`` goes first when ``d`` is below the
    threshold and otherwise before the first later candidate below it -- the plain
    rule, with ``s1`` replaced by ``d`` (docs/retrieval.md, "The lead"). A query with
    a single candidate has no lead (``d = s1``): nothing shows it standing clear.

    Args:
        sims: (n, top) best score per individual, descending per row (``-inf`` padded),
            as :func:`collapse_by_individual` returns them.
        lead_weight: the lead's weight, ``>= 0``; 0 is the plain rule (``sims`` itself).

    Raises:
        ValueError: a negative or non-finite ``lead_weight``.
    """
    if not np.isfinite(lead_weight) or lead_weight < 0:
        raise ValueError(f"the lead weight must be a finite number >= 0, got {lead_weight}")
    if lead_weight == 0 or sims.shape[1] < 2:
        return sims
    out = np.array(sims, dtype=np.float64)
    out[:, 0] += lead_weight * first_leads(out)
    return out


def first_leads(sims: np.ndarray) -> np.ndarray:
    """(n,) each row's first score's lead over its second, ``s1 - s2``; 0 without a second
    candidate (``-inf`` padding, or a single column): nothing shows it standing clear.

    Args:
        sims: (n, top) scores, descending per row, as :func:`decision_scores` reads them.
    """
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim != 2 or sims.shape[1] < 2:
        return np.zeros(len(sims))
    return np.where(np.isfinite(sims[:, 1]), sims[:, 0] - sims[:, 1], 0.0)


def predict_top5(
    similarities: np.ndarray, neighbor_ids: np.ndarray, threshold: float | np.ndarray, lead_weight: float = 0.0
) -> list[list[str]]:
    """Five predictions per query by the new_individual rule.

    Args:
        similarities: (n, k) sorted descending per row.
        neighbor_ids: (n, k) gallery individual id per neighbour (repeats allowed).
        threshold: individuals at or above it rank before ``new_individual``;
            one value, or one per query (e.g. per-species thresholds, see
            :meth:`SpeciesThresholds.for_queries`).
        lead_weight: the weight of the first candidate's lead over the second in the
            score compared with the threshold (:func:`decision_scores`); 0, the
            default, is the plain rule.

    Returns:
        Per query, five distinct ids (fewer only when the neighbours hold
        fewer than four individuals).
    """
    sims, ids, counts = collapse_by_individual(similarities, neighbor_ids)
    sims = decision_scores(sims, lead_weight)
    th = np.asarray(threshold, dtype=np.float64)
    if th.ndim == 1:
        if len(th) != len(sims):
            raise ValueError(f"{len(th)} thresholds for {len(sims)} queries")
        th = th[:, None]
    elif th.ndim != 0:
        raise ValueError(f"threshold must be a number or one per query, got shape {th.shape}")
    n_above = (sims >= th).sum(axis=1)
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
    lead_weight: float = 0.0,
) -> ThresholdResult:
    """The threshold that maximises MAP@5, found exactly.

    Args:
        similarities: (n, k) sorted descending per row.
        neighbor_ids: (n, k) gallery individual id per neighbour.
        truths: per query, its individual id or ``"new_individual"``.
        gallery_ids: the gallery's id per image; a truth not among them is
            scored as ``new_individual``. Default: every id in ``neighbor_ids``.
        lead_weight: the threshold applies to :func:`decision_scores` at this weight
            (still exact: the decision rows are sorted like the similarities).

    Returns:
        The threshold (the midpoint of the best interval, so that small
        changes in similarity do not flip decisions), its MAP@5, and the curve
        over all intervals.
        ``predict_top5`` at ``.threshold`` (and ``lead_weight``) scores exactly ``.map5``.
    """
    sims, ids, _ = collapse_by_individual(similarities, neighbor_ids)
    truths_arr = known_truths(truths, len(sims), neighbor_ids, gallery_ids)
    return tune_collapsed(decision_scores(sims, lead_weight), ids, truths_arr)


def known_truths(truths: Sequence[str], n: int, neighbor_ids: np.ndarray, gallery_ids: Sequence[str] | None) -> np.ndarray:
    """Truths as an object array, with ids absent from the gallery scored as new_individual."""
    truths_arr = np.asarray(truths, dtype=object)
    if len(truths_arr) != n:
        raise ValueError(f"{len(truths_arr)} truths for {n} queries")
    known = set(np.asarray(neighbor_ids, dtype=object).ravel()) if gallery_ids is None else set(gallery_ids)
    return np.array([t if t in known else NEW_INDIVIDUAL for t in truths_arr], dtype=object)


def tune_collapsed(sims: np.ndarray, ids: np.ndarray, truths_arr: np.ndarray) -> ThresholdResult:
    """:func:`tune_threshold` on already collapsed (n, 5) lists and gallery-mapped truths."""
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


@dataclass
class SpeciesThresholds:
    """A threshold per species where validation has enough queries, the global one elsewhere.

    A query's species is the species of its nearest gallery individual (the
    test set has no species column), the same rule in validation and at test.
    """

    default: float  # the global threshold, for every other species
    by_species: dict[str, float]
    map5: float  # validation MAP@5 with these thresholds (>= the global one's, on validation)
    global_map5: float
    table: pd.DataFrame = field(repr=False)  # per species: queries, threshold, MAP@5 own vs global

    def for_queries(self, species: Sequence[str]) -> np.ndarray:
        """One threshold per query, for :func:`predict_top5`."""
        return np.array([self.by_species.get(s, self.default) for s in species], dtype=np.float64)


def nearest_species(ids: np.ndarray, species_of: dict[str, str]) -> list[str]:
    """The species of each query's nearest individual (first column of ``ids``; '' when unknown)."""
    first = np.asarray(ids, dtype=object)
    first = first[:, 0] if first.ndim == 2 else first
    return [species_of.get(i, "") for i in first]


def query_thresholds(
    ids: np.ndarray, species_of: Mapping[str, str], threshold: float, by_species: Mapping[str, float] | None = None
) -> np.ndarray:
    """Each query's new_individual threshold, for :func:`predict_top5`: the own threshold
    of its nearest individual's species where one was tuned (``by_species``, as the
    ``match_threshold`` asset stores it), the global ``threshold`` elsewhere."""
    by_species = by_species or {}
    return np.array([by_species.get(s, threshold) for s in nearest_species(ids, species_of)], dtype=np.float64)


def tune_species_thresholds(
    similarities: np.ndarray,
    neighbor_ids: np.ndarray,
    truths: Sequence[str],
    species: Sequence[str],
    gallery_ids: Sequence[str] | None = None,
    min_queries: int = 100,
    lead_weight: float = 0.0,
) -> SpeciesThresholds:
    """Per-species thresholds, each exact on its species' queries.

    MAP@5 is a mean over queries, so with queries grouped by species the best
    set of per-species thresholds is each group's own optimum: one exact
    :func:`tune_threshold` per species with at least ``min_queries``
    validation queries. Smaller groups keep the global threshold, since an
    optimum over a few dozen queries mostly fits their noise.

    Args:
        species: per query, the group it is tuned in (use
            :func:`nearest_species` so that test queries can be grouped the same way).
        min_queries: the fewest validation queries for a species' own threshold.
        lead_weight: every threshold applies to :func:`decision_scores` at this weight (one
            weight for all species: a per-species weight would fit still fewer photos).
    """
    sims, ids, _ = collapse_by_individual(similarities, neighbor_ids)
    sims = decision_scores(sims, lead_weight)
    truths_arr = known_truths(truths, len(sims), neighbor_ids, gallery_ids)
    species_arr = np.asarray(species, dtype=object)
    if len(species_arr) != len(sims):
        raise ValueError(f"{len(species_arr)} species for {len(sims)} queries")
    overall = tune_collapsed(sims, ids, truths_arr)
    # Each query's score at the global threshold, to compare per species.
    at_global = _scores_by_cut(ids, truths_arr)[np.arange(len(sims)), (sims >= overall.threshold).sum(axis=1)]
    rows, by_species, total = [], {}, at_global.sum()
    for name in sorted(set(species_arr)):
        mask = species_arr == name
        own_map5 = global_map5 = float(at_global[mask].mean())
        threshold = overall.threshold
        if mask.sum() >= min_queries:
            result = tune_collapsed(sims[mask], ids[mask], truths_arr[mask])
            if result.map5 > global_map5 + 1e-12:  # keep the global value when it is as good
                threshold, own_map5 = result.threshold, result.map5
                by_species[str(name)] = threshold
                total += (own_map5 - global_map5) * mask.sum()
        rows.append(
            {
                "species": name,
                "queries": int(mask.sum()),
                "threshold": threshold,
                "own": str(name) in by_species,
                "map5": own_map5,
                "map5_at_global": global_map5,
            }
        )
    return SpeciesThresholds(overall.threshold, by_species, float(total / len(sims)), overall.map5, pd.DataFrame(rows))
