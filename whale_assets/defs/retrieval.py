"""Group ``retrieval`` (stage ``ensemble_and_submit``): the ensemble gallery and the matcher tuned out of fold,
per round."""

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from whale_assets.metadata import figure_md, progress_logger, table_meta
from whale_assets.partitions import fold_partitions
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.defs.detection import feature_store, local_features
from whale_assets.launchpad import GallerySettings, ThresholdSettings
from whale_assets.rounds import Round, graph_rounds
from whale_ml.gallery.build import build_gallery
from whale_ml.gallery.lineage import LineageError, model_versions, read_fold_models
from whale_ml.gallery.matchers import models_key, read_matcher, save_matcher
from whale_ml.gallery.models import gallery_models
from whale_ml.gallery.versions import list_versions
from whale_ml.retrieval.matcher import TunedMatcher
from whale_ml.retrieval.threshold import OutOfFoldThreshold, tune_out_of_fold
from whale_ml.training.trainer import resolve_device


def gallery_asset(rnd: Round) -> dg.AssetsDefinition:
    """The ensemble gallery of one training round (:mod:`whale_assets.rounds`)."""

    @dg.asset(
        name="gallery",
        key_prefix=rnd.prefix,
        ins={"train_metadata": dg.AssetIn("train_metadata"), "crops": dg.AssetIn("crops")},
        group_name=rnd.group("retrieval"),
        kinds={"faiss"},
        deps=[rnd.key("fold_embeddings")],
        code_version="4",
        automation_condition=rnd.rebuild_condition,
    )
    def gallery(
        context: dg.AssetExecutionContext,
        config: GallerySettings,
        whale: WhaleHome,
        mlflow: MlflowTracking,
        train_metadata: pd.DataFrame,
        crops: pd.DataFrame,
    ) -> dg.MaterializeResult:
        """A new gallery version (``gallery/versions/vNNNN``): every training photo, embedded by
        the ensemble of all fold models (their normalised embeddings concatenated: cosine =
        mean of the models' cosines), in a faiss index, with the models, detector and crop
        settings it was made with. It is what the submission and ``whale identify`` search.
        Exact (flat) by default; with an approximate index its recall@5 against flat is
        measured on the test photos. Every enrolled photo (``whale enroll``) the fold
        embeddings do not cover yet is embedded here by the same models and added.
        ``versions`` lists them all; with ``keep_versions`` set, older ones beyond that
        many are deleted. The release round's gallery also records its round as the home's
        release (what ``whale identify`` and ``whale enroll`` serve) in the same hold of the
        catalogue's writer lock. The value names the version. See docs/retrieval.md."""
        layout = rnd.layout(whale)
        version, stats = build_gallery(
            layout,
            fold_partitions.get_partition_keys(),
            train_metadata,
            crops,
            config,
            lambda lineage: gallery_models(lineage, layout.model_dir, mlflow.uri, layout.home / "model_cache"),
            str(resolve_device("auto")),
            release=rnd.release_number,
        )
        metadata: dict[str, object] = {
            "gallery_images": stats.photos,
            "gallery_individuals": stats.individuals,
            "models": len(stats.models),
            "dimension": stats.dimension,
            "index_kind": stats.index,
            "index": dg.MetadataValue.path(str(version.folder / "index.faiss")),
        }
        if stats.recall is not None:
            context.log.info(f"{stats.index} index keeps {stats.recall['individual_recall_at_k']:.4f} of flat's top-5 individuals")
            metadata.update({f"{k}_vs_flat" if "recall" in k else f"recall_{k}": v for k, v in stats.recall.items()})
        context.log.info(f"gallery {version.name}: {stats.photos} photos from {len(stats.models)} fold models ({stats.index} index)")
        if stats.carried_enrolled:
            context.log.info(f"{stats.carried_enrolled} enrolled photo(s) not yet in the fold embeddings added to gallery {version.name}")
        if stats.pruned:
            context.log.info(f"deleted gallery version(s) {', '.join(stats.pruned)} (keep_versions={config.keep_versions})")
        info = version.info
        metadata.update(
            {
                "version": version.name,
                "version_photos": int(info["photos"]),
                "version_individuals": int(info["individuals"]),
                "enrolled_photos": int(info["enrolled_photos"]),
                "enrolled_individuals": int(info["enrolled_individuals"]),
                "model_versions": model_versions(version.lineage.models),
                "versions": table_meta(list_versions(layout)),
                "pruned_versions": len(stats.pruned),
            }
        )
        return dg.MaterializeResult(value={"version": version.name}, metadata=metadata)

    return gallery


