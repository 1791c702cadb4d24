"""The researcher's daily loop: identify tonight's photos against the current gallery,
look at the matches, enroll the confirmed animals as a new gallery version.

    from whale_ml.identify import load_version, resolve_models, identify_photos, enroll
"""

from whale_ml.identify.enroll import enroll, read_confirmed, read_ledger
from whale_ml.identify.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.identify.matching import format_text, identify_photos
from whale_ml.identify.photos import expand_inputs
from whale_ml.identify.registry import ResolvedModel, gallery_models, resolve_models
from whale_ml.identify.report import write_report
from whale_ml.identify.versions import (
    GalleryVersion,
    current_version,
    list_versions,
    load_version,
    prune_versions,
    write_version,
)

__all__ = [
    "FoldModel",
    "GalleryLineage",
    "GalleryVersion",
    "LineageError",
    "ResolvedModel",
    "current_version",
    "enroll",
    "expand_inputs",
    "format_text",
    "gallery_models",
    "identify_photos",
    "list_versions",
    "load_version",
    "prune_versions",
    "read_confirmed",
    "read_ledger",
    "resolve_models",
    "write_report",
    "write_version",
]
