"""The shared resources follow the environment at use time, one home after another in one process."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from whale_assets.resources import MlflowTracking, WhaleHome
from whale_ml.settings import HomeLayout


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


def test_champion_challenger_rules_on_a_real_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A challenger replaces the champion only with a score at least as good on the same fold data."""
    monkeypatch.setenv("WHALE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = MlflowTracking(registered_model="test-model")
    tracking._experiment_id()  # creates the store
    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    client.create_registered_model("test-model")

    def new_version(score: float, data: str = "d1") -> str:
        v = client.create_model_version("test-model", source=str(tmp_path), tags={"val_map5": str(score), "data_version": data})
        client.set_registered_model_alias("test-model", "fold0", v.version)
        return v.version

    def champion() -> str:
        return client.get_model_version_by_alias("test-model", "champion_fold0").version

    first = new_version(0.50)
    (row,) = tracking.promote_challengers(["fold0"])
    assert champion() == first and row["decision"] == "first model of this fold"
    worse = new_version(0.40)
    (row,) = tracking.promote_challengers(["fold0"])
    assert champion() == first and "champion kept" in row["decision"]
    assert client.get_model_version_by_alias("test-model", "challenger_fold0").version == worse
    equal = new_version(0.50)
    tracking.promote_challengers(["fold0"])
    assert champion() == equal  # "at least the champion's"
    other_data = new_version(0.10, data="d2")
    (row,) = tracking.promote_challengers(["fold0"])
    assert champion() == other_data and "not comparable" in row["decision"]
    (row,) = tracking.promote_challengers(["fold1"])
    assert row["decision"] == "no registered model for this fold"
    mlflow.set_tracking_uri(None)
