"""Stage 5 -- retrieval: embeddings per fold, the ensemble gallery, the new_individual threshold."""

import dagster as dg
import numpy as np
import pandas as pd
import torch

from whale_assets.stages import REBUILD_AFTER_FOLDS
from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import figure_md, progress_logger, table_md
from whale_assets.partitions import fold_partitions
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.settings import EmbedSettings, GallerySettings, ThresholdSettings
from whale_ml.identify.enroll import with_enrolled
from whale_ml.identify.lineage import gather_lineage, record_embeddings
from whale_ml.identify.registry import gallery_models
from whale_ml.identify.versions import list_versions, prune_versions, write_version
from whale_ml.io import atomic_path, write_json
from whale_ml.retrieval import (
    build_index,
    index_recall,
    nearest_species,
    save_index,
    tune_species_thresholds,
    tune_threshold,
)
from whale_ml.retrieval.embeddings import embed_paths
from whale_ml.retrieval.store import ensemble, load_embeddings, out_of_fold_search, save_embeddings
from whale_ml.training.trainer import load_model, resolve_device


@dg.asset(
    group_name="training",
    kinds={"pytorch", "numpy"},
    partitions_def=fold_partitions,
    deps=["arcface_model"],
    code_version="2",
    pool="gpu",
    op_tags=GPU_STEP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            "embeddings_are_unit_vectors",
            asset="fold_embeddings",
            description="Every embedding finite and of unit length (what inner-product search assumes).",
        )
    ],
)
def fold_embeddings(
    context: dg.AssetExecutionContext, config: EmbedSettings, whale: WhaleHome, crops: pd.DataFrame
) -> dg.MaterializeResult:
    """The fold model's L2-normalised embeddings of every train and test crop
    (float32 ``.npy`` with the image order beside it)."""
    fold = context.partition_key
    device = resolve_device(config.device)
    checkpoint = whale.layout.model_dir(fold) / "best.pt"
    model, cfg = load_model(checkpoint, device)
    out = whale.layout.embeddings_dir(fold)
    counts, worst = {}, 0.0
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
        save_embeddings(out, split, emb, rows["image"].tolist())
        counts[split] = len(emb)
        if len(emb):
            worst = max(worst, float(np.abs(np.linalg.norm(emb, axis=1) - 1.0).max()))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the memory back before the next partition's training
    # Which checkpoint (and registry version) made these embeddings: the gallery's lineage.
    recorded = record_embeddings(whale.layout, fold, checkpoint, config.flip_tta)
    return dg.MaterializeResult(
        metadata={
            "registered_version": recorded.version or "not registered",
            "train_embeddings": counts["train"],
            "test_embeddings": counts["test"],
            "dimension": cfg.embedding_size,
            "flip_tta": config.flip_tta,
            "folder": dg.MetadataValue.path(str(out)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="embeddings_are_unit_vectors",
                passed=worst <= 1e-3,
                metadata={"max_norm_deviation": worst, "embeddings": counts["train"] + counts["test"]},
            )
        ],
    )


