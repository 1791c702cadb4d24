"""What validation measures during training, and when: ``val_every`` and ``val_sample``
(whale_ml/training/validation.py), with early stopping, best.pt and resume around them."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.stage_configs import TrainConfig
from whale_ml.training.trainer import build_training, load_checkpoint, seed_everything, train_fold
from whale_ml.training.validation import validate, validation_due, validation_set

QUIET = {"log": lambda _m: None}


def _without_timing(history: list[dict[str, float]]) -> pd.DataFrame:
    return pd.DataFrame(history).drop(columns="images_per_second")


def test_validation_is_due_every_n_epochs_and_after_the_last() -> None:
    assert [e for e in range(1, 8) if validation_due(e, TrainConfig(epochs=7, val_every=3))] == [3, 6, 7]
    assert [e for e in range(1, 5) if validation_due(e, TrainConfig(epochs=4))] == [1, 2, 3, 4]
    assert [e for e in range(1, 4) if validation_due(e, TrainConfig(epochs=3, val_every=10))] == [3]


def test_val_every_skips_epochs_without_changing_the_training(fold, tmp_path: Path, tiny_config) -> None:
    """Every second epoch and the last are validated; the others keep a history row with NaN
    validation metrics, report none to the callback, and cannot become best.pt. Training
    itself is the run with val_every 1's, loss for loss, and so is every score it measures."""
    train, val, n_classes = fold
    every = train_fold(tiny_config(epochs=5), train, val, n_classes, tmp_path / "every", **QUIET)
    reported: dict[int, dict[str, float]] = {}
    result = train_fold(
        tiny_config(epochs=5, val_every=2), train, val, n_classes, tmp_path / "second",
        on_epoch_end=lambda e, m: reported.update({e: m}), **QUIET,
    )
    history = _without_timing(result.history)
    reference = _without_timing(every.history)
    validated = [2, 4, 5]
    assert history["epoch"][history["val_map5"].notna()].tolist() == validated
    assert history[["val_map5", "val_threshold"]][~history["epoch"].isin(validated)].isna().all().all()
    assert [e for e, m in reported.items() if "val_map5" in m] == validated and list(reported) == [1, 2, 3, 4, 5]
    pd.testing.assert_frame_equal(history.drop(columns=["val_map5", "val_threshold"]), reference.drop(columns=["val_map5", "val_threshold"]))
    pd.testing.assert_frame_equal(history[history["epoch"].isin(validated)], reference[reference["epoch"].isin(validated)])
    # The kept epoch: the first best among the validated ones.
    scores = reference.set_index("epoch")["val_map5"].loc[validated]
    assert result.best_epoch == scores.idxmax() and result.best_map5 == scores.max()
    best = load_checkpoint(tmp_path / "second" / "best.pt")
    assert best["epoch"] == result.best_epoch and best["val_map5"] == result.best_map5


def test_a_resumed_run_with_val_every_ends_where_an_uninterrupted_one_does(fold, tmp_path: Path, tiny_config) -> None:
    """Stopped after an epoch that was not validated and resumed: the same history (NaN where
    it was), the same best epoch, the same weights in best.pt and last.pt."""
    train, val, n_classes = fold
    cfg = tiny_config(epochs=4, val_every=2, val_sample=6)
    straight = train_fold(cfg, train, val, n_classes, tmp_path / "straight", **QUIET)

    class Interrupted(Exception):
        pass

    def stop_after(epoch: int, _metrics: dict) -> None:
        if epoch == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_fold(cfg, train, val, n_classes, tmp_path / "resumed", on_epoch_end=stop_after, **QUIET)
    torch.manual_seed(12345)
    messages: list[str] = []
    resumed = train_fold(cfg, train, val, n_classes, tmp_path / "resumed", log=messages.append)
    assert any("after epoch 3" in m for m in messages)
    pd.testing.assert_frame_equal(_without_timing(resumed.history), _without_timing(straight.history))
    assert math.isnan(resumed.history[2]["val_map5"])
    assert (resumed.best_epoch, resumed.best_map5, resumed.threshold) == (straight.best_epoch, straight.best_map5, straight.threshold)
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(tmp_path / "resumed" / name)
        assert a["epoch"] == b["epoch"] and a.get("stale") == b.get("stale")
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)


def test_the_sample_is_fixed_by_the_seed_and_keeps_every_photo_of_its_individuals(fold) -> None:
    train, val, _ = fold
    sample = validation_set(train, val, 6, seed=0)
    assert sample.sampled and len(sample.queries) == 6 and set(sample.queries["path"]) <= set(val["path"])
    again = validation_set(train.iloc[::-1], val.sample(frac=1.0, random_state=3), 6, seed=0)
    assert set(again.queries["path"]) == set(sample.queries["path"]), "the row order does not change the draw"
    assert set(again.gallery["path"]) == set(sample.gallery["path"])
    known = set(sample.queries["truth"]) - {NEW_INDIVIDUAL}
    theirs = train[train["individual_id"].isin(known)]
    assert set(theirs["path"]) <= set(sample.gallery["path"]), "a known individual stays known"
    assert len(sample.gallery) == max(len(theirs), round(len(train) * 6 / len(val)))
    draws = {frozenset(validation_set(train, val, 6, seed).queries["path"]) for seed in range(5)}
    assert len(draws) > 1, "another seed, another sample"
    whole = validation_set(train, val, 0, seed=0)
    assert not whole.sampled and whole.gallery is train and whole.queries is val
    assert validation_set(train, val, len(val), seed=0).queries is val


def test_a_sampled_run_validates_the_same_photos_every_time(fold, tmp_path: Path, tiny_config) -> None:
    """Each validation reports its progress to the end, over the sample's gallery and
    queries: the same count at every validated epoch, and only at those."""
    train, val, n_classes = fold
    cfg = tiny_config(epochs=3, val_every=2, val_sample=6)
    sample = validation_set(train, val, cfg.val_sample, cfg.seed)
    calls: dict[int, list[tuple[int, int]]] = {}

    def progress_of(epoch: int):
        calls[epoch] = []
        return lambda done, total: calls[epoch].append((done, total))

    messages: list[str] = []
    train_fold(cfg, train, val, n_classes, tmp_path, log=messages.append, val_progress=progress_of)
    size = len(sample.gallery) + len(sample.queries)
    assert list(calls) == [2, 3]
    for seen in calls.values():
        assert seen[-1] == (size, size) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert f"a fixed sample: 6 validation photos against {len(sample.gallery)} training photos" in "\n".join(messages)


def test_validate_reports_progress_over_gallery_and_queries(fold, tiny_config) -> None:
    train, val, n_classes = fold
    cfg = tiny_config()
    seed_everything(0)
    model = build_training(cfg, train, n_classes, torch.device("cpu")).model
    seen: list[tuple[int, int]] = []
    validate(model, cfg, train, val, torch.device("cpu"), batch_size=4, progress=lambda d, t: seen.append((d, t)))
    total = len(train) + len(val)
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and (len(train), total) in seen
