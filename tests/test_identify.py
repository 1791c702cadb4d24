"""`whale identify` and `whale enroll` on a real tiny pipeline run: the JSON schema, error
rows, enrollment of a new animal, the gallery versions in Dagster, the model checks
against the MLflow registry, the HTML report opened in headless Chromium, and the
progress bars of the real commands on a pseudo-terminal and piped."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from chromium import SKIP_REASON, browser, chromium_command
from encounter import encounter
from health import stop_group, wait_healthy

from whale_assets.cli import main as whale
from whale_assets.instance import prepare_dagster_home
from whale_assets.run import load_recipe, run_pipeline
from whale_ml.gallery import list_versions, load_version, read_ledger
from whale_ml.gallery.matchers import MATCHERS_DIR
from whale_ml.gallery.release import read_release
from whale_ml.home import HomeLayout
from whale_ml.io import read_json

pytestmark = pytest.mark.e2e  # one real pipeline run, shared by the module

REPO = Path(__file__).resolve().parent.parent
NEW_ID = "cafe0000beef"


def _encounter(out: Path, n: int = 6) -> list[Path]:
    return encounter(out, n, NEW_ID)


def _whale(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = whale(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[dict]:
    """One real pipeline run on the tiny set, then a new animal enrolled from half its photos."""
    root = tmp_path_factory.mktemp("identify")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALE_HOME", str(home))
        mp.setenv("WHALE_DATA_DIR", str(tiny_data))
        mp.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        prepare_dagster_home()
        run_pipeline(load_recipe(REPO / "configs" / "tiny.yaml"), log=lambda _msg: None)
        yield {"home": home, "layout": HomeLayout(home), "data": tiny_data, "root": root}


def _served_matcher(layout: HomeLayout) -> Path:
    """The matcher file the default ``whale identify`` reads: the champion release's own."""
    champion = read_release(layout).champion
    assert champion is not None, "the pipeline's release is the champion"
    return layout.gallery_dir / MATCHERS_DIR / champion.matcher


def _gallery_ids(layout: HomeLayout) -> dict[str, str]:
    table = pd.read_csv(layout.gallery_versions_dir / "v0001" / "gallery.csv", dtype=str, keep_default_na=False)
    return dict(zip(table["image"], table["individual_id"], strict=True))


