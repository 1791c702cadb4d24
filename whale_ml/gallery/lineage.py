"""What a gallery was made with: the fold models, the detector and the box and crop settings.

A new photo can only be compared with the gallery if it goes through the same
detector, the same box and crop settings and the same fold models (in the same
order, with the same flip TTA). The pipeline's stages record their part of this
beside their artifacts; the gallery gathers the parts into one
:class:`GalleryLineage`, stored with every gallery version.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from whale_ml.io import read_json, sha256_file, write_json
from whale_ml.home import HomeLayout

# The records each stage writes beside its artifacts.
BOXES_RECORD = "boxes.json"  # in detector_dir, by the bboxes stage
CROPS_RECORD = "crops.json"  # in crops_dir, by the crops stage
EMBEDDINGS_RECORD = "embeddings.json"  # in each embedding set (embeddings_dir(fold)), by the fold embeddings stage
REGISTERED_RECORD = "registered.json"  # in model_dir(fold), by the training stage


class LineageError(RuntimeError):
    """The gallery cannot be matched against: its record is missing or the models differ."""


class FoldModel(BaseModel):
    """One fold model of the ensemble, as the gallery used it."""

    fold: str
    checkpoint_sha256: str = Field(description="sha256 of the best.pt checkpoint that embedded the gallery.")
    registered_model: str | None = Field(None, description="MLflow registered model name (None when it was not registered).")
    version: str | None = Field(None, description="MLflow registered model version of that checkpoint.")
    flip_tta: bool = False


class GalleryLineage(BaseModel):
    """Everything a new photo must go through to land in the gallery's embedding space."""

    models: list[FoldModel]
    detector_sha256: str | None = Field(description="sha256 of detector.pt; None: full frames (no detector).")
    detector_imgsz: int
    min_confidence: float
    expand: float
    crop_size: int
    resize: str
    index: str = "flat"
    index_options: dict[str, int | None] = Field(
        default_factory=dict, description="build_index's settings (nlist, nprobe, hnsw_m, ...), so a rebuilt version matches."
    )
    k: int = 50


def record_boxes(layout: HomeLayout, min_confidence: float, expand: float, imgsz: int, detector: Path | None) -> None:
    """Written by the bboxes stage: the box settings and which detector file made them."""
    write_json(
        layout.detector_dir / BOXES_RECORD,
        {
            "min_confidence": min_confidence,
            "expand": expand,
            "imgsz": imgsz,
            "detector_sha256": sha256_file(detector) if detector is not None else None,
        },
    )


def record_crops(layout: HomeLayout, size: int, resize: str) -> None:
    """Written by the crops stage."""
    write_json(layout.crops_dir / CROPS_RECORD, {"size": size, "resize": resize})


def record_registered(layout: HomeLayout, fold: str, checkpoint: Path, registered_model: str, version: str) -> None:
    """Written by the training stage: the registry version of the fold's checkpoint."""
    write_json(
        layout.model_dir(fold) / REGISTERED_RECORD,
        {"registered_model": registered_model, "version": str(version), "checkpoint_sha256": sha256_file(checkpoint)},
    )


def record_embeddings(layout: HomeLayout, fold: str, checkpoint_sha256: str, flip_tta: bool, folder: Path | None = None) -> FoldModel:
    """Written by the fold embeddings stage: which checkpoint embedded the crops.

    Args:
        checkpoint_sha256: the hash of the very bytes the model was loaded from
            (:func:`whale_ml.checkpoints.snapshot_checkpoint`), not of ``best.pt`` read
            again now: training may have replaced it since.
        folder: the embedding set being written (default: the fold's current set).

    The registry version is taken from the training stage's record only when that record
    is of this very checkpoint (a retrained fold whose embeddings were not redone is not).
    """
    registered: dict[str, str] = {}
    reg_path = layout.model_dir(fold) / REGISTERED_RECORD
    if reg_path.exists():
        found = read_json(reg_path)
        if found.get("checkpoint_sha256") == checkpoint_sha256:
            registered = found
    model = FoldModel(
        fold=fold,
        checkpoint_sha256=checkpoint_sha256,
        registered_model=registered.get("registered_model"),
        version=registered.get("version"),
        flip_tta=flip_tta,
    )
    write_json((folder if folder is not None else layout.embeddings_dir(fold)) / EMBEDDINGS_RECORD, model.model_dump())
    return model


def model_versions(models: list[FoldModel]) -> str:
    """``fold0: v3, fold1: v4`` (a model not in the registry by its checkpoint's digest), for metadata."""
    return ", ".join(f"{m.fold}: v{m.version}" if m.version else f"{m.fold}: {m.checkpoint_sha256[:12]}" for m in models)


def read_fold_models(layout: HomeLayout, folds: list[str]) -> list[FoldModel]:
    """Which checkpoint made each fold's current embeddings (the fold embeddings stage's records).

    Raises:
        LineageError: a fold has no record (its embeddings were never made).
    """
    records = {f: layout.embeddings_dir(f) / EMBEDDINGS_RECORD for f in folds}  # each fold's set resolved once
    missing = [f"fold_embeddings[{f}] ({path})" for f, path in records.items() if not path.exists()]
    if missing:
        raise LineageError("no record of the model that embedded " + ", ".join(missing) + ": rematerialise those assets first")
    return [FoldModel(**read_json(path)) for path in records.values()]


def gather_lineage(
    layout: HomeLayout, folds: list[str], index: str, k: int, index_options: dict[str, int | None] | None = None
) -> GalleryLineage:
    """The gallery's lineage from the stages' records (for the gallery stage)."""
    needed = {"bboxes": layout.detector_dir / BOXES_RECORD, "crops": layout.crops_dir / CROPS_RECORD}
    missing = [f"{stage} ({path})" for stage, path in needed.items() if not path.exists()]
    if missing:
        raise LineageError("no record of the settings of " + ", ".join(missing) + ": rematerialise those assets first")
    boxes, crops = read_json(needed["bboxes"]), read_json(needed["crops"])
    return GalleryLineage(
        models=read_fold_models(layout, folds),
        detector_sha256=boxes["detector_sha256"],
        detector_imgsz=int(boxes["imgsz"]),
        min_confidence=float(boxes["min_confidence"]),
        expand=float(boxes["expand"]),
        crop_size=int(crops["size"]),
        resize=str(crops["resize"]),
        index=index,
        index_options=index_options or {},
        k=k,
    )
