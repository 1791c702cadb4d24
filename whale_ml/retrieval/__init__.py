"""Retrieval: embeddings in, ranked individuals and the new_individual decision out.

Public API, stable for notebook users::

    from whale_ml.retrieval import map_at_5, predict_top5, tune_threshold
    from whale_ml.retrieval import build_index, search_gallery
"""

from whale_ml.retrieval.faiss_index import INDEX_KINDS, build_index, index_recall, l2_normalise, load_index, save_index, search_gallery
from whale_ml.retrieval.lead import LeadResult, tune_lead
from whale_ml.retrieval.ranking import (
    SpeciesThresholds,
    ThresholdResult,
    collapse_by_individual,
    decision_scores,
    map_at_5,
    nearest_species,
    predict_top5,
    query_thresholds,
    tune_species_thresholds,
    tune_threshold,
)

__all__ = [
    "INDEX_KINDS",
    "LeadResult",
    "SpeciesThresholds",
    "ThresholdResult",
    "build_index",
    "collapse_by_individual",
    "decision_scores",
    "index_recall",
    "l2_normalise",
    "load_index",
    "map_at_5",
    "nearest_species",
    "predict_top5",
    "query_thresholds",
    "save_index",
    "search_gallery",
    "tune_lead",
    "tune_species_thresholds",
    "tune_threshold",
]
