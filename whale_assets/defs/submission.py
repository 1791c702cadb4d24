"""Stage 6 -- submission: the Kaggle CSV, checked, and scored when truth exists."""

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from whale_assets.metadata import table_md
from whale_assets.resources import WhaleHome
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_truth
from whale_ml.io import read_json
from whale_ml.retrieval import load_index, nearest_species, predict_top5, search_gallery
from whale_ml.retrieval.store import load_embeddings
from whale_ml.submission import make_submission, prior_predictions, score_submission, submission_problems, write_submission


@dg.asset(
    group_name="submission",
    kinds={"csv"},
    deps=["gallery"],
    code_version="1",
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
) -> dg.MaterializeResult:
    """``submission.csv`` in Kaggle's format: for each test photo in
    ``sample_submission.csv`` order, five ids by the new_individual rule at the tuned
    threshold (its species' own one where tuned); a photo that could not be read gets
    the prior answer."""
    g = whale.layout.gallery_dir
    index = load_index(g / "index.faiss")
    gallery_ids = pd.read_csv(g / "gallery_ids.csv", dtype=str, keep_default_na=False)["individual_id"].to_numpy()
    queries, query_images = load_embeddings(g, "queries")
    sims, ids = search_gallery(index, gallery_ids, queries, k=int(read_json(g / "gallery.json")["k"]))
    by_species: dict[str, float] = match_threshold.get("species_thresholds") or {}
    species = nearest_species(ids, dict(zip(train_metadata["individual_id"], train_metadata["species"], strict=True)))
    thresholds = np.array([by_species.get(s, match_threshold["threshold"]) for s in species], dtype=np.float64)
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
    return dg.MaterializeResult(
        metadata={
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


@dg.asset(group_name="submission", kinds={"pandas"}, deps=[submission_csv], code_version="1")
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
