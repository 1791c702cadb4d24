"""Stage 2 -- detection: the animal detector, a box for every photo, and the crops."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd

from whale_assets.k8s import GPU_STEP_TAGS
from whale_assets.metadata import image_md, progress_logger, table_md
from whale_assets.resources import MlflowTracking, WhaleHome, mlflow_retry_policy, retry_only_if_transient
from whale_assets.settings import BoxSettings, CropSettings, DetectorSettings
from whale_ml.detection.crops import contact_sheet, write_crops
from whale_ml.detection.yolo import (
    YoloDataset,
    box_iou_report,
    detect_boxes,
    install_weights,
    read_box_file,
    read_yolo_dataset,
    train_yolo,
    write_yolo_dataset,
)
from whale_ml.gallery.lineage import record_boxes, record_crops
from whale_ml.io import atomic_path, read_json, write_json


def _detector_files(whale: WhaleHome) -> tuple[Path, Path]:
    d = whale.layout.detector_dir
    return d / "detector.pt", d / "detector.json"


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
    weights_path, info_path = _detector_files(whale)
    info: dict[str, object] = {"source": config.source, "imgsz": config.imgsz}
    metadata: dict[str, object] = {"source": config.source}
    if config.source == "none":
        weights_path.unlink(missing_ok=True)
    elif config.source == "weights":
        if not config.weights_path or not Path(config.weights_path).is_file():
            raise FileNotFoundError(f"source='weights' needs weights_path to an ultralytics .pt file; got {config.weights_path!r}")
        install_weights(config.weights_path, weights_path)
        metadata["weights_from"] = dg.MetadataValue.path(config.weights_path)
    else:
        work = whale.layout.detector_dir / "work"
        boxes: pd.DataFrame | None = None
        if config.source == "dataset":
            if not config.dataset_yaml:
                raise ValueError("source='dataset' needs dataset_yaml: the data.yaml of a YOLO-format data set")
            dataset: YoloDataset = read_yolo_dataset(config.dataset_yaml, work / "dataset_yaml")
        else:
            boxes = read_box_file(whale.data_path / config.box_file)
            dataset = write_yolo_dataset(boxes, whale.data_path / "train_images", work / "dataset", config.val_share, config.seed)
        for line in dataset.skipped:
            context.log.warning(f"box skipped: {line}")
        if dataset.skipped:
            skipped = pd.DataFrame([line.split(": ", 1) for line in dataset.skipped], columns=["image", "why"])
            metadata["skipped_boxes"] = table_md(skipped.head(50))
        context.log.info(f"training {config.model_yaml} on {dataset.n_train} boxed images for {config.epochs} epochs at {config.imgsz}px")
        with mlflow.start_run(context, run_name="fluke_detector", tags={"stage": "detection"}) as run:
            import mlflow as mlf

            mlf.log_params({k: v for k, v in config.model_dump().items() if v is not None})
            best, scores = train_yolo(
                dataset,
                work,
                config.model_yaml,
                config.epochs,
                config.imgsz,
                config.batch,
                config.device,
                config.seed,
                whale.layout.home,
                log=context.log.info,
            )
            install_weights(best, weights_path)
            # IoU of the detector's box vs the full frame, on the held-out boxes.
            val_rows = pd.DataFrame(
                {"image": dataset.val_images, "path": [str(whale.data_path / "train_images" / n) for n in dataset.val_images]}
            )
            iou = (
                box_iou_report(
                    detect_boxes(val_rows, weights_path, 0.0, 1.0, config.imgsz, device=config.device, home=whale.layout.home),
                    boxes.drop_duplicates("image"),
                )
                if len(val_rows) and boxes is not None
                else {}
            )
            scores.update({k: v for k, v in iou.items() if k != "images"})
            mlf.log_metrics({k: float(v) for k, v in scores.items()})
            metadata["mlflow_run"] = dg.MetadataValue.url(mlflow.run_url(run.info.experiment_id, run.info.run_id))
        info.update(scores)
        metadata.update(
            {
                "boxes_train": dataset.n_train,
                "boxes_val": dataset.n_val,
                "boxes_skipped": len(dataset.skipped),
                **{f"val_{k}": float(v) for k, v in scores.items()},
            }
        )
    if weights_path.exists():
        metadata["weights"] = dg.MetadataValue.path(str(weights_path))
    write_json(info_path, info)
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
    weights_path, info_path = _detector_files(whale)
    info = read_json(info_path)
    weights = weights_path if info["source"] != "none" and weights_path.exists() else None
    # One pass over both splits: the detector is loaded once.
    photos = pd.concat(
        [train_metadata.assign(split="train"), test_metadata.assign(split="test", species="(test: unknown)")], ignore_index=True
    )
    boxes = detect_boxes(
        photos,
        weights,
        config.min_confidence,
        config.expand,
        int(info["imgsz"]),
        config.batch,
        home=whale.layout.home,
        progress=progress_logger(context, "boxes"),
    ).assign(split=photos["split"].to_numpy())
    summary = boxes.groupby(["split", "source"]).size().unstack(fill_value=0).reset_index()
    boxes["fallback"] = boxes["source"] != "detector"
    by_species = (
        boxes.assign(species=photos["species"].to_numpy())
        .groupby(["split", "species"])
        .agg(photos=("image", "size"), full_frame_share=("fallback", "mean"))
        .reset_index()
        .sort_values(["split", "full_frame_share"], ascending=[True, False])
    )
    per_split = boxes.groupby("split")["fallback"].mean()
    unreadable = boxes.loc[boxes["source"] == "unreadable", ["image", "split", "note"]]
    for row in unreadable.itertuples():
        context.log.warning(f"unreadable {row.split} photo: {row.note}")
    boxes = boxes.drop(columns="fallback")
    # Photos identified later are boxed exactly like these: the settings and detector are recorded.
    record_boxes(whale.layout, config.min_confidence, config.expand, int(info["imgsz"]), weights)
    # With no detector every photo is a full frame by choice: nothing to warn about.
    high = {s: float(v) for s, v in per_split.items() if v > config.warn_full_frame_share} if weights is not None else {}
    metadata: dict[str, object] = {
        "dagster/row_count": len(boxes),
        "full_frame_share": float((boxes["source"] != "detector").mean()),
        **{f"full_frame_share_{s}": float(v) for s, v in per_split.items()},
        "mean_confidence": float(boxes.loc[boxes["source"] == "detector", "confidence"].mean())
        if (boxes["source"] == "detector").any()
        else 0.0,
        "by_split_and_source": table_md(summary),
        "full_frame_by_species": table_md(by_species),
        "unreadable_photos": len(unreadable),
    }
    if len(unreadable):
        metadata["unreadable"] = table_md(unreadable.head(50))
    # Output + check result, yielded: a returned MaterializeResult with a value and a
    # check spec trips Dagster's output typing.
    yield dg.Output(boxes, metadata=metadata)
    yield dg.AssetCheckResult(
        check_name="full_frame_share_is_low",
        passed=not high,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "threshold": config.warn_full_frame_share,
            "detector": weights is not None,
            **{f"{s}_share": float(v) for s, v in per_split.items()},
            "too_high": ", ".join(f"{s} {v:.0%}" for s, v in high.items()) or "none",
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
    paths = dict(zip(train_metadata["image"], train_metadata["path"], strict=True))
    paths.update(zip(test_metadata["image"], test_metadata["path"], strict=True))
    parts = []
    for split in ("train", "test"):
        rows = bboxes[bboxes["split"] == split]
        written = write_crops(
            rows, paths, whale.layout.crops_dir / split, config.size, progress_logger(context, f"crops for {split}"), config.resize
        )
        parts.append(written.assign(split=split))
    table = pd.concat(parts, ignore_index=True)
    record_crops(whale.layout, config.size, config.resize)  # photos identified later are cropped the same way
    failed = table[table["crop_path"] == ""]
    train_failed = failed[failed["split"] == "train"]
    if len(train_failed) and config.bad_train_image == "fail":
        raise RuntimeError(
            f"{len(train_failed)} training photo(s) could not be read (set crops' bad_train_image to 'exclude' to train "
            "without them): " + "; ".join(train_failed["error"].head(10))
        )
    for row in train_failed.itertuples():
        context.log.warning(f"training photo left out: {row.error}")
    for row in failed[failed["split"] == "test"].itertuples():
        context.log.warning(f"test photo without crop (it gets a prior-only prediction): {row.error}")
    metadata: dict[str, object] = {
        "dagster/row_count": len(table),
        "written": int(table["written"].sum()),
        "reused": int((~table["written"] & (table["crop_path"] != "")).sum()),
        "failed": len(failed),
        "excluded_train_photos": len(train_failed),
        "size": config.size,
        "resize": config.resize,
        "crop_dir": dg.MetadataValue.path(str(whale.layout.crops_dir)),
    }
    if len(failed):
        metadata["failed_photos"] = table_md(failed[["image", "split", "error"]].head(50))
    if config.contact_sheet:
        sample = bboxes.merge(table[["image", "crop_path"]], on="image")
        sample = sample.sample(min(config.contact_sheet, len(sample)), random_state=0).sort_values("image")
        sheet = contact_sheet(sample, paths)
        with atomic_path(whale.layout.crops_dir / "contact_sheet.png") as tmp:
            sheet.save(tmp)
        metadata["contact_sheet"] = image_md(sheet)
        metadata["contact_sheet_file"] = dg.MetadataValue.path(str(whale.layout.crops_dir / "contact_sheet.png"))
    return dg.MaterializeResult(value=table, metadata=metadata)
