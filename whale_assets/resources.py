"""The resources every asset shares: the data home and the MLflow store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
from pydantic import Field

from whale_assets.retries import mlflow_retry_policy
from whale_ml.offline import configure_environment
from whale_ml.settings import HomeLayout, default_data_dir, default_home


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
    env = os.environ.get("MLFLOW_TRACKING_URI")
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
        default_factory=lambda: os.environ.get("WHALE_MLFLOW_UI", "http://127.0.0.1:5000"),
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
        """Log a trained embedding model to the active run, with its signature, and register
        it under :attr:`registered_model` with ``alias`` pointing at the new version.

        The signature says what serving gets and gives: uint8 RGB images (N, 3, S, S) in,
        float32 embeddings (N, D) out. Aliases, not the deprecated registry stages.
        """
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        signature = infer_signature(
            np.zeros((1, 3, image_size, image_size), dtype=np.uint8), np.zeros((1, embedding_size), dtype=np.float32)
        )
        # Explicit requirements: inferring them imports and inspects the environment (~4 s).
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={_version('timm')}"]
        info = mlflow.pytorch.log_model(
            model.cpu().eval(),
            name="embedding_model",
            signature=signature,
            registered_model_name=self.registered_model,
            pip_requirements=requirements,
            # 'pt2' (MLflow 3's default) traces one fixed input shape; the pickled module
            # embeds any batch size. Loading it needs whale_ml importable, as here.
            serialization_format="pickle",
        )
        client = mlflow.MlflowClient(tracking_uri=self.uri)
        version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(self.registered_model, version, key, value)
        client.set_registered_model_alias(self.registered_model, alias, version)
        return info

    def promote_challengers(self, folds: list[str]) -> list[dict[str, object]]:
        """Champion/challenger per fold: the newest version (alias ``<fold>``) becomes
        ``challenger_<fold>``, and ``champion_<fold>`` too when its validation MAP@5 is at
        least the champion's on the same fold data (``data_version`` tag). A champion
        validated on other data is not comparable, so the challenger replaces it.

        Returns one row per fold: both versions, their scores and the decision.
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        self.check_reachable()
        client = mlflow.MlflowClient(tracking_uri=self.uri)
        name = self.registered_model

        def by_alias(alias: str) -> Any:
            try:
                return client.get_model_version_by_alias(name, alias)
            except MlflowException:
                return None

        def score(version: Any) -> float:
            try:
                return float(version.tags.get("val_map5", "nan"))
            except ValueError:
                return float("nan")

        rows: list[dict[str, object]] = []
        for fold in folds:
            new, champion = by_alias(fold), by_alias(f"champion_{fold}")
            row: dict[str, object] = {"fold": fold, "challenger": None, "challenger_map5": None, "champion_before": None}
            if new is None:
                rows.append({**row, "decision": "no registered model for this fold"})
                continue
            client.set_registered_model_alias(name, f"challenger_{fold}", new.version)
            row.update({"challenger": int(new.version), "challenger_map5": score(new)})
            if champion is not None:
                row.update({"champion_before": int(champion.version), "champion_map5": score(champion)})
            if champion is None:
                promote, why = True, "first model of this fold"
            elif champion.version == new.version:
                promote, why = True, "already champion"
            elif champion.tags.get("data_version") != new.tags.get("data_version"):
                promote, why = True, "champion was validated on other data: not comparable"
            elif score(new) >= score(champion):
                promote, why = True, f"val MAP@5 {score(new):.4f} >= champion's {score(champion):.4f}"
            else:
                promote, why = False, f"val MAP@5 {score(new):.4f} < champion's {score(champion):.4f}: champion kept"
            if promote:
                client.set_registered_model_alias(name, f"champion_{fold}", new.version)
            row.update({"champion_after": int(new.version if promote else champion.version), "decision": why})
            rows.append(row)
        return rows


class MlflowUnreachableError(ConnectionError):
    """The MLflow tracking server named in the message did not answer."""


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
