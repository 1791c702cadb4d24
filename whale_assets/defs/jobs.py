"""Jobs: the pipeline's stages as named, launchable selections.

The whole graph mixes fold-partitioned assets (models, embeddings) with
unpartitioned ones, so "everything" is best launched as an asset backfill
("Materialize all" in the UI), which runs each unpartitioned asset once, after
every fold it depends on. These jobs are the stages a user reruns on their own;
`whale run` runs the same stages in order.
"""

import dagster as dg

from whale_assets.partitions import fold_partitions

prepare_data = dg.define_asset_job(
    "prepare_data",
    selection=["train_metadata", "test_metadata", "fluke_detector", "bboxes", "crops", "cv_folds"],
    description="Metadata, detector, boxes, crops and folds: everything before the fold models.",
)

train_folds = dg.define_asset_job(
    "train_folds",
    selection=["arcface_model", "fold_embeddings"],
    partitions_def=fold_partitions,
    description="One fold's model and embeddings per run (launch a backfill for all folds).",
)

ensemble_and_submit = dg.define_asset_job(
    "ensemble_and_submit",
    selection=["champion_models", "gallery", "match_threshold", "submission_csv", "submission_score"],
    description="After the folds: champion/challenger, the ensemble gallery, the threshold, the submission and its score.",
)

rethreshold_and_submit = dg.define_asset_job(
    "rethreshold_and_submit",
    selection=["match_threshold", "submission_csv", "submission_score"],
    description="Cheap: re-tune the new_individual threshold (e.g. per species) and rewrite the submission, no retraining.",
)


@dg.definitions
def jobs() -> dg.Definitions:
    return dg.Definitions(jobs=[prepare_data, train_folds, ensemble_and_submit, rethreshold_and_submit])
