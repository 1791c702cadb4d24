"""The matcher: how a query's five predictions are decided, as one typed value applied in one place.

A :class:`Matcher` holds everything the new_individual rule needs: the threshold (and the
species' own), the search depth, the fusion of the evidence (local-feature inliers,
class-centre similarities; :mod:`whale_ml.retrieval.fusion`), the re-ranking settings
and the weight of the first candidate's lead over the second
(:mod:`whale_ml.retrieval.lead`). Out-of-fold tuning produces it
(:func:`whale_ml.retrieval.threshold.tune_out_of_fold`); :func:`match_queries` applies
it. The submission, the pseudo-labels and ``whale identify`` all call
:func:`match_queries`, and the tuning gathers its evidence through the same
:func:`gather_evidence`, so a photo is ranked alike wherever it is asked about:

    search the gallery -> local-feature inliers -> class-centre similarities
    -> fused score -> sorted -> the first five -> thresholds -> new_individual placed

A :class:`TunedMatcher` is a matcher with what tuning found (out-of-fold MAP@5, what each
piece of evidence added, the first candidates the pseudo-label round calibrates on) and
the fold models it was tuned for; :func:`whale_ml.gallery.matchers.save_matcher` stores
it beside the gallery versions built with those models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd

from whale_ml.progress import ProgressFn
from whale_ml.retrieval.centres import ClassCentres, centre_similarity, ensemble_centre_similarity
from whale_ml.retrieval.faiss_index import build_index, l2_normalise, search_gallery
from whale_ml.retrieval.fusion import GLOBAL, Fusion, ScorePart, fused_scores, plain_parts, row_order
from whale_ml.retrieval.local_features import FeatureStore, PhotoFeatures
from whale_ml.retrieval.ranking import TOP, decision_scores, first_leads, predict_top5, query_thresholds
from whale_ml.retrieval.rerank import Inliers, LocalRerank, match_candidates

MATCHER_FORMAT = 2  # the stored form's version (to_dict); the form without one is read by from_dict too


class MatcherFormatError(ValueError):
    """A stored matcher this version of the project cannot read."""


@dataclass(frozen=True)
class Matcher:
    """The new_individual rule, as tuned out of fold.

    Attributes:
        threshold: the decision score at or above which a candidate is known.
        species_thresholds: a species' own threshold (of the nearest individual), where tuned.
        k: neighbours fetched per query before collapsing to individuals, in the out-of-fold
            searches (and the per-fold searches that repeat them: the pseudo-labels).
        fusion: the calibrations and weights the threshold applies to; None: the plain
            embedding similarity.
        rerank: the local-feature re-ranking the fusion weighs (None: no local evidence).
        candidates: with a fusion, the individuals per query it re-scores.
        lead_weight: the decision score of the first candidate is ``s1 + lead_weight * (s1 - s2)``.
    """

    threshold: float
    species_thresholds: Mapping[str, float] = field(default_factory=dict)
    k: int = 50
    fusion: Fusion | None = None
    rerank: LocalRerank | None = None
    candidates: int = TOP
    lead_weight: float = 0.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.threshold):
            raise MatcherFormatError(f"a matcher's threshold must be finite, got {self.threshold}")
        if self.rerank is not None and (self.fusion is None or self.fusion.local_weight == 0):
            raise MatcherFormatError("a matcher that re-ranks by local features needs a fusion that weighs them")
        if not np.isfinite(self.lead_weight) or self.lead_weight < 0:
            raise MatcherFormatError(f"the lead weight must be a finite number >= 0, got {self.lead_weight}")

    @property
    def uses_centres(self) -> bool:
        """Whether the fused score weighs class-centre similarities."""
        return self.fusion is not None and self.fusion.centre_weight > 0

    @property
    def top(self) -> int:
        """Candidate individuals fetched per query: the fusion's candidates, or the five."""
        return self.candidates if self.fusion is not None else TOP

    def rank(self, evidence: Evidence) -> Ranking:
        """Each query's first five candidates by the score the threshold applies to (the
        fused one, re-sorted, with a fusion; the similarity without), with the evidence
        behind each score sorted alike."""
        if self.fusion is None:
            sims = evidence.sims[:, :TOP]
            return Ranking(sims, evidence.ids[:, :TOP], plain_parts(sims))
        parts = self.fusion.parts(evidence.sims, evidence.inliers, evidence.centre_sims)
        # The ranking score is the parts' own sum: what is shown as its parts is what ranked.
        scores = fused_scores(parts)
        order = row_order(scores)[:, :TOP]

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.take_along_axis(np.asarray(a), order, axis=1)

        return Ranking(
            np.take_along_axis(scores, order, axis=1),
            np.take_along_axis(np.asarray(evidence.ids), order, axis=1),
            {name: part.take(order) for name, part in parts.items()},
            pick(evidence.inliers),
            pick(evidence.centre_sims),
            pick(evidence.cost.photos if evidence.cost is not None else None),
        )

    def thresholds(self, ids: np.ndarray, species_of: Mapping[str, str]) -> np.ndarray:
        """Each query's threshold: its nearest individual's species' own, or the global one."""
        return query_thresholds(ids, species_of, self.threshold, dict(self.species_thresholds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MATCHER_FORMAT,
            "threshold": float(self.threshold),
            "species_thresholds": {k: float(v) for k, v in self.species_thresholds.items()},
            "k": int(self.k),
            "fusion": self.fusion.to_dict() if self.fusion is not None else None,
            "rerank": self.rerank.to_dict() if self.rerank is not None else None,
            "candidates": int(self.candidates),
            "lead_weight": float(self.lead_weight),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Matcher:
        """Reads :meth:`to_dict`, and the form stored without a ``format`` (the same
        settings under ``margin`` and ``class_centres.candidates``).

        Raises:
            MatcherFormatError: neither form, naming what is missing.
        """
        try:
            if d.get("format") == MATCHER_FORMAT:
                rerank, lead, candidates = d["rerank"], d["lead_weight"], d["candidates"]
            elif "format" not in d and "k" in d:
                rerank, lead = d.get("rerank"), d.get("margin", 0.0)
                candidates = (rerank or {}).get("candidates") or (d.get("class_centres") or {}).get("candidates") or TOP
            else:
                raise KeyError("format" if "format" in d else "k")
            fusion = Fusion.from_dict(d["fusion"]) if d.get("fusion") else None
            if fusion is None or fusion.local_weight == 0:
                rerank = None  # local evidence of weight 0 changes no score: no need to match it
            return cls(
                float(d["threshold"]),
                {str(k): float(v) for k, v in (d.get("species_thresholds") or {}).items()},
                int(d["k"]),
                fusion,
                LocalRerank.from_dict(rerank) if rerank else None,
                int(candidates),
                float(lead or 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MatcherFormatError(
                f"unreadable matcher (format {d.get('format', 'unknown')}, {type(exc).__name__}: {exc}): written by another "
                "version of this project; rematerialise match_threshold"
            ) from exc


@dataclass(frozen=True)
class TunedMatcher:
    """A matcher, what tuning it out of fold found, and the fold models it was tuned for.

    Attributes:
        map5: out-of-fold MAP@5 of the matcher (the species' thresholds where tuned).
        new_share: the share of validation photos predicted new first, at the global threshold.
        queries: validation photos pooled over folds.
        per_fold: fold, queries, and each fold's own best threshold and MAP@5.
        without: out-of-fold MAP@5 without a piece of the matcher (``fusion``,
            ``rerank``, ``lead``), where that piece was tuned.
        oof_top1: each validation photo's first-candidate score and whether it was right:
            what the pseudo-label round calibrates its confidence on.
        models: the fold models (:class:`whale_ml.gallery.lineage.FoldModel` records).
        models_key: the digest naming them (:func:`whale_ml.gallery.matchers.models_key`).
    """

    matcher: Matcher
    map5: float
    new_share: float
    queries: int
    per_fold: list[dict[str, Any]] = field(default_factory=list)
    without: Mapping[str, float] = field(default_factory=dict)
    oof_top1: Mapping[str, list[Any]] | None = None
    models: tuple[Mapping[str, Any], ...] = ()
    models_key: str = ""

    def for_models(self, models: Sequence[Mapping[str, Any]], key: str) -> TunedMatcher:
        return replace(self, models=tuple(dict(m) for m in models), models_key=key)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (also the ``match_threshold`` asset's value)."""
        return {
            **self.matcher.to_dict(),
            "map5": float(self.map5),
            "new_share": float(self.new_share),
            "queries": int(self.queries),
            "per_fold": list(self.per_fold),
            "without": {k: float(v) for k, v in self.without.items()},
            "oof_top1": dict(self.oof_top1) if self.oof_top1 is not None else None,
            "models": [dict(m) for m in self.models],
            "models_key": self.models_key,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TunedMatcher:
        """Reads :meth:`to_dict` and the form stored without a ``format``.

        Raises:
            MatcherFormatError: unreadable (see :meth:`Matcher.from_dict`).
        """
        matcher = Matcher.from_dict(d)
        if "without" in d:
            without = dict(d["without"])
        else:  # the form without a format kept them as map5_without_<piece>
            without = {p: float(d[f"map5_without_{p}"]) for p in ("fusion", "rerank", "margin") if d.get(f"map5_without_{p}") is not None}
            if "margin" in without:
                without["lead"] = without.pop("margin")
        return cls(
            matcher,
            float(d.get("map5", float("nan"))),
            float(d.get("new_share", float("nan"))),
            int(d.get("queries", 0)),
            list(d.get("per_fold") or []),
            without,
            d.get("oof_top1"),
            tuple(dict(m) for m in d.get("models") or ()),
            str(d.get("models_key") or ""),
        )


class Searchable(Protocol):
    """What :func:`match_queries` searches: a gallery version
    (:class:`~whale_ml.gallery.versions.GalleryVersion`), or one fold's training photos
    under that fold's model (:class:`FoldGallery`)."""

    @property
    def name(self) -> str: ...

    @property
    def table(self) -> pd.DataFrame: ...  # image, individual_id, species: one row per index row

    @property
    def embeddings(self) -> np.ndarray: ...

    @property
    def index(self) -> Any: ...  # the faiss index of ``embeddings``

    @property
    def k(self) -> int: ...  # neighbours fetched per query before collapsing to individuals

    @property
    def centres(self) -> list[ClassCentres | None]: ...  # each model's class centres, in the embeddings' model order


@dataclass
class FoldGallery:
    """One fold's training photos under that fold's model: what its validation photos are
    searched against out of fold (and its test photos, for the pseudo-labels)."""

    name: str
    table: pd.DataFrame  # the fold's training rows: image, individual_id, species
    embeddings: np.ndarray
    k: int
    centres: list[ClassCentres | None] = field(default_factory=list)
    index: Any = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = build_index(self.embeddings)


@dataclass
class Evidence:
    """Each query's candidate individuals and what is known about each, before any fusion."""

    sims: np.ndarray  # (q, top) each candidate's best-photo similarity, descending
    ids: np.ndarray  # (q, top) the candidates ("" padding)
    inliers: np.ndarray | None = None  # (q, top) local-feature inliers, when re-ranked
    centre_sims: np.ndarray | None = None  # (q, top) class-centre similarity (NaN: none), when weighed
    cost: Inliers | None = None  # what finding the inliers cost (and the gallery row that gave each count)


@dataclass
class Ranking:
    """Each query's first five candidates by the ranking score, and the evidence behind
    each score, every array (q, 5) in the same order."""

    scores: np.ndarray  # the score the threshold applies to (the fused one when fused), best first
    ids: np.ndarray  # the candidates ("" padding)
    parts: dict[str, ScorePart]  # each weighed matcher's value, probability and contribution; they sum to ``scores``
    inliers: np.ndarray | None = None  # local-feature inliers, when re-ranked
    centre_sims: np.ndarray | None = None  # class-centre similarity (NaN: none), when weighed
    inlier_photos: np.ndarray | None = None  # the gallery row whose photo gave ``inliers`` (-1: none), when re-ranked

    @property
    def embedding_sims(self) -> np.ndarray:
        """Each candidate's best-photo cosine similarity (the ``global`` matcher's value)."""
        return self.parts[GLOBAL].value


def gather_evidence(
    gallery: Searchable,
    queries: np.ndarray,
    top: int = TOP,
    rerank: LocalRerank | None = None,
    query_features: Sequence[PhotoFeatures | None] | None = None,
    gallery_features: FeatureStore | None = None,
    centres: bool = False,
    progress: ProgressFn | None = None,
) -> Evidence:
    """Search ``queries`` in ``gallery`` for their first ``top`` individuals, with the
    local-feature inliers of each (``rerank``) and its class-centre similarity (``centres``).

    Raises:
        ValueError: ``rerank`` without features, or ``centres`` with a gallery that holds none.
    """
    gallery_ids = gallery.table["individual_id"].to_numpy(dtype=object)
    sims, ids = search_gallery(gallery.index, gallery_ids, queries, k=gallery.k, top=top)
    found = Evidence(sims, ids)
    if rerank is not None:
        if query_features is None or gallery_features is None:
            raise ValueError(
                "this matcher was tuned with local-feature re-ranking: its threshold applies to fused scores, "
                "so the queries' and the gallery's local features are needed"
            )
        # A gallery photo the store lacks (e.g. one enrolled later) gives no local evidence.
        found.cost = match_candidates(
            rerank,
            gallery.embeddings,
            gallery_ids,
            [gallery_features.get(img) for img in gallery.table["image"]],
            l2_normalise(queries),
            query_features,
            ids,
            progress,
        )
        found.inliers = found.cost.counts
    if centres:
        held = gallery.centres
        if not held or all(c is None for c in held):
            raise ValueError(
                f"this matcher weighs class-centre scores, but gallery {gallery.name} holds no class centres: "
                "rematerialise fold_embeddings and the gallery"
            )
        # One model's queries are its own embeddings; an ensemble's are split per model.
        only = held[0] if len(held) == 1 else None
        found.centre_sims = centre_similarity(queries, only, ids) if only is not None else ensemble_centre_similarity(queries, held, ids)
    return found


@dataclass
class Matches:
    """What :func:`match_queries` found, row for row with the queries."""

    sims: np.ndarray  # (q, 5) each candidate individual's score (the fused one when fused), best first
    ids: np.ndarray  # (q, 5) the candidates ("" where the gallery has fewer individuals)
    thresholds: np.ndarray  # (q,) each query's new_individual threshold
    predictions: list[list[str]]  # five ids per query, new_individual placed by the threshold
    inliers: np.ndarray | None = None  # (q, 5) local-feature inliers of each candidate, when re-ranked
    rerank_ms_per_query: float | None = None
    lead_weight: float = 0.0  # the weight of the first candidate's lead in its decision score
    # (q, 5) each candidate's best-photo cosine similarity (``sims`` itself without a fusion)
    embedding_sims: np.ndarray | None = None
    centre_sims: np.ndarray | None = None  # (q, 5) class-centre similarity (NaN: none), when weighed
    # Each weighed matcher's share of ``sims`` (:meth:`Fusion.parts`; ``global`` alone and
    # uncalibrated without a fusion), sorted as ``sims``: the contributions sum to ``sims``.
    parts: dict[str, ScorePart] = field(default_factory=dict)
    inlier_photos: np.ndarray | None = None  # (q, 5) the gallery row whose photo gave ``inliers`` (-1: none), when re-ranked

    @property
    def decisions(self) -> np.ndarray:
        """(q, 5) what each candidate's score is compared with the threshold as: the first
        candidate's plus ``lead_weight`` times its lead over the second, the others' own."""
        return decision_scores(self.sims, self.lead_weight)

    @property
    def leads(self) -> np.ndarray:
        """(q,) each first candidate's lead over the second, ``s1 - s2`` (0 without a second):
        ``decisions[:, 0] == sims[:, 0] + lead_weight * leads`` (the lead weight > 0)."""
        return first_leads(self.sims)


def match_queries(
    gallery: Searchable,
    queries: np.ndarray,
    matcher: Matcher,
    query_features: Sequence[PhotoFeatures | None] | None = None,
    gallery_features: FeatureStore | None = None,
    workers: int = 0,
    progress: ProgressFn | None = None,
) -> Matches:
    """Search ``queries`` in ``gallery`` and decide new_individual for each, by ``matcher``.

    Args:
        queries: (q, d) embeddings in the gallery's space (its fold models' ensemble, or one fold model's).
        query_features: with re-ranking, each query's local features (``None`` for none).
        gallery_features: with re-ranking, the store holding the gallery photos' features.
        workers: processes for local matching (0: the machine's cores).
        progress: with re-ranking, called with (queries matched, total) as local matching goes.

    Raises:
        ValueError: the matcher re-ranks but no features were given, or weighs class
            centres but the gallery holds none.
    """
    rerank = replace(matcher.rerank, workers=workers) if matcher.rerank is not None else None
    evidence = gather_evidence(gallery, queries, matcher.top, rerank, query_features, gallery_features, matcher.uses_centres, progress)
    ranked = matcher.rank(evidence)
    species_of = dict(zip(gallery.table["individual_id"], gallery.table["species"], strict=True))
    thresholds = matcher.thresholds(ranked.ids, species_of)
    predictions = predict_top5(ranked.scores, ranked.ids, thresholds, lead_weight=matcher.lead_weight)
    cost = evidence.cost.ms_per_query if evidence.cost is not None else None
    return Matches(
        ranked.scores,
        ranked.ids,
        thresholds,
        predictions,
        ranked.inliers,
        cost,
        matcher.lead_weight,
        ranked.embedding_sims,
        ranked.centre_sims,
        ranked.parts,
        ranked.inlier_photos,
    )
