"""The whole graph, materialised for real on the tiny data set (in-process executor).

One run of the graph (``pipeline_run``) is shared by the tests that only read it; a test
that materialises again works on its own copy of that home (``own_pipeline``), so every
test sees the run as it was made, alone or in any order.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch

from whale_assets.instance import prepare_dagster_home
from whale_assets.run import load_recipe, run_pipeline, stage_run_config
from whale_assets.rounds import Round
from whale_assets.stages import PREPARE_DATA, asset_names, ensemble_and_submit, train_folds
from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.home import HomeLayout

# The stages' assets in the one-round graph, resolved from their groups (whale_assets/stages.py).
ONLY_ROUND = Round(1, 1)
UPSTREAM, PER_FOLD, DOWNSTREAM = (asset_names(s, 1) for s in (PREPARE_DATA, train_folds(ONLY_ROUND), ensemble_and_submit(ONLY_ROUND)))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[dict]:
    """One real run of the whole graph, shared by the tests of this module."""
    home = tmp_path_factory.mktemp("pipeline") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALE_HOME", str(home))
        mp.setenv("WHALE_DATA_DIR", str(tiny_data))
        mp.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        prepare_dagster_home()
        summary = run_pipeline(load_recipe(REPO / "configs" / "tiny.yaml"), log=lambda _msg: None)
        yield {"home": home, "data": tiny_data, "summary": summary}


@pytest.fixture
def own_pipeline(pipeline_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A copy of the shared run's home (tables, models, Dagster instance, MLflow store) for a
    test that materialises again. MLflow keeps the experiment's artifact root in the shared
    home, so new runs store their artifacts there, under new run ids that no other test lists."""
    home = tmp_path / "home"
    shutil.copytree(pipeline_run["home"], home, symlinks=True)
    monkeypatch.setenv("WHALE_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return {**pipeline_run, "home": home}


@pytest.mark.e2e
def test_whole_graph_materialises_and_writes_a_valid_submission(pipeline_run: dict) -> None:
    home, data, summary = pipeline_run["home"], pipeline_run["data"], pipeline_run["summary"]
    layout = HomeLayout(home)

    # Every asset (and every fold partition) has a materialisation in the instance.
    instance = dg.DagsterInstance.get()
    for key in UPSTREAM + DOWNSTREAM:
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    for key in PER_FOLD:
        parts = instance.get_materialized_partitions(dg.AssetKey(key))
        assert parts == {"fold0", "fold1"}, (key, parts)

    # The submission: exactly sample_submission's images, in order, five distinct ids each.
    sample = pd.read_csv(data / "sample_submission.csv")
    sub = pd.read_csv(layout.submission, dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["image", "predictions"]
    assert sub["image"].tolist() == sample["image"].tolist()
    train_ids = set(pd.read_csv(data / "train.csv")["individual_id"])
    for preds in sub["predictions"].str.split():
        assert len(preds) == 5 and len(set(preds)) == 5
        assert set(preds) <= train_ids | {NEW_INDIVIDUAL}

    # The match-review sheet: a real image of the sampled test photos and their matches.
    sub_mat = instance.get_latest_materialization_event(dg.AssetKey("submission_csv")).asset_materialization
    assert "match_review" in sub_mat.metadata
    from PIL import Image

    assert Image.open(layout.home / "match_review.png").size[0] == 6 * 112

    # Headline numbers reach the command line.
    assert summary["submission"] == str(layout.submission)
    assert 0.0 <= summary["map5"] <= 1.0 and math.isfinite(summary["oof_map5"])

    # The blocking checks ran and passed.
    for asset, check in [
        ("submission_csv", "submission_format"),
        ("train_metadata", "train_metadata_is_clean"),
        ("cv_folds", "folds_hold_out_individuals"),
        ("fold_embeddings", "embeddings_are_unit_vectors"),
        ("match_threshold", "threshold_in_range"),
    ]:
        history = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(dg.AssetKey(asset), check), limit=1)
        assert history and history[0].status.value == "SUCCEEDED", (asset, check)


@pytest.mark.e2e
def test_one_mlflow_run_per_fold_with_epoch_metrics_and_model(pipeline_run: dict) -> None:
    layout = HomeLayout(pipeline_run["home"])
    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    experiment = client.get_experiment_by_name("whale-photo-id")
    # Ultralytics' own MLflow callback is off: it would add its own experiment or untagged runs.
    assert {e.name for e in client.search_experiments()} <= {"Default", "whale-photo-id"}
    every_run = client.search_runs([experiment.experiment_id])
    assert all("dagster.run_id" in r.data.tags for r in every_run)
    assert any(r.data.tags.get("stage") == "detection" and "map50" in r.data.metrics for r in every_run)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'training'")
    assert sorted(r.data.tags["dagster.partition"] for r in runs) == ["fold0", "fold1"]
    mlflow.set_tracking_uri(layout.mlflow_uri)  # models:/ URIs resolve in this home's registry
    for run in runs:
        assert run.data.params["backbone"] == "test_resnet"
        history = client.get_metric_history(run.info.run_id, "val_map5")
        assert [m.step for m in history] == [1, 2]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
        assert len(run.data.tags["data_version"]) == 12
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/config.json"}
        assert {a.path for a in client.list_artifacts(run.info.run_id, "curves")} == {"curves/history.csv", "curves/training_curves.png"}
    # Each fold's best model is registered, with its signature, under an alias named after the fold.
    for fold in ("fold0", "fold1"):
        version = client.get_model_version_by_alias("whale-arcface", fold)
        assert version.tags["fold"] == fold and version.run_id in {r.info.run_id for r in runs}
        assert version.tags["serialization_format"] == "pt2"  # test_resnet exports: no pickle
        model = mlflow.pytorch.load_model(f"models:/whale-arcface@{fold}")
        info = mlflow.models.get_model_info(f"models:/whale-arcface@{fold}")
        assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
        with torch.no_grad():
            out = model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        assert out.shape == (2, 32)


@pytest.mark.e2e
def test_training_runs_log_their_photos_system_metrics_and_ranked_models(pipeline_run: dict) -> None:
    """The MLflow 3 side of each fold run: marked as model training, the fold's training and
    validation photos as data sets (digest: the photos, recomputed here from the fold table),
    CPU and memory samples, and a logged model carrying its validation MAP@5 that
    mlflow.search_logged_models ranks across the fold runs."""
    from whale_assets.partitions import fold_index
    from whale_ml.training.fold_model import FoldData

    layout = HomeLayout(pipeline_run["home"])
    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    experiment = client.get_experiment_by_name("whale-photo-id")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {
        r.data.tags["fold"]: r
        for r in client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'training'")
    }
    folds = pd.read_parquet(layout.tables / "cv_folds.parquet")
    (detector,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'detection'")
    for run in [*runs.values(), detector]:  # the detector's training too
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    for fold, run in runs.items():
        logged = {
            d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}.get("mlflow.data.context"), json.loads(d.dataset.profile))
            for d in run.inputs.dataset_inputs
        }
        want = FoldData.from_folds(folds, fold_index(fold)).datasets()
        assert logged == {
            f"{fold}-{use}": (digest, use, {"num_rows": len(table), "num_elements": table.size}) for use, (table, digest) in want.items()
        }

    mlflow.set_tracking_uri(layout.mlflow_uri)
    try:
        ranked = mlflow.search_logged_models(
            experiment_ids=[experiment.experiment_id],
            order_by=[{"field_name": "metrics.best_val_map5", "ascending": False}],
            output_format="list",
        )
    finally:
        mlflow.set_tracking_uri(None)
    ranked = [m for m in ranked if m.name == "embedding_model"]  # the fold models (the release's pyfunc model is logged too)
    assert sorted(m.source_run_id for m in ranked) == sorted(r.info.run_id for r in runs.values())
    scores = [{m.key: m for m in model.metrics}["best_val_map5"] for model in ranked]
    assert [m.value for m in scores] == sorted((m.value for m in scores), reverse=True)
    for model, score in zip(ranked, scores, strict=True):
        run = client.get_run(model.source_run_id)
        assert score.value == run.data.metrics["best_val_map5"]
        assert score.dataset_name == f"{run.data.tags['fold']}-validation"
        assert score.dataset_digest == FoldData.from_folds(folds, fold_index(run.data.tags["fold"])).datasets()["validation"][1]


