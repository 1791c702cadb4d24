"""Training rounds: the same fold-model, gallery, threshold and submission assets, made twice.

The first round is the pipeline as it always was (keys ``arcface_model``, ``gallery``,
...). The pseudo-label round (``round2/arcface_model``, ``round2/gallery``, ...) is the
same asset definitions, built by the same factories with a key prefix, its own groups
(so its own stages and jobs), its own folders under ``$WHALE_HOME/rounds/round2`` and
fold models trained on ``pseudo_labelled_folds`` instead of ``cv_folds``. Everything
else (crops, local features, the folds' validation side) the rounds share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import dagster as dg

from whale_ml.home import HomeLayout

if TYPE_CHECKING:
    from whale_assets.resources import WhaleHome


@dataclass(frozen=True)
class Round:
    """One training round of the asset graph.

    Attributes:
        name: None for the first round; the key prefix, group prefix and folder of a later one.
        training_folds: the asset whose fold table the round's fold models train on.

    Only the first round's stages after the folds rebuild by themselves (the
    ``rebuild_after_folds`` sensor) and carry the freshness policies: a later round runs
    only when asked for.
    """

    name: str | None
    training_folds: str = "cv_folds"

    @property
    def first(self) -> bool:
        return self.name is None

    @property
    def prefix(self) -> list[str] | None:
        return None if self.name is None else [self.name]

    def key(self, asset: str) -> dg.AssetKey:
        """The round's key of one of its assets (``round2/gallery``); shared assets pass through."""
        return dg.AssetKey([*(self.prefix or []), asset])

    def group(self, group: str) -> str:
        """The round's group for a stage group (``training`` -> ``round2_training``)."""
        return group if self.name is None else f"{self.name}_{group}"

    def label(self, fold: str) -> str:
        """A fold's name in MLflow run names and registry aliases (``fold0``, ``round2_fold0``)."""
        return fold if self.name is None else f"{self.name}_{fold}"

    def layout(self, whale: WhaleHome) -> HomeLayout:
        """The home's paths, with this round's models, embeddings, galleries and submission."""
        return whale.layout.in_round(self.name)


FIRST_ROUND = Round(None)
PSEUDO_LABEL_ROUND = Round("round2", training_folds="pseudo_labelled_folds")
