"""Groups ``training`` (stage ``train_folds``): one ArcFace model per fold, in MLflow; ``registry`` (``ensemble_and_submit``): champions."""

import dagster as dg
import pandas as pd

from whale_assets.freshness import RETRAIN_FRESHNESS
from whale_assets.stages import REBUILD_AFTER_FOLDS
from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import figure_md, progress_logger, table_meta
from whale_assets.partitions import fold_index, fold_partitions
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.launchpad import TrainSettings
from whale_assets.rounds import FIRST_ROUND, Round
from whale_ml.gallery.lineage import record_registered
from whale_ml.registry import CHECKPOINT_ARTIFACT, SHA_TAG, RegisteredEmbeddingModel
from whale_ml.io import sha256_file
from whale_ml.home import HomeLayout
from whale_ml.training.fold_model import FoldData, TrainedFold, recipe_version, train_fold_model
from whale_ml.training.trainer import load_model


def arcface_model_asset(rnd: Round) -> dg.AssetsDefinition:
    """The fold models of one training round (:mod:`whale_assets.rounds`): ``arcface_model``
    on ``cv_folds``, or ``round2/arcface_model`` on the pseudo-labelled folds."""

    @dg.asset(
        name="arcface_model",
        key_prefix=rnd.prefix,
        ins={"cv_folds": dg.AssetIn(rnd.training_folds)},
        group_name=rnd.group("training"),
        kinds={"pytorch", "mlflow"},
        partitions_def=fold_partitions,
        code_version="2",
        pool="gpu",
        retry_policy=mlflow_retry_policy(),
        op_tags=GPU_STEP_TAGS,
        freshness_policy=RETRAIN_FRESHNESS if rnd.first else None,
        deps=None if rnd.first else [FIRST_ROUND.key("arcface_model")],  # a warm start begins from the same fold's model
    )
    @retry_only_if_transient
    def arcface_model(
        context: dg.AssetExecutionContext,
        config: TrainSettings,
        whale: WhaleHome,
        mlflow: MlflowTracking,
        cv_folds: pd.DataFrame,
    ) -> dg.MaterializeResult:
        """The fold's embedding model: a timm backbone with GeM pooling and a BatchNorm
        embedding head, trained with pytorch-metric-learning's ArcFace loss (one optimiser
        over backbone, head and class centres). Validation MAP@5 with new_individual every
        ``val_every`` epochs (on the fold or a fixed sample); the best validated epoch is
        kept. One MLflow run per fold (tagged with the fold's data version) with parameters,
        the fold's training and validation photos as data sets, per-epoch and system metrics,
        curves, and the best model logged (a torch.export program where the backbone exports)
        with its signature and validation MAP@5, and registered as ``whale-arcface@<fold>``
        (the pseudo-label round's as ``@round2_<fold>``, trained with its pseudo photos)."""
        import mlflow as mlf

        fold, layout = context.partition_key, rnd.layout(whale)
        label, data = rnd.label(fold), FoldData.from_folds(cv_folds, fold_index(fold))
        config = round_recipe(config, rnd, whale, fold)
        context.log.info(f"{label}: {data.describe()}")
        tags = {"stage": "training", "fold": fold, "round": rnd.name or "round1", "data_version": data.version}
        with mlflow.start_run(context, run_name=f"arcface_{label}", tags=tags, system_metrics=True) as run:
            mlf.log_params({**config.model_dump(), "fold": fold, **data.params()})
            datasets = {
                use: mlflow.log_dataset(table, f"{label}-{use}", digest, use, source=str(layout.crops_dir))
                for use, (table, digest) in data.datasets().items()
            }
            trained = train_fold_model(
                config, data, layout.model_dir(fold), config.processes, lambda e, m: mlf.log_metrics(m, step=e), context.log.info,
                val_progress=lambda epoch: progress_logger(context, f"{label} validation after epoch {epoch}"),
            )
            sha = sha256_file(trained.result.checkpoint)
            registered = _log_and_register(context, mlflow, layout, config, fold, data, trained, datasets["validation"], label, sha)
            url = mlflow.run_url(run.info.experiment_id, run.info.run_id)
        return dg.MaterializeResult(
            # The weights' digest as the data version: a retrained fold (other weights) makes its
            # embeddings, the gallery, threshold and submission stale in the UI until they are
            # rebuilt; without it the version would be logical (code + inputs), unchanged by a rerun.
            data_version=dg.DataVersion(sha[:24]),
            metadata={
                **_trained_metadata(trained, url, f"{mlflow.registered_model} v{registered.version} @{label}", registered.serialization, data),
                "checkpoint_sha256": sha,
            },
        )

    return arcface_model


