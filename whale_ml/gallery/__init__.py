"""The gallery: every photo of a known individual, embedded, indexed and versioned.

One artifact: ``gallery/versions/vNNNN/`` under the home, written by the gallery stage
(:func:`build_gallery`) and by ``whale enroll``, searched by the submission and by
``whale identify`` alike (:func:`match_queries`). Each version records what it was made
with (:class:`GalleryLineage`); confirmed photos are kept in the enrollment ledger.
See docs/retrieval.md and docs/identify.md.

    from whale_ml.gallery import load_version, match_queries, query_embeddings
"""

from whale_ml.gallery.build import GalleryStats, build_gallery, fold_ensemble, query_embeddings
from whale_ml.gallery.ledger import read_ledger
from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.retrieval.matcher import Matches, match_queries
from whale_ml.gallery.versions import GalleryVersion, current_version, list_versions, load_version, prune_versions, write_version

__all__ = [
    "FoldModel",
    "GalleryLineage",
    "GalleryStats",
    "GalleryVersion",
    "LineageError",
    "Matches",
    "build_gallery",
    "current_version",
    "fold_ensemble",
    "list_versions",
    "load_version",
    "match_queries",
    "prune_versions",
    "query_embeddings",
    "read_ledger",
    "write_version",
]
