"""The pieces train_fold runs: build_training, build_train_loader, train_one_epoch and validate, on real tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.samplers import MPerClassSampler

from whale_ml.training.trainer import build_train_loader, build_training, seed_everything, train_one_epoch, validate

CPU = torch.device("cpu")


def test_build_training_sizes_the_schedule_in_optimiser_steps(fold, tiny_config) -> None:
    train, _, n_classes = fold
    cfg = tiny_config(epochs=2, accumulate=3, species_head=True)
    parts = build_training(cfg, train, n_classes, CPU, log=lambda _m: None)
    assert len(parts.loader) == len(train) // 4  # drop_last: BatchNorm needs whole batches
    assert parts.species_names == sorted(train["species"].unique())
    assert parts.loss_fn.W.shape[1] == n_classes and parts.species_fn is not None
    assert list(parts.checkpointed()) == ["model", "loss", "species_loss", "optimizer", "scheduler", "scaler"]
    # The cosine schedule's floor is reached at the last optimiser step of the run, not before.
    lr = parts.optimizer.param_groups[0]["lr"]
    steps = 2 * math.ceil(len(parts.loader) / 3)
    for _ in range(steps):
        parts.optimizer.step(), parts.scheduler.step()
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr)
    with pytest.raises(ValueError, match="species"):
        build_training(cfg, train.drop(columns="species"), n_classes, CPU)


def test_build_training_is_reproducible_from_the_seed(fold, tiny_config) -> None:
    train, _, n_classes = fold
    cfg = tiny_config()
    weights = []
    for _ in range(2):
        seed_everything(cfg.seed)
        weights.append(build_training(cfg, train, n_classes, CPU).loss_fn.W.detach().clone())
    assert torch.equal(*weights)


def test_train_loader_uses_the_m_per_class_sampler_only_when_batches_fit(fold, tiny_config) -> None:
    train, _, _ = fold
    messages: list[str] = []
    loader = build_train_loader(tiny_config(m_per_class=2), train, None, CPU, messages.append)
    assert isinstance(loader.sampler, MPerClassSampler) and messages == []
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(np.unique(labels.numpy(), return_counts=True)[1]) == [2, 2], "two photos each of two individuals"
    loader = build_train_loader(tiny_config(m_per_class=3), train, None, CPU, messages.append)
    assert not isinstance(loader.sampler, MPerClassSampler)
    assert messages == ["m-per-class sampler off: batch 4, m 3, " f"{train['label'].nunique()} individuals do not fit; shuffling instead"]


def test_m_per_class_sampler_order_is_checkpointed(fold, tiny_config) -> None:
    """The sampler reshuffles its own list of labels each epoch: that order is resume state."""
    train, _, n_classes = fold
    parts = build_training(tiny_config(m_per_class=2), train, n_classes, CPU, log=lambda _m: None)
    order = parts.checkpointed()["sampler"]
    list(parts.loader.sampler)  # one epoch's draw reorders it
    saved = order.state_dict()
    assert saved["labels"].tolist() == [int(x) for x in parts.loader.sampler.labels]
    list(parts.loader.sampler)
    order.load_state_dict(saved)
    assert [int(x) for x in parts.loader.sampler.labels] == saved["labels"].tolist()


@pytest.mark.parametrize("accumulate", [1, 3])
def test_train_one_epoch_steps_once_per_window_and_reports_the_mean_loss(fold, accumulate: int, tiny_config) -> None:
    train, _, n_classes = fold
    cfg = tiny_config(accumulate=accumulate)
    seed_everything(0)
    parts = build_training(cfg, train, n_classes, CPU)
    before = parts.model.fc.weight.detach().clone()
    losses: list[float] = []
    hook = parts.step.register_forward_hook(lambda _mod, _inp, out: losses.append(float(out.detach())))
    stats = train_one_epoch(1, parts.step, parts.loader, parts.optimizer, parts.scheduler, parts.scaler, CPU, accumulate)
    hook.remove()
    batches = len(parts.loader)
    assert stats.images == batches * cfg.batch_size and stats.seconds > 0
    assert stats.train_loss == pytest.approx(np.mean(losses))  # whole batches: the mean per image is the mean per batch
    assert parts.scheduler.last_epoch == math.ceil(batches / accumulate)  # the short last window steps too
    assert parts.optimizer.state_dict()["state"][0]["step"].item() == math.ceil(batches / accumulate)
    assert not torch.equal(before, parts.model.fc.weight)
    assert all(p.grad is None for p in parts.model.parameters()), "no gradient left over for the next epoch"


def test_validate_scores_a_gallery_against_itself_perfectly(fold, tiny_config) -> None:
    """Queries that are the gallery's own photos find themselves first: MAP@5 is 1 at a threshold below their similarity."""
    train, val, n_classes = fold
    cfg = tiny_config()
    seed_everything(0)
    model = build_training(cfg, train, n_classes, CPU).model
    gallery = train.drop_duplicates("individual_id").head(6)
    metrics = validate(model, cfg, gallery, gallery.assign(truth=gallery["individual_id"]), CPU)
    assert list(metrics) == ["val_map5", "val_threshold"]
    assert metrics["val_map5"] == pytest.approx(1.0)
    assert model.training, "embedded in eval mode, then handed back in the mode it came in"
    real = validate(model, cfg, train, val, CPU)
    assert 0.0 <= real["val_map5"] <= 1.0 and real == validate(model, cfg, train, val, CPU)
