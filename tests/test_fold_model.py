"""One fold's model from the fold table: the split it trains on, the files it leaves, the epochs it reports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from whale_ml.data.folds import make_folds
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_train_metadata
from whale_ml.threads import pipeline_threads
from whale_ml.training.fold_model import FoldData, curves_figure, recipe_version, train_fold_model


@pytest.fixture(scope="module")
def folds(tiny_data: Path) -> pd.DataFrame:
    """The tiny set's folds, with the full photos standing in for the crops."""
    train = read_train_metadata(tiny_data)
    return make_folds(train, 2, 0.2, 0).assign(crop_path=lambda f: f["path"])


def test_fold_data_trains_on_the_crops_with_a_head_for_every_individual(folds: pd.DataFrame) -> None:
    data = FoldData.from_folds(folds.assign(path="the full photo"), 1)
    assert (data.train["path"] == data.train["crop_path"]).all() and (data.val["path"] == data.val["crop_path"]).all()
    assert set(data.train["fold"]) == set(folds["fold"]) - {1} and set(data.val["fold"]) == {1}
    assert data.num_classes == folds["label"].max() + 1 > data.train["label"].nunique()
    assert set(data.val["truth"]) - set(data.train["individual_id"]) == {NEW_INDIVIDUAL}
    sizes = {"num_classes": data.num_classes, "train_images": len(data.train), "val_images": len(data.val)}
    assert data.params() == {**sizes, "threads": pipeline_threads()}
    assert data.describe() == (
        f"{len(data.train)} training photos of {data.train['individual_id'].nunique()} individuals, {len(data.val)} validation photos"
    )


def test_data_version_follows_the_photos_not_the_row_order(folds: pd.DataFrame) -> None:
    data = FoldData.from_folds(folds, 0)
    assert len(data.version) == 12
    assert FoldData.from_folds(folds.iloc[::-1], 0).version == data.version
    assert FoldData.from_folds(folds.iloc[1:], 0).version != data.version


def test_data_set_digests_follow_the_photos_and_their_crops_not_the_row_order_or_the_home(folds: pd.DataFrame) -> None:
    data = FoldData.from_folds(folds, 0)
    sets = data.datasets()
    assert set(sets) == {"training", "validation"}
    for use, rows in (("training", data.train), ("validation", data.val)):
        table, digest = sets[use]
        assert len(digest) == 12 and len(table) == len(rows)
        assert list(table.columns) == ["image", "individual_id", "species", "crop"] + (["truth"] if use == "validation" else [])
        assert table["crop"].tolist() == sorted(Path(p).name for p in rows["crop_path"])  # sorted by image = by file here
    assert sets["training"][1] != sets["validation"][1]
    moved = folds.assign(crop_path=[str(Path("/elsewhere/crops") / Path(p).name) for p in folds["crop_path"]])
    assert {u: d for u, (_, d) in FoldData.from_folds(moved.iloc[::-1], 0).datasets().items()} == {u: d for u, (_, d) in sets.items()}
    recut = folds.copy()
    recut.loc[recut.index[recut["fold"] == 0][0], "crop_path"] = "/crops/another_cut.jpg"
    assert FoldData.from_folds(recut, 0).datasets()["validation"][1] != sets["validation"][1]
    assert FoldData.from_folds(recut, 0).datasets()["training"][1] == sets["training"][1]


def test_recipe_version_is_a_digest_of_the_sorted_settings(tiny_config) -> None:
    cfg = tiny_config()
    assert recipe_version(cfg) == hashlib.sha1(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    assert recipe_version(tiny_config()) == recipe_version(cfg)
    assert recipe_version(tiny_config(margin=0.4)) != recipe_version(cfg)


def test_curves_figure_draws_loss_and_validation_when_there_is_one() -> None:
    import matplotlib.pyplot as plt

    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.5], "val_map5": [0.2, 0.4, 0.3]})
    fig = curves_figure(history)
    loss_axis, map_axis = fig.axes
    assert list(loss_axis.lines[0].get_ydata()) == [3.0, 2.0, 1.5] and list(map_axis.lines[0].get_ydata()) == [0.2, 0.4, 0.3]
    plt.close(fig)
    fig = curves_figure(history.drop(columns="val_map5"))
    assert len(fig.axes) == 1
    plt.close(fig)


def test_train_fold_model_writes_recipe_and_curves_and_reports_every_epoch_once(folds: pd.DataFrame, tmp_path: Path, tiny_config) -> None:
    data = FoldData.from_folds(folds, 0)
    cfg = tiny_config(epochs=2)
    live: list[tuple[int, dict]] = []
    trained = train_fold_model(cfg, data, tmp_path, on_epoch_end=lambda e, m: live.append((e, m)), log=lambda _m: None)

    assert [e for e, _ in live] == [1, 2]
    assert json.loads(trained.config_path.read_text()) == json.loads(json.dumps(cfg.model_dump()))
    assert trained.config_path == tmp_path / "config.json" and trained.history_path == tmp_path / "history.csv"
    pd.testing.assert_frame_equal(pd.read_csv(trained.history_path), trained.history)
    assert trained.history.to_dict("records") == trained.result.history
    assert len(trained.curves.axes) == 2
    # A finished run is reused, not retrained: its epochs are reported all the same, with the metrics they had.
    replayed: list[tuple[int, dict]] = []
    again = train_fold_model(cfg, data, tmp_path, on_epoch_end=lambda e, m: replayed.append((e, m)), log=lambda _m: None)
    assert replayed == live and again.result.checkpoint == trained.result.checkpoint


def test_a_resumed_fold_reports_the_epochs_of_the_interrupted_run_too(folds: pd.DataFrame, tmp_path: Path, tiny_config) -> None:
    data = FoldData.from_folds(folds, 0)
    cfg = tiny_config(epochs=2)

    def stop_after_one(epoch: int, _metrics: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold_model(cfg, data, tmp_path, on_epoch_end=stop_after_one, log=lambda _m: None)
    assert not (tmp_path / "history.csv").exists()
    reported: list[int] = []
    trained = train_fold_model(cfg, data, tmp_path, on_epoch_end=lambda e, _m: reported.append(e), log=lambda _m: None)
    assert reported == [2, 1], "epoch 2 live, then epoch 1 from the checkpoint's history"
    assert list(trained.history["epoch"]) == [1, 2]
