"""The new_individual threshold, tuned on out-of-fold predictions.

Each fold's validation photos are searched against that fold's training photos with
that fold's model (whose training never saw them), so a validation photo of an
individual missing from the fold's training is a true ``new_individual`` case. The
searches of all folds are pooled and the threshold that maximises their MAP@5 is
found exactly (:func:`tune_threshold`: every distinct threshold, no grid); optionally
with a margin weight (:func:`tune_margin`) and one per species
(:func:`tune_species_thresholds`). See docs/retrieval.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.data.folds import fold_split
from whale_ml.progress import ProgressFn
from whale_ml.retrieval.faiss_index import build_index, search_gallery
from whale_ml.retrieval.centres import ClassCentres, centre_similarity
from whale_ml.retrieval.fusion import FusionResult, NotCalibratable, fused_ranking, tune_fusion
from whale_ml.retrieval.local_features import FeatureStore
from whale_ml.retrieval.margin import MarginResult, check_margin_weights, tune_margin
from whale_ml.retrieval.rerank import Inliers, LocalRerank, match_candidates
from whale_ml.retrieval.ranking import TOP, SpeciesThresholds, ThresholdResult, nearest_species, tune_species_thresholds, tune_threshold
from whale_ml.retrieval.store import load_embeddings_of


def out_of_fold_search(
    folds: pd.DataFrame, embeddings_dir: Callable[[str], Path], fold_keys: Sequence[str], k: int = 50, top: int = TOP
) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]]:
    """Per fold with validation photos: its training and validation rows, and the validation
    photos' best ``top`` individuals among that fold's training photos, by that fold's model.

    Args:
        folds: the ``cv_folds`` table.
        embeddings_dir: fold key -> the folder of its ``train`` embeddings.
        fold_keys: ``fold0``, ``fold1``, ... in order.
        top: candidate individuals per validation photo.

    Yields:
        ``(fold, train, val, sims, ids)`` as :func:`search_gallery` returns them; ``val``
        has the ``truth`` column (``new_individual`` where the fold's training lacks the id).
    """
    for found in fold_searches(folds, embeddings_dir, fold_keys, k, top):
        yield found.fold, found.train, found.val, found.sims, found.ids


@dataclass
class FoldSearch:
    """One fold's out-of-fold search, with the embeddings it searched (for re-ranking)."""

    fold: str
    train: pd.DataFrame
    val: pd.DataFrame
    sims: np.ndarray  # (n_val, top)
    ids: np.ndarray
    gallery: np.ndarray  # (n_train, d) the fold model's embeddings of its training photos
    queries: np.ndarray  # (n_val, d)


def fold_searches(
    folds: pd.DataFrame, embeddings_dir: Callable[[str], Path], fold_keys: Sequence[str], k: int = 50, top: int = TOP
) -> Iterator[FoldSearch]:
    """:func:`out_of_fold_search`, with each fold's embeddings."""
    for i, fold in enumerate(fold_keys):
        train, val = fold_split(folds, i)
        if val.empty:
            continue
        gallery, queries = load_embeddings_of(embeddings_dir(fold), "train", train, val)
        sims, ids = search_gallery(build_index(gallery), train["individual_id"].to_numpy(), queries, k=k, top=top)
        yield FoldSearch(fold, train, val, sims, ids, gallery, queries)


@dataclass
class OutOfFoldThreshold:
    """The tuned threshold(s) and the pooled out-of-fold searches they were tuned on."""

    result: ThresholdResult  # the global threshold over all folds' validation photos
    per_fold: list[dict[str, Any]]  # fold, queries, and each fold's own best threshold and MAP@5
    species: SpeciesThresholds | None  # per-species thresholds, when asked for
    sims: np.ndarray  # (n, K) pooled over folds, in fold order: the scores the rule ranks by (the threshold: at ``margin``)
    ids: np.ndarray
    truths: list[str]
    plain: ThresholdResult | None = None  # with re-ranking: the embedding similarity alone, for comparison
    fusion: FusionResult | None = None  # with re-ranking: the tuned fusion and its per-weight table
    rerank: LocalRerank | None = None
    rerank_cost: Inliers | None = None
    candidates: int = TOP  # candidate individuals per query that the fusion re-ranks
    centres_note: str | None = None  # why class-centre scores were asked for but left out
    margin: MarginResult | None = None  # when margin weights were tried: the chosen one and each weight's best
    k: int = 50  # neighbours fetched per validation photo before collapsing to individuals

    @property
    def queries(self) -> int:
        return len(self.truths)

    @property
    def map5(self) -> float:
        """Out-of-fold MAP@5 of the thresholds in use (the species' own where tuned)."""
        return self.species.map5 if self.species is not None else self.result.map5

    def value(self) -> dict[str, Any]:
        """The ``match_threshold`` asset's value: what the submission and ``whale identify`` read."""
        value: dict[str, Any] = {
            "threshold": self.result.threshold,
            "map5": self.map5,
            "new_share": self.result.new_share,
            "queries": self.queries,
            "per_fold": self.per_fold,
            "species_thresholds": self.species.by_species if self.species is not None else {},
            "k": self.k,  # the search depth of the out-of-fold searches, which the pseudo-label round repeats per fold
        }
        if self.fusion is not None:
            # The threshold then applies to the fused score: whoever reads it must fuse alike.
            value["fusion"] = self.fusion.fusion.to_dict()
            value["map5_without_fusion"] = self.plain.map5 if self.plain is not None else None
            if self.rerank is not None:
                value["rerank"] = self.rerank.to_dict()
                value["map5_without_rerank"] = self.plain.map5 if self.plain is not None else None
            if self.fusion.fusion.centre_weight > 0:
                value["class_centres"] = {"candidates": self.candidates}
        # The threshold applies to s1 + margin * (s1 - s2) (ranking.decision_scores); 0 is the plain rule.
        value["margin"] = self.margin.weight if self.margin is not None else 0.0
        if self.margin is not None:
            value["map5_without_margin"] = self.margin.plain.map5
        return value


def _missing_centres(centres: dict[str, ClassCentres | None]) -> str | None:
    """Why class-centre scores cannot be used (a fold model kept none), or None."""
    missing = [f for f, c in centres.items() if c is None]
    if not missing:
        return None
    return (
        f"class-centre scores left out: the {', '.join(missing)} model(s) kept no class centres (trained before "
        "best.pt kept them): retrain the fold models and rematerialise fold_embeddings to use them"
    )


def _match_fold(rerank: LocalRerank, features: FeatureStore, found: FoldSearch, progress: ProgressFn | None) -> Inliers:
    """Local-feature inliers of one fold's validation photos against their candidates among its training photos."""
    train, val = found.train, found.val
    return match_candidates(
        rerank,
        found.gallery,
        train["individual_id"].to_numpy(dtype=object),
        [features.get(img) for img in train["image"]],
        found.queries,
        [features.get(img) for img in val["image"]],
        found.ids,
        progress,
    )


def _fold_sets(
    embeddings_dir: Callable[[str], Path], folds: Sequence[str], class_centres: bool
) -> tuple[Callable[[str], Path], dict[str, ClassCentres | None]]:
    """Each fold's embedding set, resolved once (a fold re-embedded meanwhile must not give
    the searches one model's vectors and the centres another's), and its centres, read once
    when asked for."""
    folders = {f: embeddings_dir(f) for f in folds}
    return folders.__getitem__, ({f: ClassCentres.load(folders[f]) for f in folds} if class_centres else {})


def tune_out_of_fold(
    cv_folds: pd.DataFrame,
    embeddings_dir: Callable[[str], Path],
    folds: Sequence[str],
    k: int = 50,
    per_species: bool = False,
    species_min_queries: int = 100,
    rerank: LocalRerank | None = None,
    features: FeatureStore | None = None,
    fusion_weights: int = 21,
    progress: ProgressFn | None = None,
    class_centres: bool = False,
    candidates: int = 10,
    margin_weights: Sequence[float] = (0.0,),
) -> OutOfFoldThreshold:
    """The new_individual threshold that maximises out-of-fold MAP@5 (see the module docstring).

    Args:
        cv_folds: the ``cv_folds`` table (``image, individual_id, species, fold``).
        embeddings_dir: fold key -> the folder of its ``train`` embeddings.
        folds: the fold keys, in order.
        k: neighbours fetched per validation photo at first.
        per_species: also tune a threshold per species (of the nearest individual).
        species_min_queries: the fewest validation photos for a species' own threshold.
        rerank: re-rank each validation photo's first ``rerank.candidates`` individuals by
            local features (from ``features``, the ``local_features`` asset's store) and tune
            the fusion weight together with the threshold (:func:`tune_fusion`).
        fusion_weights: how many weights in [0, 1] are tried per fused matcher (with
            both local features and class centres: every point of that grid on the simplex).
        margin_weights: weights of the first candidate's lead over the second in the
            new_individual decision (:mod:`whale_ml.retrieval.margin`), tried on the final
            (fused) ranking with the exact threshold each; ``(0.0,)`` is the plain rule.
        progress: called as local matching proceeds (validation photos done, total).
        class_centres: fuse each candidate's class-centre similarity too: the validation
            photos of fold k against fold k's model's centres (written beside its embeddings,
            :class:`ClassCentres`; every candidate, a fold training individual, has one). Left
            out, with a warning, when a fold model has none (trained before they were kept).
        candidates: without ``rerank``, the first individuals per query the class centres
            re-rank (with it, ``rerank.candidates``).

    Raises:
        ValueError: no fold has validation photos, or ``rerank`` without ``features``.
    """
    if rerank is not None and features is None:
        raise ValueError("re-ranking needs the local_features store")
    margin_grid = check_margin_weights(margin_weights)
    embeddings_dir, centres = _fold_sets(embeddings_dir, folds, class_centres)
    centres_note = _missing_centres(centres) if class_centres else None
    if centres_note:
        warnings.warn(centres_note, stacklevel=2)
        class_centres = False
    top = rerank.candidates if rerank is not None else (candidates if class_centres else TOP)
    sims_all, ids_all, inliers_all, centre_all, truths, per_fold = [], [], [], [], [], []
    seconds, pairs = 0.0, 0
    searches = list(fold_searches(cv_folds, embeddings_dir, folds, k=k, top=top))
    total = sum(len(f.val) for f in searches)
    for found in searches:
        fold, train, val, sims, ids = found.fold, found.train, found.val, found.sims, found.ids
        own = tune_threshold(sims, ids, val["truth"].tolist(), gallery_ids=train["individual_id"].tolist())
        per_fold.append({"fold": fold, "queries": len(val), "best_threshold": own.threshold, "best_map5": own.map5})
        if rerank is not None and features is not None:
            done = len(truths)
            report = None if progress is None else (lambda d, _t, done=done: progress(done + d, total))
            matched = _match_fold(rerank, features, found, report)
            inliers_all.append(matched.counts)
            seconds, pairs = seconds + matched.seconds, pairs + matched.pairs
        if class_centres:
            fold_centres = centres[fold]
            assert fold_centres is not None
            centre_all.append(centre_similarity(found.queries, fold_centres, ids))
        sims_all.append(sims)
        ids_all.append(ids)
        truths += val["truth"].tolist()
    if not sims_all:
        raise ValueError("no fold has validation photos: cannot tune the threshold")
    sims, ids = np.concatenate(sims_all), np.concatenate(ids_all)
    # 'truth' is already new_individual where the fold's gallery lacks the individual, so
    # every other truth is known. Passing all ids matters: by default only ids found in
    # the (top-5) lists count as known, and a missed known individual would score as new.
    known = cv_folds["individual_id"].unique().tolist()
    plain = tune_threshold(sims, ids, truths, gallery_ids=known)
    result, fusion, cost = plain, None, None
    if rerank is not None or class_centres:
        inliers = np.concatenate(inliers_all) if rerank is not None else None
        centre_sims = np.concatenate(centre_all) if class_centres else None
        try:
            fusion = tune_fusion(sims, ids, inliers, truths, known, fusion_weights, centre_sims)
        except NotCalibratable as exc:
            # E.g. no validation photo's individual among its candidates: nothing to learn a
            # fusion from. The embedding ranking alone is what such folds support.
            warnings.warn(f"fusion left out (local re-ranking, class centres): {exc}", stacklevel=2)
            rerank = None
        else:
            if rerank is None and fusion.fusion.centre_weight == 0:
                # The centres did not help: the fusion is a monotone map of the similarity,
                # so the plain similarity and its threshold are the same ranking, simpler to read.
                fusion = None
            else:
                result = fusion.threshold
                sims, ids = fused_ranking(sims, ids, inliers, fusion.fusion, centre_sims)
                cost = Inliers(inliers, seconds, pairs) if inliers is not None else None
    margin = None
    if (margin_grid > 0).any():  # after any fusion: the decision reads the final ranking's scores
        margin = tune_margin(sims, ids, truths, known, margin_grid)
        result = margin.threshold
    species = None
    if per_species:
        species_of = dict(zip(cv_folds["individual_id"], cv_folds["species"], strict=True))
        species = tune_species_thresholds(
            sims,
            ids,
            truths,
            nearest_species(ids, species_of),
            gallery_ids=known,
            min_queries=species_min_queries,
            margin=margin.weight if margin is not None else 0.0,
        )
    return OutOfFoldThreshold(
        result, per_fold, species, sims, ids, truths, plain if fusion else None, fusion, rerank, cost, top, centres_note, margin, k
    )
