"""One fold's model, from the fold table to the files a tracker logs.

:func:`train_fold_model` takes the cross-validation table's rows of one fold,
trains in one process or several (DDP under torchrun), reports every epoch's
metrics to a plain callback (so that tracking, MLflow or other, stays outside
the core), and leaves beside the checkpoints the recipe (``config.json``) and
the learning curves (``history.csv``), with a figure of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from whale_ml.stage_configs import TrainConfig
from whale_ml.data.folds import fold_split
from whale_ml.io import atomic_path, write_json
from whale_ml.threads import pipeline_threads
from whale_ml.training.launch import train_fold_distributed
from whale_ml.training.trainer import EpochCallback, LogFn, TrainResult, ValProgress, data_fingerprint, train_fold


@dataclass
class FoldData:
    """One fold's photos as training takes them.

    Attributes:
        train: the fold's training rows, ``path`` set to the crop.
        val: its validation rows, ``path`` set to the crop, with ``truth``.
        num_classes: size of the ArcFace head: every individual's label, in or out of the fold.
    """

    train: pd.DataFrame
    val: pd.DataFrame
    num_classes: int

    @classmethod
    def from_folds(cls, folds: pd.DataFrame, fold: int) -> FoldData:
        """Split the cross-validation table (``crop_path, label, individual_id, fold``) for ``fold``."""
        train, val = fold_split(folds, fold)
        return cls(train.assign(path=train["crop_path"]), val.assign(path=val["crop_path"]), int(folds["label"].max()) + 1)

    @property
    def version(self) -> str:
        """A short digest of the photos and labels: the same data gets the same version."""
        return data_fingerprint(self.train, self.val)[:12]

    def describe(self) -> str:
        return (
            f"{len(self.train)} training photos of {self.train['individual_id'].nunique()} individuals, "
            f"{len(self.val)} validation photos"
        )

    def datasets(self) -> dict[str, tuple[pd.DataFrame, str]]:
        """The training and validation photos as tables a tracker logs, each with a digest.

        One row a photo: ``image``, ``individual_id``, ``species`` when known, ``crop``
        (the crop's file name, which holds its key: source file, box, size, cutting
        method) and, for validation, ``truth``. The digest (12 hex characters) covers
        image, individual and crop of every row, in any row order and in any home: the
        same photos cut the same way give the same digest, so the data set of two runs
        is seen to be the same one.

        Returns:
            ``{"training": (table, digest), "validation": (table, digest)}``.
        """
        return {"training": photo_table(self.train), "validation": photo_table(self.val)}

    def params(self) -> dict[str, int]:
        """Sizes worth logging beside the recipe, and the CPU threads training will run with
        (``$WHALE_THREADS`` or every core: a CPU run's floats depend on it, docs/deployment.md)."""
        sizes = {"num_classes": self.num_classes, "train_images": len(self.train), "val_images": len(self.val)}
        return {**sizes, "threads": pipeline_threads()}


def photo_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows of a fold (``image``, ``individual_id``, ``crop_path``) as :meth:`FoldData.datasets`
    logs them, sorted by image, and the digest of their photos."""
    table = pd.DataFrame({"image": rows["image"].astype(str), "individual_id": rows["individual_id"].astype(str)})
    if "species" in rows:
        table["species"] = rows["species"].astype(str)
    table["crop"] = [Path(p).name for p in rows["crop_path"].astype(str)]
    if "truth" in rows:
        table["truth"] = rows["truth"].astype(str)
    table = table.sort_values(["image", "crop"], kind="stable").reset_index(drop=True)
    digest = hashlib.sha1(table[["image", "individual_id", "crop"]].to_csv(index=False).encode()).hexdigest()[:12]
    return table, digest


def recipe_version(cfg: TrainConfig) -> str:
    """A short digest of the recipe: models trained with the same settings share it."""
    return hashlib.sha1(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


def curves_figure(history: pd.DataFrame) -> Any:
    """Training loss and validation MAP@5 per epoch, one matplotlib figure (closed by the caller).

    The MAP@5 curve joins the validated epochs (with ``val_every`` > 1 the others are NaN).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history["epoch"], history["train_loss"], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    if "val_map5" in history:
        right = ax.twinx()
        validated = history.dropna(subset=["val_map5"])
        right.plot(validated["epoch"], validated["val_map5"], color="tab:red", label="val MAP@5")
        right.set_ylabel("validation MAP@5")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    return fig


@dataclass
class TrainedFold:
    """What :func:`train_fold_model` leaves: the run's result, its curves, and the files beside the checkpoints."""

    result: TrainResult
    history: pd.DataFrame
    curves: Any
    config_path: Path
    history_path: Path


def train_fold_model(
    cfg: TrainConfig,
    data: FoldData,
    out_dir: str | Path,
    processes: int = 1,
    on_epoch_end: EpochCallback | None = None,
    log: LogFn = print,
    val_progress: ValProgress | None = None,
) -> TrainedFold:
    """Train (or resume, or reuse) one fold model and write its recipe and curves beside it.

    Every epoch of the history reaches ``on_epoch_end`` exactly once: live when this
    process trains it, afterwards when it was trained by DDP workers, by an earlier
    interrupted run (resumed here), or by a finished run (reused here), so that a
    tracker shows the whole curve on every run.

    Args:
        cfg: the recipe.
        data: the fold's photos.
        out_dir: the model's folder (``best.pt``, ``last.pt``, ``config.json``, ``history.csv``).
        processes: more than 1 trains with DistributedDataParallel under torchrun.
        on_epoch_end: called with each epoch (1-based) and the metrics it measured (no
            NaN: an epoch that ``val_every`` leaves unvalidated reports no validation metrics).
        log: progress messages.
        val_progress: given an epoch, the progress callback of its validation (one process
            only: DDP workers report their epochs through ``log``).
    """
    out = Path(out_dir)
    reported: set[int] = set()

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        reported.add(epoch)

    if processes > 1:  # the workers run in their own processes: their epochs are reported below
        result = train_fold_distributed(cfg, data.train, data.val, data.num_classes, out, processes, log=log)
    else:
        result = train_fold(cfg, data.train, data.val, data.num_classes, out, on_epoch_end=report, log=log, val_progress=val_progress)
    for row in result.history:
        if row["epoch"] not in reported and on_epoch_end is not None:
            on_epoch_end(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)})
    config_path = write_json(out / "config.json", cfg.model_dump())
    history = pd.DataFrame(result.history)
    with atomic_path(out / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    return TrainedFold(result, history, curves_figure(history), config_path, out / "history.csv")