def test_identify_lists_five_candidates_per_photo_and_an_error_row_per_bad_photo(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    layout, data = home["layout"], home["data"]
    broken = home["root"] / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    train_photo = data / "train_images" / pd.read_csv(data / "train.csv")["image"].iloc[0]
    code, out, _ = _whale(
        capsys, "identify", str(data / "test_images"), str(broken), str(home["root"] / "missing.jpg"), str(train_photo), "--json"
    )
    assert code == 0
    result = json.loads(out)
    test_images = sorted(p.name for p in (data / "test_images").iterdir())
    assert [p["image"] for p in result["photos"]] == [*test_images, "broken.jpg", "missing.jpg", train_photo.name]
    assert result["schema_version"] == 2 and result["gallery"]["version"] == "v0001"
    assert result["local_rerank"], "the default recipe re-ranks by local features"
    threshold = read_json(layout.tables / "match_threshold.json")["threshold"]
    assert result["threshold"] == pytest.approx(threshold)
    assert [(m["fold"], m["alias"]) for m in result["models"]] == [("fold0", "champion_fold0"), ("fold1", "champion_fold1")]
    assert result["release_run"] == read_release(layout).champion.run_id  # type: ignore[union-attr]

    owner = _gallery_ids(layout)
    rows = {p["image"]: p for p in result["photos"]}
    for row in [rows[name] for name in test_images]:
        assert row["status"] == "ok" and row["error"] is None
        cands = row["candidates"]
        assert [c["rank"] for c in cands] == [1, 2, 3, 4, 5]
        assert len({c["individual_id"] for c in cands}) == 5
        sims = [c["similarity"] for c in cands]
        assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in sims)
        assert all(owner[c["gallery_image"]] == c["individual_id"] for c in cands), "best match is a photo of that individual"
        assert all(Path(c["gallery_crop"]).is_file() for c in cands)
        assert len(row["predictions"]) == 5 and row["decision"] == row["predictions"][0]
        lead = sims[0] - sims[1]  # the first candidate's decision score counts its lead when the threshold was tuned so
        assert row["decision_score"] == pytest.approx(sims[0] + result["lead_weight"] * lead, abs=1e-5)
        assert row["new_individual"] == (row["decision"] == "new_individual") == (row["decision_score"] < row["threshold"])
        assert len(row["box"]) == 4 and isinstance(row["crop_is_full_frame"], bool)
        # Each score is explained: its parts add up to it, and the lead's share to the decision score.
        for c in cands:
            assert sum(p["contribution"] for p in c["score_parts"].values()) == pytest.approx(c["similarity"], abs=1e-5)
            assert c["score_parts"]["local"]["value"] == c["inliers"]
            if abs(c["decision_score"] - row["threshold"]) > 1e-6:  # (rounded to 6 decimals)
                assert c["above_threshold"] == (c["decision_score"] >= row["threshold"])
        assert row["decision_score"] == pytest.approx(sims[0] + row["lead"]["contribution"], abs=2e-6)

    # The same photos, models and gallery as the pipeline's submission: the same answers.
    submission = pd.read_csv(layout.submission, dtype=str).set_index("image")["predictions"]
    assert {name: " ".join(rows[name]["predictions"]) for name in test_images} == submission.loc[test_images].to_dict()
    # A gallery photo finds itself: the query went through exactly the gallery's crop and models.
    own = rows[train_photo.name]["candidates"][0]
    assert own["gallery_image"] == train_photo.name and own["embedding_similarity"] > 0.9999
    if result["local_rerank"]:  # described as the gallery's photos were: it matches itself point for point
        assert own["inliers"] >= 4 and own["inliers"] == max(c["inliers"] for c in rows[train_photo.name]["candidates"])

    for name, why in [("broken.jpg", "not an image format Pillow can read"), ("missing.jpg", "file not found")]:
        assert rows[name]["status"] == "error" and why in rows[name]["error"] and name in rows[name]["error"]
        assert rows[name]["candidates"] == [] and rows[name]["predictions"] == []


