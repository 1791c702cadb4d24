"""The shared resources follow the environment at use time, one home after another in one process;
errors that no retry can fix fail a step at its first attempt, whatever its retry policy."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

from whale_assets.io_manager import TableIOManager
from whale_assets.resources import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy
from whale_ml.home import HomeLayout


@pytest.mark.slow
def test_each_home_gets_its_own_mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; that must not pin later homes to the first store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resource = MlflowTracking()  # built once, as the definitions are
    for name in ("first", "second"):
        home = tmp_path / name
        monkeypatch.setenv("WHALE_HOME", str(home))
        assert resource.uri == HomeLayout(home).mlflow_uri
        resource._experiment_id()
        assert mlflow.get_tracking_uri() == HomeLayout(home).mlflow_uri
        assert (home / "mlflow.db").exists()
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_the_experiment_is_marked_as_model_training_and_links_open_that_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's experiment kind tag on a new experiment and on one made before the tag existed;
    the UI links name the model-training view (MLflow 3.17's UI opens its GenAI view otherwise)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WHALE_HOME", str(tmp_path / "home"))
    tracking = MlflowTracking(ui_url="http://127.0.0.1:5000/")
    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    new = tracking._experiment_id()
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("made-by-hand", artifact_location=(tmp_path / "art").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert MlflowTracking(experiment="made-by-hand")._experiment_id() == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert tracking.run_url("3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.experiment_url("3") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    mlflow.set_tracking_uri(None)


def test_a_users_tracking_uri_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("WHALE_HOME", str(tmp_path / "home"))
    assert MlflowTracking().uri == server
    assert MlflowTracking(tracking_uri="http://127.0.0.1:5000").uri == "http://127.0.0.1:5000"


def test_whale_home_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resource = WhaleHome()
    for name in ("a", "b"):
        monkeypatch.setenv("WHALE_HOME", str(tmp_path / name))
        monkeypatch.delenv("WHALE_DATA_DIR", raising=False)
        assert resource.layout.home == tmp_path / name
        assert resource.data_path == tmp_path / name / "demo_data" and resource.is_default_demo
    assert WhaleHome(home=str(tmp_path / "x"), data_dir=str(tmp_path / "d")).data_path == tmp_path / "d"


# --- which failures are retried ---------------------------------------------------------------------------


def _attempts(result: dg.ExecuteInProcessResult, step: str) -> tuple[int, list[str]]:
    """The step's retries and the messages of its failures."""
    events = result.events_for_node(step)
    retries = sum(e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for e in events)
    failures = [e.step_failure_data.error.message for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return retries, failures


def _needs_folds(policy: dg.RetryPolicy, body_error: Exception | None = None) -> list[dg.AssetsDefinition]:
    """An upstream ``cv_folds`` and an asset that loads it under ``policy``."""

    @dg.asset(name="cv_folds")
    def upstream() -> pd.DataFrame:
        return pd.DataFrame({"image": ["a.jpg"], "fold": [0]})

    @dg.asset(retry_policy=policy)
    def needs_folds(cv_folds: pd.DataFrame) -> None:
        if body_error is not None:
            raise body_error

    return [upstream, needs_folds]


def test_a_missing_input_fails_at_the_first_attempt_whatever_the_retry_policy(tmp_path: Path) -> None:
    """The IO manager's missing-input error disallows retries: no retry event, one failure naming
    the missing asset and what to materialise first. The same policy does retry a body's error
    (the control: the policy is on)."""
    policy = dg.RetryPolicy(max_retries=2, delay=0.05)
    io_manager = TableIOManager(base_dir=str(tmp_path / "tables"))
    upstream, needs_folds = _needs_folds(policy)
    result = dg.materialize([upstream, needs_folds], selection=[needs_folds], resources={"io_manager": io_manager}, raise_on_error=False)
    assert not result.success
    retries, failures = _attempts(result, "needs_folds")
    assert retries == 0 and len(failures) == 1, failures
    assert "input cv_folds has not been materialised yet" in failures[0] and "materialise cv_folds first" in failures[0]
    assert str(tmp_path / "tables" / "cv_folds") in failures[0]

    # Control: with the input there, an error of the body is retried twice by the same policy.
    upstream, needs_folds = _needs_folds(policy, body_error=ValueError("a body error"))
    assert dg.materialize([upstream], resources={"io_manager": io_manager}).success
    result = dg.materialize([upstream, needs_folds], selection=[needs_folds], resources={"io_manager": io_manager}, raise_on_error=False)
    retries, failures = _attempts(result, "needs_folds")
    assert retries == 2 and len(failures) == 1, failures
    # And with the input there, the asset loads it and succeeds.
    upstream, needs_folds = _needs_folds(policy)
    assert dg.materialize([upstream, needs_folds], selection=[needs_folds], resources={"io_manager": io_manager}).success


def test_an_output_the_io_manager_cannot_store_fails_at_once(tmp_path: Path) -> None:
    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2, delay=0.05))
    def a_list() -> list:
        return [1, 2]

    io_manager = TableIOManager(base_dir=str(tmp_path / "tables"))
    result = dg.materialize([a_list], resources={"io_manager": io_manager}, raise_on_error=False)
    retries, failures = _attempts(result, "a_list")
    assert not result.success and retries == 0 and len(failures) == 1, failures
    assert "stores DataFrames and dicts, not list" in failures[0]
    assert not (tmp_path / "tables").exists() or not any((tmp_path / "tables").iterdir())


