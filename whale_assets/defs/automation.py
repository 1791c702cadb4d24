"""Automation: a sensor for new training data, a retraining schedule, and the sensor
that rebuilds everything after the fold models. All are off until switched on.

The schedule and the rebuild act on the release, the last round of the graph
(``whale_assets/rounds.py``): its fold models are retrained, and its gallery, threshold,
submission and release (with the champion decision) rebuilt after them. The rounds before it (and the
pseudo-labels between rounds) are rebuilt when a run asks for them (``whale run``, their jobs).
"""

import hashlib

import dagster as dg

from whale_assets.partitions import fold_partitions
from whale_assets.resources import WhaleHome
from whale_assets.rounds import Round, graph_rounds
from whale_assets.stages import PREPARE_DATA_STAGE, ensemble_and_submit
from whale_ml.data.metadata import training_data_fingerprint
from whale_ml.environment import read_environment
from whale_ml.gallery.ledger import ledger_fingerprint


@dg.sensor(job_name=PREPARE_DATA_STAGE, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
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
    context.log.info(f"training data changed in {whale.data_path}: requesting {PREPARE_DATA_STAGE}")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint)], cursor=fingerprint)


def rebuild_after_folds_sensor(release: Round) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the release's rebuild condition (``Round.rebuild_condition``)."""
    return dg.AutomationConditionSensorDefinition(
        "rebuild_after_folds",
        target=ensemble_and_submit(release),
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Rebuilds the release's ({release.title}) gallery, threshold, submission and release (the champion decision) "
        "once its fold models are newer (off until switched on).",
    )


def weekly_retrain_schedule(release: Round) -> dg.ScheduleDefinition:
    """Retrains the release's fold models on ``$WHALE_RETRAIN_CRON``."""

    @dg.schedule(
        job_name=release.stage("train_folds"),
        cron_schedule=read_environment().retrain_cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
    def weekly_retrain(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        """Retrains every fold model of the release (one run per fold partition) on the
        schedule's cron (``$WHALE_RETRAIN_CRON``, default weekly); with ``rebuild_after_folds``
        on, its gallery, threshold and submission follow. Off until switched on in the UI."""
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        return [dg.RunRequest(partition_key=fold, run_key=f"{fold}@{tick}") for fold in fold_partitions.get_partition_keys()]

    return weekly_retrain


@dg.definitions
def automation() -> dg.Definitions:
    release = graph_rounds()[-1]
    return dg.Definitions(sensors=[training_data_changed, rebuild_after_folds_sensor(release)], schedules=[weekly_retrain_schedule(release)])
