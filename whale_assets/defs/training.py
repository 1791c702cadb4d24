"""Stage 4 -- training: one ArcFace model per fold partition, logged to MLflow."""

import hashlib
import json

import dagster as dg
import pandas as pd

from whale_assets.automation import AFTER_FOLDS
from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import figure_md, table_md
from whale_assets.partitions import fold_index, fold_partitions
from whale_assets.resources import MlflowTracking, WhaleHome, mlflow_retry_policy, retry_only_if_transient
from whale_assets.settings import TrainSettings
from whale_ml.data.folds import fold_split
from whale_ml.gallery.lineage import record_registered
from whale_ml.registry import CHECKPOINT_ARTIFACT, SHA_TAG
from whale_ml.io import atomic_path, sha256_file, write_json
from whale_ml.training.launch import train_fold_distributed
from whale_ml.training.trainer import data_fingerprint, load_model, train_fold


@dg.asset(
    group_name="training",
    kinds={"pytorch", "mlflow"},
    partitions_def=fold_partitions,
    code_version="2",
    pool="gpu",
    retry_policy=mlflow_retry_policy(),
    op_tags=GPU_STEP_TAGS,
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
    epoch; the best epoch is kept. One MLflow run per fold (tagged with the fold's data
    version) with parameters, per-epoch metrics, curves, and the best model logged with
    its signature and registered as ``whale-arcface@<fold>``."""
    import mlflow as mlf

    fold = context.partition_key
    train, val = fold_split(cv_folds, fold_index(fold))
    train = train.assign(path=train["crop_path"])
    val = val.assign(path=val["crop_path"])
    num_classes = int(cv_folds["label"].max()) + 1
    out_dir = whale.layout.model_dir(fold)
    context.log.info(
        f"{fold}: {len(train)} training photos of {train['individual_id'].nunique()} individuals, {len(val)} validation photos"
    )

    data_version = data_fingerprint(train, val)[:12]
    tags = {"stage": "training", "fold": fold, "data_version": data_version}
    with mlflow.start_run(context, run_name=f"arcface_{fold}", tags=tags) as run:
        mlf.log_params(
            {**config.model_dump(), "fold": fold, "num_classes": num_classes, "train_images": len(train), "val_images": len(val)}
        )

        logged: set[int] = set()

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            mlf.log_metrics(metrics, step=epoch)
            logged.add(epoch)

        if config.processes > 1:  # DDP workers run in their own processes: their epochs are logged below
            result = train_fold_distributed(config, train, val, num_classes, out_dir, config.processes, log=context.log.info)
        else:
            result = train_fold(config, train, val, num_classes, out_dir, on_epoch_end=on_epoch_end, log=context.log.info)
        # Epochs resumed from a checkpoint (or a finished run reused) were logged by an
        # earlier run: log them here too, so that every run shows the whole curve.
        for row in result.history:
            if row["epoch"] not in logged:
                mlf.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        write_json(out_dir / "config.json", config.model_dump())
        history = pd.DataFrame(result.history)
        with atomic_path(out_dir / "history.csv") as tmp:
            history.to_csv(tmp, index=False)
        mlf.log_artifact(str(out_dir / "config.json"), artifact_path="model")
        mlf.log_artifact(str(out_dir / "history.csv"), artifact_path="curves")
        curves = _curves_plot(history)
        mlf.log_figure(curves, "curves/training_curves.png")
        mlf.log_metrics({"best_val_map5": result.best_map5 or 0.0, "best_epoch": result.best_epoch})
        # The checkpoint itself travels with the registered version (loaded later with
        # weights_only, never unpickled); its digest tags the version so that
        # `whale identify` can tell which models a gallery was built with.
        mlf.log_artifact(str(result.checkpoint), artifact_path=CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])
        checkpoint_sha = sha256_file(result.checkpoint)
        model, _ = load_model(result.checkpoint)
        registered = mlflow.log_embedding_model(
            model,
            config.image_size,
            config.embedding_size,
            alias=fold,
            tags={
                "fold": fold,
                "data_version": data_version,
                "recipe": hashlib.sha1(json.dumps(config.model_dump(), sort_keys=True).encode()).hexdigest()[:12],
                "backbone": config.backbone,
                "dagster_run_id": context.run.run_id,
                "val_map5": f"{result.best_map5}",
                SHA_TAG: checkpoint_sha,
            },
        )
        record_registered(whale.layout, fold, result.checkpoint, mlflow.registered_model, str(registered.registered_model_version))
        url = mlflow.run_url(run.info.experiment_id, run.info.run_id)

    return dg.MaterializeResult(
        metadata={
            "val_map5": float(result.best_map5) if result.best_map5 is not None else float("nan"),
            "val_threshold": float(result.threshold) if result.threshold is not None else float("nan"),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "train_images_per_second": float(result.images_per_second),
            "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
            "mlflow_run": dg.MetadataValue.url(url),
            "registered_model": f"{mlflow.registered_model} v{registered.registered_model_version} @{fold}",
            "data_version": data_version,
            "curves": figure_md(curves),
            "history": dg.MetadataValue.md(history.to_markdown(index=False, floatfmt=".4g")),
        }
    )


def _curves_plot(history: pd.DataFrame) -> object:
    """Training loss and validation MAP@5 per epoch, one figure for the UI and MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history["epoch"], history["train_loss"], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    if "val_map5" in history:
        right = ax.twinx()
        right.plot(history["epoch"], history["val_map5"], color="tab:red", label="val MAP@5")
        right.set_ylabel("validation MAP@5")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    return fig


@dg.asset(
    group_name="training",
    kinds={"mlflow"},
    deps=[arcface_model],
    code_version="1",
    automation_condition=AFTER_FOLDS,
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
    table = pd.DataFrame(rows)
    return dg.MaterializeResult(
        metadata={
            "registered_model": mlflow.registered_model,
            "promoted": int(sum(r.get("champion_after") == r.get("challenger") and r["challenger"] is not None for r in rows)),
            "champions": table_md(table),
        }
    )
