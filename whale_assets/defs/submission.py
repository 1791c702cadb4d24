"""Group ``submission`` (stage ``ensemble_and_submit``): the Kaggle CSV, checked, and scored when truth exists."""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from whale_assets.metadata import image_md, photo_list, table_meta
from whale_assets.defs.detection import feature_store
from whale_assets.defs.retrieval import tuned_matcher
from whale_assets.resources import WhaleHome
from whale_assets.rounds import Round, graph_rounds
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_truth
from whale_ml.gallery.build import query_embeddings
from whale_ml.gallery.lineage import LineageError, model_versions
from whale_ml.gallery.matchers import check_matcher
from whale_ml.gallery.versions import GalleryVersion, load_version
from whale_ml.home import HomeLayout
from whale_ml.io import atomic_path
from whale_ml.retrieval.matcher import Matches, TunedMatcher, match_queries
from whale_ml.retrieval.review import sample_review
from whale_ml.submission import (
    SubmissionFormatError,
    make_submission,
    prior_predictions,
    score_submission,
    submission_problems,
    write_submission,
)


def submission_csv_asset(rnd: Round) -> dg.AssetsDefinition:
    """The submission file of one training round (:mod:`whale_assets.rounds`)."""

    @dg.asset(
        name="submission_csv",
        key_prefix=rnd.prefix,
        ins={
            "test_metadata": dg.AssetIn("test_metadata"),
            "train_metadata": dg.AssetIn("train_metadata"),
            "match_threshold": dg.AssetIn(rnd.key("match_threshold")),
            "gallery": dg.AssetIn(rnd.key("gallery")),
            "crops": dg.AssetIn("crops"),
        },
        group_name=rnd.group("submission"),
        kinds={"csv"},
        deps=["local_features"],
        code_version="3",
        automation_condition=rnd.rebuild_condition,
        freshness_policy=rnd.freshness_policy,
        check_specs=[
            dg.AssetCheckSpec(
                "submission_format",
                asset=rnd.key("submission_csv"),
                blocking=True,
                description="Kaggle format: sample_submission's images in order, five distinct ids per row.",
            )
        ],
    )
    def submission_csv(
        context: dg.AssetExecutionContext,
        whale: WhaleHome,
        test_metadata: pd.DataFrame,
        train_metadata: pd.DataFrame,
        match_threshold: dict[str, Any],
        gallery: dict[str, Any],
        crops: pd.DataFrame,
    ) -> dg.MaterializeResult:
        """``submission.csv`` in Kaggle's format: for each test photo in
        ``sample_submission.csv`` order, five ids from the gallery version the gallery stage
        wrote (searched as ``whale identify`` searches it; a later ``whale enroll`` version
        does not change the submission) by the new_individual rule at the tuned threshold
        (its species' own one where tuned); a photo that could not be read gets the prior
        answer. A match-review sheet shows sample test photos beside their matches.
        A later round writes its own, ``rounds/round<k>/submission.csv``; the release's is
        the one ``whale identify`` agrees with."""
        layout = rnd.layout(whale)
        tuned = tuned_matcher(match_threshold)
        version = _version_of_matcher(layout, gallery["version"], tuned)
        queries, query_images = query_embeddings(layout, version)
        matches = _match_test_photos(whale, version, queries, query_images, tuned)
        found, prior = dict(zip(query_images, matches.predictions, strict=True)), prior_predictions(train_metadata["individual_id"].tolist())
        missing = [img for img in test_metadata["image"] if img not in found]
        predictions = [found.get(img, prior) for img in test_metadata["image"]]
        sub = make_submission(test_metadata["image"].tolist(), predictions)
        expected_ids = min(5, 1 + version.table["individual_id"].nunique())
        path = _write_checked(layout, sub, test_metadata["image"].tolist(), expected_ids)
        problems = submission_problems(path, test_metadata["image"].tolist(), expected_ids)  # the file in place, read back
        top1_new = float(sum(p[0] == NEW_INDIVIDUAL for p in predictions) / max(1, len(predictions)))
        sheet = sample_review(
            query_images,
            queries,
            [found[img] for img in query_images],
            dict(zip(crops["image"], crops["crop_path"], strict=True)),
            version.embeddings,
            version.table["individual_id"].to_numpy(),
            version.table["crop_path"].tolist(),
            _truth_of(whale),
        )
        return dg.MaterializeResult(
            metadata={
                **(_review_metadata(layout, sheet) if sheet is not None else {}),
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": len(sub),
                **_answered_by_md(version, tuned),
                "top1_new_individual_share": top1_new,
                **_prior_only_md(context, layout, missing, prior),
                **_rerank_md(matches),
                "preview": table_meta(sub.head(10)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="submission_format", passed=not problems, metadata={"problems": "; ".join(problems) or "none", "rows": len(sub)}
                )
            ],
        )

    return submission_csv


