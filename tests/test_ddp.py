"""The same training under torchrun: 2 processes, DistributedDataParallel, gloo on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from whale_ml.threads import pipeline_threads
from whale_ml.training.launch import train_fold_distributed
from whale_ml.training.trainer import load_checkpoint, load_model


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(fold, tmp_path: Path, tiny_config) -> None:
    tr, val, n_classes = fold
    cfg = tiny_config(epochs=2, species_head=True)
    messages: list[str] = []
    result = train_fold_distributed(cfg, tr, val, n_classes, tmp_path / "model", processes=2, log=messages.append)

    text = "\n".join(messages)
    per_rank = len(tr) // 2 // cfg.batch_size  # each process trains on its half of the epoch
    assert f"DDP: 2 processes, {per_rank} batches of 4 each per epoch (gloo)" in text
    assert text.count("epoch 1/2") == 1, "rank 0 alone logs"
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [h["threads"] for h in result.history] == [max(1, pipeline_threads() // 2)] * 2, "the pipeline's threads shared out"
    assert result.best_map5 is not None and 0.0 <= result.best_map5 <= 1.0
    state = load_checkpoint(tmp_path / "model" / "last.pt")
    # Both processes' steps are in the schedule exactly once: optimiser steps per rank, not per process sum.
    assert state["scheduler"]["last_epoch"] == 2 * per_rank
    model, loaded_cfg = load_model(result.checkpoint)
    assert loaded_cfg == cfg
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 16)


@pytest.mark.slow
def test_ddp_worker_failure_is_reported_with_its_output(fold, tmp_path: Path, tiny_config) -> None:
    tr, val, _ = fold
    cfg = tiny_config(backbone="no_such_backbone_xyz", epochs=1)
    with pytest.raises(RuntimeError, match="distributed training failed") as err:
        train_fold_distributed(cfg, tr, val, 10, tmp_path / "model", processes=2, log=lambda _m: None)
    assert "no_such_backbone_xyz" in str(err.value)


def test_ddp_needs_two_processes(tmp_path: Path, tiny_config) -> None:
    import pandas as pd

    with pytest.raises(ValueError, match="at least 2"):
        train_fold_distributed(tiny_config(), pd.DataFrame(), pd.DataFrame(), 2, tmp_path, processes=1)
