"""Matchers tied to the models they were tuned for.

The matcher (``match_threshold``'s value: the new_individual threshold, the species'
own thresholds, the fusion weights, re-ranking, the margin weight) is tuned out of fold
on one set of fold models' embeddings. It is only right for a gallery built with those
same models: another model set's cosines sit on another scale. So every matcher records
its models (fold, checkpoint sha256, flip TTA) and is stored under the digest of that
list, ``gallery/matchers/<models key>.json``; a gallery version finds its own matcher by
its lineage's key (:func:`load_matcher`), whichever version is asked for, whether or not
a later gallery step failed, and whichever matcher was tuned last. Enrolled versions keep
their parent's models, and so its matcher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.home import HomeLayout
from whale_ml.io import read_json, write_json

MATCHERS_DIR = "matchers"  # in gallery_dir


def models_key(models: Sequence[FoldModel]) -> str:
    """A short digest naming a model set: each fold's name, checkpoint and flip TTA, in order."""
    parts = [[m.fold, m.checkpoint_sha256, bool(m.flip_tta)] for m in models]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def matcher_path(layout: HomeLayout, models: Sequence[FoldModel]) -> Path:
    return layout.gallery_dir / MATCHERS_DIR / f"{models_key(models)}.json"


def save_matcher(layout: HomeLayout, models: Sequence[FoldModel], matcher: dict[str, Any]) -> dict[str, Any]:
    """Store ``matcher`` for the model set ``models``, and return it with ``models`` and
    ``models_key`` added (the value the asset returns, so both say the same)."""
    value = {**matcher, "models": [m.model_dump() for m in models], "models_key": models_key(models)}
    write_json(matcher_path(layout, models), value)
    return value


def _describe(models: Sequence[FoldModel]) -> str:
    return ", ".join(f"{m.fold} " + (f"v{m.version}" if m.version else m.checkpoint_sha256[:12]) for m in models)


def check_matcher(matcher: dict[str, Any], lineage: GalleryLineage, gallery_name: str) -> None:
    """Raise unless ``matcher`` was tuned for the models gallery ``gallery_name`` was built with.

    Raises:
        LineageError: it was tuned for other models, or records none (tuned by an older
            version of this project: materialise ``match_threshold`` again).
    """
    if "models" not in matcher:
        raise LineageError(
            f"the matcher does not record which models it was tuned for (written by an older version of this project): "
            f"rematerialise match_threshold, then answer with gallery {gallery_name}"
        )
    tuned = [FoldModel(**m) for m in matcher["models"]]
    if models_key(tuned) != models_key(lineage.models):
        raise LineageError(
            f"the matcher was tuned for models {_describe(tuned)}, but gallery {gallery_name} was built with "
            f"{_describe(lineage.models)}: rematerialise match_threshold and the gallery together (job ensemble_and_submit)"
        )


def load_matcher(layout: HomeLayout, lineage: GalleryLineage, gallery_name: str) -> dict[str, Any]:
    """The matcher tuned for gallery ``gallery_name``'s models (its ``lineage``).

    Raises:
        LineageError: no matcher was tuned for these models in this home.
    """
    path = matcher_path(layout, lineage.models)
    if not path.exists():
        raise LineageError(
            f"no matcher tuned for the models of gallery {gallery_name} ({_describe(lineage.models)}) in {path.parent}: "
            "materialise match_threshold with these fold embeddings (whale run), or choose another --gallery-version"
        )
    matcher = read_json(path)
    check_matcher(matcher, lineage, gallery_name)
    return matcher