def test_class_centres_out_of_fold_and_identify_agrees_with_the_submission(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """The fold models kept their class centres; tuned with them out of fold (each fold's
    validation photos against its own model's centres), and with a fusion that weighs them,
    ``whale identify`` answers the test photos exactly as the submission's matching does."""
    from whale_ml.data.folds import fold_split
    from whale_ml.gallery import load_version, match_queries, query_embeddings
    from whale_ml.io import write_json
    from whale_ml.retrieval.centres import ClassCentres
    from whale_ml.retrieval.fusion import Fusion
    from whale_ml.retrieval.local_features import home_feature_store
    from whale_ml.retrieval.matcher import Matcher, TunedMatcher
    from whale_ml.retrieval.rerank import LocalRerank
    from whale_ml.retrieval.threshold import tune_out_of_fold
    from whale_ml.stage_configs import ThresholdConfig

    layout, data = home["layout"], home["data"]
    cv = pd.read_parquet(layout.tables / "cv_folds.parquet")
    for i, fold in enumerate(["fold0", "fold1"]):  # each model's centres: exactly its training individuals
        centres = ClassCentres.load(layout.embeddings_dir(fold))
        assert centres is not None and sorted(centres.ids) == sorted(fold_split(cv, i)[0]["individual_id"].unique())
    store = home_feature_store(layout)
    folds = ["fold0", "fold1"]
    without = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(fusion_weights=11, class_centres=False), store)
    tuned = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(fusion_weights=11), store)
    assert tuned.fusion is not None and "centre_weight" in tuned.fusion.table and len(tuned.fusion.table) == 66
    assert tuned.result.map5 >= without.result.map5 - 1e-12, "the grid holds every point without centres"
    plain = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(rerank=False, class_centres=False))
    alone = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(rerank=False, fusion_weights=11))
    assert alone.result.map5 >= plain.result.map5 - 1e-12
    if alone.fusion is None:  # the centres did not help: the plain similarity and its threshold
        assert alone.matcher.fusion is None and alone.result.map5 == pytest.approx(plain.result.map5)

    # A fusion that weighs the centres and local features, whatever the tiny models' tuning chose, so the test path is exercised.
    assert tuned.fusion is not None
    fusion = Fusion({"global": 0.5, "local": 0.2, "centre": 0.3}, tuned.fusion.fusion.calibrations)
    matcher = Matcher(tuned.result.threshold, {}, 50, fusion, LocalRerank(store.config, 10, 4), 10)
    version = load_version(layout)
    assert all(c is not None for c in version.centres)
    queries, images = query_embeddings(layout, version)
    expected = match_queries(version, queries, matcher, [store.get(img) for img in images], store)  # as submission_csv matches
    saved = _served_matcher(layout)  # what identify reads by default
    original = saved.read_bytes()
    stored = TunedMatcher.from_dict(json.loads(original))
    try:
        write_json(saved, dataclasses.replace(stored, matcher=matcher).to_dict())
        code, out, _ = _whale(capsys, "identify", str(data / "test_images"), "--json")
    finally:
        saved.write_bytes(original)
    assert code == 0
    rows = {p["image"]: p for p in json.loads(out)["photos"]}
    assert {img: rows[img]["predictions"] for img in images} == dict(zip(images, expected.predictions, strict=True))
    assert [rows[img]["candidates"][0]["similarity"] for img in images] == pytest.approx(expected.sims[:, 0].tolist(), abs=1e-6)
    # Each candidate's parts are the three matchers' shares, as the matching weighed them.
    for q, img in enumerate(images):
        for k, c in enumerate(rows[img]["candidates"]):
            parts = c["score_parts"]
            assert set(parts) == {"global", "local", "centre"} and sum(p["contribution"] for p in parts.values()) == pytest.approx(
                c["similarity"], abs=1e-5
            )
            assert parts["global"]["value"] == pytest.approx(expected.embedding_sims[q, k], abs=1e-6)
            assert parts["local"]["value"] == expected.inliers[q, k] == c["inliers"]
            assert parts["centre"]["weight"] == 0.3 and parts["centre"]["from_global"] == bool(np.isnan(expected.centre_sims[q, k]))


