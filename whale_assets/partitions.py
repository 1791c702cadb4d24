"""Fold partitions: one partition per cross-validation fold model."""

from __future__ import annotations

import dagster as dg

from whale_ml.data.folds import fold_names
from whale_ml.environment import read_environment


def n_folds() -> int:
    """Number of folds, ``$WHALE_N_FOLDS`` (default 2; parsed in whale_ml/environment.py).

    Partitions are fixed when the definitions load, so the fold count is an
    environment setting rather than run config; ``cv_folds`` reads the same value.
    """
    return read_environment().n_folds


fold_partitions = dg.StaticPartitionsDefinition(fold_names(n_folds()))


def fold_index(partition_key: str) -> int:
    return int(partition_key.removeprefix("fold"))
