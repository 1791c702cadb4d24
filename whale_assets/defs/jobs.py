"""Jobs: the pipeline's stages (``whale_assets/stages.py``) as named, launchable runs.

The whole graph mixes fold-partitioned assets (models, embeddings) with
unpartitioned ones, so "everything" is best launched as an asset backfill
("Materialize all" in the UI), which runs each unpartitioned asset once, after
every fold it depends on. These jobs are the stages a user reruns on their own;
`whale run` runs the same stages in order.
"""

import dagster as dg

from whale_assets.partitions import fold_partitions
from whale_assets.stages import RETHRESHOLD_AND_SUBMIT, STAGES

stage_jobs = {
    stage.name: dg.define_asset_job(
        stage.name,
        selection=stage.selection,
        partitions_def=fold_partitions if stage.per_fold else None,
        description=stage.description,
    )
    for stage in STAGES
}
prepare_data, train_folds = stage_jobs["prepare_data"], stage_jobs["train_folds"]

rethreshold_and_submit = dg.define_asset_job(
    "rethreshold_and_submit",
    selection=RETHRESHOLD_AND_SUBMIT,
    description="Cheap: re-tune the new_individual threshold (e.g. per species) and rewrite the submission, no retraining.",
)


@dg.definitions
def jobs() -> dg.Definitions:
    return dg.Definitions(jobs=[*stage_jobs.values(), rethreshold_and_submit])