def test_identify_applies_the_lead_rule_it_reads(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """A match_threshold tuned with a lead weight: `whale identify` judges the first candidate
    by s1 + w (s1 - s2), the rule the submission applies through the same match_queries
    (tests/test_gallery_build.py checks that rule against brute force)."""
    layout, data = home["layout"], home["data"]
    path = _served_matcher(layout)  # what identify reads by default
    original = path.read_bytes()
    code, out, _ = _whale(capsys, "identify", str(data / "test_images"), "--json")
    rows = json.loads(out)["photos"]
    leads = [r["candidates"][0]["similarity"] - r["candidates"][1]["similarity"] for r in rows]
    q = int(np.argmax(leads))
    s1 = rows[q]["candidates"][0]["similarity"]
    value = {**json.loads(original), "lead_weight": 2.0, "threshold": s1 + leads[q], "species_thresholds": {}}  # s1 < t < s1 + 2 lead
    try:
        path.write_text(json.dumps(value))
        code, out, _ = _whale(capsys, "identify", str(data / "test_images"), "--json")
    finally:
        path.write_bytes(original)
    assert code == 0
    result = json.loads(out)
    assert result["lead_weight"] == 2.0 and result["photos"][q]["decision"] == rows[q]["candidates"][0]["individual_id"]
    lead = result["photos"][q]["lead"]
    assert lead["weight"] == 2.0 and lead["value"] == pytest.approx(leads[q], abs=2e-6)
    assert result["photos"][q]["decision_score"] == pytest.approx(s1 + lead["contribution"], abs=2e-6)
    for row in result["photos"]:
        sims = [c["similarity"] for c in row["candidates"]]
        ids = [c["individual_id"] for c in row["candidates"]]
        d = sims[0] + 2.0 * (sims[0] - sims[1])
        cut = 0 if d < value["threshold"] else 1 + sum(s >= value["threshold"] for s in sims[1:])  # new_individual's place
        assert row["predictions"] == [*ids[:cut], "new_individual", *ids[cut:]][:5] and row["new_individual"] == (cut == 0)
        assert [c["above_threshold"] for c in row["candidates"][1:]] == [s >= value["threshold"] for s in sims[1:]]


def test_enrolled_animal_is_identified_from_its_other_photos(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from whale_assets.definitions import defs as load_defs
    from whale_assets.defs.automation import training_data_changed
    from whale_assets.resources import WhaleHome

    layout = home["layout"]
    frames = _encounter(home["root"] / "tonight")
    confirmed = home["root"] / "confirmed.csv"
    pd.DataFrame({"image": [p.name for p in frames[:3]], "individual_id": NEW_ID}).to_csv(confirmed, index=False)

    def sensor(cursor: str | None) -> tuple[list[dg.RunRequest], str | None]:
        result = training_data_changed(dg.build_sensor_context(cursor=cursor, resources={"whale": WhaleHome()}))
        return ([], cursor) if isinstance(result, dg.SkipReason) else (list(result.run_requests or []), result.cursor)

    _, cursor = sensor(None)
    code, out, _ = _whale(capsys, "identify", *map(str, frames[3:]), "--json")
    assert code == 0 and all(NEW_ID not in p["predictions"] for p in json.loads(out)["photos"])

    code, out, err = _whale(capsys, "enroll", str(confirmed), "--images", str(frames[0].parent))
    assert code == 0, err
    assert "v0002" in out and NEW_ID in out
    ledger = read_ledger(layout)
    assert ledger["image"].tolist() == [p.name for p in frames[:3]] and set(ledger["new_individual"]) == {"true"}
    assert all((layout.enrolled_dir / "images" / p.name).is_file() for p in frames[:3])

    code, out, _ = _whale(capsys, "identify", *map(str, frames), "--json")
    result = json.loads(out)
    assert result["gallery"] == {"version": "v0002", "photos": result["gallery"]["photos"], "individuals": 11, "enrolled_photos": 3}
    for row in result["photos"][3:]:  # the other photos of the encounter
        assert row["candidates"][0]["individual_id"] == NEW_ID and row["candidates"][0]["gallery_source"] == "enrolled"
        assert row["decision"] == NEW_ID, row
    for frame, row in zip(frames[:3], result["photos"][:3], strict=True):  # enrolled embeddings are in the query space
        assert row["candidates"][0]["gallery_image"] == frame.name and row["candidates"][0]["embedding_similarity"] > 0.9999

    # The Dagster instance shows the new gallery version on the gallery asset.
    instance = dg.DagsterInstance.get()
    mat = instance.get_latest_materialization_event(dg.AssetKey("gallery")).asset_materialization
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["version"] == "v0002" and meta["enrolled_photos"] == 3 and meta["enrolled_individuals"] == 1
    assert [r.data["version"] for r in meta["versions"].records] == ["v0001", "v0002"]  # a table in the UI

    # Retraining includes them: the sensor sees a change, and train_metadata lists them.
    requests, _ = sensor(cursor)
    assert len(requests) == 1
    job = load_defs().resolve_implicit_global_asset_job_def()
    run = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("train_metadata")])
    assert run.success
    train = pd.read_parquet(layout.tables / "train_metadata.parquet")
    mine = train[train["individual_id"] == NEW_ID]
    assert sorted(mine["image"]) == [p.name for p in frames[:3]]
    assert all(Path(p).is_file() for p in mine["path"]) and train["label"].nunique() == train["individual_id"].nunique() == 11
    mat = instance.get_latest_materialization_event(dg.AssetKey("train_metadata")).asset_materialization
    assert mat.metadata["enrolled_photos"].value == 3

    # The gallery asset, rematerialised before any retraining, keeps the enrolled photos.
    run = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("gallery")])
    assert run.success
    versions = list_versions(layout)
    assert versions["version"].tolist() == ["v0001", "v0002", "v0003"]
    newest = versions.iloc[-1]
    assert newest["made_by"] == "gallery asset" and newest["current"] and newest["enrolled_photos"] == 3
    code, out, _ = _whale(capsys, "identify", str(frames[4]), "--json")
    assert json.loads(out)["photos"][0]["decision"] == NEW_ID


