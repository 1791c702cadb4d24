"""Group ``round<k>_pseudo_labels`` (stage ``round<k>_pick_pseudo_labels``): confident test predictions for
each later round.

``round<k>/pseudo_labels`` picks, per fold, the test photos whose first prediction by
round k-1's model of that fold among that fold's training photos (as its validation
photos were matched out of fold) clears a confidence calibrated out of fold;
``round<k>/pseudo_labelled_folds`` adds them to the training side of their own fold:
the table round k's fold models train on (:mod:`whale_assets.rounds`). Both are made
for every round after the first, by the factories below. See docs/retrieval.md.
"""

import dagster as dg
import pandas as pd

from whale_assets.defs.detection import feature_store, local_features
from whale_assets.defs.retrieval import tuned_matcher
from whale_assets.launchpad import PseudoLabelSettings
from whale_assets.metadata import progress_logger, table_meta
from whale_assets.partitions import fold_partitions, n_folds
from whale_assets.resources import WhaleHome
from whale_assets.rounds import Round, graph_rounds
from whale_assets.versions import table_version
from whale_ml.data.folds import fold_split
from whale_ml.gallery.lineage import model_versions, read_fold_models
from whale_ml.gallery.matchers import models_key
from whale_ml.retrieval.pseudo_labels import calibrate_confidence, pick_fold_pseudo_labels, pseudo_labelled_folds as add_pseudo_rows

LISTED_PHOTOS = 500  # photos listed in the UI's table; all of them are in the asset's parquet file


