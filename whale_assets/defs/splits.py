"""Group ``splits`` (stage ``prepare_data``): cross-validation folds by individual."""

import dagster as dg
import pandas as pd

from whale_assets.metadata import table_meta
from whale_assets.partitions import n_folds
from whale_assets.launchpad import FoldSettings
from whale_assets.versions import table_version
from whale_ml.data.folds import fold_summary, make_folds


@dg.asset(group_name="splits", kinds={"pandas"}, code_version="1")
def cv_folds(config: FoldSettings, train_metadata: pd.DataFrame, crops: pd.DataFrame) -> dg.MaterializeResult:
    """Training photos with the fold each is validated in. Whole individuals are held
    out so that every fold's validation has ``new_individual`` cases; the fold count
    is ``$WHALE_N_FOLDS`` (it also fixes the model partitions)."""
    table = train_metadata.merge(
        crops.loc[crops["split"] == "train", ["image", "crop_path"]], on="image", how="left", validate="one_to_one"
    )
    # Photos the crops stage left out (bad_train_image: exclude) take no part in training.
    excluded = table["crop_path"].fillna("") == ""
    table = table[~excluded].reset_index(drop=True)
    folds = make_folds(table, n_folds(), config.new_individual_share, config.seed)
    summary = fold_summary(folds)
    return dg.MaterializeResult(
        value=folds,
        data_version=table_version(folds),
        metadata={
            "dagster/row_count": len(folds),
            "folds": n_folds(),
            "held_out_individuals": int(folds.loc[folds["held_out"], "individual_id"].nunique()),
            "never_validated_images": int((folds["fold"] < 0).sum()),
            "excluded_images": int(excluded.sum()),
            "fold_table": table_meta(summary),
        },
    )


@dg.asset_check(asset=cv_folds, blocking=True)
def folds_hold_out_individuals(cv_folds: pd.DataFrame) -> dg.AssetCheckResult:
    """Each fold validates some photos, includes new individuals, and no held-out
    individual has a photo in that fold's training set."""
    summary = fold_summary(cv_folds)
    leaks = 0
    for k in summary["fold"]:
        held = set(cv_folds.loc[(cv_folds["fold"] == k) & cv_folds["held_out"], "individual_id"])
        leaks += int(cv_folds.loc[(cv_folds["fold"] != k) & cv_folds["individual_id"].isin(held)].shape[0])
    ok = len(summary) == n_folds() and bool((summary["val_images"] > 0).all()) and leaks == 0
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "folds_with_validation": len(summary),
            "leaked_photos": leaks,
            "min_new_share": float(summary["val_new_share"].min()) if len(summary) else 0.0,
        },
    )