def test_identify_refuses_models_the_gallery_was_not_built_with(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=home["layout"].mlflow_uri)
    v0, v1 = (str(client.get_model_version_by_alias("whale-arcface", f"fold{i}").version) for i in (0, 1))
    photo = next((home["data"] / "test_images").iterdir())
    code, _, err = _whale(capsys, "identify", str(photo), "--model-version", v1, v0)
    assert code == 2
    assert f"whale-arcface v{v1} is not the fold0 model" in err and "Rematerialise the gallery" in err
    code, _, err = _whale(capsys, "identify", str(photo), "--alias", "nonesuch")
    assert code == 2 and "whale-arcface@nonesuch_fold0 not found" in err
    code, out, _ = _whale(capsys, "identify", str(photo), "--model-version", v0, v1, "--json")  # the gallery's own versions
    assert code == 0 and json.loads(out)["photos"][0]["status"] == "ok"


def test_enroll_rejects_a_bad_file_whole_and_changes_nothing(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    layout, data = home["layout"], home["data"]
    folder = home["root"] / "bad_batch"
    folder.mkdir()
    known = pd.read_csv(data / "train.csv").iloc[0]
    shutil.copy(data / "train_images" / known["image"], folder / known["image"])
    shutil.copy(data / "train_images" / known["image"], folder / "fine.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    pd.DataFrame(
        {
            "image": [known["image"], "fine.jpg", "fine2.jpg", "fine.jpg"],
            "individual_id": [known["individual_id"], "new_individual", "someone", "someone"],
        }
    ).to_csv(folder / "confirmed.csv", index=False)
    before = (list_versions(layout), read_ledger(layout))
    code, _, err = _whale(capsys, "enroll", str(folder / "confirmed.csv"), "--images", str(folder))
    assert code == 2
    assert "duplicate image rows: fine.jpg" in err
    pd.DataFrame(
        {"image": [known["image"], "fine.jpg", "empty.jpg"], "individual_id": [known["individual_id"], "new_individual", "x"]}
    ).to_csv(folder / "confirmed.csv", index=False)
    code, _, err = _whale(capsys, "enroll", str(folder / "confirmed.csv"), "--images", str(folder))
    assert code == 2
    assert "'new_individual' is not an identity" in err and "line(s) 3" in err
    assert f"already in the catalogue (rename the file if it is another photo): {known['image']}" in err
    pd.DataFrame({"image": ["empty.jpg"], "individual_id": ["x"]}).to_csv(folder / "confirmed.csv", index=False)
    code, _, err = _whale(capsys, "enroll", str(folder / "confirmed.csv"), "--images", str(folder))
    assert code == 2 and "line 2:" in err and "empty.jpg: file is empty" in err
    after = (list_versions(layout), read_ledger(layout))
    pd.testing.assert_frame_equal(before[0], after[0])
    pd.testing.assert_frame_equal(before[1], after[1])


def _release_photos(home: dict) -> list[str]:
    """The test photos, tonight's frames (once enrolled), a gallery photo, an unreadable and a missing one."""
    data, root = home["data"], home["root"]
    broken = root / "broken_for_the_model.jpg"
    broken.write_bytes(b"not a jpeg")
    train_photo = data / "train_images" / pd.read_csv(data / "train.csv")["image"].iloc[0]
    tonight = sorted((root / "tonight").glob("*.jpg"))
    test_photos = sorted((data / "test_images").iterdir())
    return [str(p) for p in [*test_photos, *tonight, train_photo, broken, root / "missing.jpg"]]


@pytest.fixture(scope="module")
def release_model(home: dict) -> str:
    """The release logged as one MLflow pyfunc model in a run, registered as
    ``whale-release`` with the alias ``champion``: its URI."""
    import mlflow

    from whale_ml.gallery.release import read_release
    from whale_ml.identify.serving import log_release

    layout = read_release(home["layout"]).layout
    mlflow.set_tracking_uri(layout.mlflow_uri)
    try:
        experiment = mlflow.get_experiment_by_name("whale-photo-id")
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="release"):
            info = log_release(layout, layout.mlflow_uri, registered_model_name="whale-release")
        mlflow.MlflowClient(layout.mlflow_uri).set_registered_model_alias("whale-release", "champion", str(info.registered_model_version))
    finally:
        mlflow.set_tracking_uri(None)
    return "models:/whale-release@champion"


_LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = model.predict(pd.DataFrame({"image_path": json.loads(sys.argv[2])})).to_dict(orient="records")
try:
    model.predict(pd.DataFrame({"path": ["a.jpg"]}))
    missing = None
except Exception as exc:
    missing = str(exc)
print(json.dumps({"rows": rows, "missing": missing, "whale_ml": sys.modules["whale_ml"].__file__}))
"""


def test_release_model_answers_like_whale_identify_in_a_fresh_process(
    home: dict, release_model: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The release as an MLflow pyfunc model, loaded by ``mlflow.pyfunc.load_model`` in a new
    interpreter from the registry, gives ``whale identify``'s predictions row for row, error
    rows included."""
    photos = _release_photos(home)
    code, out, _ = _whale(capsys, "identify", *photos, "--json")
    assert code == 0
    expected = json.loads(out)["photos"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": home["layout"].mlflow_uri}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_PREDICT, release_model, json.dumps(photos)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    rows = answer["rows"]
    assert [r["image"] for r in rows] == [p["image"] for p in expected]
    assert [r["predictions"] for r in rows] == [" ".join(p["predictions"]) for p in expected]
    assert [r["error"] for r in rows] == [p["error"] for p in expected]
    assert sum(len(r["predictions"].split()) == 5 for r in rows) == len(photos) - 2
    assert [r["predictions"] for r in rows[-2:]] == ["", ""] and "file not found" in rows[-1]["error"]
    assert "image_path" in answer["missing"], answer["missing"]
    assert "/artifacts/code/whale_ml/" in answer["whale_ml"], "the model loads its own copy of whale_ml"


def test_release_model_refuses_models_its_gallery_was_not_built_with(home: dict) -> None:
    from whale_ml.gallery import LineageError
    from whale_ml.gallery.matchers import load_matcher
    from whale_ml.gallery.models import gallery_models
    from whale_ml.identify.serving import log_release_model

    layout = home["layout"]
    gallery = load_version(layout)
    models = gallery_models(gallery.lineage, layout.model_dir, None, layout.home / "model_cache")
    tuned = load_matcher(layout, gallery.lineage, gallery.name)
    with pytest.raises(LineageError, match="was built with the models fold0"):
        log_release_model(layout, gallery, models[::-1], tuned)


@pytest.mark.server
def test_release_model_is_served_by_mlflow_models_serve(home: dict, release_model: str, free_port, tmp_path: Path) -> None:
    """``mlflow models serve --env-manager local`` (docs/serving.md) answers /invocations
    with the model's rows, and a request without ``image_path`` with a 400 naming it."""
    port, log_path = free_port(), tmp_path / "serve.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": home["layout"].mlflow_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # it starts `uvicorn` by name
    }
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", release_model, "--env-manager", "local"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, log_path, timeout=180, proc=proc)
            photos = _release_photos(home)[:2] + [str(home["root"] / "missing.jpg")]

            def post(columns: list[str], data: list[list[str]]) -> tuple[int, dict]:
                body = json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()
                request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=120) as resp:
                        return resp.status, json.loads(resp.read())
                except urllib.error.HTTPError as exc:
                    return exc.code, json.loads(exc.read())

            status, answer = post(["image_path"], [[p] for p in photos])
            assert status == 200, answer
            rows = answer["predictions"]
            assert [r["image"] for r in rows] == [Path(p).name for p in photos]
            assert all(len(r["predictions"].split()) == 5 and r["error"] is None for r in rows[:2])
            assert rows[2]["predictions"] == "" and "file not found" in rows[2]["error"]
            status, answer = post(["path"], [["a.jpg"]])
            assert status == 400 and "image_path" in answer["message"]
        finally:
            stop_group(proc)