def tuned_matcher(match_threshold: dict[str, Any]) -> TunedMatcher:
    """The ``match_threshold`` asset's value, read; a step that cannot read it fails without retries."""
    try:
        return read_matcher(match_threshold)
    except LineageError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def _fusion_metadata(context: dg.AssetExecutionContext, tuned: OutOfFoldThreshold) -> dict[str, object]:
    """What the fusion (local re-ranking, class centres) changed out of fold, and what local
    matching cost (nothing without a fusion)."""
    if tuned.fusion is None or tuned.plain is None:
        return {}
    fusion = tuned.fusion.fusion
    found: dict[str, object] = {
        "oof_map5_without_fusion": tuned.plain.map5,
        "fusion_weights": ", ".join(f"{k} {v:.2f}" for k, v in fusion.weights.items()),
        "class_centre_weight": fusion.centre_weight,
        "fusion_by_weight": table_meta(tuned.fusion.table),
    }
    context.log.info(
        f"fusion: out-of-fold MAP@5 {tuned.plain.map5:.4f} -> {tuned.fusion.threshold.map5:.4f} at weights {found['fusion_weights']}"
    )
    if tuned.rerank_cost is None:
        return found
    cost, weight = tuned.rerank_cost, fusion.local_weight
    context.log.info(
        f"local re-ranking: out-of-fold MAP@5 {tuned.plain.map5:.4f} -> {tuned.fusion.threshold.map5:.4f} at local weight "
        f"{weight:.2f} ({cost.ms_per_query:.1f} ms per query, {cost.pairs} photo pairs)"
    )
    return {
        **found,
        "oof_map5_without_rerank": tuned.plain.map5,
        "local_weight": weight,
        "rerank_ms_per_query": round(cost.ms_per_query, 2),
        "rerank_pairs_matched": cost.pairs,
    }


def _log_fusion(tuned: OutOfFoldThreshold) -> None:
    """The fusion's weights, its gain and its table of weights (and the lead rule's), to the active MLflow run."""
    import mlflow as mlf

    if tuned.lead is not None:
        mlf.log_metrics({"oof_map5_without_lead": tuned.lead.plain.map5, "lead_weight": tuned.lead.weight})
        mlf.log_table(tuned.lead.table, "lead_by_weight.json")
    if tuned.fusion is None or tuned.plain is None:
        return
    fused = tuned.fusion.fusion
    metrics = {"oof_map5_without_fusion": tuned.plain.map5, "local_weight": fused.local_weight, "class_centre_weight": fused.centre_weight}
    mlf.log_metrics(metrics)
    if tuned.rerank is not None:
        mlf.log_metrics({"oof_map5_without_rerank": tuned.plain.map5})
    mlf.log_table(tuned.fusion.table, "fusion_by_weight.json")


def _lead_metadata(context: dg.AssetExecutionContext, tuned: OutOfFoldThreshold) -> dict[str, object]:
    """What the lead rule changed out of fold (its weight, 0, when no lead weight was tried)."""
    if tuned.lead is None:
        return {"lead_weight": 0.0}
    lead = tuned.lead
    context.log.info(
        f"lead rule: out-of-fold MAP@5 {lead.plain.map5:.4f} -> {lead.threshold.map5:.4f} at lead weight {lead.weight:g}"
    )
    return {"lead_weight": lead.weight, "oof_map5_without_lead": lead.plain.map5, "lead_by_weight": table_meta(lead.table)}


def _threshold_metadata(context: dg.AssetExecutionContext, tuned: OutOfFoldThreshold) -> dict[str, object]:
    """The match_threshold asset's metadata (threshold, scores, folds, fusion, lead weight, species), logged as it goes."""
    if tuned.centres_note:
        context.log.warning(tuned.centres_note)
    result = tuned.result
    metadata: dict[str, object] = {
        "threshold": result.threshold,
        "oof_map5": result.map5,
        "top1_new_share": result.new_share,
        "queries": tuned.queries,
        "per_fold": table_meta(tuned.per_fold),
    }
    metadata.update(_fusion_metadata(context, tuned))
    metadata.update(_lead_metadata(context, tuned))
    if tuned.species is not None:
        metadata.update({"oof_map5": tuned.species.map5, "oof_map5_global_only": result.map5, "species": table_meta(tuned.species.table)})
        context.log.info(f"own thresholds for {len(tuned.species.by_species)} species: out-of-fold MAP@5 {tuned.species.map5:.4f}")
    context.log.info(f"threshold {result.threshold:.4f}: out-of-fold MAP@5 {result.map5:.4f} over {tuned.queries} photos")
    return metadata


def _curve_plot(thresholds: np.ndarray, curve: np.ndarray, chosen: float, fused: bool = False, lead_weight: float = 0.0) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(thresholds, curve, lw=1.2)
    ax.axvline(chosen, color="tab:red", ls="--", lw=1, label=f"chosen {chosen:.3f}")
    score = "fused score" if fused else "cosine similarity"
    ax.set_xlabel(f"threshold on {score} + {lead_weight:g} x lead over the 2nd" if lead_weight else f"{score} threshold")
    ax.set_ylabel("validation MAP@5")
    ax.legend()
    return fig