@pytest.mark.e2e
def test_embedding_runs_record_the_machine_while_embedding(pipeline_run: dict) -> None:
    """fold_embeddings has its own MLflow run per fold, with system metrics, linked from the asset."""
    layout = HomeLayout(pipeline_run["home"])
    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    experiment = client.get_experiment_by_name("whale-photo-id")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'embedding'")
    assert sorted(r.data.tags["fold"] for r in runs) == ["fold0", "fold1"]
    crops = pd.read_parquet(layout.tables / "crops.parquet")
    for run in runs:
        assert "system/cpu_utilization_percentage" in run.data.metrics
        assert run.data.metrics["photos"] == int((crops["crop_path"] != "").sum())
        assert run.data.metrics["photos_per_second"] > 0
    mat = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("fold_embeddings")).asset_materialization
    assert mat.metadata["mlflow_run"].value.endswith("?workflowType=machine_learning")


# Run in a fresh interpreter that cannot import this project (its packages are installed
# editable in the venv, so they are blocked outright), with pickle refused by MLflow: the
# registered model must come back from the registry alone.
_LOAD_WITHOUT_PROJECT = """
import sys
for name in ("whale_ml", "whale_assets"):
    sys.modules[name] = None
import mlflow.pyfunc, mlflow.pytorch, numpy as np, torch
uri, out = sys.argv[1], sys.argv[2]
images = np.load(out + "/images.npy")
pyfunc = mlflow.pyfunc.load_model(uri)
module = mlflow.pytorch.load_model(uri)
for n in (2, 3):
    np.save(f"{out}/pyfunc_{n}.npy", np.asarray(pyfunc.predict(images[:n])))
    with torch.no_grad():
        np.save(f"{out}/module_{n}.npy", module(torch.from_numpy(images[:n])).numpy())
assert not any(m.startswith(("whale_ml", "whale_assets")) for m in sys.modules if sys.modules[m] is not None)
"""