class _Store(dg.ConfigurableResource):
    """A resource that cannot start."""

    root: str

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        raise ValueError(f"no store at {self.root}")


def test_a_resource_that_cannot_start_fails_at_once() -> None:
    """A resource's setup error (here a bad setting) is raised outside the step's retry
    policy: one failure, no retry, under the same policy that retries a body's error."""

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2, delay=0.05))
    def uses_store(store: _Store) -> None:
        pass

    result = dg.materialize([uses_store], resources={"store": _Store(root="/nowhere")}, raise_on_error=False)
    assert not result.success
    events = result.all_events
    assert not any(e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for e in events)
    failures = [str(e.event_specific_data) for e in events if e.is_failure or e.event_type_value.startswith("RESOURCE")]
    assert any("no store at /nowhere" in f for f in failures), failures


def test_a_fold_model_without_its_folds_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``arcface_model``, under its own MLflow retry policy, launched before ``cv_folds``
    exists (``train_folds`` before ``prepare_data``): it fails at the first attempt, in seconds
    rather than after minutes of back-off, and says what to materialise first."""
    from whale_assets.defs.training import arcface_model_asset
    from whale_assets.rounds import Round

    arcface_model = arcface_model_asset(Round(1, 1))

    monkeypatch.setenv("WHALE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    policy = arcface_model.op.retry_policy
    assert policy is not None and policy.max_retries >= 1  # the test means something only with retries on
    result = dg.materialize(
        [dg.SourceAsset("cv_folds"), arcface_model],
        partition_key="fold0",
        resources={"whale": WhaleHome(), "mlflow": MlflowTracking(), "io_manager": TableIOManager(base_dir=str(tmp_path / "tables"))},
        raise_on_error=False,
    )
    assert not result.success
    retries, failures = _attempts(result, "arcface_model")
    assert retries == 0 and len(failures) == 1, failures
    assert "materialise cv_folds first" in failures[0], failures[0]


def test_only_transient_errors_pass_the_body_wrapper() -> None:
    """retry_only_if_transient: a connection error reaches the retry policy as it is; any other
    error becomes a no-retry Failure naming it; a Failure passes unchanged; generators too."""
    from whale_assets.retries import retry_only_if_transient

    @retry_only_if_transient
    def body(exc: Exception) -> None:
        raise exc

    with pytest.raises(ConnectionError):
        body(ConnectionError("refused"))
    with pytest.raises(dg.Failure) as final:
        body(ValueError("bad data"))
    assert not final.value.allow_retries and final.value.description == "ValueError: bad data"
    assert isinstance(final.value.__cause__, ValueError)
    own = dg.Failure("own", allow_retries=True)
    with pytest.raises(dg.Failure) as passed:
        body(own)
    assert passed.value is own

    @retry_only_if_transient
    def generator(exc: Exception):  # noqa: ANN202
        yield 1
        raise exc

    with pytest.raises(dg.Failure):
        list(generator(KeyError("k")))
    with pytest.raises(TimeoutError):
        list(generator(TimeoutError("slow")))


@pytest.mark.parametrize(("retries", "delay", "expected"), [(None, None, (3, 30.0)), ("0", "1.5", (0, 1.5)), ("5", "0", (5, 0.0))])
def test_mlflow_retry_policy_reads_the_environment(
    retries: str | None, delay: str | None, expected: tuple[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WHALE_MLFLOW_RETRIES", retries), ("WHALE_MLFLOW_RETRY_DELAY_S", delay)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    policy = mlflow_retry_policy()
    assert (policy.max_retries, policy.delay) == expected
    assert policy.backoff == dg.Backoff.EXPONENTIAL


@pytest.mark.parametrize(("retries", "delay"), [("-1", "1"), ("1", "-0.5"), ("many", "1"), ("1", "soon")])
def test_mlflow_retry_policy_rejects_bad_settings(retries: str, delay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHALE_MLFLOW_RETRIES", retries)
    monkeypatch.setenv("WHALE_MLFLOW_RETRY_DELAY_S", delay)
    with pytest.raises(ValueError, match="WHALE_MLFLOW_RETR"):
        mlflow_retry_policy()
