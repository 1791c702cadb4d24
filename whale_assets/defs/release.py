"""Group ``registry`` (stage ``ensemble_and_submit``, the release round's): the release, one MLflow
run that holds it, and the champion decision that says whether it serves."""

from typing import Any

import dagster as dg
import pandas as pd

from whale_assets.launchpad import ReleaseSettings
from whale_assets.metadata import table_meta
from whale_assets.partitions import fold_index, fold_partitions
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.defs.retrieval import tuned_matcher
from whale_assets.rounds import Round, graph_rounds
from whale_ml.data.folds import validation_digest
from whale_ml.gallery.champion import ReleaseCandidate, ReleaseDecision, publish_release
from whale_ml.gallery.lineage import LineageError, model_versions
from whale_ml.gallery.matchers import check_matcher
from whale_ml.gallery.versions import GalleryVersion, load_version
from whale_ml.home import HomeLayout
from whale_ml.registry import RELEASE_STAGE


def release_asset(rnd: Round) -> dg.AssetsDefinition:
    """The release of the graph's last round (:mod:`whale_assets.rounds`)."""

    @dg.asset(
        name="release",
        key_prefix=rnd.prefix,
        ins={
            "cv_folds": dg.AssetIn("cv_folds"),
            "gallery": dg.AssetIn(rnd.key("gallery")),
            "match_threshold": dg.AssetIn(rnd.key("match_threshold")),
            "submission_score": dg.AssetIn(rnd.key("submission_score")),
        },
        group_name=rnd.group("registry"),
        kinds={"mlflow"},
        code_version="1",
        automation_condition=rnd.rebuild_condition,
        retry_policy=mlflow_retry_policy(),
    )
    @retry_only_if_transient
    def release(
        context: dg.AssetExecutionContext,
        config: ReleaseSettings,
        whale: WhaleHome,
        mlflow: MlflowTracking,
        cv_folds: pd.DataFrame,
        gallery: dict[str, Any],
        match_threshold: dict[str, Any],
        submission_score: dict[str, Any],
    ) -> dg.MaterializeResult:
        """The release: the fold models, the gallery version built with them and the matcher tuned
        for them, as one MLflow run (``release_<round>_<gallery version>``, tag ``stage=release``)
        with the same names in every release: out-of-fold MAP@5, threshold, new-individual
        share, validation photos, test MAP@5 (with a ``test_map5`` only where
        ``test_truth.csv`` exists) and each fold's validation MAP@5 as metrics; round, gallery
        version, models key, each fold's registry version and the validation data's digest as
        parameters. The runs that made its fold models (training, embedding) and its threshold
        run are nested under it. Then the champion decision: it becomes the champion release
        (``whale-arcface@champion_<fold>`` for all its folds, ``release.json`` in the home:
        what ``whale identify`` serves) when its logged out-of-fold MAP@5 is at least the
        champion's, read back from MLflow, on the same validation data, or when the two were
        validated on other data. The release is logged into the same run as one MLflow
        ``pyfunc`` model and registered (``whale-release``, alias ``champion`` while it is the
        champion release, ``challenger`` for the newest): photos in, the submission's five ids
        out, as ``whale identify`` answers (docs/serving.md). See docs/training.md, "Releases in MLflow"."""
        layout, run_name = rnd.layout(whale), f"release_{rnd.title}_{gallery['version']}"
        # The run first: a server that refuses fails the step before any work.
        with mlflow.start_run(context, run_name=run_name, tags={"stage": RELEASE_STAGE, "round": rnd.title}) as run:
            version = load_version(layout, gallery["version"])  # read once: the candidate's lineage, the logged model's gallery
            candidate = _candidate(rnd, version, cv_folds, match_threshold, submission_score)
            try:
                decision = publish_release(layout, mlflow.uri, run.info.run_id, run.info.experiment_id, candidate)
            except LineageError as exc:
                raise dg.Failure(str(exc), allow_retries=False) from exc
            servable = _log_servable(config, mlflow, layout, version, candidate, decision) if config.log_model else None
            url = mlflow.run_url(run.info.experiment_id, run.info.run_id)
            champion_url = mlflow.run_url(run.info.experiment_id, decision.champion.run_id)
        context.log.info(f"release {run_name}: {'champion' if decision.promoted else 'not champion'} ({decision.reason})")
        return dg.MaterializeResult(
            value={"run_id": run.info.run_id, "gallery_version": candidate.gallery_version, "models_key": candidate.models_key,
                   "champion": decision.promoted},  # fmt: skip
            metadata={"mlflow_run": dg.MetadataValue.url(url), "champion_run": dg.MetadataValue.url(champion_url),
                      **_release_metadata(candidate, decision),
                      **({"servable_model": f"models:/{config.registered_model}/{servable}"} if servable else {})},  # fmt: skip
        )

    return release