def _prior_only_md(context: dg.AssetExecutionContext, layout: HomeLayout, missing: list[str], prior: list[str]) -> dict[str, object]:
    """The test photos answered by the prior alone: one warning, their list as a file, the count."""
    prior_only = photo_list(
        context.log.warning,
        f"test photo(s) without an embedding (unreadable) get the prior answer {' '.join(prior)}",
        pd.DataFrame({"image": missing, "reason": "no embedding (the photo could not be read or cropped)"}),
        layout.reports_dir / "prior_only_rows.csv",
    )
    return {"prior_only_rows": len(missing), **({"prior_only_list": prior_only} if prior_only is not None else {})}


def _version_of_matcher(layout: HomeLayout, name: str, tuned: TunedMatcher) -> GalleryVersion:
    """Gallery version ``name``, refused (no retry) unless ``tuned`` was tuned for its models."""
    version = load_version(layout, name)
    try:
        check_matcher(tuned, version.lineage, version.name)
    except LineageError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    return version


def _answered_by_md(version: GalleryVersion, tuned: TunedMatcher) -> dict[str, object]:
    """What answered: the gallery version, its models and the matcher tuned for them."""
    return {
        "gallery_version": version.name,
        "model_versions": model_versions(version.lineage.models),
        "models_key": tuned.models_key,
        "threshold": float(tuned.matcher.threshold),
        "species_thresholds": len(tuned.matcher.species_thresholds),
    }


def submission_score_asset(rnd: Round) -> dg.AssetsDefinition:
    """The score of one training round's submission, where the data set has test truth."""

    @dg.asset(
        name="submission_score",
        key_prefix=rnd.prefix,
        group_name=rnd.group("submission"),
        kinds={"pandas"},
        deps=[rnd.key("submission_csv")],
        code_version="2",
        automation_condition=rnd.rebuild_condition,
    )
    def submission_score(context: dg.AssetExecutionContext, whale: WhaleHome) -> dg.MaterializeResult:
        """MAP@5 of the submission against ``test_truth.csv`` when the data set has one
        (the demo set does; Kaggle's does not). The value (``scored``, ``map5``) is what the
        release logs to MLflow as its ``test_map5``."""
        truth = read_truth(whale.data_path)
        if truth is None:
            context.log.info("no test_truth.csv in the data set: nothing to score")
            return dg.MaterializeResult(value={"scored": False, "map5": None}, metadata={"scored": False})
        score = score_submission(rnd.layout(whale).submission, truth)
        always_new = float((truth["individual_id"] == NEW_INDIVIDUAL).mean())
        context.log.info(f"submission MAP@5 {score:.4f} (answering new_individual first everywhere: {always_new:.4f})")
        return dg.MaterializeResult(
            value={"scored": True, "map5": float(score)},
            metadata={
                "scored": True,
                "map5": score,
                "baseline_all_new_map5": always_new,
                "truth_images": len(truth),
                "truth_new_share": always_new,
            }
        )

    return submission_score


def _match_test_photos(whale: WhaleHome, version: Any, queries: Any, images: list[str], tuned: TunedMatcher) -> Matches:
    """The test photos matched as ``whale identify`` matches them, re-ranked by local features
    (from the ``local_features`` asset) when the matcher was tuned so."""
    store = feature_store(whale) if tuned.matcher.rerank is not None else None
    return match_queries(version, queries, tuned.matcher, None if store is None else [store.get(img) for img in images], store)


def _write_checked(layout: HomeLayout, sub: pd.DataFrame, images: list[str], ids_per_row: int) -> Path:
    """Write the submission only if it passes the blocking ``submission_format`` check, run on
    the staged file before it replaces the previous one: a failing submission never reaches
    ``submission.csv`` (where a user would upload it) and fails the step, without retries."""
    try:
        return write_submission(sub, layout.submission, images, ids_per_row)
    except SubmissionFormatError as exc:
        raise dg.Failure(
            description=f"{exc}. The previous {layout.submission.name} (if any) is kept.",
            metadata={"problems": "; ".join(exc.problems), "rows": len(sub)},
            allow_retries=False,
        ) from exc


def _rerank_md(matches: Matches) -> dict[str, Any]:
    """How the test photos were matched: the lead weight of the decision, local re-ranking and its cost."""
    if matches.rerank_ms_per_query is None:
        return {"lead_weight": matches.lead_weight, "local_rerank": False}
    return {"lead_weight": matches.lead_weight, "local_rerank": True, "rerank_ms_per_query": round(matches.rerank_ms_per_query, 2)}


def _truth_of(whale: WhaleHome) -> dict[str, str] | None:
    truth = read_truth(whale.data_path)
    return None if truth is None else dict(zip(truth["image"], truth["individual_id"], strict=True))


def _review_metadata(layout: HomeLayout, sheet: Any) -> dict[str, Any]:
    """The match-review sheet, saved beside the submission and shown in the UI."""
    path = layout.match_review
    with atomic_path(path) as tmp:
        sheet.save(tmp)
    return {"match_review": image_md(sheet), "match_review_file": dg.MetadataValue.path(str(path))}


@dg.definitions
def submission() -> dg.Definitions:
    """Every round's submission file and its score."""
    return dg.Definitions(assets=[factory(rnd) for rnd in graph_rounds() for factory in (submission_csv_asset, submission_score_asset)])
