"""The resources every asset shares: the data home and the MLflow store (runs here; the
model registry itself is :mod:`whale_ml.registry`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
from pydantic import Field

from whale_assets.retries import mlflow_retry_policy
from whale_ml.offline import configure_environment
from whale_ml.environment import default_data_dir, default_home, read_environment
from whale_ml.home import HomeLayout


class WhaleHome(dg.ConfigurableResource):
    """The data set to read (Kaggle layout) and the home every artifact is written under.

    Unset fields follow the environment when a run *uses* them, not when the
    definitions were loaded, so that one process can serve several homes.
    """

    data_dir: str | None = Field(None, description="Data set folder (default: $WHALE_DATA_DIR, else the demo set in the home).")
    home: str | None = Field(None, description="Artifact home (default: $WHALE_HOME, else whale_home/ in the checkout).")

    @property
    def home_path(self) -> Path:
        return Path(self.home) if self.home else default_home()

    @property
    def layout(self) -> HomeLayout:
        return HomeLayout(self.home_path)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    @property
    def is_default_demo(self) -> bool:
        """True when no data set was given and the generated demo set is used."""
        return self.data_path.resolve() == (self.home_path / "demo_data").resolve()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        configure_environment(self.home_path)


# Home stores this process pointed MLflow at. ``mlflow.set_tracking_uri`` also writes
# $MLFLOW_TRACKING_URI (for subprocesses), which must not then pass for the user's choice
# when the home changes (several homes in one process: tests, a long-lived server).
_HOME_URIS: set[str] = set()


def _default_tracking_uri() -> str:
    env = read_environment().mlflow_tracking_uri
    if env and env not in _HOME_URIS:
        return env
    uri = HomeLayout(default_home()).mlflow_uri
    _HOME_URIS.add(uri)
    return uri


class MlflowTracking(dg.ConfigurableResource):
    """One MLflow run per asset materialisation (and partition), found again on retry.

    The run is looked up by the Dagster run id, asset key and partition tags,
    so a retried step logs into the run it started instead of a new one.
    """

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the SQLite store in the home)."
    )
    experiment: str = Field("whale-photo-id", description="MLflow experiment name.")
    artifact_root: str | None = Field(
        None,
        description="Artifact location for a newly created experiment (default: mlartifacts/ in the home; with a "
        "tracking server, the server's own artifact store).",
    )
    ui_url: str = Field(
        default_factory=lambda: read_environment().mlflow_ui,
        description="Where the MLflow UI is served (for links in asset metadata).",
    )
    registered_model: str = Field("whale-arcface", description="Model registry name of the fold embedding models.")
    probe_timeout_s: float = Field(
        5.0, gt=0, description="Seconds to wait for a tracking server to answer before the step fails (and is retried)."
    )

    @property
    def uri(self) -> str:
        """The tracking URI in force now (the field, else the environment)."""
        return self.tracking_uri or _default_tracking_uri()

    def check_reachable(self) -> None:
        """Fail at once, naming the URI, when the tracking server does not answer.

        MLflow's own client would retry a dead server for minutes (and a step that
        trains first would lose its work at the end); one quick request decides
        instead, and the assets' retry policy tries the step again later. Any HTTP
        answer counts: a proxy's 401 is still a server. File and database stores
        need no probe.
        """
        uri = self.uri
        if urlparse(uri).scheme not in ("http", "https"):
            return
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=self.probe_timeout_s)
        except requests.RequestException as exc:
            raise MlflowUnreachableError(
                f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}: {exc}). Start it, or point "
                "MLFLOW_TRACKING_URI (or the mlflow resource's tracking_uri) at one that runs; the step is retried "
                f"{mlflow_retry_policy().max_retries} time(s) (WHALE_MLFLOW_RETRIES, WHALE_MLFLOW_RETRY_DELAY_S)."
            ) from exc

    def _experiment_id(self) -> str:
        import mlflow

        self.check_reachable()
        mlflow.set_tracking_uri(self.uri)
        found = mlflow.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        if self.artifact_root:
            root = self.artifact_root
        elif urlparse(self.uri).scheme in ("http", "https"):
            root = None  # a tracking server stores artifacts where it was told to (--artifacts-destination)
        else:
            root = str(HomeLayout(default_home()).mlflow_artifacts)
        location = None if root is None else root if "://" in root else Path(root).resolve().as_uri()
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # created meanwhile by a parallel step
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
        """Start (or resume) the MLflow run of this step and make it the active run."""
        import mlflow

        experiment_id = self._experiment_id()
        partition = context.partition_key if context.has_partition_key else ""
        run_tags = {
            "dagster.run_id": context.run.run_id,
            "dagster.asset": context.asset_key.to_user_string(),
            "dagster.partition": partition,
            **(tags or {}),
        }
        query = " and ".join(f"tags.`{k}` = '{run_tags[k]}'" for k in ("dagster.run_id", "dagster.asset", "dagster.partition"))
        existing = mlflow.search_runs([experiment_id], filter_string=query, max_results=1, output_format="list")
        run_id = existing[0].info.run_id if existing else None
        with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name, tags=run_tags) as run:
            yield run

    def log_embedding_model(self, model: Any, image_size: int, embedding_size: int, alias: str, tags: dict[str, str]) -> Any:
        """Log a trained embedding model to the active run and register it under
        :attr:`registered_model` with ``tags`` and ``alias`` (:func:`whale_ml.registry.register_model`)."""
        from whale_ml.registry import register_model

        return register_model(self.uri, self.registered_model, model, image_size, embedding_size, alias, tags)

    def promote_challengers(self, folds: list[str]) -> list[dict[str, object]]:
        """Champion/challenger per fold in :attr:`registered_model`
        (:func:`whale_ml.registry.promote_challengers`): one row per fold, with the decision."""
        from whale_ml.registry import promote_challengers

        self.check_reachable()
        return promote_challengers(self.uri, self.registered_model, folds)


class MlflowUnreachableError(ConnectionError):
    """The MLflow tracking server named in the message did not answer."""

