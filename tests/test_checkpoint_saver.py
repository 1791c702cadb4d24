"""CheckpointSaver, FitProgress and the RNG state: what last.pt and best.pt hold, and how a run resumes from them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from whale_ml.stage_configs import TrainConfig
from whale_ml.training.checkpoint_saver import (
    CheckpointSaver,
    FitProgress,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

CFG = TrainConfig(backbone="test_resnet", image_size=32, embedding_size=16, device="cpu", epochs=3)


def _draws() -> tuple[float, float, float]:
    return float(torch.rand(1)), float(np.random.rand()), random.random()


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draws()  # a state partway along each stream, not a fresh seed
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = _draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_fit_progress_counts_gains_and_runs_out_of_patience() -> None:
    p = FitProgress()
    assert p.observe(1, 0.5, 0.7) and (p.best_epoch, p.best_map5, p.best_threshold, p.stale) == (1, 0.5, 0.7, 0)
    assert not p.observe(2, 0.4, 0.6) and p.stale == 1
    assert not p.observe(3, 0.5, 0.6), "a tie is no gain"
    assert (p.stale, p.stopped(2), p.stopped(3), p.stopped(0)) == (2, True, False, False)
    assert p.observe(4, 0.6, 0.5) and (p.best_epoch, p.best_map5, p.best_threshold, p.stale) == (4, 0.6, 0.5, 0)
    # Without a score every epoch counts as a gain (the last one is kept), the best score stays.
    assert p.observe(5, None, None) and (p.best_epoch, p.best_map5, p.stale) == (5, 0.6, 0)


def test_a_skipped_validation_neither_gains_nor_uses_up_patience() -> None:
    """val_every > 1: NaN marks an epoch without validation; patience counts validations."""
    p = FitProgress()
    assert p.observe(2, 0.5, 0.7)
    assert not p.observe(3, float("nan"), float("nan")) and (p.best_epoch, p.best_map5, p.stale) == (2, 0.5, 0)
    assert not p.observe(4, 0.4, 0.6) and p.stale == 1
    assert not p.observe(5, float("nan"), float("nan")) and p.stale == 1 and not p.stopped(2)
    assert not p.observe(6, 0.5, 0.6) and p.stopped(2) and (p.best_epoch, p.best_threshold) == (2, 0.7)


def _modules(seed: int) -> dict:
    torch.manual_seed(seed)
    model, loss = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2, bias=False)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return {"model": model, "loss": loss, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}


def _one_epoch(modules: dict) -> None:
    modules["loss"](modules["model"](torch.randn(4, 3))).pow(2).mean().backward()
    modules["optimizer"].step()
    modules["scheduler"].step()


def test_saver_writes_both_layouts_and_a_new_run_resumes_the_same_state(tmp_path: Path) -> None:
    modules = _modules(0)
    _one_epoch(modules)
    saver = CheckpointSaver(tmp_path, CFG, 7, "data-digest", modules, extra={"species": ["a", "b"]})
    progress = FitProgress()
    progress.observe(1, 0.25, 0.9)
    progress.epoch, progress.history = 1, [{"epoch": 1, "train_loss": 2.0}]
    saver.save(progress, improved=True)
    after_save = _draws()

    best = load_checkpoint(tmp_path / "best.pt")
    assert list(best) == ["model", "config", "num_classes", "epoch", "val_map5", "threshold"]
    assert (best["config"], best["num_classes"], best["epoch"], best["val_map5"], best["threshold"]) == (CFG.model_dump(), 7, 1, 0.25, 0.9)
    last = load_checkpoint(tmp_path / "last.pt")
    assert list(last) == [
        "model", "loss", "species", "optimizer", "scheduler", "scaler", "rng", "config", "num_classes", "data",
        "epoch", "best_map5", "best_epoch", "best_threshold", "stale", "history",
    ]

    fresh = _modules(1)  # another initialisation, as a new process would build
    messages: list[str] = []
    resumed = CheckpointSaver(tmp_path, CFG, 7, "data-digest", fresh).resume(3, 0, "cpu", messages.append)
    assert resumed == progress
    assert messages == [f"resuming from {tmp_path / 'last.pt'} after epoch 1"]
    for key in ("model", "loss"):
        for a, b in zip(fresh[key].state_dict().values(), modules[key].state_dict().values()):
            assert torch.equal(a, b)
    assert fresh["optimizer"].state_dict()["state"][0]["step"] == 1 and fresh["scheduler"].last_epoch == 1
    assert _draws() == after_save, "the RNGs continue from where the checkpoint was written"


def test_saver_does_not_resume_a_finished_foreign_or_incomplete_checkpoint(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path, CFG, 7, "data-digest", _modules(0))
    messages: list[str] = []
    assert saver.resume(3, 0, "cpu", messages.append) == FitProgress() and messages == [], "no checkpoint yet"
    progress = FitProgress(epoch=3, best_epoch=3, history=[{"epoch": e} for e in (1, 2, 3)])
    saver.save(progress, improved=False)
    assert not (tmp_path / "best.pt").exists(), "best.pt only when an epoch improves"

    assert saver.resume(3, 0, "cpu", messages.append) == progress
    assert "already trained" in messages[-1]
    other = CFG.model_copy(update={"embedding_size": 8})
    for recipe, data in ((other, "data-digest"), (CFG, "other-digest")):
        assert CheckpointSaver(tmp_path, recipe, 7, data, _modules(0)).resume(3, 0, "cpu", messages.append) == FitProgress()
        assert messages[-1].endswith("was made with another recipe or other data; starting afresh")
    # A layout without a state this run needs (an older one) is not half-resumed.
    with_sampler = {**_modules(0), "sampler": torch.nn.Linear(1, 1)}
    assert CheckpointSaver(tmp_path, CFG, 7, "data-digest", with_sampler).resume(3, 0, "cpu", messages.append) == FitProgress()
    assert messages[-1].endswith("has no sampler state to resume from; starting afresh")


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path: Path) -> None:
    """last.pt written before val_every and val_sample were settings: the run validated every
    epoch on all photos, which is what their defaults do, so it resumes (and is not retrained)."""
    CheckpointSaver(tmp_path, CFG, 7, "d", _modules(0)).save(FitProgress(epoch=1), improved=True)
    last = load_checkpoint(tmp_path / "last.pt")
    last["config"] = {k: v for k, v in last["config"].items() if k not in ("val_every", "val_sample")}
    save_checkpoint(tmp_path / "last.pt", last)
    messages: list[str] = []
    assert CheckpointSaver(tmp_path, CFG, 7, "d", _modules(1)).resume(3, 0, "cpu", messages.append).epoch == 1
    assert messages == [f"resuming from {tmp_path / 'last.pt'} after epoch 1"]
    other = CFG.model_copy(update={"val_every": 2})
    assert CheckpointSaver(tmp_path, other, 7, "d", _modules(1)).resume(3, 0, "cpu", messages.append) == FitProgress()
    last["config"] = {**last["config"], "epochs": "many"}  # a recipe today's settings cannot read
    save_checkpoint(tmp_path / "last.pt", last)
    assert CheckpointSaver(tmp_path, CFG, 7, "d", _modules(1)).resume(3, 0, "cpu", messages.append) == FitProgress()


def test_a_saver_that_does_not_write_leaves_no_files(tmp_path: Path) -> None:
    """The DDP processes other than rank 0 resume, but never write."""
    saver = CheckpointSaver(tmp_path, CFG, 7, "d", _modules(0), write=False)
    saver.save(FitProgress(epoch=1), improved=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("patience", [1, 2])
def test_a_run_stopped_early_is_finished(tmp_path: Path, patience: int) -> None:
    saver = CheckpointSaver(tmp_path, CFG, 7, "d", _modules(0))
    saver.save(FitProgress(epoch=1, stale=1), improved=False)
    messages: list[str] = []
    saver.resume(3, patience, "cpu", messages.append)
    assert ("already trained" in messages[-1]) == (patience == 1)
