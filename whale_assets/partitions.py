"""Fold partitions: one partition per cross-validation fold model.

The fold count is ``$WHALE_N_FOLDS`` (default 2; parsed in whale_ml/environment.py),
read once when the definitions load: partitions cannot change while a code location
runs, so it is an environment setting rather than run config.
"""

from __future__ import annotations

import dagster as dg

from whale_ml.data.folds import fold_names
from whale_ml.environment import read_environment

fold_partitions = dg.StaticPartitionsDefinition(fold_names(read_environment().n_folds))


def n_folds() -> int:
    """The fold count the partitions were made with (what ``cv_folds`` splits into)."""
    return len(fold_partitions.get_partition_keys())


def fold_index(partition_key: str) -> int:
    return int(partition_key.removeprefix("fold"))
