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
