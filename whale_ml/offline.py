"""Keep the stack off the network and out of the user's home directory.

Every switch here was measured (see the project docs): with them, YOLO
training, MLflow and Dagster make no network attempts. Call
:func:`configure_environment` before importing ultralytics, and run every
ultralytics call inside :func:`ultralytics_session`, which keeps its thread
settings from outliving it (whale_ml/threads.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from whale_ml.threads import set_thread_env_defaults, using_threads

_done_for: set[Path] = set()


def configure_environment(home: Path) -> None:
    """Set the offline switches and point ultralytics' settings at ``home``.

    Values a user has already set in the environment are kept.
    """
    set_thread_env_defaults()  # before ultralytics' import would write OMP_NUM_THREADS=1
    home = Path(home)
    if home in _done_for:
        return
    yolo_dir = home / "ultralytics"
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS checks or analytics at import
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")  # never pip-install "missing" requirements
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(yolo_dir))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    # MLflow's HTTP client retries a failing server 7 times with doubling waits (minutes)
    # before a step sees the error; fewer, shorter tries here, and Dagster's retry policy
    # retries the whole step later (whale_assets.retries.mlflow_retry_policy).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Ultralytics downloads Arial.ttf on every training run, plots or not; any TTF will do.
    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        from whale_ml.io import atomic_path

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        with atomic_path(font) as tmp:
            shutil.copyfile(source, tmp)
    _done_for.add(home)


def disable_ultralytics_integrations() -> None:
    """Stop ultralytics' own MLflow callback (it would end the project's active run) and hub sync."""
    from ultralytics import settings

    if settings.get("mlflow") or settings.get("sync"):
        settings.update({"mlflow": False, "sync": False})


@contextmanager
def ultralytics_session(home: Path, threads: int | None = None) -> Iterator[int]:
    """Import ultralytics (offline, integrations off) and run with ``threads`` torch threads.

    Ultralytics' import turns OpenCV's threads off, and every training or prediction
    sets torch to ``cpu_count - 1`` threads; the settings found on entry come back on
    leaving, whatever happened inside. Pass the yielded count to :func:`keep_torch_threads`
    so that the model runs with it too.

    Yields:
        The torch thread count in force inside (:func:`whale_ml.threads.pipeline_threads`).
    """
    configure_environment(home)
    with using_threads(threads) as n:
        disable_ultralytics_integrations()
        yield n


def keep_torch_threads(model: Any, threads: int) -> None:
    """Make an ultralytics ``YOLO`` model train, validate and predict with ``threads`` torch threads.

    Its ``select_device`` sets torch's count each time a trainer, validator or
    predictor starts; these callbacks run right after it and set it back.
    """
    import torch

    def restore(_: object) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    for event in ("on_pretrain_routine_start", "on_train_start", "on_val_start", "on_predict_start"):
        model.add_callback(event, restore)
