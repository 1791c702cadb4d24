"""Group ``training`` (stage ``train_folds``): one ArcFace model per fold, in MLflow, and its embeddings."""

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import torch

from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import figure_md, progress_logger, table_meta
from whale_assets.partitions import fold_index, fold_partitions
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.launchpad import EmbedSettings, TrainSettings
from whale_assets.rounds import Round, graph_rounds
from whale_ml.checkpoints import snapshot_checkpoint
from whale_ml.gallery.lineage import record_embeddings, record_registered
from whale_ml.registry import CHECKPOINT_ARTIFACT, SHA_TAG, RegisteredEmbeddingModel
from whale_ml.io import sha256_file
from whale_ml.home import HomeLayout
from whale_ml.retrieval.centres import replace_centres
from whale_ml.retrieval.embeddings import embed_paths
from whale_ml.retrieval.store import new_embedding_set, save_embeddings
from whale_ml.training.fold_model import FoldData, TrainedFold, recipe_version, train_fold_model
from whale_ml.training.trainer import load_class_centres, load_model, resolve_device


def arcface_model_asset(rnd: Round) -> dg.AssetsDefinition:
    """The fold models of one training round (:mod:`whale_assets.rounds`): ``arcface_model``
    on ``cv_folds``, ``round<k>/arcface_model`` on ``round<k>/pseudo_labelled_folds``."""

    @dg.asset(
        name="arcface_model",
        key_prefix=rnd.prefix,
        ins={"training_folds": dg.AssetIn(rnd.training_folds)},
        group_name=rnd.group("training"),
        kinds={"pytorch", "mlflow"},
        partitions_def=fold_partitions,
        code_version="2",
        pool="gpu",
        retry_policy=mlflow_retry_policy(),
        op_tags=GPU_STEP_TAGS,
        freshness_policy=rnd.freshness_policy,
        deps=rnd.from_previous("arcface_model"),  # a warm start begins from the previous round's model of the same fold
    )
    @retry_only_if_transient
    def arcface_model(
        context: dg.AssetExecutionContext,
        config: TrainSettings,
        whale: WhaleHome,
        mlflow: MlflowTracking,
        training_folds: pd.DataFrame,
    ) -> dg.MaterializeResult:
        """The fold's embedding model: a timm backbone with GeM pooling and a BatchNorm
        embedding head, trained with pytorch-metric-learning's ArcFace loss (one optimiser
        over backbone, head and class centres). Validation MAP@5 with new_individual every
        ``val_every`` epochs (on the fold or a fixed sample); the best validated epoch is
        kept. One MLflow run per fold (tagged with the fold's data version) with parameters,
        the fold's training and validation photos as data sets, per-epoch and system metrics,
        curves, and the best model logged (a torch.export program where the backbone exports)
        with its signature and validation MAP@5, and registered as ``whale-arcface@<fold>``
        (a later round's as ``@round<k>_<fold>``, trained with its pseudo-labelled photos)."""
        import mlflow as mlf

        fold, layout = context.partition_key, rnd.layout(whale)
        label, data = rnd.label(fold), FoldData.from_folds(training_folds, fold_index(fold))
        config = round_recipe(config, rnd, whale, fold)
        context.log.info(f"{label}: {data.describe()}")
        tags = {"stage": "training", "fold": fold, "round": rnd.title, "data_version": data.version}
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
    """A later round's recipe: with ``warm_start_epochs``, its fold model starts from the
    previous round's ``best.pt`` of the same fold (``init_weights``) and trains that many
    epochs. No round's fold k ever saw fold k's validation photos (pseudo-labels join the
    training side only), so the later round's out-of-fold figures stay honest."""
    previous = rnd.previous
    if previous is None or config.warm_start_epochs == 0:
        return config
    start = previous.layout(whale).model_dir(fold) / "best.pt"
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


