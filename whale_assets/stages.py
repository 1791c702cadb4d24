"""The pipeline's stages, defined once as asset selections.

An asset belongs to a stage through its group (``group_name``), so a new asset joins
the right job, sensor and ``whale run`` stage by being put in its group; nothing else
lists asset names. The jobs (``defs/jobs.py``), the rebuild sensor
(``defs/automation.py``), ``whale run`` and the tests all select through these.

Stages and groups, made from the graph's rounds (``whale_assets/rounds.py``), in the
order ``whale run`` runs them::

    prepare_data                  raw, detection, splits       unpartitioned, before the folds
    train_folds                   training                     one run per fold partition
    ensemble_and_submit           retrieval, submission        unpartitioned, after every fold
    then for each later round k:
    round<k>_pick_pseudo_labels   round<k>_pseudo_labels       unpartitioned, after round k-1's threshold
    round<k>_train_folds          round<k>_training            one run per fold partition
    round<k>_ensemble_and_submit  round<k>_retrieval,          unpartitioned, after every round-k fold
                                  round<k>_submission

The last round has its ``registry`` group too (``release``: the release's MLflow run and the
champion decision), in its ensemble stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import dagster as dg

from whale_assets.rounds import Round, building_rounds, graph_rounds, round_count

PREPARE_DATA = dg.AssetSelection.groups("raw", "detection", "splits")
PREPARE_DATA_STAGE = "prepare_data"  # the one stage every round shares


def pseudo_labels(rnd: Round) -> dg.AssetSelection:
    """A later round's pseudo-labels and the fold table they make (empty for the first round)."""
    return dg.AssetSelection.groups(rnd.group("pseudo_labels"))


def train_folds(rnd: Round) -> dg.AssetSelection:
    """The round's fold models and their embeddings (partitioned by fold)."""
    return dg.AssetSelection.groups(rnd.group("training"))


def ensemble_and_submit(rnd: Round) -> dg.AssetSelection:
    """After the round's folds: gallery, threshold, submission, score, and (the last round's) the release."""
    return dg.AssetSelection.groups(rnd.group("registry"), rnd.group("retrieval"), rnd.group("submission"))


def rethreshold_and_submit(rnd: Round) -> dg.AssetSelection:
    """Re-tune the round's threshold and rewrite its submission: the threshold and what
    follows it in its round's ensemble stage (a later round's pseudo-labels follow it too,
    but are a stage of their own)."""
    return dg.AssetSelection.assets(rnd.key("match_threshold")).downstream() & ensemble_and_submit(rnd)


@dataclass(frozen=True)
class Stage:
    """One stage of ``whale run``: a selection, run once or once per fold partition."""

    name: str
    selection: dg.AssetSelection
    per_fold: bool
    description: str


def round_stages(rnd: Round) -> list[Stage]:
    """The stages of one round, in order: its pseudo-labels (a later round's), its folds, its ensemble."""
    chosen = []
    if rnd.previous is not None:  # the first round trains on cv_folds as they are
        chosen.append(
            Stage(
                rnd.stage("pick_pseudo_labels"),  # not "pseudo_labels": a job may not share its name with an op
                pseudo_labels(rnd),
                False,
                f"{rnd.title}: the test photos {rnd.previous.title}'s fold models predicted confidently enough (calibrated out "
                f"of fold), added to the folds' training side ({rnd.training_folds.to_user_string()}).",
            )
        )
    return [
        *chosen,
        Stage(
            rnd.stage("train_folds"),
            train_folds(rnd),
            True,
            f"{rnd.title}: one fold's model and embeddings per run, trained on {rnd.training_folds.to_user_string()} "
            "(launch a backfill for all folds).",
        ),
        Stage(
            rnd.stage("ensemble_and_submit"),
            ensemble_and_submit(rnd),
            False,
            f"{rnd.title}, after its folds: the ensemble gallery, the threshold, the submission and its score"
            + (", and the release: its MLflow run and the champion decision (what whale identify serves)." if rnd.is_release else "."),
        ),
    ]


def stages(rounds: Sequence[Round] | None = None) -> tuple[Stage, ...]:
    """Every stage of a graph of ``rounds`` (default: the graph's, :func:`graph_rounds`), in ``whale run``'s order."""
    rounds = graph_rounds() if rounds is None else rounds
    return (
        Stage(PREPARE_DATA_STAGE, PREPARE_DATA, False, "Metadata, detector, boxes, crops and folds: everything before the fold models."),
        *(stage for rnd in rounds for stage in round_stages(rnd)),
    )


@cache
def _asset_graph(count: int) -> object:
    from whale_assets.definitions import defs

    with building_rounds(count):
        return defs().resolve_asset_graph()


def asset_graph(count: int | None = None) -> object:
    """The asset graph of the code location with ``count`` rounds (default :func:`round_count`), loaded once per count."""
    return _asset_graph(round_count() if count is None else count)


def asset_names(selection: dg.AssetSelection, count: int | None = None) -> list[str]:
    """The asset names a selection holds in the code location with ``count`` rounds, sorted."""
    return sorted(key.to_user_string() for key in selection.resolve(asset_graph(count)))  # type: ignore[arg-type]


def all_asset_names(count: int | None = None) -> list[str]:
    """Every asset of the code location with ``count`` rounds, sorted."""
    return asset_names(dg.AssetSelection.all(), count)


def op_assets(count: int | None = None) -> dict[str, list[str]]:
    """Op name -> the assets it computes: what a run config's ``ops`` section is keyed by.
    Each asset is its own op, except ``boxes_and_crops``, one pass that makes ``bboxes`` and ``crops``."""
    graph = asset_graph(count)
    return {
        ad.node_def.name: sorted(k.to_user_string() for k in ad.keys)
        for ad in graph.assets_defs  # type: ignore[attr-defined]
        if ad.keys
    }
