"""Keep the stack off the network and out of the user's home directory.

Every switch here was measured (see the project docs): with them, YOLO
training, MLflow and Dagster make no network attempts. Call
:func:`configure_environment` before importing ultralytics.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_done_for: set[Path] = set()


def configure_environment(home: Path) -> None:
    """Set the offline switches and point ultralytics' settings at ``home``.

    Values a user has already set in the environment are kept.
    """
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