@dg.asset(group_name="retrieval", kinds={"faiss"}, deps=[fold_embeddings], code_version="3", automation_condition=REBUILD_AFTER_FOLDS)
def gallery(
    context: dg.AssetExecutionContext,
    config: GallerySettings,
    whale: WhaleHome,
    mlflow: MlflowTracking,
    train_metadata: pd.DataFrame,
    crops: pd.DataFrame,
) -> dg.MaterializeResult:
    """The faiss gallery of every training photo, embedded by the ensemble of all fold
    models (their normalised embeddings concatenated: cosine = mean of the models'
    cosines), with the test queries embedded the same way. Exact (flat) by default;
    with an approximate index its recall@5 against flat is measured on the queries.

    Each materialisation also writes a new gallery version (``gallery/versions/``, what
    ``whale identify`` searches) with the models, detector and crop settings it was
    made with, and with every enrolled photo (``whale enroll``) that the fold embeddings
    do not cover yet, embedded here by the same models. ``versions`` lists them all;
    with ``keep_versions`` set, older ones beyond that many are deleted."""
    folds = fold_partitions.get_partition_keys()
    train_parts, test_parts, train_images, test_images = [], [], None, None
    for fold in folds:
        emb_train, img_train = load_embeddings(whale.layout.embeddings_dir(fold), "train")
        emb_test, img_test = load_embeddings(whale.layout.embeddings_dir(fold), "test")
        if train_images is not None and (img_train != train_images or img_test != test_images):
            raise ValueError(f"{fold}'s embeddings cover other images than {folds[0]}'s; re-materialise fold_embeddings for all folds")
        train_images, test_images = img_train, img_test
        train_parts.append(emb_train)
        test_parts.append(emb_test)
    gallery_emb, query_emb = ensemble(train_parts), ensemble(test_parts)
    ids = train_metadata.set_index("image").loc[train_images, "individual_id"].to_numpy(dtype=object)
    index_options = {
        "hnsw_m": config.hnsw_m,
        "ef_search": config.ef_search,
        "nlist": config.nlist,
        "nprobe": config.nprobe,
        "pq_m": config.pq_m,
        "pq_nbits": config.pq_nbits,
    }
    index = build_index(gallery_emb, config.index, **index_options)
    out = whale.layout.gallery_dir
    save_index(index, out / "index.faiss")
    # The index holds the gallery vectors; beside it, which photo and individual each row is.
    with atomic_path(out / "gallery_ids.csv") as tmp:
        pd.DataFrame({"image": train_images, "individual_id": ids}).to_csv(tmp, index=False)
    save_embeddings(out, "queries", query_emb, test_images)
    metadata: dict[str, object] = {
        "gallery_images": len(ids),
        "gallery_individuals": len(set(ids)),
        "query_images": len(test_images),
        "models": len(folds),
        "dimension": int(gallery_emb.shape[1]),
        "index_kind": config.index,
        "index": dg.MetadataValue.path(str(out / "index.faiss")),
    }
    if config.index != "flat":
        probe = query_emb if len(query_emb) else gallery_emb
        recall = index_recall(index, gallery_emb, ids, probe, max_queries=config.recall_queries)
        context.log.info(f"{config.index} index keeps {recall['individual_recall_at_k']:.4f} of flat's top-5 individuals")
        metadata.update({f"{k}_vs_flat" if "recall" in k else f"recall_{k}": v for k, v in recall.items()})
    lineage = gather_lineage(whale.layout, folds, config.index, config.k, index_options)
    write_json(
        out / "gallery.json",
        {
            **config.model_dump(),
            "models": folds,
            "images": len(ids),
            "dimension": int(gallery_emb.shape[1]),
            "lineage": lineage.model_dump(),
        },
    )
    context.log.info(f"gallery of {len(ids)} photos from {len(folds)} fold models ({config.index} index)")

    # The version identification searches: the same photos plus enrolled ones not in them.
    crop_of = dict(zip(crops["image"], crops["crop_path"], strict=True))
    species_of = train_metadata.set_index("image")["species"]
    table = pd.DataFrame(
        {
            "image": train_images,
            "individual_id": ids,
            "species": species_of.loc[train_images].to_numpy(),
            "crop_path": [crop_of.get(img, "") for img in train_images],
            "source": "pipeline",
        }
    )
    table, version_emb, carried = with_enrolled(
        whale.layout,
        table,
        gallery_emb,
        lineage,
        lambda: gallery_models(lineage, whale.layout.model_dir, mlflow.uri, whale.layout.home / "model_cache"),
        str(resolve_device("auto")),
    )
    version = write_version(
        whale.layout,
        table,
        version_emb,
        lineage,
        made_by="gallery asset",
        extra={"carried_enrolled": carried},
        index=index if carried == 0 else None,  # the same vectors: no second build
    )
    if carried:
        context.log.info(f"{carried} enrolled photo(s) not yet in the fold embeddings added to gallery {version.name}")
    pruned = prune_versions(whale.layout, config.keep_versions) if config.keep_versions else []
    if pruned:
        context.log.info(f"deleted gallery version(s) {', '.join(pruned)} (keep_versions={config.keep_versions})")
    metadata.update(
        {
            "version": version.name,
            "version_photos": int(version.info["photos"]),
            "version_individuals": int(version.info["individuals"]),
            "enrolled_photos": int(version.info["enrolled_photos"]),
            "enrolled_individuals": int(version.info["enrolled_individuals"]),
            "model_versions": ", ".join(f"{m.fold}: v{m.version}" for m in lineage.models),
            "versions": table_md(list_versions(whale.layout)),
            "pruned_versions": len(pruned),
        }
    )
    return dg.MaterializeResult(metadata=metadata)


def _curve_plot(thresholds: np.ndarray, curve: np.ndarray, chosen: float) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(thresholds, curve, lw=1.2)
    ax.axvline(chosen, color="tab:red", ls="--", lw=1, label=f"chosen {chosen:.3f}")
    ax.set_xlabel("cosine similarity threshold")
    ax.set_ylabel("validation MAP@5")
    ax.legend()
    return fig


