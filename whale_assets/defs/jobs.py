"""Jobs: the pipeline's stages (``whale_assets/stages.py``) as named, launchable runs.

The whole graph mixes fold-partitioned assets (models, embeddings) with
unpartitioned ones, so "everything" is best launched as an asset backfill
("Materialize all" in the UI), which runs each unpartitioned asset once, after
every fold it depends on. These jobs are the stages a user reruns on their own;
`whale run` runs the same stages in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

from whale_assets.partitions import fold_partitions
from whale_assets.rounds import Round, graph_rounds
from whale_assets.stages import Stage, rethreshold_and_submit, stages

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


def stage_job(stage: Stage) -> UnresolvedAssetJobDefinition:
    """A stage as a job of the same name (partitioned by fold when the stage runs per fold)."""
    return dg.define_asset_job(
        stage.name,
        selection=stage.selection,
        partitions_def=fold_partitions if stage.per_fold else None,
        description=stage.description,
    )


def rethreshold_and_submit_job(release: Round) -> UnresolvedAssetJobDefinition:
    """Re-tune the release's threshold and rewrite its submission."""
    return dg.define_asset_job(
        "rethreshold_and_submit",
        selection=rethreshold_and_submit(release),
        description=f"Cheap: re-tune the release's ({release.title}) new_individual threshold (e.g. per species) and rewrite "
        "its submission, no retraining.",
    )


@dg.definitions
def jobs() -> dg.Definitions:
    rounds = graph_rounds()
    return dg.Definitions(jobs=[*(stage_job(stage) for stage in stages(rounds)), rethreshold_and_submit_job(rounds[-1])])
