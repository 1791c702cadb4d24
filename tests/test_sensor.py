"""The training-data sensor, evaluated with a build context on a real data folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pandas as pd

from whale_assets.defs.automation import training_data_changed
from whale_assets.resources import WhaleHome


def _evaluate(data: Path, cursor: str | None, home: Path) -> tuple[list[dg.RunRequest], str | None]:
    context = dg.build_sensor_context(cursor=cursor, resources={"whale": WhaleHome(data_dir=str(data), home=str(home))})
    result = training_data_changed(context)
    if isinstance(result, dg.SkipReason):
        return [], cursor
    return list(result.run_requests or []), result.cursor if result.cursor is not None else cursor


def test_one_request_per_change_of_training_data(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    home = tmp_path / "home"

    requests, cursor = _evaluate(data, None, home)  # switching it on: records, requests nothing
    assert requests == [] and cursor
    requests, cursor = _evaluate(data, cursor, home)  # nothing changed
    assert requests == []

    # A new training row and its photo: one request.
    train = pd.read_csv(data / "train.csv")
    first = train.iloc[0]
    shutil.copy(data / "train_images" / first["image"], data / "train_images" / "new_photo.jpg")
    pd.concat([train, pd.DataFrame([{**first.to_dict(), "image": "new_photo.jpg"}])]).to_csv(data / "train.csv", index=False)
    requests, new_cursor = _evaluate(data, cursor, home)
    assert len(requests) == 1 and requests[0].run_key == new_cursor != cursor
    requests, again = _evaluate(data, new_cursor, home)  # the change was seen: no second request
    assert requests == [] and again == new_cursor

    # A photo replaced in place (same name, other bytes) is a change too.
    (data / "train_images" / "new_photo.jpg").write_bytes((data / "train_images" / first["image"]).read_bytes()[:-10])
    requests, _ = _evaluate(data, new_cursor, home)
    assert len(requests) == 1


def test_sensor_is_off_until_switched_on() -> None:
    from whale_assets.definitions import defs

    sensor = defs().resolve_sensor_def("training_data_changed")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.job_name == "prepare_data"


def test_weekly_retrain_requests_every_fold_and_is_off_until_switched_on() -> None:
    import datetime

    from whale_assets.definitions import defs

    d = defs()
    schedule = d.resolve_schedule_def("weekly_retrain")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == "0 3 * * 0"
    when = datetime.datetime(2026, 11, 29, 3, 0, tzinfo=datetime.timezone.utc)
    context = dg.build_schedule_context(scheduled_execution_time=when, repository_def=d.get_repository_def())
    requests = schedule.evaluate_tick(context).run_requests
    assert sorted(r.partition_key for r in requests) == ["fold0", "fold1"]
    assert len({r.run_key for r in requests}) == 2
    sensor = d.resolve_sensor_def("rebuild_after_folds")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