@pytest.mark.e2e
def test_registered_model_loads_without_this_projects_code(pipeline_run: dict, tmp_path: Path) -> None:
    """Pickle-free: the registered fold model loads in a process that cannot import whale_ml
    (with MLflow's pickle loading off), through pyfunc and the pytorch flavour, and embeds
    batches of 2 and 3 images (the batch dimension stays dynamic) as the trained model does."""
    import os

    import numpy as np

    from whale_ml.training.trainer import load_model

    layout = HomeLayout(pipeline_run["home"])
    images = np.random.default_rng(7).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"MLFLOW_TRACKING_URI": layout.mlflow_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    done = subprocess.run(
        [sys.executable, "-I", "-c", _LOAD_WITHOUT_PROJECT, "models:/whale-arcface@fold0", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model, _ = load_model(layout.model_dir("fold0") / "best.pt")
    for n in (2, 3):
        with torch.no_grad():
            want = model(torch.from_numpy(images[:n])).numpy()
        for flavour in ("pyfunc", "module"):
            got = np.load(tmp_path / f"{flavour}_{n}.npy")
            assert got.shape == (n, 32), (flavour, got.shape)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{flavour}, {n} images")


RELEASE_METRICS = {"oof_map5", "threshold", "new_share", "queries", "test_map5", "fold0_val_map5", "fold1_val_map5"}


def _release_runs(client: mlflow.MlflowClient) -> list:
    """The release runs of the home's experiment, oldest first."""
    experiment = client.get_experiment_by_name("whale-photo-id").experiment_id
    return client.search_runs([experiment], filter_string="tags.stage = 'release'", order_by=["attributes.start_time ASC"])


def _children(client: mlflow.MlflowClient, run: object) -> dict[str, set[str]]:
    """The runs nested under ``run``, by their stage: what MLflow's UI shows under it."""
    experiment = run.info.experiment_id  # type: ignore[attr-defined]
    found = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")  # type: ignore[attr-defined]
    stages: dict[str, set[str]] = {}
    for child in found:
        stages.setdefault(child.data.tags["stage"], set()).add(child.info.run_id)
    return stages


@pytest.mark.e2e
def test_the_release_is_one_mlflow_run_over_its_fold_runs_and_the_first_champion(pipeline_run: dict) -> None:
    """The first release: one MLflow run with the ensemble's scores (the submission's test MAP@5
    included: the tiny set has a truth file) and what answers as parameters, its fold runs nested
    under it, and it is the champion: every fold's champion and challenger aliases on its
    versions, and the home's record."""
    from whale_ml.gallery.release import read_release

    layout = HomeLayout(pipeline_run["home"])
    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    (run,) = _release_runs(client)
    assert run.info.run_name == "release_round1_v0001" and set(run.data.metrics) == RELEASE_METRICS
    versions = {f: str(client.get_model_version_by_alias("whale-arcface", f).version) for f in ("fold0", "fold1")}
    assert {k: run.data.params[k] for k in ("round", "gallery_version", "fold0_model_version", "fold1_model_version")} == {
        "round": "1", "gallery_version": "v0001", "fold0_model_version": versions["fold0"], "fold1_model_version": versions["fold1"]
    }  # fmt: skip
    instance = dg.DagsterInstance.get()
    threshold = instance.get_latest_materialization_event(dg.AssetKey("match_threshold")).asset_materialization.metadata
    score = instance.get_latest_materialization_event(dg.AssetKey("submission_score")).asset_materialization.metadata
    assert run.data.metrics["oof_map5"] == pytest.approx(threshold["oof_map5"].value)
    assert run.data.metrics["threshold"] == pytest.approx(threshold["threshold"].value)
    assert run.data.metrics["test_map5"] == pytest.approx(score["map5"].value)
    assert run.data.params["models_key"] == threshold["models_key"].value
    children = _children(client, run)
    assert children["training"] == {client.get_model_version("whale-arcface", v).run_id for v in versions.values()}
    assert len(children["embedding"]) == 2 and len(children["retrieval"]) == 1  # the threshold run
    assert (run.data.tags["champion"], run.data.tags["decision"]) == ("true", "first release: no champion yet (or its MLflow run is gone)")
    for fold, version in versions.items():
        for role in ("champion", "challenger"):
            assert str(client.get_model_version_by_alias("whale-arcface", f"{role}_{fold}").version) == version
    champion = read_release(layout).champion
    assert champion is not None and (champion.run_id, champion.gallery_version, champion.round) == (run.info.run_id, "v0001", 1)
    mat = instance.get_latest_materialization_event(dg.AssetKey("release")).asset_materialization
    assert mat.metadata["champion"].value is True and mat.metadata["nested_runs"].value == 5
    assert run.info.run_id in mat.metadata["mlflow_run"].value
    assert [r.data["fold"] for r in mat.metadata["fold_runs"].records] == ["fold0", "fold1"]  # a table in the UI
    # The release as one servable model, logged into the release run and registered: the champion.
    servable = client.get_model_version_by_alias("whale-release", "champion")
    assert servable.run_id == run.info.run_id and mat.metadata["servable_model"].value == f"models:/whale-release/{servable.version}"


@pytest.mark.e2e
def test_threshold_is_reproducible_from_the_fold_embeddings(pipeline_run: dict) -> None:
    """match_threshold's MAP@5 is what the public API scores on the saved fold embeddings, and
    its curve, threshold and settings are in MLflow."""
    import numpy as np

    from whale_ml.retrieval import map_at_5, predict_top5
    from whale_ml.retrieval.local_features import home_feature_store
    from whale_ml.retrieval.threshold import tune_out_of_fold
    from whale_ml.stage_configs import ThresholdConfig

    layout = HomeLayout(pipeline_run["home"])
    instance = dg.DagsterInstance.get()
    mat = instance.get_latest_materialization_event(dg.AssetKey("match_threshold")).asset_materialization
    threshold, oof_map5 = mat.metadata["threshold"].value, mat.metadata["oof_map5"].value
    store = home_feature_store(layout)
    tuned = tune_out_of_fold(
        pd.read_parquet(layout.tables / "cv_folds.parquet"),
        layout.embeddings_dir,
        ["fold0", "fold1"],
        ThresholdConfig(class_centres=False),
        store,
    )
    assert tuned.fusion is not None, "the default recipe re-ranks by local features"
    assert mat.metadata["oof_map5_without_rerank"].value == pytest.approx(tuned.plain.map5)
    assert mat.metadata["local_weight"].value == pytest.approx(tuned.fusion.fusion.local_weight)
    assert tuned.result.threshold == threshold
    preds, truths = predict_top5(tuned.sims, tuned.ids, threshold), tuned.truths
    assert map_at_5(preds, truths) == pytest.approx(oof_map5, abs=1e-12)
    assert np.mean([p[0] == NEW_INDIVIDUAL for p in preds]) == pytest.approx(mat.metadata["top1_new_share"].value)

    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    experiment = client.get_experiment_by_name("whale-photo-id")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`dagster.asset` = 'match_threshold'")
    assert run.data.metrics["threshold"] == pytest.approx(threshold)
    assert run.data.metrics["oof_map5"] == pytest.approx(oof_map5)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"map5_curve.png", "map5_curve.json"}


@pytest.mark.e2e
def test_approximate_gallery_and_per_species_thresholds(own_pipeline: dict) -> None:
    """The options of the retrieval stage, materialised: an HNSW gallery reports its recall
    against flat, per-species thresholds and a lead weight are tuned and used, and the
    submission stays valid."""
    from whale_assets.definitions import defs
    from whale_ml.gallery import load_version

    layout = HomeLayout(own_pipeline["home"])
    job = defs().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config={
            "ops": {
                "gallery": {"config": {"index": "hnsw", "k": 10}},
                "match_threshold": {"config": {"per_species": True, "species_min_queries": 3, "lead_weights": [0.0, 0.5, 2.0]}},
            }
        },
        instance=dg.DagsterInstance.get(),
        asset_selection=[dg.AssetKey(k) for k in DOWNSTREAM],
    )
    assert result.success
    (gallery,) = result.asset_materializations_for_node("gallery")
    assert gallery.metadata["index_kind"].value == "hnsw"
    assert 0.9 <= gallery.metadata["individual_recall_at_k_vs_flat"].value <= 1.0
    assert load_version(layout).lineage.index == "hnsw"
    (threshold,) = result.asset_materializations_for_node("match_threshold")
    assert "species" in threshold.metadata
    assert threshold.metadata["oof_map5"].value >= threshold.metadata["oof_map5_global_only"].value - 1e-12
    (sub,) = result.asset_materializations_for_node("submission_csv")
    stored = json.loads((layout.tables / "match_threshold.json").read_text())
    assert sub.metadata["species_thresholds"].value == len(stored["species_thresholds"])
    # The weight chosen (0 included) is what the value carries and the submission applied.
    assert stored["lead_weight"] == threshold.metadata["lead_weight"].value == sub.metadata["lead_weight"].value
    assert [r.data["weight"] for r in threshold.metadata["lead_by_weight"].records] == [0.0, 0.5, 2.0]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"threshold_in_range": True, "submission_format": True}


