"""Stage 6 -- submission: the Kaggle CSV, checked, and scored when truth exists."""

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from whale_assets.stages import REBUILD_AFTER_FOLDS
from whale_assets.metadata import image_md, table_md
from whale_assets.resources import WhaleHome
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_truth
from whale_ml.io import atomic_path, read_json
from whale_ml.retrieval import load_index, predict_top5, query_thresholds, search_gallery
from whale_ml.retrieval.review import best_photo_per_prediction, review_sheet
from whale_ml.retrieval.store import load_embeddings
from whale_ml.submission import make_submission, prior_predictions, score_submission, submission_problems, write_submission


@dg.asset(
    group_name="submission",
    kinds={"csv"},
    deps=["gallery"],
    code_version="1",
    automation_condition=REBUILD_AFTER_FOLDS,
    check_specs=[
        dg.AssetCheckSpec(
            "submission_format",
            asset="submission_csv",
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
    crops: pd.DataFrame,
) -> dg.MaterializeResult:
    """``submission.csv`` in Kaggle's format: for each test photo in
    ``sample_submission.csv`` order, five ids by the new_individual rule at the tuned
    threshold (its species' own one where tuned); a photo that could not be read gets
    the prior answer. A match-review sheet shows sample test photos beside the gallery
    photos they were matched to."""
    g = whale.layout.gallery_dir
    index = load_index(g / "index.faiss")
    gallery = pd.read_csv(g / "gallery_ids.csv", dtype=str, keep_default_na=False)
    gallery_ids = gallery["individual_id"].to_numpy()
    queries, query_images = load_embeddings(g, "queries")
    sims, ids = search_gallery(index, gallery_ids, queries, k=int(read_json(g / "gallery.json")["k"]))
    by_species: dict[str, float] = match_threshold.get("species_thresholds") or {}
    species_of = dict(zip(train_metadata["individual_id"], train_metadata["species"], strict=True))
    thresholds = query_thresholds(ids, species_of, match_threshold["threshold"], by_species)
    found = dict(zip(query_images, predict_top5(sims, ids, thresholds), strict=True))
    prior = prior_predictions(train_metadata["individual_id"].tolist())
    missing = [img for img in test_metadata["image"] if img not in found]
    for img in missing:
        context.log.warning(f"{img}: no embedding (unreadable photo); predicting the prior {' '.join(prior)}")
    predictions = [found.get(img, prior) for img in test_metadata["image"]]
    sub = make_submission(test_metadata["image"].tolist(), predictions)
    path = write_submission(sub, whale.layout.submission)

    expected_ids = min(5, 1 + len(set(gallery_ids)))
    problems = submission_problems(path, test_metadata["image"].tolist(), expected_ids)
    top1_new = float(sum(p[0] == NEW_INDIVIDUAL for p in predictions) / max(1, len(predictions)))
    review = _match_review(whale, index, gallery, queries, query_images, found, crops)
    return dg.MaterializeResult(
        metadata={
            **review,
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": len(sub),
            "threshold": float(match_threshold["threshold"]),
            "species_thresholds": len(by_species),
            "top1_new_individual_share": top1_new,
            "prior_only_rows": len(missing),
            "preview": table_md(sub.head(10)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="submission_format", passed=not problems, metadata={"problems": "; ".join(problems) or "none", "rows": len(sub)}
            )
        ],
    )


@dg.asset(group_name="submission", kinds={"pandas"}, deps=[submission_csv], code_version="1", automation_condition=REBUILD_AFTER_FOLDS)
def submission_score(context: dg.AssetExecutionContext, whale: WhaleHome) -> dg.MaterializeResult:
    """MAP@5 of the submission against ``test_truth.csv`` when the data set has one
    (the demo set does; Kaggle's does not)."""
    truth = read_truth(whale.data_path)
    if truth is None:
        context.log.info("no test_truth.csv in the data set: nothing to score")
        return dg.MaterializeResult(metadata={"scored": False})
    score = score_submission(whale.layout.submission, truth)
    always_new = float((truth["individual_id"] == NEW_INDIVIDUAL).mean())
    context.log.info(f"submission MAP@5 {score:.4f} (answering new_individual first everywhere: {always_new:.4f})")
    return dg.MaterializeResult(
        metadata={
            "scored": True,
            "map5": score,
            "baseline_all_new_map5": always_new,
            "truth_images": len(truth),
            "truth_new_share": always_new,
        }
    )


def _match_review(
    whale: WhaleHome,
    index: Any,
    gallery: pd.DataFrame,
    queries: np.ndarray,
    query_images: list[str],
    found: dict[str, list[str]],
    crops: pd.DataFrame,
    n: int = 8,
) -> dict[str, Any]:
    """Metadata entries for the match-review sheet of ``n`` sample test photos."""
    if not query_images:
        return {}
    crop_of = dict(zip(crops["image"], crops["crop_path"], strict=True))
    rows = sorted(np.random.default_rng(0).choice(len(query_images), min(n, len(query_images)), replace=False).tolist())
    names = [query_images[r] for r in rows]
    preds = [found[name] for name in names]
    matches = best_photo_per_prediction(index, gallery["individual_id"].to_numpy(), queries[rows], preds)
    truth = read_truth(whale.data_path)
    truths = None
    if truth is not None:
        known = set(gallery["individual_id"])
        truth_of = dict(zip(truth["image"], truth["individual_id"], strict=True))
        truths = [t if (t := truth_of.get(name, "?")) in known else NEW_INDIVIDUAL for name in names]
    sheet = review_sheet([crop_of[x] for x in names], preds, matches, [crop_of.get(x, "") for x in gallery["image"]], truths)
    path = whale.layout.home / "match_review.png"
    with atomic_path(path) as tmp:
        sheet.save(tmp)
    return {"match_review": image_md(sheet), "match_review_file": dg.MetadataValue.path(str(path))}
