"""Sensors: the pipeline notices new or changed training data."""

import dagster as dg

from whale_assets.defs.jobs import prepare_data
from whale_assets.resources import WhaleHome
from whale_ml.data.metadata import training_data_fingerprint


@dg.sensor(job=prepare_data, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
def training_data_changed(context: dg.SensorEvaluationContext, whale: WhaleHome) -> dg.SensorResult | dg.SkipReason:
    """Requests the data stage (metadata, detector, boxes, crops, folds) once per change of
    ``train.csv`` or of the photos in ``train_images/``; the fold models and everything
    after them then show as stale in the asset graph. The first evaluation only records
    the current state (a cursor), so switching the sensor on does not start a run."""
    fingerprint = training_data_fingerprint(whale.data_path)
    if context.cursor is None:
        return dg.SensorResult(skip_reason=dg.SkipReason("first look: current training data recorded"), cursor=fingerprint)
    if context.cursor == fingerprint:
        return dg.SkipReason("training data unchanged")
    context.log.info(f"training data changed in {whale.data_path}: requesting {prepare_data.name}")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint)], cursor=fingerprint)