def fold_embeddings_asset(rnd: Round) -> dg.AssetsDefinition:
    """The fold embeddings of one training round (:mod:`whale_assets.rounds`)."""

    @dg.asset(
        name="fold_embeddings",
        key_prefix=rnd.prefix,
        ins={"crops": dg.AssetIn("crops")},
        group_name=rnd.group("training"),
        kinds={"pytorch", "numpy", "mlflow"},
        partitions_def=fold_partitions,
        deps=[rnd.key("arcface_model")],
        code_version="4",
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        retry_policy=mlflow_retry_policy(),
        check_specs=[
            dg.AssetCheckSpec(
                "embeddings_are_unit_vectors",
                asset=rnd.key("fold_embeddings"),
                description="Every embedding finite and of unit length (what inner-product search assumes).",
            )
        ],
    )
    @retry_only_if_transient
    def fold_embeddings(
        context: dg.AssetExecutionContext, config: EmbedSettings, whale: WhaleHome, mlflow: MlflowTracking, crops: pd.DataFrame
    ) -> dg.MaterializeResult:
        """The fold model's L2-normalised embeddings of every train and test crop (float32 ``.npy``
        with the image order beside it) and its ArcFace class centres, in an MLflow run with the
        settings, the rate and the machine's use while embedding (system metrics: CPU, memory, GPU)."""
        fold, layout = context.partition_key, rnd.layout(whale)
        # best.pt read once: the model, its class centres and the recorded sha256 all come from
        # these bytes, even if training replaces best.pt while the crops are embedded.
        checkpoint, sha = snapshot_checkpoint(layout.model_dir(fold) / "best.pt", layout.home / "model_cache")
        # The checkpoint's digest on the run: the release whose fold model it is finds it by that.
        tags = {"stage": "embedding", "fold": fold, "round": rnd.title, SHA_TAG: sha}
        # The whole set (train, test, centres, record) is published at once, or not at all.
        with new_embedding_set(layout.embeddings_root(fold), sha) as folder:
            with mlflow.start_run(context, run_name=f"embed_{rnd.label(fold)}", tags=tags, system_metrics=True) as run:
                embedded = _embed_fold(context, config, checkpoint, folder, fold, crops)
            centres = replace_centres(folder, load_class_centres(checkpoint))
            recorded = record_embeddings(layout, fold, sha, config.flip_tta, folder)
        return dg.MaterializeResult(
            metadata={
                "registered_version": recorded.version or "not registered",
                "train_embeddings": embedded.counts["train"],
                "test_embeddings": embedded.counts["test"],
                "dimension": embedded.dimension,
                "class_centres": centres,
                "flip_tta": config.flip_tta,
                "checkpoint_sha256": sha,
                "folder": dg.MetadataValue.path(str(layout.embeddings_dir(fold))),
                "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run.info.experiment_id, run.info.run_id)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="embeddings_are_unit_vectors",
                    passed=embedded.worst <= 1e-3,
                    metadata={"max_norm_deviation": embedded.worst, "embeddings": sum(embedded.counts.values())},
                )
            ],
        )

    return fold_embeddings


@dataclass
class _Embedded:
    checkpoint: Path
    counts: dict[str, int]
    worst: float  # the largest deviation of an embedding's norm from 1
    dimension: int


def _embed_fold(
    context: dg.AssetExecutionContext, config: EmbedSettings, checkpoint: Path, folder: Path, fold: str, crops: pd.DataFrame
) -> _Embedded:
    """Embed every train and test crop with the model in ``checkpoint`` (a snapshot: it never
    changes) into the set being written in ``folder``, logging to the active MLflow run."""
    import mlflow as mlf

    device = resolve_device(config.device)
    model, cfg = load_model(checkpoint, device)
    counts, worst = {}, 0.0
    mlf.log_params({**config.model_dump(), "device": str(device), "fold": fold})
    started = time.perf_counter()
    for split in ("train", "test"):
        rows = crops[(crops["split"] == split) & (crops["crop_path"] != "")]
        emb = embed_paths(
            model,
            rows["crop_path"].tolist(),
            cfg.image_size,
            device,
            config.batch_size,
            config.flip_tta,
            config.num_workers,
            progress=progress_logger(context, f"{fold} {split} embeddings"),
            decode=config.decode,
        )
        if not np.isfinite(emb).all():
            raise FloatingPointError(f"{fold}: non-finite {split} embeddings; the model checkpoint is broken")
        save_embeddings(folder, split, emb, rows["image"].tolist())
        counts[split] = len(emb)
        if len(emb):
            worst = max(worst, float(np.abs(np.linalg.norm(emb, axis=1) - 1.0).max()))
    photos, seconds = sum(counts.values()), time.perf_counter() - started
    mlf.log_metrics({"photos": photos, "seconds": seconds, "photos_per_second": photos / max(seconds, 1e-9)})
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the memory back before the next partition's training
    return _Embedded(checkpoint, counts, worst, cfg.embedding_size)


@dg.definitions
def training() -> dg.Definitions:
    """Every round's fold models and embeddings."""
    return dg.Definitions(assets=[factory(rnd) for rnd in graph_rounds() for factory in (arcface_model_asset, fold_embeddings_asset)])
