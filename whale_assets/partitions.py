"""Fold partitions: one partition per cross-validation fold model."""

from __future__ import annotations

import os

import dagster as dg

from whale_ml.data.folds import fold_names


def n_folds() -> int:
    """Number of folds, ``$WHALE_N_FOLDS`` (default 2).

    Partitions are fixed when the definitions load, so the fold count is an
    environment setting rather than run config; ``cv_folds`` reads the same value.
    """
    raw = os.environ.get("WHALE_N_FOLDS", "2")
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"WHALE_N_FOLDS must be an integer >= 2, got {raw!r}") from exc
    if value < 2:
        raise ValueError(f"WHALE_N_FOLDS must be at least 2, got {value}")
    return value


fold_partitions = dg.StaticPartitionsDefinition(fold_names(n_folds()))


def fold_index(partition_key: str) -> int:
    return int(partition_key.removeprefix("fold"))
