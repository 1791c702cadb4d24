"""The two checkpoints of a fold model, and resuming an interrupted run from them.

``last.pt`` holds everything a run needs to go on as if it had never stopped:
module, optimiser, scheduler and scaler states, the RNG states of torch, numpy
and Python, and the run's progress (epoch, best so far, patience count,
history). ``best.pt`` holds what later stages load: the weights of the best
epoch with its recipe and validation score, and the ArcFace class centres of the
individuals it trained on (``class_centres``, for class-centre scores at search time). Both are written atomically, so a
kill leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from whale_ml.checkpoints import load_weights_only
from whale_ml.retrieval.centres import CHECKPOINT_KEY as CENTRES_KEY
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.stage_configs import TrainConfig
from whale_ml.io import atomic_path

LAST, BEST = "last.pt", "best.pt"


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, numpy, Python, and CUDA when present), as tensors and lists.

    Stored as plain tensors and lists rather than the libraries' own objects so that the
    checkpoint loads with ``weights_only`` (no unpickling of arbitrary objects).
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save``, atomically (a temp file renamed into place)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only``).

    Raises:
        CheckpointError: a tampered, foreign or truncated file, named, with the reason.
    """
    return load_weights_only(path, map_location)


@dataclass
class FitProgress:
    """Where a run stands after its last complete epoch: the part of ``last.pt`` besides module states.

    Attributes:
        epoch: the last complete epoch (0 before the first).
        best_map5: the best validation MAP@5 so far (None without validation).
        best_epoch: the epoch ``best.pt`` holds.
        best_threshold: the new_individual threshold tuned at the best epoch.
        stale: validations since the last gain, for early stopping (epochs without
            validation, when ``val_every`` skips them, do not count).
        history: one row of metrics per epoch, ``epoch`` first.
    """

    epoch: int = 0
    best_map5: float | None = None
    best_epoch: int = 0
    best_threshold: float | None = None
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def observe(self, epoch: int, map5: float | None, threshold: float | None) -> bool:
        """Count an epoch's validation score; True when it is the best so far.

        Without a score (no validation set, or a process that does not validate) every
        epoch counts as a gain, so the last epoch is the one kept and patience never runs out.
        A NaN score is a validation skipped (``val_every``): the epoch neither gains nor
        uses up patience, so ``best.pt`` is only ever a validated epoch.
        """
        if map5 is not None and math.isnan(map5):
            return False
        improved = map5 is None or self.best_map5 is None or map5 > self.best_map5
        if improved and map5 is not None:
            self.best_map5, self.best_threshold = map5, threshold
        if improved:
            self.best_epoch, self.stale = epoch, 0
        else:
            self.stale += 1
        return improved

    def stopped(self, patience: int) -> bool:
        """True once ``patience`` validations in a row brought no gain (0: never)."""
        return bool(patience and self.stale >= patience)


