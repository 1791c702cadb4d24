"""The new_individual threshold, tuned on out-of-fold predictions.

Each fold's validation photos are searched against that fold's training photos with
that fold's model (whose training never saw them), so a validation photo of an
individual missing from the fold's training is a true ``new_individual`` case. The
searches of all folds are pooled and the threshold that maximises their MAP@5 is
found exactly (:func:`tune_threshold`: every distinct threshold, no grid); optionally
with a lead weight (:func:`tune_lead`) and one per species
(:func:`tune_species_thresholds`). See docs/retrieval.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from whale_ml.data.folds import fold_split
from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.progress import ProgressFn
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.retrieval.fusion import FusionResult, NotCalibratable, fused_ranking, tune_fusion
from whale_ml.retrieval.lead import LeadResult, check_lead_weights, tune_lead
from whale_ml.retrieval.local_features import FeatureStore
from whale_ml.retrieval.matcher import Evidence, FoldGallery, Matcher, TunedMatcher, gather_evidence
from whale_ml.retrieval.ranking import TOP, SpeciesThresholds, ThresholdResult, nearest_species, tune_species_thresholds, tune_threshold
from whale_ml.retrieval.rerank import Inliers, LocalRerank
from whale_ml.retrieval.store import load_embeddings_of
from whale_ml.stage_configs import ThresholdConfig

GALLERY_COLUMNS = ["image", "individual_id", "species"]


def fold_gallery(
    cv_folds: pd.DataFrame, index: int, fold: str, folder: Path, k: int, centres: ClassCentres | None = None, *others: pd.DataFrame
) -> tuple[FoldGallery, list[np.ndarray]]:
    """Fold ``index``'s training photos under its model (embeddings in ``folder``): what its
    validation photos are searched against out of fold, never holding them; and the
    embeddings of the ``others`` rows of the same ``train`` set (e.g. its validation photos)."""
    train, _ = fold_split(cv_folds, index)
    embeddings, *rest = load_embeddings_of(folder, "train", train, *others)
    gallery = FoldGallery(fold, train[GALLERY_COLUMNS].reset_index(drop=True), embeddings, k, [centres] if centres is not None else [])
    return gallery, rest


@dataclass
class FoldSearch:
    """One fold's out-of-fold search: its validation rows and their evidence among its training photos."""

    fold: str
    val: pd.DataFrame  # with ``truth``: new_individual where the fold's training lacks the individual
    gallery: FoldGallery
    queries: np.ndarray  # (n_val, d) the fold model's embeddings of the validation photos
    evidence: Evidence


@dataclass
class OutOfFoldThreshold:
    """The tuned matcher and the pooled out-of-fold searches it was tuned on."""

    result: ThresholdResult  # the global threshold over all folds' validation photos
    per_fold: list[dict[str, Any]]  # fold, queries, and each fold's own best threshold and MAP@5
    species: SpeciesThresholds | None  # per-species thresholds, when asked for
    sims: np.ndarray  # (n, K) pooled over folds, in fold order: the scores the rule ranks by
    ids: np.ndarray
    truths: list[str]
    plain: ThresholdResult | None = None  # with a fusion: the embedding similarity alone, for comparison
    fusion: FusionResult | None = None  # the tuned fusion and its per-weight table
    rerank: LocalRerank | None = None
    rerank_cost: Inliers | None = None
    candidates: int = TOP  # candidate individuals per query that the fusion re-scores
    centres_note: str | None = None  # why class-centre scores were asked for but left out
    lead: LeadResult | None = None  # when lead weights were tried: the chosen one and each weight's best
    k: int = 50  # neighbours fetched per validation photo before collapsing to individuals

    @property
    def queries(self) -> int:
        return len(self.truths)

    @property
    def map5(self) -> float:
        """Out-of-fold MAP@5 of the thresholds in use (the species' own where tuned)."""
        return self.species.map5 if self.species is not None else self.result.map5

    @property
    def matcher(self) -> Matcher:
        """The rule tuned: what the submission, the pseudo-labels and ``whale identify`` apply."""
        fusion = self.fusion.fusion if self.fusion is not None else None
        # Local matching is only worth its cost where the fusion weighs it.
        rerank = self.rerank if fusion is not None and fusion.local_weight > 0 else None
        return Matcher(
            self.result.threshold,
            self.species.by_species if self.species is not None else {},
            self.k,
            fusion,
            rerank,
            self.candidates,
            self.lead.weight if self.lead is not None else 0.0,
        )

    def tuned(self) -> TunedMatcher:
        """The matcher with its out-of-fold record (the fold models are added where it is stored)."""
        without: dict[str, float] = {}
        if self.fusion is not None and self.plain is not None:
            without["fusion"] = self.plain.map5
            if self.rerank is not None:
                without["rerank"] = self.plain.map5
        if self.lead is not None:
            without["lead"] = self.lead.plain.map5
        top1 = out_of_fold_top1(self.sims, self.ids, self.truths)
        return TunedMatcher(self.matcher, self.map5, self.result.new_share, self.queries, self.per_fold, without, top1)