def _log_servable(
    config: ReleaseSettings,
    mlflow: MlflowTracking,
    layout: HomeLayout,
    version: GalleryVersion,
    candidate: ReleaseCandidate,
    decision: ReleaseDecision,
) -> str:
    """Log the release's pyfunc model into the active (release) run with the very checkpoints its
    gallery version was built with, register it and point ``challenger`` (and ``champion``,
    when it is the champion release) at it; returns the registered version."""
    from whale_ml.gallery.models import gallery_models
    from whale_ml.identify.serving import log_release_model
    from whale_ml.registry import point_aliases

    models = gallery_models(version.lineage, layout.model_dir, mlflow.uri, layout.home / "model_cache")
    tags = {"round": str(candidate.number), "gallery_version": candidate.gallery_version, "models_key": candidate.models_key}
    info = log_release_model(layout, version, models, candidate.matcher, registered_model_name=config.registered_model, tags=tags)
    registered = str(info.registered_model_version)
    aliases = {"challenger": registered, **({"champion": registered} if decision.promoted else {})}
    point_aliases(mlflow.uri, config.registered_model, aliases)
    return registered


def _candidate(
    rnd: Round, version: GalleryVersion, cv_folds: pd.DataFrame, match_threshold: dict[str, Any], score: dict[str, Any]
) -> ReleaseCandidate:
    """The release the round's ensemble stage made: its gallery version, checked against the
    matcher (refused, without retries, unless both are of the same models), and its scores."""
    tuned = tuned_matcher(match_threshold)
    try:
        check_matcher(tuned, version.lineage, version.name)
    except LineageError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    folds = fold_partitions.get_partition_keys()
    return ReleaseCandidate(
        number=rnd.number,
        gallery_version=version.name,
        models=version.lineage.models,
        models_key=tuned.models_key,
        oof_map5=tuned.map5,
        threshold=float(tuned.matcher.threshold),
        new_share=tuned.new_share,
        queries=tuned.queries,
        validation_digest=validation_digest(cv_folds, [fold_index(f) for f in folds]),
        matcher=tuned,
        test_map5=score.get("map5") if score.get("scored") else None,
    )


def _release_metadata(candidate: ReleaseCandidate, decision: ReleaseDecision) -> dict[str, object]:
    """The scores, what answers, the decision and the nested fold runs, for the UI."""
    versions = {m.fold: m.version for m in candidate.models}
    return {
        **candidate.metrics(),
        "queries": candidate.queries,
        "gallery_version": candidate.gallery_version,
        "model_versions": model_versions(list(candidate.models)),
        "models_key": candidate.models_key,
        "validation_digest": candidate.validation_digest,
        "champion": decision.promoted,
        "decision": decision.reason,
        "champion_round": decision.champion.round,
        "champion_oof_map5_before": decision.before_map5,
        "nested_runs": decision.nested,
        "fold_runs": table_meta(
            [
                {"fold": f.fold, "version": versions.get(f.fold), "training_run": f.training, "embedding_runs": len(f.embedding),
                 "best_val_map5": f.best_val_map5}  # fmt: skip
                for f in decision.fold_runs
            ]
        ),
    }


@dg.definitions
def registry() -> dg.Definitions:
    """The release round's release (the graph's last round: :mod:`whale_assets.rounds`)."""
    return dg.Definitions(assets=[release_asset(graph_rounds()[-1])])
