"""Where data and artifacts live, resolved from the environment.

``WHALE_DATA_DIR`` is the data set in the Kaggle layout; ``WHALE_HOME`` holds
everything the pipeline writes (artifacts, MLflow store, ``DAGSTER_HOME``).
Both default to places inside the checkout so that a fresh clone runs with no
setup; set them to run on your own data or to keep artifacts elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def default_home() -> Path:
    """``$WHALE_HOME``, else ``whale_home/`` in the checkout (or the cwd when installed)."""
    if env := os.environ.get("WHALE_HOME"):
        return Path(env).expanduser().resolve()
    root = _PACKAGE_ROOT if (_PACKAGE_ROOT / "pyproject.toml").exists() else Path.cwd()
    return root / "whale_home"


def default_data_dir() -> Path:
    """``$WHALE_DATA_DIR``, else the generated demo data set inside the home."""
    if env := os.environ.get("WHALE_DATA_DIR"):
        return Path(env).expanduser().resolve()
    return default_home() / "demo_data"


@dataclass(frozen=True)
class HomeLayout:
    """Every path the pipeline writes to, below one home directory."""

    home: Path

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def tables(self) -> Path:
        return self.home / "tables"

    @property
    def detector_dir(self) -> Path:
        return self.home / "detector"

    @property
    def crops_dir(self) -> Path:
        return self.home / "crops"

    def model_dir(self, fold: str) -> Path:
        return self.home / "models" / fold

    def embeddings_dir(self, fold: str) -> Path:
        return self.home / "embeddings" / fold

    @property
    def gallery_dir(self) -> Path:
        return self.home / "gallery"

    @property
    def gallery_versions_dir(self) -> Path:
        """Every gallery version (``vNNNN/``) and ``current.json``, the pointer to the newest."""
        return self.gallery_dir / "versions"

    @property
    def enrolled_dir(self) -> Path:
        """The enrollment ledger: confirmed photos (``images/``), their crops and ``enrolled.csv``."""
        return self.home / "enrolled"

    @property
    def submission(self) -> Path:
        return self.home / "submission.csv"

    @property
    def ultralytics_config(self) -> Path:
        return self.home / "ultralytics"
