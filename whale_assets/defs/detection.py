"""Stage 2 -- detection: the animal detector, a box for every photo, and the crops."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import pandas as pd

from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import image_md, progress_logger, table_md
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.retries import mlflow_retry_policy, retry_only_if_transient
from whale_assets.launchpad import BoxSettings, CropSettings, DetectorSettings
from whale_ml.detection.box_summary import photos_to_box, summarise_boxes
from whale_ml.detection.crops import CONTACT_SHEET_FILE, crop_every_split, crop_report, photo_paths, write_contact_sheet
from whale_ml.detection.detector import MetricsFn, prepare_detector, read_detector
from whale_ml.detection.yolo import detect_boxes
from whale_ml.gallery.lineage import record_boxes, record_crops


@dg.asset(
    group_name="detection",
    kinds={"pytorch", "ultralytics"},
    deps=["train_metadata"],
    code_version="1",
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
    a user's ``.pt``, or none (full frames)."""
    metadata: dict[str, object] = {"source": config.source}

    @contextmanager
    def tracked() -> Iterator[MetricsFn]:
        # Opened by prepare_detector once the training data is checked: bad settings open no run.
        with mlflow.start_run(context, run_name="fluke_detector", tags={"stage": "detection"}) as run:
            import mlflow as mlf

            mlf.log_params({k: v for k, v in config.model_dump().items() if v is not None})
            yield mlf.log_metrics
            metadata["mlflow_run"] = dg.MetadataValue.url(mlflow.run_url(run.info.experiment_id, run.info.run_id))

    result = prepare_detector(
        config, whale.data_path, whale.layout.detector_dir, whale.layout.home, context.log.info, context.log.warning, tracked
    )
    if config.source == "weights":
        metadata["weights_from"] = dg.MetadataValue.path(config.weights_path)
    if result.dataset is not None:
        if len(result.skipped):
            metadata["skipped_boxes"] = table_md(result.skipped.head(50))
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
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name="detection",
    kinds={"pandas", "ultralytics"},
    deps=[fluke_detector],
    code_version="3",
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
def bboxes(
    context: dg.AssetExecutionContext,
    config: BoxSettings,
    whale: WhaleHome,
    train_metadata: pd.DataFrame,
    test_metadata: pd.DataFrame,
) -> Iterator[dg.Output[pd.DataFrame] | dg.AssetCheckResult]:
    """A crop box for every train and test photo: the detector's most confident box,
    enlarged by ``expand``; the full frame when nothing passes ``min_confidence``
    (the row's ``note`` says why). Fallback shares per split and species, and every
    unreadable photo, are listed."""
    detector = read_detector(whale.layout.detector_dir)
    photos = photos_to_box(train_metadata, test_metadata)
    boxes = detect_boxes(
        photos,
        detector.weights,
        config.min_confidence,
        config.expand,
        detector.imgsz,
        config.batch,
        home=whale.layout.home,
        progress=progress_logger(context, "boxes"),
    ).assign(split=photos["split"].to_numpy())
    summary = summarise_boxes(boxes, photos["species"], config.warn_full_frame_share, detector.weights is not None)
    for row in summary.unreadable.itertuples():
        context.log.warning(f"unreadable {row.split} photo: {row.note}")
    # Photos identified later are boxed exactly like these: the settings and detector are recorded.
    record_boxes(whale.layout, config.min_confidence, config.expand, detector.imgsz, detector.weights)
    metadata: dict[str, object] = {
        "dagster/row_count": len(boxes),
        "full_frame_share": summary.full_frame_share,
        **{f"full_frame_share_{s}": v for s, v in summary.per_split.items()},
        "mean_confidence": summary.mean_confidence,
        "by_split_and_source": table_md(summary.by_split_and_source),
        "full_frame_by_species": table_md(summary.full_frame_by_species),
        "unreadable_photos": len(summary.unreadable),
    }
    if len(summary.unreadable):
        metadata["unreadable"] = table_md(summary.unreadable.head(50))
    # Output + check result, yielded: a returned MaterializeResult with a value and a
    # check spec trips Dagster's output typing.
    yield dg.Output(boxes, metadata=metadata)
    yield dg.AssetCheckResult(
        check_name="full_frame_share_is_low",
        passed=not summary.too_high,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "threshold": config.warn_full_frame_share,
            "detector": detector.weights is not None,
            **{f"{s}_share": v for s, v in summary.per_split.items()},
            "too_high": summary.too_high_text,
        },
    )


@dg.asset(group_name="detection", kinds={"pandas"}, code_version="3")
def crops(
    context: dg.AssetExecutionContext,
    config: CropSettings,
    whale: WhaleHome,
    bboxes: pd.DataFrame,
    train_metadata: pd.DataFrame,
    test_metadata: pd.DataFrame,
) -> dg.MaterializeResult:
    """Square crops of every photo at the training size (stretched or letterboxed),
    written once: a crop whose photo, box, size and mode are unchanged is reused. A
    training photo that cannot be read stops the run (``bad_train_image: fail``, the
    default) or is left out (``exclude``); a test photo that cannot be read keeps its
    row and gets the prior answer. A contact sheet shows sample boxes and crops."""
    paths = photo_paths(train_metadata, test_metadata)
    table = crop_every_split(
        bboxes, paths, whale.layout.crops_dir, config.size, config.resize, lambda split: progress_logger(context, f"crops for {split}")
    )
    record_crops(whale.layout, config.size, config.resize)  # photos identified later are cropped the same way
    report = crop_report(table, config.bad_train_image)
    for row in report.train_failed.itertuples():
        context.log.warning(f"training photo left out: {row.error}")
    for row in report.test_failed.itertuples():
        context.log.warning(f"test photo without crop (it gets a prior-only prediction): {row.error}")
    metadata: dict[str, object] = {
        "dagster/row_count": len(table),
        "written": report.written,
        "reused": report.reused,
        "failed": len(report.failed),
        "excluded_train_photos": len(report.train_failed),
        "size": config.size,
        "resize": config.resize,
        "crop_dir": dg.MetadataValue.path(str(whale.layout.crops_dir)),
    }
    if len(report.failed):
        metadata["failed_photos"] = table_md(report.failed[["image", "split", "error"]].head(50))
    if config.contact_sheet:
        sheet_file = whale.layout.crops_dir / CONTACT_SHEET_FILE
        metadata["contact_sheet"] = image_md(write_contact_sheet(bboxes, table, paths, config.contact_sheet, sheet_file))
        metadata["contact_sheet_file"] = dg.MetadataValue.path(str(sheet_file))
    return dg.MaterializeResult(value=table, metadata=metadata)
