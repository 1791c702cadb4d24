"""Faults, for real: kill -9 mid-stage, two folds at once, an MLflow server that is not
there (then is), and writes that the kernel refuses (file-size limit, full disk, no
permission, a file where a folder should be). docs/reliability.md lists what each shows.

One tiny pipeline run is shared: it is killed while writing crops, then materialised
again, and the later tests work on that home. Training killed mid-epoch is
tests/test_kill_resume.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from health import wait_healthy

from whale_assets.instance import prepare_dagster_home
from whale_assets.run import load_recipe, run_pipeline
from whale_assets.rounds import Round
from whale_assets.stages import asset_names, ensemble_and_submit
from whale_ml.gallery.catalogue import LOCK_FILE, READERS_LOCK_FILE
from whale_ml.io import ArtifactWriteError, is_staging_name, is_temp_name
from whale_ml.home import HomeLayout

# The stages' assets, resolved from their groups (whale_assets/stages.py).
DOWNSTREAM = asset_names(ensemble_and_submit(Round(1, 1)), 1)

pytestmark = [pytest.mark.kill, pytest.mark.skipif(sys.platform == "win32", reason="process groups, SIGKILL, setrlimit")]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _fast_recipe(tmp: Path, **train: object) -> Path:
    """configs/tiny.yaml without the YOLO detector (full frames: seconds, not a minute)."""
    recipe = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    recipe["ops"]["fluke_detector"] = {"config": {"source": "none"}}
    recipe["ops"]["arcface_model"]["config"].update(train)
    path = tmp / f"recipe{len(list(tmp.glob('recipe*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env(home: Path, data: Path, **extra: str) -> dict[str, str]:
    """The environment of a process working on ``home`` (the home's own MLflow store unless ``extra`` names one)."""
    env = {**os.environ, "WHALE_HOME": str(home), "WHALE_DATA_DIR": str(data), "DAGSTER_HOME": str(home / "dagster_home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, **extra}


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _kill_when(proc: subprocess.Popen, seen: Callable[[], bool], what: str, timeout_s: float, interval_s: float) -> None:
    """SIGKILL ``proc``'s process group as soon as ``seen()`` holds, polled every
    ``interval_s``; fail if the process ends first or ``timeout_s`` passes. A
    FileNotFoundError from ``seen`` (a file renamed away meanwhile) counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            if seen():
                break
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"not seen in {timeout_s:.0f} s: {what}"
        time.sleep(interval_s)
    os.killpg(proc.pid, signal.SIGKILL)


def _in_process(pipeline: dict, keys: list[str]) -> dg.ExecuteInProcessResult:
    """Materialise ``keys`` in this process, on the pipeline's home and recipe (not raising on failure)."""
    from whale_assets.definitions import defs
    from whale_assets.run import stage_run_config

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(pipeline["home"], pipeline["data"]).items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return (
            defs()
            .resolve_implicit_global_asset_job_def()
            .execute_in_process(
                run_config=stage_run_config(load_recipe(pipeline["recipe"]), keys),
                instance=dg.DagsterInstance.get(),
                asset_selection=[dg.AssetKey(k) for k in keys],
                raise_on_error=False,
            )
        )


def read_back(home: Path) -> dict[str, object]:
    """Open every artifact under ``home`` with the reader of its kind (raises on a broken one).

    Returns counts per kind, and the hidden temp files found, including those in staging
    folders (never read: readers skip them).
    """
    import faiss
    import torch
    from PIL import Image

    counts: Counter[str] = Counter()
    temps: list[Path] = []
    for path in sorted(home.rglob("*")):
        if not path.is_file() or "dagster_home" in path.relative_to(home).parts:  # Dagster's own storage
            continue
        if is_temp_name(path.name) or any(is_staging_name(part) for part in path.relative_to(home).parts):
            temps.append(path)  # a temp file, or a file in a folder not yet renamed into place
            continue
        kind = path.suffix.lower()
        try:
            if kind == ".csv":
                pd.read_csv(path)
            elif kind == ".parquet":
                pd.read_parquet(path)
            elif kind == ".npy":
                np.load(path)
            elif kind == ".faiss":
                faiss.read_index(str(path))
            elif kind == ".json":
                json.loads(path.read_text())
            elif kind in (".yaml", ".yml") or path.name == "MLmodel":
                yaml.safe_load(path.read_text())
            elif kind in (".png", ".jpg", ".jpeg"):
                with Image.open(path) as im:
                    im.verify()
            elif kind == ".pt":
                torch.load(path, weights_only=True)
            elif kind == ".pth":  # MLflow's pickled model (our own classes)
                torch.load(path, weights_only=False)
            elif kind == ".db":
                with sqlite3.connect(path) as db:
                    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            else:
                continue
        except Exception as exc:
            raise AssertionError(f"{path} does not read back: {exc}") from exc
        counts[kind] += 1
    return {"counts": counts, "temps": temps}


# --- kill -9 while crops are written, then materialise again ------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[dict]:
    """A ``whale run`` killed (SIGKILL, whole process group) as soon as its first crop file
    appears, then the whole graph materialised again in this process. Later tests share the home."""
    root = tmp_path_factory.mktemp("faults")
    home = root / "home"
    recipe = _fast_recipe(root)
    proc = subprocess.Popen(
        [PY, "-m", "whale_assets.run", "--recipe", str(recipe)],
        env=_env(home, tiny_data),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    crops_dir = HomeLayout(home).crops_dir / "train"
    n_train = len(pd.read_csv(tiny_data / "train.csv"))
    n_photos = n_train + len(pd.read_csv(tiny_data / "sample_submission.csv"))
    try:
        _kill_when(
            proc,
            lambda: crops_dir.is_dir() and any(n.endswith(".jpg") and not is_temp_name(n) for n in os.listdir(crops_dir)),
            "a crop was written",
            timeout_s=180,
            interval_s=0.0005,
        )
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    at_kill = read_back(home)
    # Train crops are written first, then test crops: count both.
    crops_at_kill = sum(1 for p in HomeLayout(home).crops_dir.rglob("*.jpg") if not is_temp_name(p.name))

    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(home, tiny_data).items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        prepare_dagster_home()
        summary = run_pipeline(load_recipe(recipe), log=messages.append)
        yield {
            "root": root,
            "home": home,
            "data": tiny_data,
            "recipe": recipe,
            "at_kill": at_kill,
            "crops_at_kill": crops_at_kill,
            "n_train": n_train,
            "n_photos": n_photos,
            "messages": messages,
            "summary": summary,
        }


def _latest_metadata(asset: str) -> dict[str, object]:
    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, asset
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_kill_during_crop_writing_then_rerun_reuses_the_crops_written(pipeline: dict) -> None:
    home = pipeline["home"]
    # At the kill: every file under its real name reads back; only hidden temps may be partial.
    assert pipeline["at_kill"]["counts"][".jpg"] == pipeline["crops_at_kill"] >= 1
    assert 1 <= pipeline["crops_at_kill"] < pipeline["n_photos"], "the kill must land while crops are being written"
    print(f"killed with {pipeline['crops_at_kill']} of {pipeline['n_photos']} crops written, temps {pipeline['at_kill']['temps']}")
    # The killed run was marked failed (its step never finished), and the rerun finished everything.
    assert any("marked failed" in m for m in pipeline["messages"]), pipeline["messages"]
    assert 0.0 <= pipeline["summary"]["map5"] <= 1.0
    crops = _latest_metadata("crops")
    assert crops["reused"] == pipeline["crops_at_kill"], crops  # what was written whole is kept ...
    assert crops["written"] == pipeline["n_photos"] - pipeline["crops_at_kill"] == crops["dagster/row_count"] - crops["reused"]
    after = read_back(home)
    assert not after["temps"], after["temps"]
    for kind in (".jpg", ".csv", ".npy", ".faiss", ".pt", ".parquet", ".json", ".png", ".db"):
        assert after["counts"][kind] > 0, (kind, after["counts"])


# --- kill -9 while the gallery and the submission are written -----------------------------------------

_LOOP = """
import os, sys, dagster as dg
from whale_assets.definitions import defs
from whale_assets.run import stage_run_config, load_recipe
job = defs().resolve_implicit_global_asset_job_def()
config = stage_run_config(load_recipe(sys.argv[1]), ["gallery", "submission_csv"])
instance = dg.DagsterInstance.get()
for i in range(1000):
    job.execute_in_process(run_config=config, instance=instance, asset_selection=[dg.AssetKey("gallery"), dg.AssetKey("submission_csv")])
    print(i, flush=True)
"""


def test_kill_during_gallery_and_submission_writing(pipeline: dict) -> None:
    """A process rewriting the gallery and the submission over and over is killed at a few moments;
    every artifact reads back each time, and materialising again finishes and clears the temps.
    (Where in a write a kill lands is chance: test_kill_mid_write below lands inside one for sure.)"""
    home, layout = pipeline["home"], HomeLayout(pipeline["home"])
    checkpoints = {p: p.stat().st_mtime_ns for p in (home / "models").rglob("*.pt")}
    for delay in (0.0, 0.45):
        proc = subprocess.Popen(
            [PY, "-c", _LOOP, str(pipeline["recipe"])],
            env=_env(home, pipeline["data"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout.readline().strip() == "0", "the loop did not finish its first round"  # type: ignore[union-attr]
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            _kill_group(proc)
        seen = read_back(home)  # raises on any artifact that is not whole
        print(f"killed {delay} s into round 1: {sum(seen['counts'].values())} artifacts read back, temps left {seen['temps']}")
        pd.read_csv(layout.submission)  # (named again: the file this is about)

    result = _in_process(pipeline, DOWNSTREAM)
    assert result.success
    after = read_back(home)
    assert not after["temps"], after["temps"]
    # The fold checkpoints were not touched by any of it.
    assert {p: p.stat().st_mtime_ns for p in (home / "models").rglob("*.pt")} == checkpoints


_WRITER = """
import sys, numpy as np, pandas as pd, faiss
from whale_ml.retrieval.store import save_embeddings
from whale_ml.retrieval.faiss_index import save_index
from whale_ml.submission import write_submission
folder, what = sys.argv[1], sys.argv[2]
def write(n):
    x = np.ones((n, 64), dtype=np.float32)
    if what == "npy":
        save_embeddings(folder, "queries", x, [str(i) for i in range(n)])
    elif what == "faiss":
        index = faiss.IndexFlatIP(64); index.add(x); save_index(index, folder + "/index.faiss")
    else:
        write_submission(pd.DataFrame({"image": [f"{i}.jpg" for i in range(n)], "predictions": "new_individual a b c d"}),
                         folder + "/submission.csv")
write(10)  # the complete earlier version
print("ready", flush=True)
write(1_000_000)  # 256 MB (the csv: 40 MB) to write: the kill lands inside it
"""


_VERSION_WRITER = """
import sys, numpy as np, pandas as pd
from pathlib import Path
from whale_ml.gallery import FoldModel, GalleryLineage, write_version
from whale_ml.home import HomeLayout
layout = HomeLayout(Path(sys.argv[1]))
lineage = GalleryLineage(models=[FoldModel(fold="fold0", checkpoint_sha256="0" * 64)], detector_sha256=None,
                         detector_imgsz=64, min_confidence=0.25, expand=1.2, crop_size=64, resize="pad")
def write(n):
    table = pd.DataFrame({"image": [f"{i}.jpg" for i in range(n)], "individual_id": "a", "species": "s",
                          "crop_path": "", "source": "pipeline"})
    x = np.zeros((n, 64), dtype=np.float32); x[:, 0] = 1
    write_version(layout, table, x, lineage, made_by="test")
write(10)  # v0001, complete
print("ready", flush=True)
write(1_000_000)  # 256 MB of index, as much of embeddings: the kill lands while it is staged
"""


def test_kill_while_a_gallery_version_is_staged(tmp_path: Path) -> None:
    """SIGKILL while a new gallery version is being written: no version appears, the
    current one still loads whole, and the next write (or prune) sweeps the dead
    writer's folder."""
    from whale_ml.gallery import list_versions, load_version, prune_versions, write_version

    layout = HomeLayout(tmp_path)
    root = layout.gallery_versions_dir
    proc = subprocess.Popen([PY, "-c", _VERSION_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    staged: list[Path] = []

    def grown() -> bool:
        staged[:] = [p for p in root.iterdir() if is_staging_name(p.name)]
        return bool(staged) and any(f.stat().st_size > 1 << 20 for f in staged[0].iterdir())

    try:
        assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        _kill_when(proc, grown, "a staged version grew past 1 MB", timeout_s=120, interval_s=0.01)
    finally:
        _kill_group(proc)
    assert staged[0].exists()  # the kill landed before the rename
    assert list_versions(layout)["version"].tolist() == ["v0001"]
    assert len(load_version(layout).table) == 10
    found = read_back(tmp_path)
    assert found["temps"] and all(staged[0] in p.parents for p in found["temps"])  # type: ignore[union-attr]

    lineage = load_version(layout).lineage
    table = pd.DataFrame({"image": ["x.jpg"], "individual_id": "b", "species": "s", "crop_path": "", "source": "pipeline"})
    write_version(layout, table, np.eye(1, 64, dtype=np.float32), lineage, made_by="test")
    assert not staged[0].exists(), "the dead writer's folder was swept"
    assert list_versions(layout)["version"].tolist() == ["v0001", "v0002"]
    # A prune killed between its rename and its delete leaves a folder of the same kind.
    leftover = root / f".deleting.p{proc.pid}.v0000.partial"
    (leftover / "sub").mkdir(parents=True)
    assert prune_versions(layout, 1) == ["v0001"] and not leftover.exists()
    assert sorted(p.name for p in root.iterdir()) == ["current.json", "v0002"]


@pytest.mark.parametrize("what, name", [("npy", "queries.npy"), ("faiss", "index.faiss"), ("csv", "submission.csv")])
def test_kill_mid_write_keeps_the_old_file_whole(tmp_path: Path, what: str, name: str) -> None:
    """SIGKILL while a temp file is growing: the real name still holds the earlier complete
    version, and the next write of that file removes the dead writer's temp file."""
    stem = name.rsplit(".", 1)[0]
    proc = subprocess.Popen([PY, "-c", _WRITER, str(tmp_path), what], stdout=subprocess.PIPE, text=True, start_new_session=True)
    temps: list[Path] = []

    def grown() -> bool:
        temps[:] = [p for p in tmp_path.iterdir() if is_temp_name(p.name) and p.name.startswith(f".{stem}.")]
        return bool(temps) and temps[0].stat().st_size > 1 << 20

    try:
        assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        _kill_when(proc, grown, "a temp file grew past 1 MB", timeout_s=60, interval_s=0.001)
    finally:
        _kill_group(proc)
    assert temps[0].exists()  # the kill really landed mid-write
    old = read_back(tmp_path)
    assert temps[0] in old["temps"]
    if what == "npy":  # the pair: neither half of the new one replaced the old
        assert np.load(tmp_path / name).shape == (10, 64) and len(pd.read_csv(tmp_path / "queries_images.csv")) == 10
    elif what == "csv":
        assert len(pd.read_csv(tmp_path / name)) == 10
    else:
        import faiss

        assert faiss.read_index(str(tmp_path / name)).ntotal == 10

    from whale_ml.retrieval.store import save_embeddings
    from whale_ml.submission import write_submission

    if what == "npy":
        save_embeddings(tmp_path, "queries", np.zeros((3, 64), np.float32), ["a", "b", "c"])
    elif what == "csv":
        write_submission(pd.DataFrame({"image": ["a.jpg"], "predictions": ["new_individual"]}), tmp_path / name)
    else:
        import faiss

        from whale_ml.retrieval.faiss_index import save_index

        save_index(faiss.IndexFlatIP(64), tmp_path / name)
    assert not read_back(tmp_path)["temps"]


# --- MLflow unreachable, then reachable ------------------------------------------------------------------

_MATERIALISE = """
import json, sys, time, dagster as dg
from whale_assets.definitions import defs
from whale_assets.run import stage_run_config, load_recipe
keys, partition = sys.argv[2].split(","), sys.argv[3]
job = defs().resolve_implicit_global_asset_job_def()
t0 = time.time()
result = job.execute_in_process(
    run_config=stage_run_config(load_recipe(sys.argv[1]), keys), instance=dg.DagsterInstance.get(),
    asset_selection=[dg.AssetKey(k) for k in keys], partition_key=partition, raise_on_error=False)
events = result.all_events
records = dg.DagsterInstance.get().all_logs(result.run_id)
steps = [(r.dagster_event.event_type_value, r.step_key, r.timestamp) for r in records if r.dagster_event is not None]
starts = {key: t for kind, key, t in steps if kind == "STEP_START"}
ends = {key: t for kind, key, t in steps if kind in ("STEP_SUCCESS", "STEP_FAILURE")}
failures = [e.event_specific_data.error.to_string() for e in events if e.event_type_value == "STEP_FAILURE"]
logs = [r.user_message for r in records]
print(json.dumps({"success": result.success, "run_id": result.run_id, "seconds": time.time() - t0,
                  "retries": sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in events),
                  "starts": starts, "ends": ends, "failures": failures, "logs": logs}))
"""


def _materialise(pipeline: dict, keys: str, partition: str, recipe: Path | None = None, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", _MATERIALISE, str(recipe or pipeline["recipe"]), keys, partition],
        env=_env(pipeline["home"], pipeline["data"], **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _result(proc: subprocess.Popen, timeout: float = 240) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def mlflow_server(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[tuple[str, Callable[[], Path]]]:
    """A URI where nothing listens yet, and a function that starts a real ``mlflow server`` there."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start() -> Path:
        artifacts = tmp_path / "server_artifacts"
        procs.append(
            subprocess.Popen(
                [
                    str(Path(PY).with_name("mlflow")),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination",
                    str(artifacts),
                ],
                stdout=open(tmp_path / "server.log", "w"),  # noqa: SIM115 - the server's lifetime
                stderr=subprocess.STDOUT,
                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                start_new_session=True,
            )
        )
        wait_healthy(uri, tmp_path / "server.log", timeout=90, proc=procs[-1], interval=0.3)
        return artifacts

    yield uri, start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # uvicorn waits for idle keep-alive clients
                _kill_group(proc)


def test_mlflow_unreachable_fails_fast_is_retried_then_succeeds_without_retraining(pipeline: dict, mlflow_server: tuple) -> None:
    uri, start_server = mlflow_server
    model_dir = HomeLayout(pipeline["home"]).model_dir("fold0")
    checkpoints = {p.name: p.stat().st_mtime_ns for p in model_dir.glob("*.pt")}
    retry = {"WHALE_MLFLOW_RETRIES": "2", "WHALE_MLFLOW_RETRY_DELAY_S": "0.2", "MLFLOW_TRACKING_URI": uri}

    down = _result(_materialise(pipeline, "arcface_model", "fold0", **retry))
    assert not down["success"]
    assert down["retries"] == 2, down  # the retry policy tried it twice more
    assert uri in down["failures"][-1] and "unreachable" in down["failures"][-1], down["failures"][-1]
    assert down["seconds"] < 20, f"not fast: {down['seconds']:.1f} s for three attempts"
    print(f"unreachable: failed after {down['retries']} retries in {down['seconds']:.1f} s: {down['failures'][-1][:300]}")
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.glob("*.pt")} == checkpoints  # nothing lost

    # Materialise again while the server starts: attempts before it listens fail fast and are
    # retried (1 s, 2 s, 4 s, ... apart) until one gets through.
    child = _materialise(pipeline, "arcface_model", "fold0", **{**retry, "WHALE_MLFLOW_RETRIES": "6", "WHALE_MLFLOW_RETRY_DELAY_S": "1"})
    artifacts = start_server()
    up = _result(child)
    assert up["success"], up["failures"]
    print(f"with the server starting meanwhile: succeeded after {up['retries']} retries")
    # The finished checkpoint was reused, not trained again.
    assert any("already trained with this recipe" in m for m in up["logs"]), up["logs"]
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.glob("*.pt")} == checkpoints

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("whale-photo-id")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dagster.run_id` = '{up['run_id']}'")
    assert run.data.tags["dagster.partition"] == "fold0" and "best_val_map5" in run.data.metrics
    # Artifacts went through the server into its own store, not into the client's home.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any(p.name == "MLmodel" for p in artifacts.rglob("MLmodel"))
    assert client.get_model_version_by_alias("whale-arcface", "fold0").run_id == run.info.run_id


def test_only_transient_mlflow_failures_are_retried(pipeline: dict, tmp_path: Path, free_port: Callable[[], int]) -> None:
    """A real connection failure counts as transient; an error of the step itself (here an
    unknown backbone) fails at the first attempt, without minutes of backoff, naming the cause."""
    import requests

    from whale_assets.retries import is_transient

    with pytest.raises(requests.ConnectionError) as dead:
        requests.get(f"http://127.0.0.1:{free_port()}/health", timeout=2)
    assert is_transient(dead.value) and not is_transient(ValueError("bad data"))
    try:
        raise RuntimeError("logging failed") from dead.value
    except RuntimeError as wrapped:  # found through the cause chain
        assert is_transient(wrapped)

    recipe = _fast_recipe(tmp_path, backbone="no_such_backbone")
    r = _result(_materialise(pipeline, "arcface_model", "fold1", recipe=recipe, WHALE_MLFLOW_RETRIES="3", WHALE_MLFLOW_RETRY_DELAY_S="5"))
    assert not r["success"] and r["retries"] == 0, r
    assert "no_such_backbone" in r["failures"][-1], r["failures"][-1]
    assert r["seconds"] < 60, r["seconds"]


# --- two fold partitions at the same time -----------------------------------------------------------------


def test_two_folds_materialised_at_once_keep_their_own_files(pipeline: dict) -> None:
    """Both partitions train (a new recipe: 3 epochs) in two processes at the same time, with
    the gpu pool opened to two slots; each keeps its own checkpoints, embeddings and MLflow run."""
    import mlflow
    import torch

    home = pipeline["home"]
    layout = HomeLayout(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        dg.DagsterInstance.get().event_log_storage.set_concurrency_slots("gpu", 2)
    recipe = _fast_recipe(pipeline["root"], epochs=3)
    procs = {fold: _materialise(pipeline, "arcface_model,fold_embeddings", fold, recipe=recipe) for fold in ("fold0", "fold1")}
    results = {fold: _result(proc) for fold, proc in procs.items()}
    for fold, r in results.items():
        assert r["success"], (fold, r["failures"])
    # They really overlapped: each training step started before the other one ended.
    a, b = results["fold0"], results["fold1"]
    assert a["starts"]["arcface_model"] < b["ends"]["arcface_model"] and b["starts"]["arcface_model"] < a["ends"]["arcface_model"]

    fingerprints = {}
    for fold in ("fold0", "fold1"):
        last = torch.load(layout.model_dir(fold) / "last.pt", weights_only=True)
        assert last["epoch"] == 3 and [h["epoch"] for h in last["history"]] == [1, 2, 3]
        fingerprints[fold] = last["data"]
        assert len(pd.read_csv(layout.model_dir(fold) / "history.csv")) == 3
        assert np.load(layout.embeddings_dir(fold) / "train.npy").shape[0] == pipeline["n_train"]
    assert fingerprints["fold0"] != fingerprints["fold1"]  # each file holds its own fold
    assert not np.array_equal(np.load(layout.embeddings_dir("fold0") / "train.npy"), np.load(layout.embeddings_dir("fold1") / "train.npy"))
    assert not read_back(home)["temps"]

    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    experiment = client.get_experiment_by_name("whale-photo-id")
    for fold, r in results.items():
        (run,) = client.search_runs(  # the fold's training run (fold_embeddings has a run of its own)
            [experiment.experiment_id], filter_string=f"tags.`dagster.run_id` = '{r['run_id']}' and tags.`dagster.asset` = 'arcface_model'"
        )
        assert run.data.tags["dagster.partition"] == fold and run.info.status == "FINISHED"
        assert client.get_model_version_by_alias("whale-arcface", fold).run_id == run.info.run_id


# --- writes the kernel refuses ---------------------------------------------------------------------------

_REFUSED = """
import json, os, resource, signal, sys, numpy as np, pandas as pd, torch, faiss
from pathlib import Path
from PIL import Image
from whale_ml.io import ArtifactWriteError, atomic_path, write_json
from whale_ml.retrieval.store import save_embeddings
from whale_ml.retrieval.faiss_index import save_index
from whale_ml.submission import write_submission
from whale_ml.training.trainer import save_checkpoint
from whale_ml.gallery import FoldModel, GalleryLineage, write_version
from whale_ml.home import HomeLayout
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size limit then fails with EFBIG
big = np.random.default_rng(0).random((20000, 64), dtype=np.float32)  # 5 MB
index = faiss.IndexFlatIP(64); index.add(big)
photo = Image.fromarray((np.random.default_rng(1).random((1500, 1500, 3)) * 255).astype("uint8"))
def save_image(image, path):  # as the crops, the contact sheet and the match review are written
    with atomic_path(path) as tmp:
        image.save(tmp, quality=95)
writers = {
    "train.npy": lambda p: save_embeddings(p.parent, "train", big, [str(i) for i in range(len(big))]),
    "index.faiss": lambda p: save_index(index, p),
    "last.pt": lambda p: save_checkpoint(p, {"w": torch.from_numpy(big)}),
    "submission.csv": lambda p: write_submission(pd.DataFrame({"image": range(200000), "predictions": "new_individual a b c d"}), p),
    "crop.jpg": lambda p: save_image(photo, p),
    "gallery.json": lambda p: write_json(p, {"rows": list(range(300000))}),
    # A whole folder: a gallery version (index, embeddings, table) staged, then renamed.
    "home": lambda p: write_version(
        HomeLayout(p),
        pd.DataFrame({"image": [f"{i}.jpg" for i in range(len(big))], "individual_id": "a", "species": "s", "crop_path": "", "source": "pipeline"}),
        big,
        GalleryLineage(models=[FoldModel(fold="fold0", checkpoint_sha256="0" * 64)], detector_sha256=None, detector_imgsz=64,
                       min_confidence=0.25, expand=1.2, crop_size=64, resize="pad"),
        made_by="test",
        index=index,
    ),
}
out = {}
for case in json.loads(sys.argv[1]):
    # Soft limit and effective uid only, so that the next case starts unrestricted; the writes
    # are checked by the kernel as this uid (the interpreter itself may live in root's home).
    resource.setrlimit(resource.RLIMIT_FSIZE, (case["limit"] or resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if case["user"] >= 0:
        os.setegid(case["user"]); os.seteuid(case["user"])
    out[case["folder"]] = {}
    for name, write in writers.items():
        try:
            write(Path(case["folder"]) / name)
            out[case["folder"]][name] = "written"
        except ArtifactWriteError as exc:
            out[case["folder"]][name] = str(exc)
    if case["user"] >= 0:
        os.seteuid(0); os.setegid(0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def refused_writes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, dict[str, str]]]]:
    """Seven real writers (numpy, faiss, torch, pandas, PIL, json, and a gallery version: a
    folder of three files staged, then renamed) each write a 1-5 MB artifact in
    three places the kernel refuses, in one child process:

    - ``size_limit``: RLIMIT_FSIZE of 1 MiB (EFBIG past it);
    - ``permission``: a root-owned 0755 folder written as ``nobody`` (root ignores file modes;
      without root, a 0555 folder);
    - ``full_disk``: a 2 MiB tmpfs (ENOSPC), where this process may mount one (else left out).
    """
    root = tmp_path_factory.mktemp("refused")
    size_limit = root / "size_limit"
    size_limit.mkdir()
    # pytest's tmp dirs are private to their owner; ``nobody`` must be able to reach this one.
    shared = Path(tempfile.mkdtemp(prefix="whale-faults-", dir="/tmp"))
    shared.chmod(0o755)
    permission = shared / "home"
    permission.mkdir(mode=0o755)
    if os.geteuid() != 0:
        permission.chmod(0o555)
    disk = root / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=False, capture_output=True, text=True)
    cases = [
        {"name": "size_limit", "folder": str(size_limit), "limit": 1 << 20, "user": -1},
        {"name": "permission", "folder": str(permission), "limit": 0, "user": 65534 if os.geteuid() == 0 else -1},
    ]
    if mounted.returncode == 0:
        cases.append({"name": "full_disk", "folder": str(disk), "limit": 0, "user": -1})
    try:
        proc = subprocess.run([PY, "-c", _REFUSED, json.dumps(cases)], check=False, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        yield {c["name"]: (Path(c["folder"]), out[c["folder"]]) for c in cases} | (
            {} if mounted.returncode == 0 else {"full_disk_skip": (disk, {"why": mounted.stderr.strip()})}
        )
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        permission.chmod(0o755)
        shutil.rmtree(shared)


def _left_behind(folder: Path) -> list[Path]:
    """Files, and staging folders, under ``folder`` (empty parent folders, and the catalogue's
    lock files, which stay by design, do not count)."""
    locks = {LOCK_FILE, READERS_LOCK_FILE}
    return [p for p in folder.rglob("*") if (p.is_file() and p.name not in locks) or is_staging_name(p.name)]


def test_file_size_limit_gives_a_clear_error_and_no_temp_file(refused_writes: dict) -> None:
    folder, results = refused_writes["size_limit"]
    assert len(results) == 7
    for name, message in results.items():
        # The version's error names the staged file that could not be written.
        assert re.match(rf"could not write {re.escape(str(folder / name))}(: |/gallery/versions/\.staging\.p\d+\.)", message), message
        assert "file-size limit (ulimit -f) of 1048576 bytes" in message, message
    assert not _left_behind(folder), "nothing left behind: no temp file, no partial artifact"


def test_permission_denied_names_the_folder(refused_writes: dict) -> None:
    folder, results = refused_writes["permission"]
    assert len(results) == 7
    for name, message in results.items():
        assert message.startswith(f"could not write {folder / name}: no permission to write in {folder}"), message
    assert not list(folder.iterdir())


def test_full_disk_gives_a_clear_error_and_no_temp_file(refused_writes: dict) -> None:
    if "full_disk" not in refused_writes:
        pytest.skip(f"cannot mount a small tmpfs here ({refused_writes['full_disk_skip'][1]['why']}); the size-limit test covers the path")
    folder, results = refused_writes["full_disk"]
    assert len(results) == 7
    for name, message in results.items():
        assert message.startswith(f"could not write {folder / name}"), message
        assert f"no space left on the disk holding {folder}" in message, message
    assert not _left_behind(folder)


def test_a_file_where_a_folder_should_be_fails_the_asset_naming_it(pipeline: dict) -> None:
    """Materialising the gallery when ``gallery/`` is a file: the step fails and says which path and why."""
    gallery_dir = HomeLayout(pipeline["home"]).gallery_dir
    saved = gallery_dir.with_name("gallery.saved")
    gallery_dir.rename(saved)
    gallery_dir.write_text("not a folder")
    try:
        result = _in_process(pipeline, ["gallery"])
    finally:
        gallery_dir.unlink()
        saved.rename(gallery_dir)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.to_string()
    assert ArtifactWriteError.__name__ in message
    assert f"could not write {gallery_dir / 'versions'}: {gallery_dir} is a file where a folder is needed" in message, message


def test_artifacts_get_the_usual_file_mode_not_the_temp_files_private_one(tmp_path: Path) -> None:
    """mkstemp's temp files are 0600; the renamed artifact must carry the mode the umask gives
    (a report or submission in a shared home is readable by the group, like the rest)."""
    from whale_ml.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o027)
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