def match_threshold_asset(rnd: Round) -> dg.AssetsDefinition:
    """The out-of-fold threshold of one training round (:mod:`whale_assets.rounds`): always
    tuned on ``cv_folds``' validation photos, with that round's fold embeddings."""

    @dg.asset(
        name="match_threshold",
        key_prefix=rnd.prefix,
        ins={"cv_folds": dg.AssetIn("cv_folds")},
        group_name=rnd.group("retrieval"),
        kinds={"numpy", "mlflow"},
        deps=[rnd.key("fold_embeddings"), local_features],
        code_version="4",
        automation_condition=rnd.rebuild_condition,
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
        validation photos. With re-ranking and/or class centres it applies to the fused score,
        tuned with its weights; with a lead weight, the first candidate is judged by its score
        plus the weight times its lead over the second. The curve goes to the UI and to MLflow; the value also holds each
        validation photo's first-candidate score and whether it was right (``oof_top1``, what
        the next round's pseudo-labels calibrate their confidence on). See docs/retrieval.md."""
        import mlflow as mlf

        store = feature_store(whale) if config.rerank else None
        folds = fold_partitions.get_partition_keys()
        # Each fold's embedding set fixed once: the models read here are the ones tuned on.
        layout = rnd.layout(whale).with_current_embeddings(folds)
        models = read_fold_models(layout, folds)  # what the matcher is tuned for, and only good for
        progress = progress_logger(context, "out-of-fold local matching")
        tuned = tune_out_of_fold(cv_folds, layout.embeddings_dir, folds, config, store, progress)
        result, metadata = tuned.result, _threshold_metadata(context, tuned)
        fig = _curve_plot(result.thresholds, result.map5_curve, result.threshold, tuned.fusion is not None, tuned.matcher.lead_weight)
        # Tagged with its models' key: the release of those models nests this run under its own.
        tags = {"stage": "retrieval", "round": rnd.title, "models_key": models_key(models)}
        with mlflow.start_run(context, run_name=rnd.label("match_threshold"), tags=tags) as run:
            mlf.log_params({**config.model_dump(), "folds": len(tuned.per_fold), "queries": tuned.queries})
            mlf.log_metrics({"threshold": result.threshold, "oof_map5": tuned.map5, "oof_map5_global": result.map5})
            _log_fusion(tuned)
            mlf.log_figure(fig, "map5_curve.png")
            mlf.log_table(result.curve(), "map5_curve.json")
            if tuned.species is not None:
                mlf.log_table(tuned.species.table, "species_thresholds.json")
            metadata["mlflow_run"] = dg.MetadataValue.url(mlflow.run_url(run.info.experiment_id, run.info.run_id))
        metadata["map5_curve"] = figure_md(fig)
        # Stored under its models' key, where each gallery version built with them finds it. The
        # out-of-fold first candidates ride along: what the next round's pseudo-labels calibrate on.
        stored = save_matcher(layout, models, tuned.tuned())
        metadata.update({"models_key": stored.models_key, "model_versions": model_versions(models)})
        return dg.MaterializeResult(value=stored.to_dict(), metadata=metadata)

    return match_threshold


def threshold_in_range_check(rnd: Round) -> dg.AssetChecksDefinition:
    """The range check of one round's threshold."""

    @dg.asset_check(
        asset=rnd.key("match_threshold"),
        name="threshold_in_range",
        description="The threshold is a finite cosine similarity and its MAP@5 a probability.",
    )
    def threshold_in_range(match_threshold: dict) -> dg.AssetCheckResult:
        tuned = tuned_matcher(match_threshold)
        threshold, map5, species = tuned.matcher.threshold, tuned.map5, dict(tuned.matcher.species_thresholds)
        # With a lead weight w the decision score s1 + w (s1 - s2) of scores in [-1, 1] lies in [-1, 1 + 2w].
        top = 1.0 + 2.0 * tuned.matcher.lead_weight
        in_range = [t for t in [threshold, *species.values()] if np.isfinite(t) and -1.0 - 1e-5 <= t <= top + 1e-5]
        return dg.AssetCheckResult(
            passed=len(in_range) == 1 + len(species) and 0.0 <= map5 <= 1.0,
            metadata={"threshold": threshold, "oof_map5": map5, "species_thresholds": len(species)},
        )

    return threshold_in_range


@dg.definitions
def retrieval() -> dg.Definitions:
    """Every round's gallery and threshold (with its check)."""
    rounds = graph_rounds()
    return dg.Definitions(
        assets=[factory(rnd) for rnd in rounds for factory in (gallery_asset, match_threshold_asset)],
        asset_checks=[threshold_in_range_check(rnd) for rnd in rounds],
    )
