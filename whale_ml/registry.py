"""The MLflow model registry of the fold embedding models (register, find, point aliases,
download) and the runs of the releases made of them.

The one module of ``whale_ml`` that talks to MLflow's registry of fold models (imported
lazily, so the rest of the core runs without it; the release's own MLflow model is
:mod:`whale_ml.identify.serving`). Each registered version of ``whale-arcface`` carries its
checkpoint (``best.pt``) as an artifact of its run and the checkpoint's sha256 as a
version tag. Aliases, not the deprecated stages: ``<fold>`` is the newest version,
``challenger_<fold>`` the newest release's and ``champion_<fold>`` the champion
release's (:func:`point_aliases`, moved by :mod:`whale_ml.gallery.champion`). A release
has one run: :func:`log_release_run` logs it, :func:`release_score` reads its score back,
:func:`release_fold_runs` and :func:`nest_runs` put the runs that made its fold models
under it. Versions are found by alias or number
(:func:`model_version`), their checkpoints downloaded once into a cache named by their
digest and checked against it (:func:`fetch_checkpoint`), and loaded by
``whale_ml.checkpoints`` (torch's weights-only loader): nothing is unpickled. Which
versions a gallery needs, and whether they are the ones it was built with, is
:mod:`whale_ml.gallery.models`: this module knows nothing of galleries (docs/architecture.md,
"Layers"). See docs/identify.md.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whale_ml.io import atomic_path, sha256_file, staging_dir
from whale_ml.mlflow_errors import is_missing, mlflow_error_code, refusals_named

CHECKPOINT_ARTIFACT = "checkpoint/best.pt"
SHA_TAG = "checkpoint_sha256"
SERIALIZATION_TAG = "serialization_format"
DEFAULT_ALIAS = "champion_{fold}"


class CheckpointFetchError(RuntimeError):
    """A registered version's checkpoint cannot be had: MLflow says its run or artifact does
    not exist, or the download is another file. A server that is down or refuses raises
    MLflow's own error instead (retried, or named), never this."""


@dataclass(frozen=True)
class RegisteredEmbeddingModel:
    """A fold model as logged and registered: the registry version, MLflow's logged model,
    and how it was saved (``pt2``; ``pickle`` when torch.export could not export it, why in
    ``export_error``)."""

    version: str
    model_id: str
    serialization: str
    export_error: str | None