@pytest.mark.e2e
def test_fold_model_trained_with_ddp_from_the_asset(own_pipeline: dict) -> None:
    """``processes: 2`` trains the partition under torchrun; its epochs still reach MLflow and the registry."""
    from whale_assets.definitions import defs

    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["ops"]["arcface_model"]["config"].update({"processes": 2, "epochs": 1})
    job = defs().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config={"ops": {"arcface_model": recipe["ops"]["arcface_model"]}},
        instance=dg.DagsterInstance.get(),
        asset_selection=[dg.AssetKey("arcface_model")],
        partition_key="fold0",
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("arcface_model")
    assert mat.metadata["epochs_run"].value == 1
    client = mlflow.MlflowClient(tracking_uri=HomeLayout(own_pipeline["home"]).mlflow_uri)
    run_id = mat.metadata["mlflow_run"].value.split("?")[0].rsplit("/", 1)[-1]  # the link opens the training view (?workflowType=...)
    assert client.get_run(run_id).data.params["processes"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val_map5")] == [1]
    assert client.get_model_version_by_alias("whale-arcface", "fold0").run_id == run_id


@pytest.mark.e2e
def test_rethreshold_job_reruns_only_its_stage(own_pipeline: dict) -> None:
    """The named jobs resolve; the cheap re-threshold job touches the threshold and submission only."""
    from whale_assets.definitions import defs

    d = defs()
    for name in ("prepare_data", "train_folds", "ensemble_and_submit", "rethreshold_and_submit"):
        d.resolve_job_def(name)
    assert d.resolve_job_def("train_folds").partitions_def is not None
    result = d.resolve_job_def("rethreshold_and_submit").execute_in_process(
        run_config={"ops": {"match_threshold": {"config": {"per_species": True, "species_min_queries": 3}}}},
        instance=dg.DagsterInstance.get(),
    )
    assert result.success
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialised == {"match_threshold", "submission_csv", "submission_score", "release"}


@pytest.mark.e2e
def test_a_fold_rerun_makes_the_ensemble_stages_due(own_pipeline: dict) -> None:
    """With the pipeline up to date nothing is due; after one fold is retrained, the stages
    after the folds are (what rebuild_after_folds then materialises)."""
    from whale_assets.definitions import defs

    d = defs()
    instance = dg.DagsterInstance.get()
    after = {"release", "gallery", "match_threshold", "submission_csv", "submission_score"}
    first = dg.evaluate_automation_conditions(defs=d, instance=instance)
    assert first.total_requested == 0
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["ops"]["arcface_model"]["config"]["epochs"] = 1
    ops = {k: recipe["ops"][k] for k in ("arcface_model", "fold_embeddings")}
    assert d.resolve_job_def("train_folds").execute_in_process(run_config={"ops": ops}, instance=instance, partition_key="fold1").success
    second = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=first.cursor)
    due = {name for name in after if second.get_num_requested(dg.AssetKey(name))}
    assert second.total_requested == len(due)  # nothing else (no fold, no upstream asset) is due
    assert {"gallery", "match_threshold"} <= due

    # What the UI shows (README, "Rerun one fold"): the retrained fold's weights are a new
    # data version, so what read the old fold embeddings is stale; the other fold is not.
    # (Dagster 1.13 does not pass staleness on: the submission reads the gallery and the
    # threshold, which are unchanged until rebuilt.)
    status = _stale_status()
    assert status("arcface_model", "fold0") == "FRESH" and status("arcface_model", "fold1") == "FRESH"
    assert (status("gallery"), status("match_threshold"), status("submission_csv")) == ("STALE", "STALE", "FRESH")
    assert d.resolve_job_def("ensemble_and_submit").execute_in_process(run_config=stage_run_config(recipe, DOWNSTREAM), instance=instance).success
    status = _stale_status()
    assert {n: status(n) for n in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, "FRESH")


