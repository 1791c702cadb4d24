"""The deployment's environment (whale_ml/environment.py): parsed in one place, defaults
that run anywhere, and every malformed value named in its error."""

from __future__ import annotations

from pathlib import Path

import pytest

from whale_ml.environment import BadEnvironmentVariable, read_environment


def test_defaults_with_an_empty_environment(tmp_path: Path) -> None:
    env = read_environment({"WHALE_HOME": str(tmp_path)})
    assert env.home == tmp_path.resolve()
    assert env.data_dir == tmp_path.resolve() / "demo_data"
    assert (env.n_folds, env.mlflow_retries, env.mlflow_retry_delay_s) == (2, 3, 30.0)
    assert env.retrain_cron == "0 3 * * 0"
    assert env.executor == "default"
    assert env.mlflow_tracking_uri is None
    assert env.k8s.max_concurrent is None and env.k8s.image_pull_policy == "IfNotPresent"
    assert env.fsync is True
    assert (env.rounds, env.rounds_set) == (2, False)


def test_every_setting_is_read(tmp_path: Path) -> None:
    env = read_environment(
        {
            "WHALE_HOME": str(tmp_path / "h"),
            "WHALE_DATA_DIR": str(tmp_path / "d"),
            "WHALE_N_FOLDS": "5",
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5001",
            "WHALE_MLFLOW_UI": "http://mlflow.example:80",
            "WHALE_MLFLOW_RETRIES": "0",
            "WHALE_MLFLOW_RETRY_DELAY_S": "0.5",
            "WHALE_RETRAIN_CRON": "0 4 * * 1",
            "WHALE_EXECUTOR": " K8S ",
            "WHALE_K8S_MAX_CONCURRENT": "4",
            "WHALE_K8S_TRAIN_GPUS": "2",
            "WHALE_K8S_NAMESPACE": "whale",
            "WHALE_FSYNC": " Off ",
            "WHALE_ROUNDS": "3",
        }
    )
    assert env.home == (tmp_path / "h").resolve() and env.data_dir == (tmp_path / "d").resolve()
    assert env.n_folds == 5 and env.mlflow_retries == 0 and env.mlflow_retry_delay_s == 0.5
    assert env.mlflow_tracking_uri == "http://127.0.0.1:5001" and env.mlflow_ui == "http://mlflow.example:80"
    assert env.retrain_cron == "0 4 * * 1" and env.executor == "k8s"
    assert (env.k8s.max_concurrent, env.k8s.train_gpus, env.k8s.namespace) == (4, 2, "whale")
    assert env.fsync is False
    assert (env.rounds, env.rounds_set) == (3, True)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("WHALE_N_FOLDS", "1", "WHALE_N_FOLDS='1': expected a whole number >= 2"),
        ("WHALE_N_FOLDS", "three", "WHALE_N_FOLDS='three'"),
        ("WHALE_MLFLOW_RETRIES", "-1", "WHALE_MLFLOW_RETRIES='-1'"),
        ("WHALE_MLFLOW_RETRY_DELAY_S", "soon", "WHALE_MLFLOW_RETRY_DELAY_S='soon': expected a number of seconds"),
        ("WHALE_MLFLOW_RETRY_DELAY_S", "-3", "WHALE_MLFLOW_RETRY_DELAY_S='-3'"),
        ("WHALE_EXECUTOR", "kubernetes", "WHALE_EXECUTOR='kubernetes': expected one of default, k8s"),
        ("WHALE_K8S_TRAIN_GPUS", "0", "WHALE_K8S_TRAIN_GPUS='0': expected a whole number >= 1"),
        ("WHALE_FSYNC", "sometimes", "WHALE_FSYNC='sometimes': expected 1 or 0"),
        ("WHALE_ROUNDS", "0", "WHALE_ROUNDS='0': expected a whole number >= 1"),
    ],
)
def test_a_malformed_value_names_its_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(BadEnvironmentVariable, match=expected.replace("*", r"\*")):
        read_environment({name: value})


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WHALE_HOME", str(tmp_path))
    monkeypatch.setenv("WHALE_N_FOLDS", "3")
    env = read_environment()
    assert env.home == tmp_path.resolve() and env.n_folds == 3