def pseudo_labels_asset(rnd: Round, previous: Round) -> dg.AssetsDefinition:
    """Round ``rnd``'s pseudo-labels, chosen by ``previous`` round's fold models and threshold."""

    @dg.asset(
        name="pseudo_labels",
        key_prefix=rnd.prefix,
        ins={"match_threshold": dg.AssetIn(previous.key("match_threshold")), "cv_folds": dg.AssetIn("cv_folds")},
        group_name=rnd.group("pseudo_labels"),
        kinds={"pandas"},
        deps=[previous.key("fold_embeddings"), local_features],
        code_version="2",
    )
    def pseudo_labels(
        context: dg.AssetExecutionContext,
        config: PseudoLabelSettings,
        whale: WhaleHome,
        match_threshold: dict,
        cv_folds: pd.DataFrame,
    ) -> dg.MaterializeResult:
        """The test photos pseudo-labelled for this round, per fold (``fold, image,
        individual_id, score``): the previous round's fold k model matches the test photos
        among fold k's training photos only, exactly as its validation photos were matched
        out of fold (fusion, local re-ranking, threshold); a photo whose first prediction is
        a known individual scoring at least the confidence calibrated on the out-of-fold
        searches (the smallest score at which validation photos' first candidates are right
        ``min_precision`` of the time) joins fold k's training in this round. Nothing a fold
        validates on chose its labels; test truth is never read."""
        tuned = tuned_matcher(match_threshold)
        top1, matcher = tuned.oof_top1, tuned.matcher
        if top1 is None:
            raise dg.Failure("match_threshold has no out-of-fold first candidates (oof_top1): rematerialise it first", allow_retries=False)
        calibration = calibrate_confidence(top1["score"], top1["correct"], config.min_precision, matcher.threshold, config.min_photos)
        folds = fold_partitions.get_partition_keys()
        layout = previous.layout(whale)  # the fold models, embeddings and matcher that choose
        models = read_fold_models(layout, folds)
        if tuned.models_key != models_key(models):  # the fold searches below use these models' embeddings
            raise dg.Failure(
                "match_threshold was tuned for other fold models than the current fold embeddings': rematerialise match_threshold first",
                allow_retries=False,
            )
        table, test_photos = pick_fold_pseudo_labels(
            cv_folds,
            layout.embeddings_dir,
            folds,
            matcher,
            calibration.confidence,
            feature_store(whale) if matcher.rerank is not None else None,
            progress=progress_logger(context, "folds' test matching"),
        )
        per_fold = [{"fold": f, "pseudo_labels": int((table["fold"] == i).sum())} for i, f in enumerate(folds)]
        context.log.info(
            f"{table['image'].nunique()} of {test_photos} test photos pseudo-labelled by some fold at confidence {calibration.confidence:.4f} "
            f"(out of fold: {calibration.photos} of {calibration.queries} validation photos, top-1 precision {calibration.precision:.4f})"
        )
        curve = calibration.curve.iloc[:: max(1, len(calibration.curve) // 20)]  # about 20 points of the precision curve
        return dg.MaterializeResult(
            value=table,
            data_version=table_version(table),
            metadata={
                **calibration.to_dict(),
                "models_key": models_key(models),
                "model_versions": model_versions(models),
                "threshold": float(matcher.threshold),
                "dagster/row_count": len(table),
                "test_photos": test_photos,
                "pseudo_share": table["image"].nunique() / max(1, test_photos),
                "individuals": int(table["individual_id"].nunique()),
                "per_fold": table_meta(per_fold),
                "photos": table_meta(table.head(LISTED_PHOTOS)),
                "oof_precision_curve": table_meta(curve),
            },
        )

    return pseudo_labels


def pseudo_labelled_folds_asset(rnd: Round) -> dg.AssetsDefinition:
    """The fold table round ``rnd``'s fold models train on."""

    @dg.asset(
        name="pseudo_labelled_folds",
        key_prefix=rnd.prefix,
        ins={"cv_folds": dg.AssetIn("cv_folds"), "pseudo_labels": dg.AssetIn(rnd.key("pseudo_labels")), "crops": dg.AssetIn("crops")},
        group_name=rnd.group("pseudo_labels"),
        kinds={"pandas"},
        code_version="1",
    )
    def pseudo_labelled_folds(cv_folds: pd.DataFrame, pseudo_labels: pd.DataFrame, crops: pd.DataFrame) -> dg.MaterializeResult:
        """The round's fold table: ``cv_folds`` plus its pseudo-labelled test photos
        (``pseudo``, ``fold = -1``), each on the training side of every fold whose training
        photos hold its individual, never on a validation side."""
        table = add_pseudo_rows(cv_folds, pseudo_labels, crops)
        per_fold = []
        for k in range(n_folds()):
            train, val = fold_split(table, k)
            per_fold.append({"fold": k, "train_images": len(train), "pseudo_train_images": int(train["pseudo"].sum()), "val_images": len(val)})
        return dg.MaterializeResult(
            value=table,
            data_version=table_version(table),
            metadata={"dagster/row_count": len(table), "pseudo_rows": int(table["pseudo"].sum()), "folds": table_meta(per_fold)},
        )

    return pseudo_labelled_folds


def pseudo_photos_never_validated_check(rnd: Round) -> dg.AssetChecksDefinition:
    """The blocking check of one round's pseudo-labelled folds."""

    @dg.asset_check(
        asset=rnd.key("pseudo_labelled_folds"), name="pseudo_photos_never_validated", additional_ins={"cv_folds": dg.AssetIn("cv_folds")}, blocking=True
    )
    def pseudo_photos_never_validated(cv_folds: pd.DataFrame, pseudo_labelled_folds: pd.DataFrame) -> dg.AssetCheckResult:
        """Every fold validates exactly the photos, with exactly the truths, of ``cv_folds``:
        the pseudo photos change the training side only, so every round's out-of-fold
        threshold is tuned on the same validation cases as the first's."""
        changed = []
        for k in range(n_folds()):
            _, before = fold_split(cv_folds, k)
            _, after = fold_split(pseudo_labelled_folds, k)
            if before[["image", "truth"]].to_dict("records") != after[["image", "truth"]].to_dict("records"):
                changed.append(k)
        return dg.AssetCheckResult(passed=not changed, metadata={"folds_with_changed_validation": len(changed)})

    return pseudo_photos_never_validated


@dg.definitions
def pseudo_labelling() -> dg.Definitions:
    """Every later round's pseudo-labels and the fold table they make, each from the round before it."""
    later = [(rnd, rnd.previous) for rnd in graph_rounds() if rnd.previous is not None]
    return dg.Definitions(
        assets=[asset for rnd, previous in later for asset in (pseudo_labels_asset(rnd, previous), pseudo_labelled_folds_asset(rnd))],
        asset_checks=[pseudo_photos_never_validated_check(rnd) for rnd, _ in later],
    )
