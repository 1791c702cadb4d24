"""Stage 2 -- detection: the animal detector, a box for every photo, and the crops."""

from pathlib import Path

import dagster as dg
import pandas as pd

from whale_assets.metadata import progress_logger, table_md
from whale_assets.resources import MlflowTracking, WhaleHome
from whale_assets.settings import BoxSettings, CropSettings, DetectorSettings
from whale_ml.detection.crops import write_crops
from whale_ml.detection.yolo import box_iou_report, detect_boxes, install_weights, read_box_file, train_yolo, write_yolo_dataset
from whale_ml.io import read_json, write_json


def _detector_files(whale: WhaleHome) -> tuple[Path, Path]:
    d = whale.layout.detector_dir
    return d / "detector.pt", d / "detector.json"


@dg.asset(group_name="detection", kinds={"pytorch", "ultralytics"}, deps=["train_metadata"], code_version="1", pool="gpu")
def fluke_detector(
    context: dg.AssetExecutionContext, config: DetectorSettings, whale: WhaleHome, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    """The animal detector: an ultralytics YOLO model built from its yaml and trained
    on the box file (mAP on a held-out share of the boxes), a user's ``.pt``, or none."""
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
        boxes = read_box_file(whale.data_path / config.box_file)
        work = whale.layout.detector_dir / "work"
        dataset = write_yolo_dataset(boxes, whale.data_path / "train_images", work / "dataset", config.val_share, config.seed)
        for line in dataset.skipped:
            context.log.warning(f"box skipped: {line}")
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
                if len(val_rows)
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


@dg.asset(group_name="detection", kinds={"pandas", "ultralytics"}, deps=[fluke_detector], code_version="1", pool="gpu")
def bboxes(
    context: dg.AssetExecutionContext,
    config: BoxSettings,
    whale: WhaleHome,
    train_metadata: pd.DataFrame,
    test_metadata: pd.DataFrame,
) -> dg.MaterializeResult:
    """A crop box for every train and test photo: the detector's most confident box,
    enlarged by ``expand``; the full frame when nothing passes ``min_confidence``
    (the row's ``note`` says why)."""
    weights_path, info_path = _detector_files(whale)
    info = read_json(info_path)
    weights = weights_path if info["source"] != "none" and weights_path.exists() else None
    # One pass over both splits: the detector is loaded once.
    photos = pd.concat([train_metadata.assign(split="train"), test_metadata.assign(split="test")], ignore_index=True)
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
    fallback = float((boxes["source"] != "detector").mean())
    for row in boxes[boxes["source"] == "unreadable"].itertuples():
        context.log.warning(f"unreadable photo: {row.note}")
    return dg.MaterializeResult(
        value=boxes,
        metadata={
            "dagster/row_count": len(boxes),
            "full_frame_share": fallback,
            "mean_confidence": float(boxes.loc[boxes["source"] == "detector", "confidence"].mean())
            if (boxes["source"] == "detector").any()
            else 0.0,
            "by_split_and_source": table_md(summary),
        },
    )


@dg.asset(group_name="detection", kinds={"pandas"}, code_version="1")
def crops(
    context: dg.AssetExecutionContext,
    config: CropSettings,
    whale: WhaleHome,
    bboxes: pd.DataFrame,
    train_metadata: pd.DataFrame,
    test_metadata: pd.DataFrame,
) -> dg.MaterializeResult:
    """Square crops of every photo at the training size, written once: a crop whose
    photo, box and size are unchanged is reused, not rewritten."""
    paths = dict(zip(train_metadata["image"], train_metadata["path"], strict=True))
    paths.update(zip(test_metadata["image"], test_metadata["path"], strict=True))
    parts = []
    for split in ("train", "test"):
        rows = bboxes[bboxes["split"] == split]
        written = write_crops(rows, paths, whale.layout.crops_dir / split, config.size, progress_logger(context, f"crops for {split}"))
        parts.append(written.assign(split=split))
    table = pd.concat(parts, ignore_index=True)
    failed = table[table["crop_path"] == ""]
    train_failed = failed[failed["split"] == "train"]
    if len(train_failed):
        raise RuntimeError(f"{len(train_failed)} training photo(s) could not be cropped: " + "; ".join(train_failed["error"].head(5)))
    for row in failed.itertuples():
        context.log.warning(f"test photo without crop (it gets a prior-only prediction): {row.error}")
    return dg.MaterializeResult(
        value=table,
        metadata={
            "dagster/row_count": len(table),
            "written": int(table["written"].sum()),
            "reused": int((~table["written"] & (table["crop_path"] != "")).sum()),
            "failed": len(failed),
            "size": config.size,
            "crop_dir": dg.MetadataValue.path(str(whale.layout.crops_dir)),
        },
    )
