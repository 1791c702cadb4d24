"""Matchers tied to the models they were tuned for.

The matcher (``match_threshold``'s value: the new_individual threshold, the species'
own thresholds, the fusion weights, re-ranking, the lead weight) is tuned out of fold
on one set of fold models' embeddings. It is only right for a gallery built with those
same models: another model set's cosines sit on another scale. So every matcher records
its models (fold, checkpoint sha256, flip TTA) and is stored under the digest of that
list, ``gallery/matchers/<models key>.json``; a gallery version finds its own matcher by
its lineage's key (:func:`load_matcher`), whichever version is asked for, whether or not
a later gallery step failed, and whichever matcher was tuned last. Enrolled versions keep
their parent's models, and so its matcher.

A re-tuning of the same models replaces that file, and may score worse than the champion
release it would then change: so the champion decision keeps the champion's own matcher
apart, ``gallery/matchers/release_<MLflow run>.json`` (:func:`save_release_matcher`), and
``whale identify`` serves that one with the champion release.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.home import HomeLayout
from whale_ml.io import read_json, write_json
from whale_ml.retrieval.matcher import MatcherFormatError, TunedMatcher

MATCHERS_DIR = "matchers"  # in gallery_dir


def models_key(models: Sequence[FoldModel]) -> str:
    """A short digest naming a model set: each fold's name, checkpoint and flip TTA, in order."""
    parts = [[m.fold, m.checkpoint_sha256, bool(m.flip_tta)] for m in models]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def matcher_path(layout: HomeLayout, models: Sequence[FoldModel]) -> Path:
    return layout.gallery_dir / MATCHERS_DIR / f"{models_key(models)}.json"


def save_matcher(layout: HomeLayout, models: Sequence[FoldModel], tuned: TunedMatcher) -> TunedMatcher:
    """Store ``tuned`` for the model set ``models`` and return it with them recorded (the
    ``match_threshold`` asset's value is its :meth:`~TunedMatcher.to_dict`, so both say the same)."""
    stored = tuned.for_models([m.model_dump() for m in models], models_key(models))
    write_json(matcher_path(layout, models), stored.to_dict())
    return stored


def save_release_matcher(layout: HomeLayout, run_id: str, tuned: TunedMatcher) -> Path:
    """Keep ``tuned`` as the matcher of release run ``run_id`` (the champion's: see the module's
    docstring), without the out-of-fold first candidates, which only the next round reads."""
    path = layout.gallery_dir / MATCHERS_DIR / f"release_{run_id}.json"
    write_json(path, replace(tuned, oof_top1=None).to_dict())
    return path


def read_matcher(value: dict[str, Any]) -> TunedMatcher:
    """A stored matcher (a matcher file, or the ``match_threshold`` asset's value), read.

    Raises:
        LineageError: it records no models, or cannot be read (written by another version
            of this project: materialise ``match_threshold`` again).
    """
    if not value.get("models"):
        raise LineageError(
            "the matcher does not record which models it was tuned for (written by an older version of this project): "
            "rematerialise match_threshold"
        )
    try:
        return TunedMatcher.from_dict(value)
    except MatcherFormatError as exc:
        raise LineageError(str(exc)) from exc


def _describe(models: Sequence[FoldModel]) -> str:
    return ", ".join(f"{m.fold} " + (f"v{m.version}" if m.version else m.checkpoint_sha256[:12]) for m in models)


def check_matcher(tuned: TunedMatcher, lineage: GalleryLineage, gallery_name: str) -> None:
    """Raise unless ``tuned`` was tuned for the models gallery ``gallery_name`` was built with.

    Raises:
        LineageError: it was tuned for other models.
    """
    if tuned.models_key != models_key(lineage.models):
        described = _describe([FoldModel(**m) for m in tuned.models])
        raise LineageError(
            f"the matcher was tuned for models {described}, but gallery {gallery_name} was built with "
            f"{_describe(lineage.models)}: rematerialise match_threshold and the gallery together (job ensemble_and_submit)"
        )


def load_matcher(layout: HomeLayout, lineage: GalleryLineage, gallery_name: str, stored: str | None = None) -> TunedMatcher:
    """The matcher tuned for gallery ``gallery_name``'s models (its ``lineage``).

    Args:
        stored: a file of the matchers folder to read instead of the models' own (the champion
            release's, :func:`save_release_matcher`); it must be tuned for the same models.

    Raises:
        LineageError: no readable matcher was tuned for these models in this home.
    """
    path = matcher_path(layout, lineage.models) if stored is None else layout.gallery_dir / MATCHERS_DIR / stored
    if not path.exists():
        raise LineageError(
            f"no matcher tuned for the models of gallery {gallery_name} ({_describe(lineage.models)}) in {path.parent}: "
            "materialise match_threshold with these fold embeddings (whale run), or choose another --gallery-version"
        )
    try:
        tuned = read_matcher(read_json(path))
    except LineageError as exc:
        raise LineageError(f"{path}: {exc}") from exc
    check_matcher(tuned, lineage, gallery_name)
    return tuned