def out_of_fold_top1(sims: np.ndarray, ids: np.ndarray, truths: Sequence[str]) -> dict[str, list[Any]]:
    """The out-of-fold searches reduced to what the pseudo-labels' calibration needs: each
    validation photo's first candidate's score and whether that candidate is its individual
    (a ``new_individual`` truth is never right). JSON-ready."""
    sims, ids = np.asarray(sims, dtype=np.float64), np.asarray(ids, dtype=object)
    if sims.ndim != 2 or sims.shape != ids.shape or len(sims) != len(truths):
        raise ValueError(f"sims {sims.shape}, ids {ids.shape} and {len(truths)} truths do not match")
    truth = np.asarray(list(truths), dtype=object)
    correct = (ids[:, 0] == truth) & (truth != NEW_INDIVIDUAL) if len(truth) else np.zeros(0, dtype=bool)
    return {"score": sims[:, 0].tolist() if len(sims) else [], "correct": [bool(c) for c in correct]}


def _missing_centres(centres: dict[str, ClassCentres | None]) -> str | None:
    """Why class-centre scores cannot be used (a fold model kept none), or None."""
    missing = [f for f, c in centres.items() if c is None]
    if not missing:
        return None
    return (
        f"class-centre scores left out: the {', '.join(missing)} model(s) kept no class centres (trained before "
        "best.pt kept them): retrain the fold models and rematerialise fold_embeddings to use them"
    )


def fold_searches(
    cv_folds: pd.DataFrame,
    folders: dict[str, Path],
    k: int,
    top: int,
    rerank: LocalRerank | None = None,
    features: FeatureStore | None = None,
    centres: dict[str, ClassCentres | None] | None = None,
    progress: ProgressFn | None = None,
) -> list[FoldSearch]:
    """Every fold's validation photos searched among its training photos by its model
    (:func:`~whale_ml.retrieval.matcher.gather_evidence`, as a gallery is searched)."""
    plans = []
    for i, fold in enumerate(folders):
        _, val = fold_split(cv_folds, i)
        if not val.empty:
            plans.append((i, fold, val))
    total, done, searches = sum(len(v) for *_, v in plans), 0, []
    for i, fold, val in plans:
        gallery, (queries,) = fold_gallery(cv_folds, i, fold, folders[fold], k, (centres or {}).get(fold), val)
        report = None if progress is None else (lambda d, _t, done=done: progress(done + d, total))
        query_features = [features.get(img) for img in val["image"]] if rerank is not None and features is not None else None
        evidence = gather_evidence(gallery, queries, top, rerank, query_features, features, centres is not None, report)
        searches.append(FoldSearch(fold, val, gallery, queries, evidence))
        done += len(val)
    return searches


