"""Shared fixtures. Every test writes under pytest's tmp dirs, never into the checkout."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Before any project import: keep ultralytics, MLflow and Dagster state out of $HOME and
# the checkout, and the whole stack off the network.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="whale-tests-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)  # ~1 MB a session: a shared CI disk fills with them
os.environ["WHALE_HOME"] = str(_SESSION_HOME / "home")
os.environ["YOLO_CONFIG_DIR"] = str(_SESSION_HOME / "ultralytics")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("WHALE_DATA_DIR", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# The tests build one-round graphs (a second round on every pipeline test would double the
# suite); the tests of a second round ask for it (building_rounds, a recipe's `rounds` with
# this variable unset), and the default count has its own test. Set here, so the processes
# the tests start (`whale`, `dagster dev`) build the same graph.
os.environ["WHALE_ROUNDS"] = "1"

import pandas as pd

from whale_ml.data.demo import PRESETS, generate_demo_data
from whale_ml.data.folds import fold_split, make_folds
from whale_ml.data.metadata import read_train_metadata
from whale_ml.offline import configure_environment
from whale_ml.stage_configs import TrainConfig

configure_environment(Path(os.environ["WHALE_HOME"]))


@pytest.fixture(autouse=True)
def _no_tracking_uri_left_behind() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` writes $MLFLOW_TRACKING_URI: a test that pointed MLflow at
    its own store must not send a later test, or the processes it starts, to that store.
    (Unset for the whole session above; a test that wants a server sets it with monkeypatch.)"""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny generated data set in the Kaggle layout (read-only for tests)."""
    return generate_demo_data(tmp_path_factory.mktemp("tiny") / "data", PRESETS["tiny"])


@pytest.fixture
def whale_env(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh WHALE_HOME (and DAGSTER_HOME inside it) on the tiny data set."""
    home = tmp_path / "home"
    monkeypatch.setenv("WHALE_HOME", str(home))
    monkeypatch.setenv("WHALE_DATA_DIR", str(tiny_data))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    from whale_assets.instance import prepare_dagster_home

    prepare_dagster_home()
    return home


# ---------------------------------------------------------------- training on the tiny set

# The tiny training recipe (TrainConfig's fields): a test ResNet on 32-pixel photos, on the
# CPU, seconds an epoch. Tests take it from the fixtures below, never from this name.
TINY = {"backbone": "test_resnet", "image_size": 32, "embedding_size": 16, "batch_size": 4, "m_per_class": 1, "device": "cpu"}


@pytest.fixture
def tiny_recipe() -> dict[str, object]:
    """The tiny training recipe as TrainConfig's keyword arguments (a fresh copy: change it freely)."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., TrainConfig]:
    """The tiny recipe's TrainConfig, with any field set otherwise: ``tiny_config(epochs=2, m_per_class=2)``."""

    def make(**fields: object) -> TrainConfig:
        return TrainConfig(**{**TINY, **fields})

    return make


@pytest.fixture(scope="module")
def fold(tiny_data: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Fold 0 of 2 of the tiny set, on the full photos (no detector needed): its training and
    validation rows, and the number of classes (every individual of the set has a label)."""
    train = read_train_metadata(tiny_data)
    tr, val = fold_split(make_folds(train, 2, 0.2, 0), 0)
    return tr, val, int(train["label"].max()) + 1


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a local TCP port where nothing listens (at the time of asking)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    return pick
