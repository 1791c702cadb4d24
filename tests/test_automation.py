"""Keeping the graph up to date: the rebuild condition after the folds (eager, but only
on parents whose blocking checks passed) and the freshness policies that follow the
retraining schedule, evaluated by Dagster's own evaluators on a real instance; all of it,
with the release (and its champion decision) and the re-threshold job, on the last round."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import dagster as dg
import pytest

from whale_assets.freshness import RETRAIN_FRESHNESS, RETRAIN_WINDOW, longest_cron_gap, retrain_window
from whale_assets.rounds import REBUILD_AFTER_FOLDS, Round, building_rounds
from whale_assets.stages import all_asset_names
from whale_ml.environment import read_environment

DAY = dt.timedelta(days=1)


def _defs(rounds: int = 1) -> dg.Definitions:
    from whale_assets.definitions import defs

    with building_rounds(rounds):
        return defs()


# --- the rebuild condition -------------------------------------------------------------


def test_rebuild_condition_is_eager_and_waits_for_blocking_checks() -> None:
    labels = [child.get_label() for child in REBUILD_AFTER_FOLDS.children]
    assert REBUILD_AFTER_FOLDS.operator_type == "and"  # both must hold
    assert labels == ["eager", "all_deps_blocking_checks_passed"]
    graph = _defs().resolve_asset_graph()
    eager = {name for name in all_asset_names(1) if graph.get(dg.AssetKey.from_user_string(name)).automation_condition is not None}
    assert eager == {"release", "gallery", "match_threshold", "submission_csv", "submission_score"}
    assert all(graph.get(dg.AssetKey.from_user_string(name)).automation_condition == REBUILD_AFTER_FOLDS for name in eager)
    # It applies: these parents of rebuilt assets have blocking checks.
    blocking = {
        key.asset_key.to_user_string() for key in graph.asset_check_keys if graph.get(key).blocking  # type: ignore[attr-defined]
    }
    assert {"train_metadata", "cv_folds", "submission_csv"} <= blocking


def test_a_failed_blocking_check_holds_the_rebuild_until_it_passes(tmp_path: Path) -> None:
    """Two children of one parent with a blocking check, one with plain ``eager()`` and one
    with ``REBUILD_AFTER_FOLDS``: after the parent is rematerialised with its check failing,
    only the plain one is requested; once the check passes again, both are."""
    verdict = tmp_path / "check_passes"

    @dg.asset
    def parent() -> int:
        return 1

    @dg.asset_check(asset=parent, blocking=True)
    def parent_is_good() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=verdict.read_text() == "yes")

    @dg.asset(deps=[parent], automation_condition=dg.AutomationCondition.eager())
    def plain_eager() -> None: ...

    @dg.asset(deps=[parent], automation_condition=REBUILD_AFTER_FOLDS)
    def rebuilt() -> None: ...

    defs = dg.Definitions(assets=[parent, plain_eager, rebuilt], asset_checks=[parent_is_good])
    instance = dg.DagsterInstance.ephemeral()

    def materialise_parent(passes: bool) -> None:
        verdict.write_text("yes" if passes else "no")
        result = dg.materialize([parent, parent_is_good], instance=instance, raise_on_error=False)
        assert [e.passed for e in result.get_asset_check_evaluations()] == [passes]

    def requested(cursor: object) -> tuple[set[str], object]:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)  # type: ignore[arg-type]
        return {name for name in ("plain_eager", "rebuilt") if result.get_requested_partitions(dg.AssetKey(name))}, result.cursor

    materialise_parent(True)
    assert dg.materialize([plain_eager, rebuilt], instance=instance).success
    due, cursor = requested(None)
    assert due == set()  # everything up to date

    materialise_parent(False)
    due, cursor = requested(cursor)
    assert due == {"plain_eager"}  # eager alone rebuilds on a parent that failed its check
    due, cursor = requested(cursor)
    assert "rebuilt" not in due  # still held on the next tick

    materialise_parent(True)
    due, cursor = requested(cursor)
    assert due == {"plain_eager", "rebuilt"}


# --- freshness ---------------------------------------------------------------------------


def test_fold_models_and_submission_carry_the_retraining_freshness_policy() -> None:
    graph = _defs().resolve_asset_graph()
    with_policy = {name for name in all_asset_names(1) if graph.get(dg.AssetKey.from_user_string(name)).freshness_policy is not None}
    assert with_policy == {"arcface_model", "submission_csv"}
    for name in with_policy:
        policy = graph.get(dg.AssetKey.from_user_string(name)).freshness_policy
        assert policy == RETRAIN_FRESHNESS
        assert isinstance(policy, dg.FreshnessPolicy) and type(policy).__name__ == "TimeWindowFreshnessPolicy"
        # The default schedule (Sundays 03:00): WARN after 7.5 days, FAIL after 8.
        assert policy.warn_window.to_timedelta() == 7 * DAY + DAY / 2  # type: ignore[attr-defined]
        assert policy.fail_window.to_timedelta() == 8 * DAY  # type: ignore[attr-defined]
    # One cron for both: the schedule's.
    assert RETRAIN_WINDOW.cron == read_environment().retrain_cron == _defs().resolve_schedule_def("weekly_retrain").cron_schedule


@pytest.mark.parametrize("rounds", [1, 2])
def test_the_release_is_what_automation_keeps_up_to_date(rounds: int) -> None:
    """With one round or two, the last round is the release: only its stages after the folds
    carry the rebuild condition, and the rebuild sensor targets exactly them; only its fold
    models and submission carry the freshness policy; the schedule retrains its folds;
    ``rethreshold_and_submit`` re-tunes its threshold; its ensemble stage makes the release
    the champion decision is made on (the only ``release`` of the graph), after its gallery,
    threshold and submission score."""
    release = Round(rounds, rounds)
    d = _defs(rounds)
    graph = d.resolve_asset_graph()

    def node(name: str) -> object:
        return graph.get(dg.AssetKey.from_user_string(name))

    def of_release(*assets: str) -> set[str]:
        return {release.key(a).to_user_string() for a in assets}

    names = all_asset_names(rounds)
    eager = {n for n in names if node(n).automation_condition is not None}  # type: ignore[attr-defined]
    assert eager == of_release("release", "gallery", "match_threshold", "submission_csv", "submission_score")
    sensor = d.resolve_sensor_def("rebuild_after_folds")
    assert {k.to_user_string() for k in sensor.asset_selection.resolve(graph)} == eager  # type: ignore[union-attr]
    assert {n for n in names if node(n).freshness_policy is not None} == of_release("arcface_model", "submission_csv")  # type: ignore[attr-defined]
    assert d.resolve_schedule_def("weekly_retrain").job_name == release.stage("train_folds")
    assert d.resolve_job_def(release.stage("train_folds")).partitions_def is not None
    rethreshold = d.resolve_job_def("rethreshold_and_submit").asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in rethreshold} == of_release("match_threshold", "submission_csv", "submission_score", "release")
    assert [n for n in names if n.endswith("release")] == sorted(of_release("release"))
    parents = {p.to_user_string() for p in node(release.key("release").to_user_string()).parent_keys}  # type: ignore[attr-defined]
    assert parents == {"cv_folds", *of_release("gallery", "match_threshold", "submission_score")}


@pytest.mark.parametrize(
    ("cron", "period", "fail_after"),
    [
        ("0 3 * * 0", 7 * DAY, 8 * DAY),  # weekly
        ("0 3 * * *", DAY, 2 * DAY),  # daily
        ("0 3 * * 1,4", 4 * DAY, 5 * DAY),  # Mondays and Thursdays: the longer gap (Thu -> Mon) counts
        ("0 * * * 1-5", 2 * DAY + dt.timedelta(hours=1), 3 * DAY + dt.timedelta(hours=1)),  # weekday hours: the weekend
        ("0 3 31 * *", 61 * DAY, 62 * DAY),  # the 31st: a month without one makes a gap of 61 days
        ("*/30 * * * *", dt.timedelta(minutes=30), dt.timedelta(hours=1)),  # grace = the period when under a day
    ],
)
def test_retrain_window_follows_the_longest_gap_of_the_cron(cron: str, period: dt.timedelta, fail_after: dt.timedelta) -> None:
    window = retrain_window(cron)
    assert longest_cron_gap(cron) == window.period == period
    assert window.fail_after == fail_after
    assert window.period < window.warn_after < window.fail_after


def test_a_bad_retrain_cron_names_its_variable() -> None:
    with pytest.raises(ValueError, match=r"\$WHALE_RETRAIN_CRON: 'every sunday' is not a valid cron"):
        retrain_window("every sunday")


def test_freshness_state_of_a_fold_model_by_age() -> None:
    """The daemon's evaluator on the real asset node: PASS for a fresh model, WARN and FAIL
    as its newest materialisation ages past the windows."""
    from dagster._core.definitions.freshness import FreshnessState
    from dagster._core.definitions.freshness_evaluator import TimeWindowFreshnessPolicyEvaluator
    from dagster._core.loader import LoadingContextForTest
    from dagster._core.test_utils import freeze_time

    node = _defs().resolve_asset_graph().get(dg.AssetKey("arcface_model"))
    instance = dg.DagsterInstance.ephemeral()

    def state() -> FreshnessState:
        return asyncio.run(TimeWindowFreshnessPolicyEvaluator().evaluate_freshness(LoadingContextForTest(instance), node))

    assert state() == FreshnessState.UNKNOWN  # never materialised
    instance.report_runless_asset_event(dg.AssetMaterialization("arcface_model", partition="fold0"))
    when = instance.get_latest_materialization_event(dg.AssetKey("arcface_model")).timestamp  # type: ignore[union-attr]
    expected = {DAY: FreshnessState.PASS, 7 * DAY + DAY / 4: FreshnessState.PASS, 7 * DAY + 0.6 * DAY: FreshnessState.WARN}
    expected[8 * DAY + dt.timedelta(minutes=1)] = FreshnessState.FAIL
    for age, want in expected.items():
        with freeze_time(when + age.total_seconds()):
            assert state() == want, age
