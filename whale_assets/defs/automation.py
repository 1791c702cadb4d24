"""Automation: a sensor for new training data, a retraining schedule, and the sensor
that rebuilds everything after the fold models. All are off until switched on."""

import hashlib

import dagster as dg

from whale_assets.defs.jobs import prepare_data, train_folds
from whale_assets.partitions import fold_partitions
from whale_assets.resources import WhaleHome
from whale_assets.stages import ENSEMBLE_AND_SUBMIT
from whale_ml.data.metadata import training_data_fingerprint
from whale_ml.environment import read_environment
from whale_ml.gallery.ledger import ledger_fingerprint


@dg.sensor(job=prepare_data, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
def training_data_changed(context: dg.SensorEvaluationContext, whale: WhaleHome) -> dg.SensorResult | dg.SkipReason:
    """Requests the data stage (metadata, detector, boxes, crops, folds) once per change of
    ``train.csv``, of the photos in ``train_images/`` or of the enrolled photos (``whale
    enroll``); the fold models and everything
    after them then show as stale in the asset graph. The first evaluation only records
    the current state (a cursor), so switching the sensor on does not start a run."""
    fingerprint = training_data_fingerprint(whale.data_path)
    enrolled = ledger_fingerprint(whale.layout)
    if enrolled != "no enrollments":  # (fingerprints recorded before any enrollment stay valid)
        fingerprint = hashlib.sha1(f"{fingerprint}|{enrolled}".encode()).hexdigest()
    if context.cursor is None:
        return dg.SensorResult(skip_reason=dg.SkipReason("first look: current training data recorded"), cursor=fingerprint)
    if context.cursor == fingerprint:
        return dg.SkipReason("training data unchanged")
    context.log.info(f"training data changed in {whale.data_path}: requesting {prepare_data.name}")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint)], cursor=fingerprint)


rebuild_after_folds = dg.AutomationConditionSensorDefinition(
    "rebuild_after_folds",
    target=ENSEMBLE_AND_SUBMIT,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Rebuilds champion/challenger, gallery, threshold and submission once fold models are newer (off until switched on).",
)


@dg.schedule(job=train_folds, cron_schedule=read_environment().retrain_cron, default_status=dg.DefaultScheduleStatus.STOPPED)
def weekly_retrain(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    """Retrains every fold model (one run per fold partition) on the schedule's cron
    (``$WHALE_RETRAIN_CRON``, default weekly); with ``rebuild_after_folds`` on, the
    gallery, threshold and submission follow. Off until switched on in the UI."""
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
    return [dg.RunRequest(partition_key=fold, run_key=f"{fold}@{tick}") for fold in fold_partitions.get_partition_keys()]
