"""The pipeline's stages, defined once as asset selections.

An asset belongs to a stage through its group (``group_name``), so a new asset joins
the right job, sensor and ``whale run`` stage by being put in its group; nothing else
lists asset names. The jobs (``defs/jobs.py``), the rebuild sensor
(``defs/automation.py``), ``whale run`` and the tests all select through these.

Stages and groups::

    prepare_data         raw, detection, splits      unpartitioned, before the folds
    train_folds          training                    one run per fold partition
    ensemble_and_submit  registry, retrieval,        unpartitioned, after every fold
                         submission

The pseudo-label round (``whale_assets/rounds.py``), run by ``whale run`` only when the
recipe enables it (``pseudo_labels: {config: {enabled: true}}``)::

    pseudo_labels               pseudo_labels            unpartitioned, after the first submission
    train_round2_folds          round2_training          one run per fold partition
    round2_ensemble_and_submit  round2_retrieval,        unpartitioned, after every round-2 fold
                                round2_submission
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import dagster as dg

PREPARE_DATA = dg.AssetSelection.groups("raw", "detection", "splits")
TRAIN_FOLDS = dg.AssetSelection.groups("training")
ENSEMBLE_AND_SUBMIT = dg.AssetSelection.groups("registry", "retrieval", "submission")
PSEUDO_LABELS = dg.AssetSelection.groups("pseudo_labels")
TRAIN_ROUND2_FOLDS = dg.AssetSelection.groups("round2_training")
ROUND2_ENSEMBLE_AND_SUBMIT = dg.AssetSelection.groups("round2_retrieval", "round2_submission")
# Re-tune the threshold and rewrite the submission: the threshold and what follows it in its
# round (the pseudo-label round follows it too, but is a stage of its own).
RETHRESHOLD_AND_SUBMIT = dg.AssetSelection.assets("match_threshold").downstream() & ENSEMBLE_AND_SUBMIT

# Dagster's eager condition on the stages after the folds: a parent was updated since the
# last run, no parent is missing, and none is still being materialised (so all folds
# finish first); and every blocking check of every parent passed (or runs in the same
# request), so a parent whose blocking check failed (folds that leak, unclean metadata, a
# malformed submission) is not rebuilt on. It acts only while the ``rebuild_after_folds``
# sensor is switched on.
REBUILD_AFTER_FOLDS = (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
    "eager, after blocking checks"
)


@dataclass(frozen=True)
class Stage:
    """One stage of ``whale run``: a selection, run once or once per fold partition."""

    name: str
    selection: dg.AssetSelection
    per_fold: bool
    description: str
    pseudo_label_round: bool = False  # run by `whale run` only when the recipe enables the round


STAGES: tuple[Stage, ...] = (
    Stage("prepare_data", PREPARE_DATA, False, "Metadata, detector, boxes, crops and folds: everything before the fold models."),
    Stage("train_folds", TRAIN_FOLDS, True, "One fold's model and embeddings per run (launch a backfill for all folds)."),
    Stage(
        "ensemble_and_submit",
        ENSEMBLE_AND_SUBMIT,
        False,
        "After the folds: champion/challenger, the ensemble gallery, the threshold, the submission and its score.",
    ),
    Stage(
        "pick_pseudo_labels",  # not "pseudo_labels": a job may not share its name with an op
        PSEUDO_LABELS,
        False,
        "Pseudo-label round: the test photos predicted confidently enough (calibrated out of fold), added to the folds' training side.",
        pseudo_label_round=True,
    ),
    Stage(
        "train_round2_folds",
        TRAIN_ROUND2_FOLDS,
        True,
        "Pseudo-label round: one second-round fold model and its embeddings per run, trained with the pseudo-labelled photos.",
        pseudo_label_round=True,
    ),
    Stage(
        "round2_ensemble_and_submit",
        ROUND2_ENSEMBLE_AND_SUBMIT,
        False,
        "Pseudo-label round: the second round's gallery, threshold, submission (rounds/round2/submission.csv) and score.",
        pseudo_label_round=True,
    ),
)


@cache
def _asset_graph() -> object:
    from whale_assets.definitions import defs

    return defs().resolve_asset_graph()


def asset_names(selection: dg.AssetSelection) -> list[str]:
    """The asset names a selection holds in this code location, sorted."""
    return sorted(key.to_user_string() for key in selection.resolve(_asset_graph()))  # type: ignore[arg-type]


def all_asset_names() -> list[str]:
    """Every asset of the code location, sorted."""
    return asset_names(dg.AssetSelection.all())


def op_assets() -> dict[str, list[str]]:
    """Op name -> the assets it computes: what a run config's ``ops`` section is keyed by.
    Each asset is its own op, except ``boxes_and_crops``, one pass that makes ``bboxes`` and ``crops``."""
    graph = _asset_graph()
    return {
        ad.node_def.name: sorted(k.to_user_string() for k in ad.keys)
        for ad in graph.assets_defs  # type: ignore[attr-defined]
        if ad.keys
    }