def tune_out_of_fold(
    cv_folds: pd.DataFrame,
    embeddings_dir: Callable[[str], Path],
    folds: Sequence[str],
    config: ThresholdConfig | None = None,
    features: FeatureStore | None = None,
    progress: ProgressFn | None = None,
) -> OutOfFoldThreshold:
    """The matcher that maximises out-of-fold MAP@5 (see the module docstring).

    Args:
        cv_folds: the ``cv_folds`` table (``image, individual_id, species, fold``).
        embeddings_dir: fold key -> the folder of its ``train`` embeddings (and class centres).
        folds: the fold keys, in order.
        config: what to tune: the search depth, species' thresholds, local re-ranking
            (``rerank``, with ``features``), class-centre scores, the fusion and lead
            weights tried. Class centres are left out, with a warning, when a fold model
            kept none.
        features: the ``local_features`` asset's store; re-ranking needs it.
        progress: called as local matching proceeds (validation photos done, total).

    Raises:
        ValueError: no fold has validation photos, or re-ranking without ``features``.
    """
    config = config or ThresholdConfig()
    if config.rerank and features is None:
        raise ValueError("re-ranking needs the local_features store: pass features, or set rerank to false")
    lead_grid = check_lead_weights(config.lead_weights)
    rerank = None
    if config.rerank and features and features.config is not None:  # a store with no photo's features: nothing to re-rank by
        rerank = LocalRerank(features.config, config.candidates, config.photos_per_candidate)
    # Each fold's embedding set resolved once: a fold re-embedded meanwhile must not give the
    # searches one model's vectors and the centres another's.
    folders = {f: embeddings_dir(f) for f in folds}
    centres = {f: ClassCentres.load(folders[f]) for f in folds} if config.class_centres else None
    centres_note = _missing_centres(centres) if centres is not None else None
    if centres_note:
        warnings.warn(centres_note, stacklevel=2)
        centres = None
    top = config.candidates if rerank is not None or centres is not None else TOP
    searches = fold_searches(cv_folds, folders, config.k, top, rerank, features, centres, progress)
    if not searches:
        raise ValueError("no fold has validation photos: cannot tune the threshold")
    per_fold, truths = [], []
    for found in searches:
        fold_ids = found.gallery.table["individual_id"].tolist()
        own = tune_threshold(found.evidence.sims, found.evidence.ids, found.val["truth"].tolist(), gallery_ids=fold_ids)
        per_fold.append({"fold": found.fold, "queries": len(found.val), "best_threshold": own.threshold, "best_map5": own.map5})
        truths += found.val["truth"].tolist()
    sims = np.concatenate([f.evidence.sims for f in searches])
    ids = np.concatenate([f.evidence.ids for f in searches])
    # 'truth' is already new_individual where the fold's gallery lacks the individual, so
    # every other truth is known. Passing all ids matters: by default only ids found in
    # the (top-5) lists count as known, and a missed known individual would score as new.
    known = cv_folds["individual_id"].unique().tolist()
    plain = tune_threshold(sims, ids, truths, gallery_ids=known)
    result, fusion, cost = plain, None, None
    if rerank is not None or centres is not None:
        inliers = np.concatenate([f.evidence.inliers for f in searches]) if rerank is not None else None
        centre_sims = np.concatenate([f.evidence.centre_sims for f in searches]) if centres is not None else None
        try:
            fusion = tune_fusion(sims, ids, inliers, truths, known, config.fusion_weights, centre_sims)
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
                if inliers is not None:
                    costs = [f.evidence.cost for f in searches if f.evidence.cost is not None]
                    cost = Inliers(inliers, sum(c.seconds for c in costs), sum(c.pairs for c in costs))
    lead = None
    if (lead_grid > 0).any():  # after any fusion: the decision reads the final ranking's scores
        lead = tune_lead(sims, ids, truths, known, lead_grid)
        result = lead.threshold
    species = None
    if config.per_species:
        species_of = dict(zip(cv_folds["individual_id"], cv_folds["species"], strict=True))
        species = tune_species_thresholds(
            sims,
            ids,
            truths,
            nearest_species(ids, species_of),
            gallery_ids=known,
            min_queries=config.species_min_queries,
            lead_weight=lead.weight if lead is not None else 0.0,
        )
    return OutOfFoldThreshold(
        result, per_fold, species, sims, ids, truths, plain if fusion else None, fusion, rerank, cost, top, centres_note, lead, config.k
    )