def round_recipe(config: TrainSettings, rnd: Round, whale: WhaleHome, fold: str) -> TrainSettings:
    """A later round's recipe: with ``warm_start_epochs``, its fold model starts from the first
    round's ``best.pt`` of the same fold (``init_weights``) and trains that many epochs. The
    first round's fold k never saw fold k's validation photos, so the later round's out-of-fold
    figures stay honest."""
    if rnd.first or config.warm_start_epochs == 0:
        return config
    start = whale.layout.model_dir(fold) / "best.pt"
    return config.model_copy(update={"epochs": config.warm_start_epochs, "init_weights": str(start)})


def _trained_metadata(trained: TrainedFold, url: str, registered: str, serialization: str, data: FoldData) -> dict[str, object]:
    result = trained.result
    return {
        "val_map5": float(result.best_map5) if result.best_map5 is not None else float("nan"),
        "val_threshold": float(result.threshold) if result.threshold is not None else float("nan"),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_images_per_second": float(result.images_per_second),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
        "mlflow_run": dg.MetadataValue.url(url),
        "registered_model": registered,
        "model_format": serialization,
        "data_version": data.version,
        "train_images": len(data.train),
        "pseudo_labelled_train_images": int(data.train["pseudo"].sum()) if "pseudo" in data.train else 0,
        "curves": figure_md(trained.curves),
        "history": table_meta(trained.history),
    }


arcface_model = arcface_model_asset(FIRST_ROUND)


def _log_and_register(
    context: dg.AssetExecutionContext,
    mlflow: MlflowTracking,
    layout: HomeLayout,
    config: TrainSettings,
    fold: str,
    data: FoldData,
    trained: TrainedFold,
    validation: object,
    alias: str,
    checkpoint_sha: str,
) -> RegisteredEmbeddingModel:
    """Log the recipe, curves and checkpoint to the active MLflow run and register the best
    model as ``<registered_model>@<alias>``, its validation scores attached to it (measured
    on the ``validation`` data set); returns the registered version."""
    import mlflow as mlf

    result = trained.result
    mlf.log_artifact(str(trained.config_path), artifact_path="model")
    mlf.log_artifact(str(trained.history_path), artifact_path="curves")
    mlf.log_figure(trained.curves, "curves/training_curves.png")
    mlf.log_metric("best_epoch", result.best_epoch)
    # The checkpoint itself travels with the registered version (loaded later with
    # weights_only, never unpickled); its digest tags the version so that
    # `whale identify` can tell which models a gallery was built with.
    mlf.log_artifact(str(result.checkpoint), artifact_path=CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])
    model, _ = load_model(result.checkpoint)
    tags = {
        "fold": fold,
        "data_version": data.version,
        "recipe": recipe_version(config),
        "backbone": config.backbone,
        "dagster_run_id": context.run.run_id,
        "val_map5": f"{result.best_map5}",
        SHA_TAG: checkpoint_sha,
    }
    # Measured on the validation photos, on the logged model too: mlflow.search_logged_models
    # ranks the fold models by them (on the same data set: its digest).
    scores = {"best_val_map5": result.best_map5 or 0.0}
    if result.threshold is not None:
        scores["best_val_threshold"] = float(result.threshold)
    registered = mlflow.log_embedding_model(
        model, config.image_size, config.embedding_size, alias=alias, tags=tags, metrics=scores, dataset=validation, log=context.log.warning
    )
    record_registered(layout, fold, result.checkpoint, mlflow.registered_model, registered.version)
    return registered


@dg.asset(
    group_name="registry",
    kinds={"mlflow"},
    deps=[arcface_model],
    code_version="1",
    automation_condition=REBUILD_AFTER_FOLDS,
    retry_policy=mlflow_retry_policy(),
)
@retry_only_if_transient
def champion_models(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Champion/challenger in the MLflow registry: each fold's newest model becomes
    ``whale-arcface@challenger_<fold>``, and ``@champion_<fold>`` only if its validation
    MAP@5 is at least the champion's on the same fold data."""
    rows = mlflow.promote_challengers(fold_partitions.get_partition_keys())
    for row in rows:
        context.log.info(f"{row['fold']}: {row['decision']}")
    return dg.MaterializeResult(
        metadata={
            "registered_model": mlflow.registered_model,
            "promoted": int(sum(r.get("champion_after") == r.get("challenger") and r["challenger"] is not None for r in rows)),
            "champions": table_meta(rows),
        }
    )
