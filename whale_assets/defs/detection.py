"""Group ``detection`` (stage ``prepare_data``): the animal detector, one pass that boxes and crops every photo, and the
local features of every box (for re-ranking)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import image_md, photo_list, progress_logger, table_meta, warn_photos, write_photo_list
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.versions import table_version
from whale_assets.launchpad import BoxesAndCropsSettings, CropSettings, DetectorSettings, LocalFeatureSettings
from whale_ml.detection.box_summary import BoxSummary, summarise_boxes
from whale_ml.detection.crops import CONTACT_SHEET_FILE, CropReport, crop_report, photo_paths, write_contact_sheet
from whale_ml.detection.detector import MetricsFn, detector_version, prepare_detector, read_detector
from whale_ml.detection.photo_pass import BoxRule, CropRule, PassStats
from whale_ml.detection.yolo import box_and_crop
from whale_ml.retrieval.local_features import FeatureStore, extract_features, home_feature_store, save_features
from whale_ml.gallery.lineage import record_boxes, record_crops


@dg.asset(
    group_name="detection",
    kinds={"pytorch", "ultralytics"},
    deps=["photos"],
    code_version="2",
    pool="gpu",
    retry_policy=mlflow_retry_policy(),
    op_tags=GPU_STEP_TAGS,
)
@retry_only_if_transient
def fluke_detector(
    context: dg.AssetExecutionContext, config: DetectorSettings, whale: WhaleHome, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    """The animal detector: an ultralytics YOLO model built from its yaml and trained
    on the box file (mAP on a held-out share of the boxes) or on a YOLO-format data set,
    a user's ``.pt``, or none (full frames). Each boxed photo is decoded once, at the
    training size. A detector already trained from the same box file, boxed photos,
    settings and code is reused, not trained again. Its data version is a digest of the
    installed weights, so a reused detector leaves the boxes and crops up to date."""
    metadata: dict[str, object] = {"source": config.source}

    @contextmanager
    def tracked() -> Iterator[MetricsFn]:
        # Opened by prepare_detector once the training data is checked: bad settings open no run.
        with mlflow.start_run(context, run_name="fluke_detector", tags={"stage": "detection"}, system_metrics=True) as run:
            import mlflow as mlf

            mlf.log_params({k: v for k, v in config.model_dump().items() if v is not None})
            yield mlf.log_metrics
            metadata["mlflow_run"] = dg.MetadataValue.url(mlflow.run_url(run.info.experiment_id, run.info.run_id))

    result = prepare_detector(
        config, whale.data_path, whale.layout.detector_dir, whale.layout.home, context.log.info, context.log.warning, tracked
    )
    metadata["reused"] = result.reused
    if result.reused:
        metadata.update({f"val_{k}": float(v) for k, v in result.scores.items()})
    if config.source == "weights":
        metadata["weights_from"] = dg.MetadataValue.path(config.weights_path)
    if result.dataset is not None:
        if len(result.skipped):
            metadata["skipped_boxes"] = table_meta(result.skipped.head(50))
        metadata.update(
            {
                "boxes_train": result.dataset.n_train,
                "boxes_val": result.dataset.n_val,
                "boxes_skipped": len(result.skipped),
                **{f"val_{k}": float(v) for k, v in result.scores.items()},
            }
        )
    if result.weights is not None and result.weights.exists():
        metadata["weights"] = dg.MetadataValue.path(str(result.weights))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(detector_version(whale.layout.detector_dir)))


@dg.multi_asset(
    name="boxes_and_crops",
    outs={
        "bboxes": dg.AssetOut(
            group_name="detection",
            kinds={"pandas", "ultralytics"},
            code_version="4",
            description="A crop box for every train and test photo: the detector's most confident box, enlarged by "
            "``expand``; the full frame when nothing passes ``min_confidence`` (the row's ``note`` says why).",
        ),
        "crops": dg.AssetOut(
            group_name="detection",
            kinds={"pandas"},
            code_version="4",
            description="Square crops of every photo at the training size (stretched or letterboxed), written once.",
        ),
    },
    deps=[fluke_detector],
    pool="gpu",
    op_tags=GPU_STEP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            "full_frame_share_is_low",
            asset="bboxes",
            description="Warns when a split has more full-frame fallbacks than warn_full_frame_share.",
        )
    ],
)
def boxes_and_crops(
    context: dg.AssetExecutionContext,
    config: BoxesAndCropsSettings,
    whale: WhaleHome,
    photos: pd.DataFrame,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """One pass over every photo, on every core: each is decoded once, at the smallest JPEG
    scale that still gives the detector its input size and the crop its size, boxed by the
    detector (or the full frame) and cropped. A crop whose photo, box, size and mode are
    unchanged is reused. A training photo that cannot be read stops the run
    (``bad_train_image: fail``, the default) or is left out (``exclude``); a test photo that
    cannot be read keeps its row and gets the prior answer. Fallback shares per split and
    species, every unreadable photo and a contact sheet of sample boxes and crops are shown."""
    detector = read_detector(whale.layout.detector_dir)
    boxes_cfg, crops_cfg = config.boxes, config.crops
    done = box_and_crop(
        photos[["image", "path", "split"]],
        detector.weights,
        BoxRule(boxes_cfg.min_confidence, boxes_cfg.expand, detector.imgsz),
        CropRule(whale.layout.crops_dir, crops_cfg.size, crops_cfg.resize),
        boxes_cfg.batch,
        home=whale.layout.home,
        progress=progress_logger(context, "boxes and crops"),
        workers=config.workers or None,
    )
    boxes = done.boxes.assign(split=photos["split"].to_numpy())
    table = done.crops.assign(split=photos["split"].to_numpy())  # type: ignore[union-attr]
    summary = summarise_boxes(boxes, photos["species"], boxes_cfg.warn_full_frame_share, detector.weights is not None)
    reports = whale.layout.reports_dir
    unreadable_list = photo_list(
        context.log.warning, "unreadable photo(s)", summary.unreadable.rename(columns={"note": "reason"}), reports / "unreadable_photos.csv"
    )
    # Photos identified later are boxed and cropped exactly like these: the settings and detector are recorded.
    record_boxes(whale.layout, boxes_cfg.min_confidence, boxes_cfg.expand, detector.imgsz, detector.weights)
    record_crops(whale.layout, crops_cfg.size, crops_cfg.resize)
    # The boxes are materialised before the crops are judged: an unreadable training photo
    # fails the step, but every photo's box (and its reason) is on record.
    box_meta = {**box_metadata(summary, len(boxes)), **pass_metadata(done.stats)}
    if unreadable_list is not None:
        box_meta["unreadable_list"] = unreadable_list
    yield dg.MaterializeResult(asset_key="bboxes", value=boxes, metadata=box_meta, data_version=table_version(boxes))
    yield box_check(summary, boxes_cfg.warn_full_frame_share, detector.weights is not None)
    report = crop_report(table, crops_cfg.bad_train_image)
    failed, failed_list = report.failed.rename(columns={"error": "reason"}), reports / "photos_without_crop.csv"
    failed_list_md = write_photo_list(failed, failed_list)
    warn_photos(context.log.warning, "training photo(s) left out (no crop)", failed[failed["split"] == "train"], failed_list)
    warn_photos(context.log.warning, "test photo(s) without a crop (each gets the prior answer)", failed[failed["split"] == "test"], failed_list)
    paths = photo_paths(photos)
    crop_meta = crop_metadata(report, table, crops_cfg, boxes, paths, whale.layout.crops_dir)
    if failed_list_md is not None:
        crop_meta["failed_photos_list"] = failed_list_md
    # A crop's file name is a digest of its photo, box, size and mode: the table is its content.
    yield dg.MaterializeResult(asset_key="crops", value=table, metadata=crop_meta, data_version=table_version(table, ignore=["written"]))


def box_check(summary: BoxSummary, threshold: float, detector: bool) -> dg.AssetCheckResult:
    """``full_frame_share_is_low``: a warning when a split falls back to the full frame too often."""
    return dg.AssetCheckResult(
        check_name="full_frame_share_is_low",
        asset_key="bboxes",
        passed=not summary.too_high,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "threshold": threshold,
            "detector": detector,
            **{f"{s}_share": v for s, v in summary.per_split.items()},
            "too_high": summary.too_high_text,
        },
    )


def pass_metadata(stats: PassStats) -> dict[str, object]:
    """How the pass went: decodes (one per photo, plus the redecoded small boxes), scales and speed."""
    return {
        "decodes": stats.decodes,
        "redecoded_photos": stats.redecodes,
        "decode_scales": ", ".join(f"1/{r}: {n}" for r, n in sorted(stats.by_reduction.items())),
        "workers": stats.workers,
        "photos_per_second": round(stats.photos_per_second, 2),
    }


def box_metadata(summary: BoxSummary, rows: int) -> dict[str, object]:
    """The box table's shares and fallbacks, as small tables (never the 80k rows)."""
    metadata: dict[str, object] = {
        "dagster/row_count": rows,
        "full_frame_share": summary.full_frame_share,
        **{f"full_frame_share_{s}": v for s, v in summary.per_split.items()},
        "mean_confidence": summary.mean_confidence,
        "by_split_and_source": table_meta(summary.by_split_and_source),
        "full_frame_by_species": table_meta(summary.full_frame_by_species),
        "unreadable_photos": len(summary.unreadable),
    }
    if len(summary.unreadable):
        metadata["unreadable"] = table_meta(summary.unreadable.head(50))
    return metadata


