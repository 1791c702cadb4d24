"""The resources every asset shares: the data home and the MLflow store (runs here; the
model registry itself is :mod:`whale_ml.registry`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from whale_ml.mlflow_errors import TRANSIENT_STATUSES, MlflowRefusedError, refusal_message, refusals_named


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


# MLflow's kind of an experiment (the UI's `mlflow.experimentKind` tag, values from its
# ExperimentKind enum): these are model-training runs, not GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI opens an experiment in its GenAI view (Overview, Traces) whatever the tag
# says, unless the link names the view or the user switched to "Model training" before.
UI_VIEW = "?workflowType=machine_learning"

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


def _set_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri``, remembering ``uri`` as this process's own choice when it is
    not what $MLFLOW_TRACKING_URI said: MLflow writes it there, and a later resource of another
    home must not take it for the user's setting."""
    import mlflow

    if read_environment().mlflow_tracking_uri != uri:
        _HOME_URIS.add(uri)
    mlflow.set_tracking_uri(uri)


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
    system_metrics_interval_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between two samples of CPU, memory, disk, network and GPU use on the runs that log them "
        "(training, embeddings); the end of a run is always sampled ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins).",
    )

    @property
    def uri(self) -> str:
        """The tracking URI in force now (the field, else the environment)."""
        return self.tracking_uri or _default_tracking_uri()

    def check_reachable(self) -> None:
        """Fail at once, naming the URI, when the tracking server does not answer, is
        unavailable, or refuses the credentials.

        MLflow's own client would retry a dead server for minutes (and a step that
        trains first would lose its work at the end); one quick request decides
        instead. No answer, or a 429/5xx (a proxy whose backend is down, maintenance),
        raises :class:`MlflowUnreachableError` (transient: the assets' retry policy tries
        the step again later). A 401 or 403 raises :class:`MlflowRefusedError` (final: the
        same credentials get the same answer). Any other answer counts as a server: a
        proxy may route only the API, not ``/health``, so a 404 here decides nothing
        (the first API call names a server that is not MLflow). File and database stores
        need no probe.
        """
        uri = self.uri
        if urlparse(uri).scheme not in ("http", "https"):
            return
        import requests

        retried = (
            f"the step is retried {mlflow_retry_policy().max_retries} time(s) (WHALE_MLFLOW_RETRIES, WHALE_MLFLOW_RETRY_DELAY_S)"
        )
        try:
            answer = requests.get(f"{uri.rstrip('/')}/health", timeout=self.probe_timeout_s)
        except requests.RequestException as exc:
            raise MlflowUnreachableError(
                f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}: {exc}). Start it, or point "
                f"MLFLOW_TRACKING_URI (or the mlflow resource's tracking_uri) at one that runs; {retried}."
            ) from exc
        status = answer.status_code
        if status in (401, 403):
            raise MlflowRefusedError(refusal_message(uri, status, f"{answer.reason} at /health") or "", uri, status)
        if status in TRANSIENT_STATUSES:
            raise MlflowUnreachableError(f"MLflow tracking server {uri} is unavailable ({status} {answer.reason} at /health); {retried}.")

    def _experiment_id(self) -> str:
        import mlflow

        self.check_reachable()
        _set_tracking_uri(self.uri)
        found = mlflow.get_experiment_by_name(self.experiment)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before the tag was set, or by hand
                mlflow.MlflowClient(self.uri).set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        if self.artifact_root:
            root = self.artifact_root
        elif urlparse(self.uri).scheme in ("http", "https"):
            root = None  # a tracking server stores artifacts where it was told to (--artifacts-destination)
        else:
            root = str(HomeLayout(default_home()).mlflow_artifacts)
        location = None if root is None else root if "://" in root else Path(root).resolve().as_uri()
        try:
            return mlflow.create_experiment(
                self.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except Exception:  # created meanwhile by a parallel step
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def experiment_url(self, experiment_id: str) -> str:
        """The experiment's runs in the MLflow UI, in its model-training view."""
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}{UI_VIEW}"

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """One run in the MLflow UI, in its model-training view."""
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}"

    @contextmanager
    def start_run(
        self, context: dg.AssetExecutionContext, run_name: str, tags: dict[str, str] | None = None, system_metrics: bool = False
    ) -> Iterator[Any]:
        """Start (or resume) the MLflow run of this step and make it the active run.

        Args:
            system_metrics: sample CPU, memory, disk, network (and GPU, where ``pynvml``
                finds one) every :attr:`system_metrics_interval_s` while the run is open,
                and once more at its end, as MLflow's ``system/*`` metrics (psutil; a
                resumed run continues their steps).

        Raises:
            MlflowRefusedError: the tracking server refused a request made here or in the
                block (401, 403, not an MLflow server): MLflow's message names only the
                endpoint, this one names the server and what to set.
        """
        with refusals_named(self.uri), self._run(context, run_name, tags, system_metrics) as run:
            yield run

    @contextmanager
    def _run(
        self, context: dg.AssetExecutionContext, run_name: str, tags: dict[str, str] | None, system_metrics: bool
    ) -> Iterator[Any]:
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
        # log_system_metrics=False: MLflow's own monitor (were it switched on globally) would drop the run's end.
        with mlflow.start_run(
            run_id=run_id, experiment_id=experiment_id, run_name=run_name, tags=run_tags, log_system_metrics=False
        ) as run:
            if not system_metrics:
                yield run
                return
            with self._system_metrics(run.info.run_id, run_id is not None, context.log.warning):
                yield run

    @contextmanager
    def _system_metrics(self, run_id: str, resumed: bool, warn: Callable[[str], None]) -> Iterator[None]:
        """MLflow's system metrics monitor on ``run_id`` while the block runs, and a last sample at its end.

        The monitor (what ``log_system_metrics=True`` starts) publishes a window of samples
        only once the window is full, so the end of every run, and all of a run shorter
        than one interval, would be lost; the last, partial window is published here. A
        monitor that cannot start (no psutil) or a last sample that cannot be logged is
        reported, never fatal: it is instrumentation, and must not hide the block's own error.
        """
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id, sampling_interval=self.system_metrics_interval_s, resume_logging=resumed, tracking_uri=self.uri
            )
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            warn(f"system metrics are not recorded on MLflow run {run_id}: {type(exc).__name__}: {exc}")
            yield
            return
        try:
            yield
        finally:
            try:
                monitor.finish()
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as exc:  # noqa: BLE001 - see the docstring
                warn(f"the last system metrics of MLflow run {run_id} were not logged: {type(exc).__name__}: {exc}")

    def log_dataset(self, table: Any, name: str, digest: str, context: str, source: str | None = None) -> Any:
        """Log ``table`` (a DataFrame) to the active run as an input data set, under
        ``name`` with ``digest`` (the caller's content hash of its rows, so that the same
        photos show as the same data set in every run), used as ``context``
        (``training``, ``validation``). Returns MLflow's data set, for metrics measured on it."""
        import warnings

        import mlflow

        with warnings.catch_warnings():
            # A local path matches MLflow's local artifact source twice (schemes '' and 'file',
            # one class): it warns that the source "can be interpreted in multiple ways".
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(table, source=source, name=name, digest=digest)
        mlflow.log_input(dataset, context=context)
        return dataset

    def log_embedding_model(
        self,
        model: Any,
        image_size: int,
        embedding_size: int,
        alias: str,
        tags: dict[str, str],
        metrics: dict[str, float] | None = None,
        dataset: Any = None,
        log: Callable[[str], None] = print,
    ) -> Any:
        """Log a trained embedding model to the active run, with ``metrics`` measured on
        ``dataset`` attached to it, and register it under :attr:`registered_model` with
        ``tags`` and ``alias`` (:func:`whale_ml.registry.register_model`)."""
        from whale_ml.registry import register_model

        with refusals_named(self.uri):
            return register_model(
                self.uri, self.registered_model, model, image_size, embedding_size, alias, tags, metrics=metrics, dataset=dataset, log=log
            )


class MlflowUnreachableError(ConnectionError):
    """The MLflow tracking server named in the message did not answer, or answered that it
    is unavailable (a ``ConnectionError``: transient, the step is retried)."""