@pytest.fixture(scope="module")
def report(home: dict) -> Path:
    """The HTML report of the test photos and one unreadable photo."""
    out = home["root"] / "report.html"
    broken = home["root"] / "broken_for_report.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    assert whale(["identify", str(home["data"] / "test_images"), str(broken), "--report", str(out)]) == 0
    return out


def test_report_is_self_contained(home: dict, report: Path) -> None:
    page = report.read_text()
    n_ok = len(list((home["data"] / "test_images").iterdir()))
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 6 * n_ok, "each query crop and its five candidates' crops"
    assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
    outside_images = re.sub(r'src="data:[^"]*"', "", page)  # (base64 may hold '//')
    assert not re.search(r"(?:https?:)?//|<link|<script|url\(|src=", outside_images), "no external assets"
    assert "broken_for_report.jpg" in page and "could not be identified" in page


@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
@pytest.mark.server
def test_report_images_load_in_headless_chromium(home: dict, report: Path, tmp_path: Path) -> None:
    # A copy with a probe that records, once the page has loaded, how many images decoded.
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.body.setAttribute('data-images', imgs.length);"
        " document.body.setAttribute('data-loaded', imgs.filter(i => i.complete && i.naturalWidth > 0).length); });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [
            *chromium_command(
                tmp_path / "profile",
                "--virtual-time-budget=10000",
                "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: anything external would fail to load
                "--dump-dom",
            ),
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    found = re.search(r'data-images="(\d+)" data-loaded="(\d+)"', dom)
    assert found, dom[:2000]
    images, loaded = map(int, found.groups())
    assert images == 6 * len(list((home["data"] / "test_images").iterdir())) and loaded == images


def _start_whale(*args: str, terminal: bool) -> Callable[[], tuple[int, str, str]]:
    """A real `whale` process, its stdout a pipe and its stderr a pseudo-terminal (``terminal``)
    or a pipe. Returns what waits for it: exit code, stdout, and what it wrote on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}  # as a user runs it
    env["TERM"] = "xterm-256color"  # the pipe, not the terminal type, must silence it
    screen, stderr = pty.openpty() if terminal else (-1, subprocess.PIPE)
    proc = subprocess.Popen([sys.executable, "-m", "whale_assets.cli", *args], stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO)
    drawn: list[bytes] = []

    def read_screen() -> None:  # drained as it is drawn: a full terminal would block the command
        while True:
            try:
                chunk = os.read(screen, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                return
            if not chunk:
                return
            drawn.append(chunk)

    if terminal:
        os.close(stderr)
        reader = threading.Thread(target=read_screen, daemon=True)
        reader.start()

    def wait() -> tuple[int, str, str]:
        out, err = proc.communicate(timeout=300)
        if terminal:
            reader.join(timeout=30)
            os.close(screen)
            err = b"".join(drawn)
        return proc.returncode, out.decode(), err.decode()

    return wait


def _bars(screen: str) -> dict[str, str]:
    """The last frame drawn on each line of a terminal's output, by what precedes its first colon."""
    frames = [line.split("\r")[-1].strip() for line in screen.replace("\r\n", "\n").split("\n")]
    return {frame.split(":")[0]: frame for frame in frames if frame}


