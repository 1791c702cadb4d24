"""snapshot_checkpoint: the bytes hashed are the bytes loaded, even while the file is replaced."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from whale_ml.checkpoints import CheckpointError, load_weights_only, snapshot_checkpoint


def _save(path: Path, value: float) -> str:
    tmp = path.with_suffix(".tmp")
    torch.save({"w": torch.full((64,), value)}, tmp)
    os.replace(tmp, path)  # how training replaces best.pt: a rename, never an in-place write
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_snapshot_holds_the_bytes_of_its_hash_and_survives_the_original_being_replaced(tmp_path: Path) -> None:
    best, cache = tmp_path / "best.pt", tmp_path / "model_cache"
    sha_a = _save(best, 1.0)
    snap, sha = snapshot_checkpoint(best, cache)
    assert sha == sha_a and snap == cache / f"{sha_a}.pt"
    assert hashlib.sha256(snap.read_bytes()).hexdigest() == sha
    _save(best, 2.0)  # training writes a better checkpoint
    assert float(load_weights_only(snap)["w"][0]) == 1.0  # the snapshot still holds what was hashed
    again, same = snapshot_checkpoint(best, cache)
    assert same != sha and again != snap and snap.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{sha}.pt", f"{same}.pt"])  # no temp file left


def test_an_expected_hash_that_differs_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    best, cache = tmp_path / "best.pt", tmp_path / "model_cache"
    sha_a = _save(best, 1.0)
    _save(best, 2.0)
    with pytest.raises(CheckpointError, match=f"not the expected {sha_a[:12]}"):
        snapshot_checkpoint(best, cache, expected_sha256=sha_a)
    assert list(cache.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        snapshot_checkpoint(tmp_path / "missing.pt", cache)