class CheckpointSaver:
    """Owns ``out_dir/last.pt`` (resume state) and ``out_dir/best.pt`` (the model) of one run.

    Args:
        out_dir: the run's folder.
        cfg: the recipe; a checkpoint made with another recipe is not resumed.
        num_classes: size of the ArcFace head, saved for loading.
        fingerprint: :func:`~whale_ml.training.trainer.data_fingerprint` of the fold's data;
            a checkpoint made on other data is not resumed.
        modules: the stateful parts (anything with ``state_dict``/``load_state_dict``) by
            checkpoint key: ``model``, ``loss``, optionally ``species_loss`` and ``sampler``,
            ``optimizer``, ``scheduler``, ``scaler``.
        extra: other values saved in ``last.pt`` (e.g. the species names of the species head).
        write: False on the processes of a DDP run other than rank 0, which only resume.
        centres: called at each ``best.pt``: the ArcFace class centres of the individuals
            trained on, with their ids (:class:`~whale_ml.retrieval.centres.ClassCentres`),
            kept for class-centre scores at search time. Older ``best.pt`` files lack them.
    """

    def __init__(
        self,
        out_dir: Path,
        cfg: TrainConfig,
        num_classes: int,
        fingerprint: str,
        modules: dict[str, Any],
        extra: dict[str, Any] | None = None,
        write: bool = True,
        centres: Callable[[], ClassCentres] | None = None,
    ) -> None:
        self.last_path, self.best_path = out_dir / LAST, out_dir / BEST
        self.config = cfg.model_dump()
        self.num_classes, self.fingerprint = num_classes, fingerprint
        self.modules, self.extra, self.write = modules, extra or {}, write
        self.centres = centres

    def _same_recipe(self, saved: Any) -> bool:
        """True when a checkpoint's recipe is this run's, read as today's TrainConfig.

        A setting added since the checkpoint was written takes its default, which by this
        project's rule is what runs did before the setting existed (``val_every: 1`` is
        validating every epoch): a run interrupted or finished before an upgrade resumes
        or is reused instead of training again from scratch.
        """
        try:
            return TrainConfig(**saved).model_dump() == self.config
        except (TypeError, ValidationError):
            return False

    def resume(self, epochs: int, patience: int, map_location: str | torch.device, log: Callable[[str], None]) -> FitProgress:
        """Load ``last.pt`` into the modules and the RNGs when it was made by this recipe on this data.

        Returns:
            The run's progress: fresh when there is no resumable checkpoint.
        """
        if not self.last_path.exists():
            return FitProgress()
        ckpt = load_checkpoint(self.last_path, map_location=map_location)
        if not (self._same_recipe(ckpt.get("config")) and ckpt.get("num_classes") == self.num_classes and ckpt.get("data") == self.fingerprint):
            log(f"{self.last_path} was made with another recipe or other data; starting afresh")
            return FitProgress()
        missing = [key for key in self.modules if key not in ckpt]
        if missing:  # an older layout, which did not save all a resume needs
            log(f"{self.last_path} has no {', '.join(missing)} state to resume from; starting afresh")
            return FitProgress()
        for key, module in self.modules.items():
            module.load_state_dict(ckpt[key])
        set_rng_state(ckpt["rng"])
        progress = FitProgress(
            epoch=int(ckpt["epoch"]),
            best_map5=ckpt["best_map5"],
            best_epoch=int(ckpt["best_epoch"]),
            best_threshold=ckpt["best_threshold"],
            stale=int(ckpt["stale"]),
            history=list(ckpt["history"]),
        )
        if progress.epoch + 1 > epochs or progress.stopped(patience):  # a finished run
            log(f"{self.last_path}: already trained with this recipe on this data ({progress.epoch} epochs); reusing {self.best_path}")
        else:
            log(f"resuming from {self.last_path} after epoch {progress.epoch}")
        return progress

    def save(self, progress: FitProgress, improved: bool) -> None:
        """Checkpoint the epoch ``progress`` has just recorded: ``best.pt`` when it improved, then ``last.pt``.

        ``best.pt`` goes first: a kill between the two leaves ``last.pt`` one epoch behind,
        and the resumed run trains that epoch again and rewrites both.
        """
        if not self.write:
            return
        model = self.modules["model"]
        if improved:
            save_checkpoint(
                self.best_path,
                {
                    "model": model.state_dict(),
                    "config": self.config,
                    "num_classes": self.num_classes,
                    "epoch": progress.epoch,
                    "val_map5": progress.best_map5,
                    "threshold": progress.best_threshold,
                    **({CENTRES_KEY: self.centres().to_checkpoint()} if self.centres is not None else {}),
                },
            )
        states = {key: module.state_dict() for key, module in self.modules.items() if key not in ("optimizer", "scheduler", "scaler")}
        save_checkpoint(
            self.last_path,
            {
                **states,
                **self.extra,
                "optimizer": self.modules["optimizer"].state_dict(),
                "scheduler": self.modules["scheduler"].state_dict(),
                "scaler": self.modules["scaler"].state_dict(),
                "rng": rng_state(),
                "config": self.config,
                "num_classes": self.num_classes,
                "data": self.fingerprint,
                "epoch": progress.epoch,
                "best_map5": progress.best_map5,
                "best_epoch": progress.best_epoch,
                "best_threshold": progress.best_threshold,
                "stale": progress.stale,
                "history": progress.history,
            },
        )
