"""Every setting the pipeline takes from the environment, read and checked in one place.

A deployment changes these without touching code or recipes (docs/deployment.md lists
them). :func:`read_environment` parses them all at once and names the variable in every
error. Two moments read them:

- when the code location loads (fold partitions, training rounds, the retry policy, the
  retraining cron, the executor): these are fixed for the life of the process;
- when a run uses a resource (the home, the data set, the MLflow URI): one process can
  then serve several homes (a long-lived ``dagster dev``, the tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent

EXECUTORS = ("default", "k8s")

# Training rounds in the asset graph when neither $WHALE_ROUNDS nor the recipe says: the first
# round, then a pseudo-label round (its gallery is the release). The second round trains every
# fold again with the test photos the first pseudo-labelled, calibrated out of fold; it raised
# out-of-fold MAP@5 on the demo set and on the Kaggle-shaped long tail alike, and with a warm
# start (the recipe's warm_start_epochs) it costs about a third of the first round's training
# (docs/benchmarks.md, "The pseudo-label round"). 1: the first round alone.
DEFAULT_ROUNDS = 2


class BadEnvironmentVariable(ValueError):
    """An environment variable holds a value the pipeline cannot use (the message names it)."""


@dataclass(frozen=True)
class K8sEnvironment:
    """The Kubernetes executor's settings (``WHALE_K8S_*``), all optional."""

    namespace: str | None = None  # where step Jobs go (default: the K8sRunLauncher's namespace)
    home_claim: str | None = None  # ReadWriteMany PVC for WHALE_HOME, when no launcher/Helm mount gives it
    image_pull_policy: str = "IfNotPresent"
    max_concurrent: int | None = None  # step pods at once per run
    train_gpus: int | None = None  # GPUs of each fold model's pod (DDP: arcface_model's `processes`)
    kubeconfig: str | None = None  # launching step pods from outside the cluster


@dataclass(frozen=True)
class Environment:
    """The deployment's settings: paths, fold count, MLflow, retries, schedule, executor."""

    home: Path
    data_dir: Path
    n_folds: int = 2
    rounds: int = DEFAULT_ROUNDS  # training rounds in the asset graph; the last makes the release
    rounds_set: bool = False  # $WHALE_ROUNDS was given (a recipe must then agree with it)
    mlflow_tracking_uri: str | None = None  # None: the SQLite store in the home
    mlflow_ui: str = "http://127.0.0.1:5000"
    mlflow_retries: int = 3
    mlflow_retry_delay_s: float = 30.0
    retrain_cron: str = "0 3 * * 0"
    executor: str = "default"
    k8s: K8sEnvironment = field(default_factory=K8sEnvironment)
    threads: int | None = None  # torch/OpenMP threads of a stage; None: every core this process may use
    fsync: bool = True  # flush every artifact to disk before and after its rename (whale_ml/io.py)


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$WHALE_HOME``, else ``whale_home/`` in the checkout (or the cwd when installed)."""
    environ = os.environ if environ is None else environ
    if env := environ.get("WHALE_HOME"):
        return Path(env).expanduser().resolve()
    root = _PACKAGE_ROOT if (_PACKAGE_ROOT / "pyproject.toml").exists() else Path.cwd()
    return root / "whale_home"


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$WHALE_DATA_DIR``, else the generated demo data set inside the home."""
    environ = os.environ if environ is None else environ
    if env := environ.get("WHALE_DATA_DIR"):
        return Path(env).expanduser().resolve()
    return default_home(environ) / "demo_data"


def threads_setting(environ: Mapping[str, str] | None = None) -> int | None:
    """``$WHALE_THREADS``: the CPU threads each torch-heavy stage runs with (None: every core).

    The count is the machine's, not the recipe's: one value for every stage of a
    deployment (a step pod's CPU request, a shared workstation's share), read when a
    stage starts, so that the step's own machine decides (whale_ml/threads.py applies it).

    Raises:
        BadEnvironmentVariable: not a whole number >= 1.
    """
    return _integer(os.environ if environ is None else environ, "WHALE_THREADS", None, minimum=1)


_FALSE, _TRUE = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def fsync_setting(environ: Mapping[str, str] | None = None) -> bool:
    """``$WHALE_FSYNC``: whether artifacts are flushed to disk around their rename (default
    on), so that a power cut cannot leave an empty file under a real name. ``0`` for a
    scratch home where that does not matter (the cost: docs/benchmarks.md, "Durable writes").
    Read at each write, so that the storage of the step's own machine decides.

    Raises:
        BadEnvironmentVariable: not one of 1/0, true/false, yes/no, on/off.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("WHALE_FSYNC", "").strip().lower()
    if not raw or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise BadEnvironmentVariable(f"WHALE_FSYNC={raw!r}: expected 1 or 0 (or true/false, yes/no, on/off)")


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """Parse every ``WHALE_*`` setting (and ``MLFLOW_TRACKING_URI``) from ``environ``
    (default: the process environment).

    Raises:
        BadEnvironmentVariable: a value is malformed; the message names the variable.
    """
    environ = os.environ if environ is None else environ
    executor = environ.get("WHALE_EXECUTOR", "").strip().lower() or "default"
    if executor not in EXECUTORS:
        raise BadEnvironmentVariable(f"WHALE_EXECUTOR={executor!r}: expected one of {', '.join(EXECUTORS)} (or unset)")
    n_folds = _integer(environ, "WHALE_N_FOLDS", 2, minimum=2)
    rounds = _integer(environ, "WHALE_ROUNDS", None, minimum=1)
    retries = _integer(environ, "WHALE_MLFLOW_RETRIES", 3, minimum=0)
    delay = _number(environ, "WHALE_MLFLOW_RETRY_DELAY_S", 30.0)
    k8s = K8sEnvironment(
        namespace=environ.get("WHALE_K8S_NAMESPACE") or None,
        home_claim=environ.get("WHALE_K8S_HOME_CLAIM") or None,
        image_pull_policy=environ.get("WHALE_K8S_IMAGE_PULL_POLICY") or "IfNotPresent",
        max_concurrent=_integer(environ, "WHALE_K8S_MAX_CONCURRENT", None, minimum=1),
        train_gpus=_integer(environ, "WHALE_K8S_TRAIN_GPUS", None, minimum=1),
        kubeconfig=environ.get("WHALE_K8S_KUBECONFIG") or None,
    )
    return Environment(
        home=default_home(environ),
        data_dir=default_data_dir(environ),
        n_folds=n_folds,
        rounds=DEFAULT_ROUNDS if rounds is None else rounds,
        rounds_set=rounds is not None,
        mlflow_tracking_uri=environ.get("MLFLOW_TRACKING_URI") or None,
        mlflow_ui=environ.get("WHALE_MLFLOW_UI") or "http://127.0.0.1:5000",
        mlflow_retries=retries,
        mlflow_retry_delay_s=delay,
        retrain_cron=environ.get("WHALE_RETRAIN_CRON") or "0 3 * * 0",
        executor=executor,
        k8s=k8s,
        threads=threads_setting(environ),
        fsync=fsync_setting(environ),
    )


def _integer(environ: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.lstrip("-").isdigit():
        raise BadEnvironmentVariable(f"{name}={raw!r}: expected a whole number >= {minimum}")
    value = int(raw)
    if value < minimum:
        raise BadEnvironmentVariable(f"{name}={raw!r}: expected a whole number >= {minimum}")
    return value


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadEnvironmentVariable(f"{name}={raw!r}: expected a number of seconds >= 0") from None
    if not value >= 0:
        raise BadEnvironmentVariable(f"{name}={raw!r}: expected a number of seconds >= 0")
    return value