# A finished bar: all photos counted, elapsed<time left, and a rate (tqdm turns a slow one into s/photo).
FINISHED = r"{}: 100%\|.+\| (\d+)/\1 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(photo/s|s/photo)\]"


def test_identify_draws_bars_on_a_terminal_and_nothing_when_piped(home: dict) -> None:
    """Side by side, the same photos: on a terminal a bar per phase on stderr; piped, stderr
    stays empty (MLflow's download included: the model cache is emptied first). Stdout holds
    the same JSON either way."""
    shutil.rmtree(home["home"] / "model_cache", ignore_errors=True)
    photos = str(home["data"] / "test_images")
    on_terminal, piped = (_start_whale("identify", photos, "--json", terminal=t) for t in (True, False))
    (code, out, screen), (piped_code, piped_out, piped_err) = on_terminal(), piped()
    assert code == piped_code == 0, screen + piped_err
    assert piped_err == ""
    bars = _bars(screen)
    assert list(bars) == ["cropping", "embedding", "local features", "matching"], screen
    n = len(list((home["data"] / "test_images").iterdir()))
    for phase, frame in bars.items():
        assert re.fullmatch(FINISHED.format(phase), frame) and f" {n}/{n} " in frame, frame
    answers = [[row["predictions"] for row in json.loads(text)["photos"]] for text in (out, piped_out)]
    assert answers[0] == answers[1] and len(answers[0]) == n


def test_enroll_draws_a_bar_per_phase_on_a_terminal(home: dict) -> None:
    """Its phases on stderr, its summary alone on stdout. (Piped, it shares identify's
    silence above: the same switch.)"""
    frames = _encounter(home["root"] / "progress", n=3)
    confirmed = home["root"] / "progress.csv"
    names = [frame.rename(frame.with_name("progress_" + frame.name)).name for frame in frames]  # not in the ledger yet
    pd.DataFrame({"image": names, "individual_id": "bead0000face"}).to_csv(confirmed, index=False)
    code, out, screen = _start_whale("enroll", str(confirmed), "--images", str(frames[0].parent), "--json", terminal=True)()
    assert code == 0, screen
    bars = _bars(screen)
    assert list(bars) == ["checking", "cropping", "embedding", "local features"], screen
    for phase, frame in bars.items():
        assert re.fullmatch(FINISHED.format(phase), frame) and " 3/3 " in frame, frame
    assert json.loads(out)["enrolled_photos_now"] == 3


def test_gallery_asset_prunes_old_versions_when_asked(home: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Last in this module: it deletes the versions the tests above looked at."""
    from whale_assets.definitions import defs as load_defs

    layout = home["layout"]
    before = list_versions(layout)["version"].tolist()
    job = load_defs().resolve_implicit_global_asset_job_def()
    run = job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        asset_selection=[dg.AssetKey("gallery")],
        run_config={"ops": {"gallery": {"config": {"keep_versions": 2}}}},
    )
    assert run.success
    after = list_versions(layout)
    newest = f"v{int(before[-1][1:]) + 1:04d}"
    assert after["version"].tolist() == [before[-1], newest] and bool(after.iloc[-1]["current"])
    mat = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("gallery")).asset_materialization
    assert mat.metadata["pruned_versions"].value == len(before) - 1
    code, out, _ = _whale(capsys, "identify", str(next((home["data"] / "test_images").iterdir())), "--json")
    assert code == 0 and json.loads(out)["gallery"]["version"] == newest
