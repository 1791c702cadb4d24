"""Launchpad configs: the ``whale_ml`` stage settings, exposed to Dagster.

Each class *is* its ``whale_ml`` model (by inheritance), so an asset hands its
config straight to the core and the field descriptions show in the launchpad.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from whale_ml.stage_configs import (
    BoxConfig,
    CropConfig,
    DetectorConfig,
    EmbedConfig,
    FoldConfig,
    GalleryConfig,
    LocalFeatureConfig,
    MetadataConfig,
    PseudoLabelConfig,
    ThresholdConfig,
    TrainConfig,
)


class ReleaseSettings(dg.Config):
    """What the release logs besides its scores."""

    log_model: bool = Field(
        True,
        description="Log the release as one MLflow pyfunc model (fold models, gallery version, matcher, detector, the gallery's "
        "local features) and register it (whale-release, alias champion when it is the champion release): what `mlflow models "
        "serve` serves. It copies the release (about 1 GB at the Kaggle scale, 3.6 GB with local re-ranking): false skips it.",
    )
    registered_model: str = Field("whale-release", description="Model registry name of the release's pyfunc model.")


class MetadataSettings(dg.Config, MetadataConfig):
    """How the Kaggle CSVs are read and checked."""


class DetectorSettings(dg.Config, DetectorConfig):
    """The animal detector: trained from the box file, a user's .pt, or none."""


class BoxSettings(dg.Config, BoxConfig):
    """Crop boxes for every image: confidence floor and enlargement."""


class CropSettings(dg.Config, CropConfig):
    """The crops written to disk."""


class BoxesAndCropsSettings(dg.Config):
    """The one pass over the photos that boxes and crops each of them (decoded once)."""

    boxes: BoxSettings = BoxSettings()
    crops: CropSettings = CropSettings()
    workers: int = Field(
        0, ge=0, description="Threads that decode, cut and write the photos (0: $WHALE_THREADS or every core); results do not depend on it."
    )


class FoldSettings(dg.Config, FoldConfig):
    """Cross-validation folds by individual."""


class TrainSettings(dg.Config, TrainConfig):
    """The ArcFace recipe of each fold model."""


class EmbedSettings(dg.Config, EmbedConfig):
    """Embedding every crop with a fold model."""


class GallerySettings(dg.Config, GalleryConfig):
    """The faiss gallery: exact or approximate, and its search depth."""


class ThresholdSettings(dg.Config, ThresholdConfig):
    """Tuning the new_individual threshold: global, or per species."""


class LocalFeatureSettings(dg.Config, LocalFeatureConfig):
    """Keypoints of every photo's box, for local-feature re-ranking."""


class PseudoLabelSettings(dg.Config, PseudoLabelConfig):
    """A later round's pseudo-labels: which of the previous round's confident test predictions it trains on."""
