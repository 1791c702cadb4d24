"""Where data and artifacts live, resolved from the environment.

``WHALE_DATA_DIR`` is the data set in the Kaggle layout; ``WHALE_HOME`` holds
everything the pipeline writes (artifacts, MLflow store, ``DAGSTER_HOME``).
Both default to places inside the checkout so that a fresh clone runs with no
setup; set them to run on your own data or to keep artifacts elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from whale_ml.environment import default_data_dir, default_home  # noqa: F401  (moved; importers follow at merge)

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