def _stale_resolver() -> object:
    """What the UI asks for stale status and data versions, made now (it caches)."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from whale_assets.definitions import defs

    instance = dg.DagsterInstance.get()
    return CachingStaleStatusResolver(instance, defs().resolve_asset_graph(), LoadingContextForTest(instance))


def _stale_status() -> Callable[..., str]:
    """``status(asset, partition=None)``: FRESH, STALE or MISSING, as the UI shows it now."""
    resolver = _stale_resolver()
    return lambda name, partition=None: resolver.get_status(dg.AssetKey(name), partition).value  # type: ignore[attr-defined]


def _data_versions(*names: str) -> dict[str, str]:
    resolver = _stale_resolver()
    return {n: resolver.get_current_data_version(dg.AssetKey(n)).value for n in names}  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_identical_tables_keep_fold_models_fresh_and_changed_ones_make_them_stale(
    own_pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metadata tables and the folds report a digest of their content as data version:
    rematerialised with the same content they keep it, and nothing after them (the fold
    models above all) goes stale; with other content they get a new one, and what reads
    them is stale."""
    from whale_assets.definitions import defs

    job, instance = defs().resolve_implicit_global_asset_job_def(), dg.DagsterInstance.get()

    def materialise(*names: str, run_config: dict | None = None) -> None:
        keys = [dg.AssetKey(n) for n in names]
        assert job.execute_in_process(run_config=run_config or {}, instance=instance, asset_selection=keys).success

    tables = ("train_metadata", "test_metadata", "cv_folds")
    before = _data_versions(*tables)
    status = _stale_status()
    assert {status("arcface_model", f) for f in ("fold0", "fold1")} == {"FRESH"}

    materialise(*tables)  # the same data, the same settings
    assert _data_versions(*tables) == before
    status = _stale_status()
    up_to_date = [(n, None) for n in UPSTREAM + DOWNSTREAM] + [(n, f) for n in PER_FOLD for f in ("fold0", "fold1")]
    assert {key: status(*key) for key in up_to_date} == {key: "FRESH" for key in up_to_date}

    materialise("cv_folds", run_config={"ops": {"cv_folds": {"config": {"seed": 1}}}})  # other folds
    assert _data_versions("cv_folds")["cv_folds"] != before["cv_folds"]
    status = _stale_status()
    assert {status("arcface_model", f) for f in ("fold0", "fold1")} == {"STALE"}
    assert status("match_threshold") == "STALE" and status("cv_folds") == "FRESH"

    # The data set copied (new paths: new metadata, folds made from it), then one training
    # photo fewer in train.csv: new metadata again, so those folds are stale.
    data = tmp_path / "data"
    shutil.copytree(own_pipeline["data"], data)
    monkeypatch.setenv("WHALE_DATA_DIR", str(data))
    materialise("train_metadata", "cv_folds", run_config={"ops": {"cv_folds": {"config": {"seed": 1}}}})
    copied = _data_versions("train_metadata")["train_metadata"]
    assert _stale_status()("cv_folds") == "FRESH"
    train = pd.read_csv(data / "train.csv")
    train.iloc[:-1].to_csv(data / "train.csv", index=False)
    materialise("train_metadata")
    assert _data_versions("train_metadata")["train_metadata"] != copied
    assert _stale_status()("cv_folds") == "STALE"


@pytest.mark.e2e
def test_rerunning_reuses_crops(own_pipeline: dict) -> None:
    """A second materialisation of the crops rewrites nothing when photos, boxes and size are
    unchanged, and keeps the crops' data version: what reads them (folds, fold embeddings,
    gallery, submission) stays up to date."""
    from whale_assets.definitions import defs

    job = defs().resolve_implicit_global_asset_job_def()
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    before = _data_versions("bboxes", "crops")
    result = job.execute_in_process(
        run_config={"ops": {"boxes_and_crops": recipe["ops"]["boxes_and_crops"]}},
        instance=dg.DagsterInstance.get(),
        asset_selection=[dg.AssetKey("bboxes"), dg.AssetKey("crops")],  # one pass makes both
    )
    (mat,) = [m for m in result.asset_materializations_for_node("boxes_and_crops") if m.asset_key == dg.AssetKey("crops")]
    assert mat.metadata["written"].value == 0
    assert mat.metadata["reused"].value == len(pd.read_parquet(HomeLayout(own_pipeline["home"]).tables / "crops.parquet"))
    assert _data_versions("bboxes", "crops") == before  # "written" (now False everywhere) is not content
    status = _stale_status()
    readers = ["cv_folds", "gallery", "submission_csv"] + [f"fold_embeddings[{f}]" for f in ("fold0", "fold1")]
    assert {r: status(*r.rstrip("]").split("[")) for r in readers} == dict.fromkeys(readers, "FRESH")