def register_model(
    tracking_uri: str,
    registered_model: str,
    model: Any,
    image_size: int,
    embedding_size: int,
    alias: str,
    tags: dict[str, str],
    metrics: dict[str, float] | None = None,
    dataset: Any = None,
    log: Callable[[str], None] = print,
) -> RegisteredEmbeddingModel:
    """Log a trained embedding model to the active run, with its signature, and register
    it under ``registered_model`` with ``tags`` on the new version and ``alias`` pointing at it.

    The signature says what serving gets and gives: uint8 RGB images (N, 3, S, S) in,
    float32 embeddings (N, D) out. The model is saved as a torch.export program
    (``pt2``: weights and graph, no pickle, loadable without this project's code) with a
    dynamic batch dimension, when :func:`export_check` finds that it exports; else
    pickled (loading it then needs ``whale_ml`` importable), and ``log`` says why.

    Args:
        metrics: attached to MLflow's logged model as well as to the run, so that
            ``mlflow.search_logged_models`` can rank models by them.
        dataset: the MLflow data set ``metrics`` were measured on (the fold's validation photos).

    Returns:
        The registry version, the logged model's id and how it was saved.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    same = registered_with_checkpoint(client, registered_model, tags.get(SHA_TAG))
    if same is not None:  # a reused fold: the same bytes are registered once, the alias moves to them
        client.set_registered_model_alias(registered_model, alias, str(same.version))
        log(f"{registered_model} v{same.version} holds this very checkpoint: alias {alias} set on it, nothing registered")
        serialization = same.tags.get(SERIALIZATION_TAG, "pickle")
        return RegisteredEmbeddingModel(str(same.version), str(getattr(same, "model_id", "") or ""), serialization, None)
    model = model.cpu().eval()
    export_error = export_check(model, image_size)
    serialization = "pickle" if export_error else "pt2"
    if export_error:
        log(f"torch.export cannot export this model ({export_error}): registered pickled instead (loading it needs whale_ml)")
    info = _log_model(model, image_size, embedding_size, serialization)
    if metrics:
        mlflow.log_metrics(metrics, model_id=info.model_id, dataset=dataset)
    version = mlflow.register_model(info.model_uri, registered_model, tags={**tags, SERIALIZATION_TAG: serialization}).version
    client.set_registered_model_alias(registered_model, alias, str(version))
    return RegisteredEmbeddingModel(str(version), info.model_id, serialization, export_error)


def registered_with_checkpoint(client: Any, registered_model: str, sha: str | None) -> Any | None:
    """The newest version of ``registered_model`` tagged with checkpoint digest ``sha``, or None
    (none yet, no digest given, or no such registered model)."""
    if not sha:
        return None
    try:
        found = client.search_model_versions(f"name = '{registered_model}' and tags.{SHA_TAG} = '{sha}'")
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def export_check(model: Any, image_size: int) -> str | None:
    """Why ``model`` cannot be saved as a ``pt2`` program with a dynamic batch, or None when it can.

    It exports the model with a batch dimension that must stay symbolic (a model whose
    code fixes the batch size fails here, where MLflow's own export would silently keep
    the example's size) and checks that the program gives the model's embeddings for 1
    and 3 images. Pure torch: any error is the model's, not the tracking server's.
    """
    import torch
    from torch.export import Dim

    try:
        images = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        program = torch.export.export(model, (images,), dynamic_shapes=({0: Dim("batch", min=1)},))
        exported = program.module()
        with torch.no_grad():
            for n in (1, 3):
                batch = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
                want, got = model(batch), exported(batch)
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                    return f"the exported program's embeddings of {n} image(s) differ from the model's"
    except Exception as exc:  # noqa: BLE001 - any export failure means: save it another way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:300]}"
    return None


def _log_model(model: Any, image_size: int, embedding_size: int, serialization: str) -> Any:
    from importlib.metadata import version as package_version

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    signature = infer_signature(np.zeros((1, 3, image_size, image_size), dtype=np.uint8), np.zeros((1, embedding_size), dtype=np.float32))
    # Explicit requirements: inferring them imports and inspects the environment (~4 s).
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    if serialization == "pickle":  # the pickled module names timm's (and whale_ml's) classes
        requirements.append(f"timm=={package_version('timm')}")
    # pt2 traces the input example; with 2 images its batch dimension stays dynamic
    # (MLflow exports with Dim.AUTO, which fixes a dimension of size 1). MLflow stores the
    # example twice as JSON (25 MB at 512 px): black images, whose zeros print shortest.
    example = np.zeros((2, 3, image_size, image_size), dtype=np.uint8)
    return mlflow.pytorch.log_model(
        model,
        name="embedding_model",
        signature=signature,
        input_example=example if serialization == "pt2" else None,
        pip_requirements=requirements,
        serialization_format=serialization,
    )


def point_aliases(tracking_uri: str, registered_model: str, aliases: Mapping[str, str]) -> None:
    """Point each alias of ``aliases`` (alias -> version) at its version of ``registered_model``.

    Raises:
        MlflowRefusedError: the tracking server refused the request (names the URI).
        MlflowException: anything else MLflow raised (:func:`whale_ml.mlflow_errors.is_transient` says
            whether trying again may help).
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with refusals_named(tracking_uri):
        for alias, version in aliases.items():
            client.set_registered_model_alias(registered_model, alias, str(version))


# ---------------------------------------------------------------- release runs
#
# One MLflow run per release (the ``release`` asset opens it): the ensemble's scores under
# the same names in every release, so that MLflow's compare view sets two retrains side by
# side, and the release's fold runs nested under it (MLflow's UI nests by the tag below).

RELEASE_STAGE = "release"  # the ``stage`` tag of a release run
PARENT_RUN_TAG = "mlflow.parentRunId"
OOF_MAP5 = "oof_map5"  # the metric the champion decision compares
VALIDATION_DIGEST = "validation_digest"  # the parameter naming the validation data it was measured on


@dataclass(frozen=True)
class ReleaseScore:
    """A release run's out-of-fold MAP@5 and the validation data it was measured on, as MLflow holds them."""

    run_id: str
    oof_map5: float
    validation_digest: str | None


@dataclass(frozen=True)
class FoldRuns:
    """The MLflow runs that made one fold model of a release: its training run (the one its
    registry version was logged from), and the runs that embedded photos with that checkpoint."""

    fold: str
    training: str
    embedding: tuple[str, ...]
    best_val_map5: float | None  # logged by the training run with the model


def log_release_run(
    tracking_uri: str,
    run_id: str,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log parameters, metrics and tags to a release run, in one request."""
    import time

    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with refusals_named(tracking_uri):
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )


def release_score(tracking_uri: str, run_id: str) -> ReleaseScore | None:
    """The logged ``oof_map5`` and validation digest of release run ``run_id``, read back from
    MLflow; None when MLflow says the run does not exist or it was deleted.

    Raises:
        MlflowRefusedError: the tracking server refused the request (names the URI).
        MlflowException: anything else (a locked store, a server that is down: transient).
    """
    import mlflow

    try:
        with refusals_named(tracking_uri):
            run = mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
    if run.info.lifecycle_stage == "deleted":
        return None
    return ReleaseScore(run_id, float(run.data.metrics.get(OOF_MAP5, float("nan"))), run.data.params.get(VALIDATION_DIGEST))


def release_fold_runs(tracking_uri: str, experiment_id: str, models: Sequence[tuple[str, str, str, str]]) -> list[FoldRuns]:
    """The training and embedding runs of a release's fold models.

    Args:
        models: ``(fold, registered model, version, checkpoint sha256)`` of each fold model.
            The training run is the one its version was logged from; the embedding runs are
            those of ``experiment_id`` tagged with its checkpoint's digest.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = []
    with refusals_named(tracking_uri):
        for fold, name, version, sha in models:
            training = client.get_model_version(name, version).run_id
            embedding = client.search_runs(
                [experiment_id], filter_string=f"tags.stage = 'embedding' and tags.{SHA_TAG} = '{sha}'", max_results=100
            )
            best = client.get_run(training).data.metrics.get("best_val_map5")
            found.append(FoldRuns(fold, training, tuple(r.info.run_id for r in embedding), best))
    return found


def runs_tagged(tracking_uri: str, experiment_id: str, tags: Mapping[str, str]) -> list[str]:
    """The ids of the runs of ``experiment_id`` that carry every tag of ``tags``, newest first."""
    import mlflow

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    with refusals_named(tracking_uri):
        runs = mlflow.MlflowClient(tracking_uri=tracking_uri).search_runs([experiment_id], filter_string=query, max_results=100)
    return [r.info.run_id for r in runs]


def nest_runs(tracking_uri: str, parent_run_id: str, run_ids: Sequence[str]) -> None:
    """Make ``run_ids`` children of ``parent_run_id`` (the ``mlflow.parentRunId`` tag, by which
    MLflow's UI nests runs and a search finds a parent's children). A run has one parent: one
    nested before under another parent moves here."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with refusals_named(tracking_uri):
        for run_id in run_ids:
            if run_id != parent_run_id:
                client.set_tag(run_id, PARENT_RUN_TAG, parent_run_id)


def alias_missing(exc: BaseException) -> bool:
    """True when MLflow says the alias (or the whole registered model) does not exist: for
    an alias it answers INVALID_PARAMETER_VALUE, for a model RESOURCE_DOES_NOT_EXIST (the
    SQLite store and a tracking server alike, MLflow 3.17). The alias names asked for here
    are valid, so INVALID_PARAMETER_VALUE cannot mean a malformed name."""
    return is_missing(exc) or mlflow_error_code(exc) == "INVALID_PARAMETER_VALUE"


def model_version(tracking_uri: str, name: str, *, alias: str | None = None, version: str | None = None) -> Any:
    """MLflow's record (a ``ModelVersion``) of one version of ``name``, by alias or by number.

    Raises:
        MlflowRefusedError: the tracking server refused the request (names the URI).
        MlflowException: anything else, a version or alias that does not exist included
            (:func:`whale_ml.mlflow_errors.is_missing`, :func:`alias_missing` tell).
    """
    import mlflow

    if (alias is None) == (version is None):
        raise ValueError("model_version takes an alias or a version, one of them")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with refusals_named(tracking_uri):
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)


def fetch_checkpoint(tracking_uri: str, run_id: str, sha: str, cache_dir: Path, what: str) -> Path:
    """The checkpoint artifact of ``run_id``, cached as ``<sha>.pt`` and checked against ``sha``.

    Raises:
        CheckpointFetchError: MLflow says the run or its checkpoint does not exist (retrain
            the fold), or the download is another file.
        MlflowRefusedError: the tracking server refused the credentials or is not MLflow.
        MlflowException: anything else (a server that is down stays transient, retried).
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar on stderr
    target = cache_dir / f"{sha}.pt"
    if target.exists() and sha256_file(target) == sha:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(cache_dir, "download")  # a killed download is swept by the next one
    try:
        try:
            with refusals_named(tracking_uri):
                got = Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(tmp), tracking_uri=tracking_uri
                    )
                )
        except Exception as exc:
            if not is_missing(exc):
                raise  # a server that is down stays transient (retried); a refusal names the server
            raise CheckpointFetchError(
                f"{what}: its run {run_id} has no {CHECKPOINT_ARTIFACT} artifact ({exc}); it was registered "
                "before checkpoints were logged, or the run was deleted: retrain the fold (job train_folds) and "
                "rematerialise the gallery"
            ) from exc
        if sha256_file(got) != sha:
            raise CheckpointFetchError(f"{what}: the downloaded checkpoint's sha256 is not the one tagged on the version ({sha[:12]})")
        with atomic_path(target) as part:
            shutil.copyfile(got, part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