@dg.asset(
    group_name="retrieval",
    kinds={"numpy", "mlflow"},
    deps=[fold_embeddings],
    code_version="2",
    automation_condition=REBUILD_AFTER_FOLDS,
    retry_policy=mlflow_retry_policy(),
)
@retry_only_if_transient
def match_threshold(
    context: dg.AssetExecutionContext,
    config: ThresholdSettings,
    whale: WhaleHome,
    mlflow: MlflowTracking,
    cv_folds: pd.DataFrame,
) -> dg.MaterializeResult:
    """The ``new_individual`` threshold that maximises out-of-fold MAP@5: each fold's
    validation photos searched against that fold's training photos with that fold's
    model, pooled over folds, every distinct threshold considered (exact, no grid).
    Optionally one threshold per species (of the nearest individual) with enough
    validation photos. The curve goes to the UI and to MLflow."""
    import mlflow as mlf

    species_of = dict(zip(cv_folds["individual_id"], cv_folds["species"], strict=True))
    sims_all, ids_all, truths_all, per_fold = [], [], [], []
    folds = fold_partitions.get_partition_keys()
    for fold, train, val, sims, ids in out_of_fold_search(cv_folds, whale.layout.embeddings_dir, folds, k=config.k):
        fold_result = tune_threshold(sims, ids, val["truth"].tolist(), gallery_ids=train["individual_id"].tolist())
        per_fold.append({"fold": fold, "queries": len(val), "best_threshold": fold_result.threshold, "best_map5": fold_result.map5})
        sims_all.append(sims)
        ids_all.append(ids)
        truths_all += val["truth"].tolist()
    if not sims_all:
        raise ValueError("no fold has validation photos: cannot tune the threshold")
    sims, ids = np.concatenate(sims_all), np.concatenate(ids_all)
    # 'truth' is already new_individual where the fold's gallery lacks the individual, so
    # every other truth is known. Passing all ids matters: by default only ids found in
    # the (top-5) lists count as known, and a missed known individual would score as new.
    known = cv_folds["individual_id"].unique().tolist()
    result = tune_threshold(sims, ids, truths_all, gallery_ids=known)
    value: dict[str, object] = {
        "threshold": result.threshold,
        "map5": result.map5,
        "new_share": result.new_share,
        "queries": len(truths_all),
        "per_fold": per_fold,
        "species_thresholds": {},
    }
    metadata: dict[str, object] = {
        "threshold": result.threshold,
        "oof_map5": result.map5,
        "top1_new_share": result.new_share,
        "queries": len(truths_all),
        "per_fold": table_md(pd.DataFrame(per_fold)),
    }
    if config.per_species:
        by_species = tune_species_thresholds(
            sims, ids, truths_all, nearest_species(ids, species_of), gallery_ids=known, min_queries=config.species_min_queries
        )
        value["species_thresholds"] = by_species.by_species
        value["map5"] = by_species.map5
        metadata.update({"oof_map5": by_species.map5, "oof_map5_global_only": result.map5, "species": table_md(by_species.table)})
        context.log.info(f"own thresholds for {len(by_species.by_species)} species: out-of-fold MAP@5 {by_species.map5:.4f}")
    context.log.info(f"threshold {result.threshold:.4f}: out-of-fold MAP@5 {result.map5:.4f} over {len(truths_all)} photos")

    fig = _curve_plot(result.thresholds, result.map5_curve, result.threshold)
    with mlflow.start_run(context, run_name="match_threshold", tags={"stage": "retrieval"}) as run:
        mlf.log_params({**config.model_dump(), "folds": len(per_fold), "queries": len(truths_all)})
        mlf.log_metrics({"threshold": result.threshold, "oof_map5": float(value["map5"]), "oof_map5_global": result.map5})
        mlf.log_figure(fig, "map5_curve.png")
        mlf.log_table(result.curve(), "map5_curve.json")
        if config.per_species:
            mlf.log_table(by_species.table, "species_thresholds.json")
        metadata["mlflow_run"] = dg.MetadataValue.url(mlflow.run_url(run.info.experiment_id, run.info.run_id))
    metadata["map5_curve"] = figure_md(fig)
    return dg.MaterializeResult(value=value, metadata=metadata)


@dg.asset_check(asset=match_threshold, description="The threshold is a finite cosine similarity and its MAP@5 a probability.")
def threshold_in_range(match_threshold: dict) -> dg.AssetCheckResult:
    threshold, map5 = float(match_threshold["threshold"]), float(match_threshold["map5"])
    species = {k: float(v) for k, v in (match_threshold.get("species_thresholds") or {}).items()}
    in_range = [t for t in [threshold, *species.values()] if np.isfinite(t) and -1.0 - 1e-5 <= t <= 1.0 + 1e-5]
    return dg.AssetCheckResult(
        passed=len(in_range) == 1 + len(species) and 0.0 <= map5 <= 1.0,
        metadata={"threshold": threshold, "oof_map5": map5, "species_thresholds": len(species)},
    )