def _enroll(capsys: pytest.CaptureFixture[str], folder: Path, photos: dict[str, Path], individual: str) -> dict:
    """``whale enroll`` of ``photos`` (new name -> a photo to copy) as ``individual``; its JSON summary."""
    from whale_assets.cli import main as whale

    folder.mkdir(parents=True, exist_ok=True)
    for name, source in photos.items():
        shutil.copyfile(source, folder / name)
    pd.DataFrame({"image": list(photos), "individual_id": individual}).to_csv(folder / "confirmed.csv", index=False)
    capsys.readouterr()
    code = whale(["enroll", str(folder / "confirmed.csv"), "--images", str(folder), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.mark.e2e
def test_a_second_round_is_the_release_whale_identify_and_enroll_serve(
    own_pipeline: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`whale run` with ``rounds: 2`` on a home whose first round ran (round 2's stages only):
    test photos pseudo-labelled by round 1 join round 2's training (never a validation side),
    its fold models register and become champions under their own aliases, its submission
    is its own file, and it is the release: ``release.json`` names round 2, ``whale
    identify`` answers the test photos exactly as round 2's submission does, with round 2's
    champions, and ``whale enroll`` extends round 2's gallery. A photo enrolled while round 1
    was the release is carried into round 2's gallery (the ledger is the home's). Round 1's
    submission, gallery versions and registry aliases are left as they were. Round 1's release
    run is deleted from MLflow first, so that round 2's release becomes the champion whatever
    the tiny models score (the rule's "champion's run gone" case; a release that loses:
    test_a_retrain_that_loses_leaves_the_champion_release_serving)."""
    from whale_assets.cli import main as whale
    from whale_assets.rounds import Round, graph_rounds
    from whale_assets.stages import stages
    from whale_ml.gallery import list_versions, load_version
    from whale_ml.gallery.release import read_release
    from whale_ml.io import read_json

    layout, data = HomeLayout(own_pipeline["home"]), own_pipeline["data"]
    second = layout.in_round("round2")
    first_submission = layout.submission.read_bytes()
    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    first_fold0 = client.get_model_version_by_alias("whale-arcface", "fold0").version
    assert read_json(layout.release_pointer)["round"] == 1  # the one-round run's gallery was the release

    # Enrolled while round 1 is the release: a copy of a training photo, under its own individual.
    train = pd.read_csv(data / "train.csv")
    known = train.iloc[0]
    early = _enroll(capsys, tmp_path / "early", {"early.jpg": data / "train_images" / known["image"]}, known["individual_id"])
    assert (early["round"], early["version"]) == (1, "v0002")
    first_versions = list_versions(layout)["version"].tolist()

    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["rounds"] = 2
    monkeypatch.delenv("WHALE_ROUNDS")  # the suite's one-round setting: the recipe decides here
    # A low precision target: the tiny models are barely trained, and the path needs photos.
    recipe["ops"]["pseudo_labels"] = {"config": {"min_precision": 0.05, "min_photos": 1}}
    round2 = [stage.name for stage in stages(graph_rounds(2)) if stage.name.startswith("round2_")]
    assert round2 == ["round2_pick_pseudo_labels", "round2_train_folds", "round2_ensemble_and_submit"]
    (first_release,) = _release_runs(client)
    client.delete_run(first_release.info.run_id)
    summary = run_pipeline(recipe, log=lambda _msg: None, stages=round2)

    # The pseudo-labels and the fold table they make, its check passed.
    instance = dg.DagsterInstance.get()
    pseudo = instance.get_latest_materialization_event(dg.AssetKey(["round2", "pseudo_labels"])).asset_materialization
    table = pd.read_parquet(layout.tables / "round2" / "pseudo_labels.parquet")
    assert len(table) == pseudo.metadata["dagster/row_count"].value == summary["rounds"]["round2"]["pseudo_labels"]["photos"] > 0
    assert pseudo.metadata["confidence"].value >= pseudo.metadata["floor"].value
    assert (table["score"] >= pseudo.metadata["confidence"].value).all()
    assert set(table["image"]) <= set(pd.read_parquet(layout.tables / "test_metadata.parquet")["image"])
    check = dg.AssetCheckKey(dg.AssetKey(["round2", "pseudo_labelled_folds"]), "pseudo_photos_never_validated")
    assert instance.event_log_storage.get_asset_check_execution_history(check, limit=1)[0].status.value == "SUCCEEDED"

    # Round 2's fold models: trained with pseudo photos, the tiny recipe's epochs (inherited), their own aliases.
    for fold in ("fold0", "fold1"):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(["round2", "arcface_model"]), asset_partitions=[fold]), limit=1
        ).records
        meta = records[0].asset_materialization.metadata
        assert meta["pseudo_labelled_train_images"].value > 0 and meta["epochs_run"].value == 2  # not the default 60
        newest = client.get_model_version_by_alias("whale-arcface", f"round2_{fold}").version
        assert client.get_model_version_by_alias("whale-arcface", f"champion_round2_{fold}").version == newest
    assert client.get_model_version_by_alias("whale-arcface", "fold0").version == first_fold0
    assert (second.model_dir("fold0") / "best.pt").exists()

    # Its submission, beside the first round's, is the release's.
    assert summary["release"] == "round2" and summary["submission"] == str(second.submission)
    assert second.submission == layout.home / "rounds" / "round2" / "submission.csv"
    sample = pd.read_csv(data / "sample_submission.csv")
    answers = pd.read_csv(second.submission, dtype=str, keep_default_na=False).set_index("image")["predictions"]
    assert answers.index.tolist() == sample["image"].tolist()
    assert layout.submission.read_bytes() == first_submission and list_versions(layout)["version"].tolist() == first_versions
    assert 0.0 <= summary["map5"] <= 1.0

    # The release: round 2's gallery, holding the photo enrolled before it was built.
    pointer = read_json(layout.release_pointer)
    assert pointer["round"] == 2 and pointer["champion"]["round"] == 2
    release = read_release(layout)
    assert release.number == 2 and release.layout == second
    (second_release,) = _release_runs(client)
    assert second_release.info.run_name == "release_round2_v0001" and second_release.data.tags["champion"] == "true"
    assert "its MLflow run is gone" in second_release.data.tags["decision"]
    built = load_version(second)
    assert built.name == "v0001" and built.info["carried_enrolled"] == 1
    assert built.table.set_index("image").loc["early.jpg", "source"] == "enrolled"

    # whale identify serves the release: the same five answers as its submission, with its champions.
    test_images = sorted(p.name for p in (data / "test_images").iterdir())
    capsys.readouterr()
    assert whale(["identify", str(data / "test_images"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["round"] == 2 and result["gallery"]["version"] == "v0001"
    assert [(m["fold"], m["alias"]) for m in result["models"]] == [("fold0", "champion_round2_fold0"), ("fold1", "champion_round2_fold1")]
    identified = {row["image"]: " ".join(row["predictions"]) for row in result["photos"]}
    assert identified == answers.loc[test_images].to_dict()

    # whale enroll extends the release's gallery, and the UI shows it on round2/gallery.
    late = _enroll(capsys, tmp_path / "late", {"late.jpg": data / "train_images" / known["image"]}, known["individual_id"])
    assert (late["round"], late["version"], late["parent"], late["enrolled_photos"]) == (2, "v0002", "v0001", 2)
    assert list_versions(second)["version"].tolist() == ["v0001", "v0002"]
    assert list_versions(layout)["version"].tolist() == first_versions
    mat = instance.get_latest_materialization_event(Round(2, 2).key("gallery")).asset_materialization
    assert mat.metadata["version"].value == "v0002" and mat.metadata["made_by"].value == "whale enroll"


@pytest.mark.e2e
def test_a_retrain_that_loses_leaves_the_champion_release_serving(
    own_pipeline: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two releases in one home, compared through MLflow as a user would: the first (the shared
    run's) and a retrain with a broken recipe (a learning rate of 1e-7 for one epoch, tuned
    without local re-ranking: its out-of-fold MAP@5 is the all-new_individual floor), its
    ensemble stage rerun. Both release runs carry the same metric names and name their gallery
    and model versions; each nests its own fold runs. The retrain loses on the same validation
    data: the champion aliases stay on the first release's versions (the challenger ones move),
    the home's record keeps it, and the default ``whale identify`` answers with its models, its
    gallery and its matcher, exactly as its submission did. ``whale enroll`` extends the
    champion's gallery, and the next default identify searches that version; the losing
    release stays reachable by naming its models and gallery version."""
    from whale_assets.cli import main as whale
    from whale_assets.definitions import defs
    from whale_ml.gallery.release import read_release

    layout, data = HomeLayout(own_pipeline["home"]), own_pipeline["data"]
    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    first_answers = pd.read_csv(layout.submission, dtype=str).set_index("image")["predictions"]
    first = {f: str(client.get_model_version_by_alias("whale-arcface", f).version) for f in ("fold0", "fold1")}

    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["ops"]["arcface_model"]["config"].update({"epochs": 1, "lr_backbone": 1e-7, "lr_head": 1e-7})
    recipe["ops"]["match_threshold"] = {"config": {"rerank": False, "class_centres": False}}
    d, instance = defs(), dg.DagsterInstance.get()
    ops = {k: recipe["ops"][k] for k in ("arcface_model", "fold_embeddings")}
    for fold in ("fold0", "fold1"):
        assert d.resolve_job_def("train_folds").execute_in_process(run_config={"ops": ops}, instance=instance, partition_key=fold).success
    ensemble = d.resolve_job_def("ensemble_and_submit")
    assert ensemble.execute_in_process(run_config=stage_run_config(recipe, DOWNSTREAM), instance=instance).success
    second = {f: str(client.get_model_version_by_alias("whale-arcface", f).version) for f in ("fold0", "fold1")}

    # MLflow's compare view: the same names in both release runs, and what each was made of.
    old, new = _release_runs(client)
    assert set(old.data.metrics) == set(new.data.metrics) == RELEASE_METRICS
    assert set(old.data.params) == set(new.data.params)
    assert (old.data.params["gallery_version"], new.data.params["gallery_version"]) == ("v0001", "v0002")
    assert [new.data.params[f"{f}_model_version"] for f in ("fold0", "fold1")] == [second["fold0"], second["fold1"]]
    assert old.data.params["validation_digest"] == new.data.params["validation_digest"], "validated on the same photos"
    old_children, new_children = _children(client, old), _children(client, new)
    assert new_children["training"] == {client.get_model_version("whale-arcface", v).run_id for v in second.values()}
    assert old_children["training"] == {client.get_model_version("whale-arcface", v).run_id for v in first.values()}
    assert not set().union(*old_children.values()) & set().union(*new_children.values())
    assert new.data.metrics["oof_map5"] < old.data.metrics["oof_map5"], "the broken recipe was meant to lose"
    assert (new.data.tags["champion"], new.data.tags["champion_before"]) == ("false", old.info.run_id)
    assert "champion kept" in new.data.tags["decision"] and old.data.tags["champion"] == "true"

    # The champion stays whole: its aliases, the home's record; the challenger aliases are the retrain's.
    for fold in ("fold0", "fold1"):
        assert str(client.get_model_version_by_alias("whale-arcface", f"champion_{fold}").version) == first[fold]
        assert str(client.get_model_version_by_alias("whale-arcface", f"challenger_{fold}").version) == second[fold]
    assert read_release(layout).champion.run_id == old.info.run_id  # type: ignore[union-attr]

    def identify(*args: str) -> dict:
        capsys.readouterr()
        code = whale(["identify", *args, "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        return json.loads(out.out)

    test_images = sorted(p.name for p in (data / "test_images").iterdir())
    served = identify(str(data / "test_images"))
    assert [m["version"] for m in served["models"]] == [first["fold0"], first["fold1"]]
    assert (served["gallery"]["version"], served["release_run"]) == ("v0001", old.info.run_id)
    assert {row["image"]: " ".join(row["predictions"]) for row in served["photos"]} == first_answers.loc[test_images].to_dict()

    known = pd.read_csv(data / "train.csv").iloc[0]
    enrolled = _enroll(capsys, tmp_path / "confirmed", {"late.jpg": data / "train_images" / known["image"]}, known["individual_id"])
    assert (enrolled["version"], enrolled["parent"]) == ("v0003", "v0001")
    assert [m["version"] for m in enrolled["models"]] == [first["fold0"], first["fold1"]]
    after = identify(str(data / "train_images" / known["image"]))
    assert after["gallery"]["version"] == "v0003" and after["gallery"]["enrolled_photos"] == 1
    challenger = identify(str(data / "test_images"), "--alias", "challenger", "--gallery-version", "v0002")
    assert [m["version"] for m in challenger["models"]] == [second["fold0"], second["fold1"]] and challenger["release_run"] is None


@pytest.mark.slow
def test_definitions_validate(whale_env: Path) -> None:
    """`dagster definitions validate` loads the code location from workspace.yaml."""
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


@pytest.mark.parametrize("recipe", ["demo.yaml", "gpu.yaml", "tiny.yaml"])
@pytest.mark.parametrize("rounds", [1, 2])
def test_recipes_are_valid_run_config(recipe: str, rounds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each recipe under configs/, run with one round or two, is accepted by the launchpad's
    config schema: the run config of the whole graph, a later round's ops with what they inherit."""
    monkeypatch.delenv("WHALE_ROUNDS")  # the suite's one-round setting: `rounds` decides here
    from whale_assets.definitions import defs
    from whale_assets.rounds import building_rounds
    from whale_assets.stages import all_asset_names

    with building_rounds(rounds):
        job = defs().resolve_implicit_global_asset_job_def()
    loaded = {**load_recipe(REPO / "configs" / recipe), "rounds": rounds}
    config = stage_run_config(loaded, all_asset_names(rounds))
    assert rounds == 1 or config["ops"]["round2__arcface_model"] == config["ops"]["arcface_model"]
    dg.validate_run_config(job, config)  # raises on any bad key or value


def test_recipe_with_a_bad_value_is_rejected() -> None:
    from whale_assets.definitions import defs

    job = defs().resolve_implicit_global_asset_job_def()
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, {"ops": {"arcface_model": {"config": {"epochs": "many"}}}})


@pytest.mark.e2e
def test_runs_on_a_data_set_with_only_the_kaggle_files(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No box file, no truth, no sample_submission: full frames, every test photo, no score
    (and no ``test_map5`` on the release run)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for name in ("fluke_boxes.csv", "test_truth.csv", "sample_submission.csv"):
        (data / name).unlink()
    home = tmp_path / "home"
    monkeypatch.setenv("WHALE_HOME", str(home))
    monkeypatch.setenv("WHALE_DATA_DIR", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    prepare_dagster_home()
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["ops"]["fluke_detector"] = {"config": {"source": "none"}}
    recipe["ops"]["arcface_model"]["config"]["epochs"] = 1
    summary = run_pipeline(recipe, log=lambda _msg: None)

    sub = pd.read_csv(HomeLayout(home).submission)
    assert sub["image"].tolist() == sorted(p.name for p in (data / "test_images").iterdir())
    assert summary.get("map5") is None
    (release,) = _release_runs(mlflow.MlflowClient(tracking_uri=HomeLayout(home).mlflow_uri))
    assert set(release.data.metrics) == RELEASE_METRICS - {"test_map5"}
    boxes = pd.read_parquet(HomeLayout(home).tables / "bboxes.parquet")
    assert (boxes["source"] == "full_frame").all() and (boxes["note"] == "no detector").all()


def _materialised_since(cursor: int) -> set[str]:
    """``asset`` or ``asset[partition]`` of every materialisation the instance recorded after event ``cursor``."""
    from whale_assets.definitions import defs

    instance, found = dg.DagsterInstance.get(), set()
    for key in defs().resolve_asset_graph().materializable_asset_keys:
        for record in instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, after_storage_id=cursor), limit=100).records:
            partition = record.partition_key
            found.add(key.to_user_string() + (f"[{partition}]" if partition else ""))
    return found


def _event_cursor() -> int:
    return dg.DagsterInstance.get().event_log_storage.get_maximum_record_id() or 0


def _registered_versions(home: Path) -> int:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{HomeLayout(home).mlflow_db}")
    return len(client.search_model_versions("name = 'whale-arcface'"))


@pytest.mark.e2e
def test_whale_run_materialises_only_what_is_due(own_pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`whale run` on an up-to-date home re-reads the data set's tables and does nothing else
    (no training, nothing registered); a relabelled train.csv row reruns what reads the
    labels and nothing of the detector, the boxes or the crops; a changed setting reruns its
    op, and what reads it only if its output changed; --force reruns everything."""
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    data = tmp_path / "data"
    shutil.copytree(own_pipeline["data"], data)  # copy2: the photos keep their times, so their crops
    monkeypatch.setenv("WHALE_DATA_DIR", str(data))
    run_pipeline(recipe, log=lambda _m: None)  # whatever the copy's new paths make due

    cursor, versions = _event_cursor(), _registered_versions(own_pipeline["home"])
    summary = run_pipeline(recipe, log=lambda _m: None)
    read_again = {"train_metadata", "test_metadata", "photos"}  # the CSVs, and each photo's size and time
    assert _materialised_since(cursor) == read_again
    assert _registered_versions(own_pipeline["home"]) == versions
    assert summary["oof_map5"] == pytest.approx(own_pipeline["summary"]["oof_map5"])  # read back from the last materialisation

    train = pd.read_csv(data / "train.csv")
    other = train["individual_id"].iloc[-1]
    train.loc[0, "individual_id"] = other if train.loc[0, "individual_id"] != other else train["individual_id"].iloc[1]
    train.to_csv(data / "train.csv", index=False)
    cursor = _event_cursor()
    run_pipeline(recipe, log=lambda _m: None)
    folds = {f"{name}[{f}]" for name in PER_FOLD for f in ("fold0", "fold1")}
    ensemble = set(DOWNSTREAM)
    relabelled = _materialised_since(cursor)
    assert relabelled == read_again | {"cv_folds"} | folds | ensemble
    assert not relabelled & {"fluke_detector", "bboxes", "crops", "local_features"}

    recipe["ops"]["fold_embeddings"]["config"]["batch_size"] = 3  # the same embeddings, in other batches
    cursor = _event_cursor()
    run_pipeline(recipe, log=lambda _m: None)
    assert _materialised_since(cursor) == read_again | {"fold_embeddings[fold0]", "fold_embeddings[fold1]"}

    cursor, versions = _event_cursor(), _registered_versions(own_pipeline["home"])
    run_pipeline(recipe, log=lambda _m: None, force=True)
    assert _materialised_since(cursor) == set(UPSTREAM) | folds | ensemble
    assert _registered_versions(own_pipeline["home"]) == versions  # the folds were reused: the same checkpoints