def crop_metadata(
    report: CropReport, table: pd.DataFrame, config: CropSettings, boxes: pd.DataFrame, paths: dict[str, str], crops_dir: Path
) -> dict[str, object]:
    """Counts, the first failures and the contact sheet of the crop table."""
    metadata: dict[str, object] = {
        "dagster/row_count": len(table),
        "written": report.written,
        "reused": report.reused,
        "failed": len(report.failed),
        "excluded_train_photos": len(report.train_failed),
        "size": config.size,
        "resize": config.resize,
        "crop_dir": dg.MetadataValue.path(str(crops_dir)),
    }
    if len(report.failed):
        metadata["failed_photos"] = table_meta(report.failed[["image", "split", "error"]].head(50))
    if config.contact_sheet:
        sheet_file = crops_dir / CONTACT_SHEET_FILE
        metadata["contact_sheet"] = image_md(write_contact_sheet(boxes, table, paths, config.contact_sheet, sheet_file))
        metadata["contact_sheet_file"] = dg.MetadataValue.path(str(sheet_file))
    return metadata


@dg.asset(group_name="detection", kinds={"opencv", "numpy"}, code_version="1")
def local_features(
    context: dg.AssetExecutionContext,
    config: LocalFeatureSettings,
    whale: WhaleHome,
    bboxes: pd.DataFrame,
    photos: pd.DataFrame,
) -> dg.MaterializeResult:
    """Keypoints (SIFT, stored as RootSIFT; or ORB) of every photo's box, taken from the
    original photo at ``size`` pixels: more than the models' crops keep, so marks still
    match. The threshold stage re-ranks each query's first candidates by how many of
    these match geometrically (HotSpotter-style), and the submission and ``whale
    identify`` do the same. One folder per split; a photo that cannot be read gets none."""
    counts: dict[str, int] = {}
    keypoints: list[int] = []
    failed: list[dict[str, str]] = []
    for split in ("train", "test"):
        rows = bboxes[bboxes["split"] == split]
        boxes = rows[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float).tolist()
        # By split and name: a test photo may share its name with a training photo (a user's catalogue).
        paths = photos[photos["split"] == split].set_index("image").loc[rows["image"], "path"].tolist()
        feats, failures = extract_features(paths, boxes, config, config.workers, progress_logger(context, f"{split} local features"))
        failed += [{"image": f.image, "split": split, "reason": f.error} for f in failures]
        save_features(whale.layout.local_features_dir(split), rows["image"].tolist(), feats, config)
        counts[split] = len(rows)
        keypoints += [len(f) for f in feats if f is not None]
    without = photo_list(
        context.log.warning,
        "photo(s) without local features (unreadable)",
        pd.DataFrame(failed, columns=["image", "split", "reason"]),
        whale.layout.reports_dir / "photos_without_local_features.csv",
    )
    kp = np.asarray(keypoints or [0])
    return dg.MaterializeResult(
        metadata={
            **({"without_features_list": without} if without is not None else {}),
            "train_photos": counts["train"],
            "test_photos": counts["test"],
            "photos_without_features": len(failed),
            "keypoints_median": int(np.median(kp)),
            "keypoints_p10": int(np.percentile(kp, 10)),
            "photos_under_20_keypoints": int((kp < 20).sum()),
            "method": config.method,
            "size": config.size,
            "folder": dg.MetadataValue.path(str(whale.layout.local_features_dir("train").parent)),
        }
    )


def feature_store(whale: WhaleHome) -> FeatureStore:
    """The ``local_features`` asset's store over both splits, and the enrolled photos' features."""
    return home_feature_store(whale.layout)
