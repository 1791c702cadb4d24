"""The ArcFace recipe: what it trains, how it steps, what it saves, and how it resumes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from whale_ml.models.embedding import GeM, create_embedding_model
from whale_ml.training.trainer import (
    create_loss,
    create_optimizer,
    load_checkpoint,
    load_class_centres,
    load_model,
    train_fold,
    warmup_cosine,
)


def test_one_optimiser_updates_backbone_head_and_class_centres(tiny_config) -> None:
    """The notebook built its head and loss optimisers over the trunk: heads never trained."""
    cfg = tiny_config()
    model, loss = create_embedding_model(cfg), create_loss(cfg, num_classes=3)
    opt = create_optimizer(cfg, model, loss)
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):  # two steps: timm zero-inits each block's last BN, so its branch gets gradient from step 2
        opt.zero_grad()
        loss(model(images), labels).backward()
        opt.step()
    after = dict([*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())])
    unchanged = [n for n, p in after.items() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert "loss.W" in after and "pool.p" in after and "fc.weight" in after
    assert unchanged == []
    # Each parameter sits in exactly one group, with the head group at the head learning rate.
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(after)
    assert [g["lr"] for g in opt.param_groups] == [cfg.lr_backbone, cfg.lr_head]


def test_arcface_margin_is_given_to_the_library_in_degrees(tiny_config) -> None:
    loss = create_loss(tiny_config(margin=0.5, scale=20.0), num_classes=5)
    # The library takes degrees and keeps radians: our radians must come back unchanged.
    assert loss.margin == pytest.approx(0.5)
    assert loss.scale == 20.0
    sub = create_loss(tiny_config(sub_centers=2), num_classes=5)
    assert type(sub).__name__ == "SubCenterArcFaceLoss"


def test_gem_matches_its_formula() -> None:
    x = torch.rand(2, 3, 4, 4) + 0.1
    expected = x.pow(3.0).mean(dim=(2, 3)).pow(1 / 3.0)
    assert torch.allclose(GeM(3.0)(x), expected, atol=1e-6)


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(total_steps=10, warmup_steps=2, floor=0.0)
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(2, 10))


def test_schedule_steps_once_per_optimiser_step_with_a_short_last_window(fold, tmp_path: Path, tiny_config) -> None:
    """The notebook sized its schedule per batch but stepped it per accumulated step."""
    train, val, n_classes = fold
    batches = len(train) // 2  # batch 2, drop_last
    accumulate = next(a for a in (4, 3, 5) if batches % a)  # so that the last window is short
    cfg = tiny_config(batch_size=2, epochs=2, accumulate=accumulate)
    train_fold(cfg, train, val.iloc[:0], n_classes, tmp_path, log=lambda _m: None)
    per_epoch = -(-batches // accumulate)  # the last, shorter window also steps
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["scheduler"]["last_epoch"] == 2 * per_epoch
    assert state["optimizer"]["state"][0]["step"].item() == 2 * per_epoch


def test_training_logs_epochs_and_saves_a_loadable_best_model(fold, tmp_path: Path, tiny_config) -> None:
    train, val, n_classes = fold
    seen: list[tuple[int, dict]] = []
    result = train_fold(
        tiny_config(epochs=2), train, val, n_classes, tmp_path, on_epoch_end=lambda e, m: seen.append((e, m)), log=lambda _m: None
    )
    assert [e for e, _ in seen] == [1, 2]
    assert {"train_loss", "val_map5", "val_threshold", "images_per_second", "lr_backbone", "lr_head"} <= set(seen[0][1])
    assert result.best_map5 == max(m["val_map5"] for _, m in seen)
    model, cfg = load_model(result.checkpoint)
    assert cfg.backbone == "test_resnet" and not model.training
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    # best.pt keeps the class centres of the fold's training individuals (the others' rows never had a photo).
    centres = load_class_centres(result.checkpoint)
    assert centres is not None and sorted(centres.ids) == sorted(train["individual_id"].unique())
    assert centres.vectors.shape == (train["individual_id"].nunique(), 1, 16)
    assert np.allclose(np.linalg.norm(centres.vectors, axis=2), 1.0, atol=1e-5)
    if result.best_epoch == 2:  # then last.pt's loss state is the same epoch's: the centres are its W's columns
        w = load_checkpoint(tmp_path / "last.pt")["loss"]["W"].numpy()
        labels = train.drop_duplicates("individual_id").set_index("individual_id")["label"]
        expected = w[:, labels[centres.ids].to_numpy()].T
        assert np.allclose(centres.vectors[:, 0], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def test_init_weights_start_training_from_a_fold_model(fold, tmp_path: Path, tiny_config) -> None:
    """A warm start (the pseudo-label round's): the first epoch begins at the given best.pt's
    weights -- with no learning rate to move them, the result keeps them exactly -- and a
    model of another shape or a missing file is a clear error naming it."""
    train, val, n_classes = fold
    first = train_fold(tiny_config(epochs=1), train, val, n_classes, tmp_path / "first", log=lambda _m: None)
    start = load_checkpoint(first.checkpoint)["model"]
    logged: list[str] = []
    still = tiny_config(lr_backbone=1e-30, lr_head=1e-30, weight_decay=0.0, epochs=1, init_weights=str(first.checkpoint))
    again = train_fold(still, train, val, n_classes, tmp_path / "second", log=logged.append)
    assert any("started from the weights of" in m for m in logged)
    after = load_checkpoint(again.checkpoint)["model"]
    for name, tensor in start.items():
        if tensor.is_floating_point() and "running" not in name:  # BatchNorm's running statistics move without a learning rate
            assert torch.allclose(tensor, after[name], atol=1e-6), name
    with pytest.raises(ValueError, match="does not fit this recipe's model"):
        wider = tiny_config(embedding_size=8, epochs=1, init_weights=str(first.checkpoint))
        train_fold(wider, train, val, n_classes, tmp_path / "third", log=lambda _m: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.pt"):
        train_fold(tiny_config(epochs=1, init_weights=str(tmp_path / "missing.pt")), train, val, n_classes, tmp_path / "fourth")


def test_resume_continues_after_the_last_complete_epoch(fold, tmp_path: Path, tiny_config) -> None:
    train, val, n_classes = fold
    cfg = tiny_config(epochs=3)

    class Interrupted(Exception):
        pass

    def crash_after_two(epoch: int, _metrics: dict) -> None:
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_fold(cfg, train, val, n_classes, tmp_path, on_epoch_end=crash_after_two, log=lambda _m: None)
    messages: list[str] = []
    epochs: list[int] = []
    result = train_fold(cfg, train, val, n_classes, tmp_path, on_epoch_end=lambda e, _m: epochs.append(e), log=messages.append)
    assert epochs == [3]
    assert any("resuming" in m and "after epoch 2" in m for m in messages)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_a_checkpoint_from_another_recipe_or_other_data_is_not_resumed(fold, tmp_path: Path, tiny_config) -> None:
    train, val, n_classes = fold
    train_fold(tiny_config(epochs=1), train, val, n_classes, tmp_path, log=lambda _m: None)
    messages: list[str] = []
    result = train_fold(tiny_config(embedding_size=8, epochs=1), train, val, n_classes, tmp_path, log=messages.append)
    assert any("starting afresh" in m for m in messages)
    assert result.epochs_run == 1
    # Same recipe, one photo fewer: the fold's data changed, so no resume either.
    messages.clear()
    train_fold(tiny_config(embedding_size=8, epochs=1), train.iloc[1:], val, n_classes, tmp_path, log=messages.append)
    assert any("starting afresh" in m for m in messages)


def test_a_finished_run_is_reused_not_retrained(fold, tmp_path: Path, tiny_config) -> None:
    train, val, n_classes = fold
    cfg = tiny_config(epochs=1)
    first = train_fold(cfg, train, val, n_classes, tmp_path, log=lambda _m: None)
    messages: list[str] = []
    epochs: list[int] = []
    again = train_fold(cfg, train, val, n_classes, tmp_path, on_epoch_end=lambda e, _m: epochs.append(e), log=messages.append)
    assert epochs == [] and any("already trained" in m for m in messages)
    assert again.best_map5 == first.best_map5 and again.checkpoint == first.checkpoint


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    """Checkpoints load with weights_only: a pickled object is not executed."""

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "best.pt"
    bad.write_bytes(pickle.dumps({"model": Exploit()}))
    with pytest.raises(RuntimeError, match="best.pt"):
        load_checkpoint(bad)


class _Interrupted(Exception):
    pass


def _same(a: object, b: object, where: str = "") -> None:
    """Checkpoint contents equal to the bit: tensors by value and dtype, containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"m_per_class": 2, "species_head": True, "accumulate": 2, "augment": "autoaugment"},  # numpy-drawn batches, two heads
        {"num_workers": 1},  # augmentation drawn in a worker process
    ],
    ids=["shuffle", "m_per_class_species_accumulate", "worker"],
)
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(fold, tmp_path: Path, recipe: dict, tiny_config) -> None:
    """Stopped after epoch 1 and resumed, a run trains epochs 2-3 on the same batches with the same
    augmentations as if it had never stopped: the RNG states restored from last.pt in effect."""
    train, val, n_classes = fold
    cfg = tiny_config(**recipe, epochs=3)
    straight = train_fold(cfg, train, val, n_classes, tmp_path / "straight", log=lambda _m: None)

    def stop_after_one(epoch: int, _metrics: dict) -> None:
        if epoch == 1:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train_fold(cfg, train, val, n_classes, tmp_path / "resumed", on_epoch_end=stop_after_one, log=lambda _m: None)
    torch.manual_seed(12345)  # whatever state the next process starts in
    messages: list[str] = []
    resumed = train_fold(cfg, train, val, n_classes, tmp_path / "resumed", log=messages.append)
    assert any("after epoch 1" in m for m in messages)

    timing = "images_per_second"  # the one metric that is not a function of the data and the seed
    assert [{k: v for k, v in h.items() if k != timing} for h in resumed.history] == [
        {k: v for k, v in h.items() if k != timing} for h in straight.history
    ]
    assert (resumed.best_epoch, resumed.best_map5, resumed.threshold) == (straight.best_epoch, straight.best_map5, straight.threshold)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(tmp_path / "resumed" / name)
        a.pop("history", None), b.pop("history", None)
        _same(a, b, name)
