"""The catalogue with several real processes at work on it: enrolments, a gallery build, a
fold's training, pruning and readers side by side, and kill -9 at each step of publishing a
version. Each process is a real `whale` command or tests/catalogue_worker.py, never a
thread; the home is small (a tiny timm model, the tiny data set's photos)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from whale_ml.data.metadata import read_train_metadata
from whale_ml.gallery import build_gallery, current_version, list_versions, load_version, read_ledger
from whale_ml.gallery.lineage import record_boxes, record_crops, record_embeddings
from whale_ml.home import HomeLayout
from whale_ml.io import sha256_file
from whale_ml.models.embedding import create_embedding_model
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.retrieval.embeddings import embed_paths
from whale_ml.retrieval.store import save_embeddings
from whale_ml.stage_configs import GalleryConfig, TrainConfig
from whale_ml.training.checkpoint_saver import save_checkpoint
from whale_ml.training.trainer import load_model

pytestmark = pytest.mark.slow  # subprocesses, each importing torch

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "catalogue_worker.py"


def _checkpoint(cfg: TrainConfig, path: Path, seed: int, ids: list[str]) -> bytes:
    """A fold model's checkpoint of recipe ``cfg`` (untrained, seeded), with class centres for ``ids``."""
    torch.manual_seed(seed)
    model = create_embedding_model(cfg, pretrained=False)
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(ids), 1, cfg.embedding_size)).astype(np.float32)
    centres = ClassCentres(np.array(ids, dtype=object), vectors / np.linalg.norm(vectors, axis=2, keepdims=True))
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.model_dump(), "num_classes": len(ids), **{"class_centres": centres.to_checkpoint()}})
    return path.read_bytes()


def _env(home: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},  # the home's own store
        "WHALE_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def _start(home: Path, *args: str) -> subprocess.Popen[str]:
    """A worker action (catalogue_worker.py) or, with a first argument ``whale``, a whale command."""
    cmd = [sys.executable, "-m", "whale_assets.cli", *args[1:]] if args[0] == "whale" else [sys.executable, str(WORKER), args[0], str(home), *args[1:]]
    return subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO)


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{err[-3000:]}"
    return out


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode} before {path.name}:\n{proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _confirmed(root: Path, name: str, individual: str, photos: list[str]) -> Path:
    path = root / f"{name}.csv"
    pd.DataFrame({"image": photos, "individual_id": individual}).to_csv(path, index=False)
    return path


@pytest.fixture
def catalogue(tmp_path: Path, tiny_data: Path, tiny_config) -> Iterator[dict]:
    """A home whose gallery v0001 holds the tiny set's training photos, embedded (as random
    fold embeddings) with one real tiny fold model whose ``best.pt`` and class centres are
    on disk, full frames (no detector), and the records the gallery stage reads."""
    home = tmp_path / "home"
    layout = HomeLayout(home)
    train = read_train_metadata(tiny_data)
    ids = sorted(train["individual_id"].unique())
    best = layout.model_dir("fold0") / "best.pt"
    best.parent.mkdir(parents=True)
    cfg = tiny_config()
    original = _checkpoint(cfg, best, 0, ids)
    record_boxes(layout, 0.25, 1.2, 64, None)
    record_crops(layout, cfg.image_size, "letterbox")
    rng = np.random.default_rng(0)
    save_embeddings(layout.embeddings_dir("fold0"), "train", rng.normal(size=(len(train), 16)).astype(np.float32), train["image"].tolist())
    save_embeddings(layout.embeddings_dir("fold0"), "test", np.zeros((0, 16), np.float32), [])
    ClassCentres.from_checkpoint(torch.load(best, weights_only=True)).save(layout.embeddings_dir("fold0"))
    record_embeddings(layout, "fold0", sha256_file(best), flip_tta=False)
    meta = train[["image", "individual_id", "species"]]
    crops = pd.DataFrame({"image": train["image"], "crop_path": ""})
    meta.to_csv(home / "train_metadata.csv", index=False)
    crops.to_csv(home / "crops.csv", index=False)
    version, _ = build_gallery(layout, ["fold0"], meta, crops, GalleryConfig(), lambda lineage: [])
    assert version.name == "v0001"
    tests = sorted(p.name for p in (tiny_data / "test_images").iterdir())
    yield {"home": home, "layout": layout, "root": tmp_path, "data": tiny_data, "tests": tests, "original": original, "config": cfg}


def _enrolled_embeddings_match(layout: HomeLayout, version_name: str, checkpoint: bytes, root: Path) -> None:
    """The enrolled rows of a version are the embeddings ``checkpoint`` gives their crops."""
    version = load_version(layout, version_name)
    enrolled = version.table["source"] == "enrolled"
    assert enrolled.any()
    copy = root / "expected.pt"
    copy.write_bytes(checkpoint)
    model, cfg = load_model(copy)
    want = embed_paths(model, version.table.loc[enrolled, "crop_path"].tolist(), cfg.image_size, "cpu", 8, False)
    np.testing.assert_allclose(version.embeddings[enrolled.to_numpy()], want, atol=1e-5)


def test_two_enrolments_at_once_both_land_in_the_current_gallery(catalogue: dict) -> None:
    """Two `whale enroll` started together, each with other new animals: they take turns,
    the second extends the first's version, and the current one holds both batches."""
    root, tests = catalogue["root"], catalogue["tests"]
    images = str(catalogue["data"] / "test_images")
    a = _confirmed(root, "a", "newA", tests[:2])
    b = _confirmed(root, "b", "newB", tests[2:4])
    procs = [_start(catalogue["home"], "whale", "enroll", str(csv), "--images", images, "--json") for csv in (a, b)]
    summaries = [json.loads(_finish(p)) for p in procs]
    layout = catalogue["layout"]
    assert sorted(s["version"] for s in summaries) == ["v0002", "v0003"]
    assert sorted(s["parent"] for s in summaries) == ["v0001", "v0002"], "the second enrolment extends the first's version"
    current = load_version(layout)
    assert current.name == current_version(layout) == "v0003"
    assert set(current.table.loc[current.table["source"] == "enrolled", "individual_id"]) == {"newA", "newB"}
    assert sorted(read_ledger(layout)["image"]) == sorted(tests[:4])
    _enrolled_embeddings_match(layout, "v0003", catalogue["original"], root)


def test_an_enrolment_during_a_gallery_build_waits_and_extends_the_build(catalogue: dict) -> None:
    """A gallery build holding the catalogue (stopped after staging its version); `whale
    enroll` started then waits for it, and extends the build's version, not the one it
    would have read before."""
    home, root, tests = catalogue["home"], catalogue["root"], catalogue["tests"]
    build = _start(home, "build", "--pause-at", "staged")
    _wait_for(root / "paused.staged", build)
    csv = _confirmed(root, "a", "newA", tests[:2])
    enrol = _start(home, "whale", "enroll", str(csv), "--images", str(catalogue["data"] / "test_images"), "--json")
    time.sleep(8)  # time enough to import, read the gallery and publish, were it not waiting
    assert enrol.poll() is None and list_versions(catalogue["layout"])["version"].tolist() == ["v0001"]
    (root / "go").touch()
    built = json.loads(_finish(build))["version"]
    summary = json.loads(_finish(enrol))
    assert (built, summary["parent"], summary["version"]) == ("v0002", "v0002", "v0003")
    current = load_version(catalogue["layout"])
    assert current.name == "v0003" and current.info["made_by"] == "whale enroll"
    assert set(current.table.loc[current.table["source"] == "enrolled", "individual_id"]) == {"newA"}


def _register(layout: HomeLayout, best: Path) -> None:
    """The fold model in the home's MLflow registry, as training leaves it: a run holding its
    checkpoint, a version tagged with its digest, and the training stage's record."""
    import mlflow

    from whale_ml.gallery.lineage import record_registered
    from whale_ml.io import sha256_file
    from whale_ml.registry import CHECKPOINT_ARTIFACT, SHA_TAG

    client = mlflow.MlflowClient(tracking_uri=layout.mlflow_uri)
    experiment = client.create_experiment("training", artifact_location=(layout.home / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(best), str(Path(CHECKPOINT_ARTIFACT).parent))
    client.create_registered_model("whale-arcface")
    mv = client.create_model_version("whale-arcface", f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id, tags={SHA_TAG: sha256_file(best)})
    record_registered(layout, "fold0", best, "whale-arcface", mv.version)
    record_embeddings(layout, "fold0", sha256_file(best), flip_tta=False)


def test_an_enrolment_during_a_folds_training_uses_the_gallerys_own_model(catalogue: dict) -> None:
    """A process rewrites the fold's best.pt again and again, as training does at each
    improving epoch, alternating the gallery's model with another. Each enrolment embeds
    with the gallery's model: the very bytes it checked, or the registry's copy of them;
    never the other weights."""
    home, root, layout = catalogue["home"], catalogue["root"], catalogue["layout"]
    best = layout.model_dir("fold0") / "best.pt"
    _register(layout, best)
    meta = pd.read_csv(home / "train_metadata.csv", dtype=str)
    crops = pd.read_csv(home / "crops.csv", dtype=str, keep_default_na=False)
    assert build_gallery(layout, ["fold0"], meta, crops, GalleryConfig(), lambda lineage: [])[0].lineage.models[0].version == "1"
    other = _checkpoint(catalogue["config"], root / "other.pt", 1, ["x"])
    assert other != catalogue["original"]
    (root / "original.pt").write_bytes(catalogue["original"])
    script = (
        "import os, sys, time\n"
        "best, blobs = sys.argv[1], [open(p, 'rb').read() for p in sys.argv[2:]]\n"
        "i = 0\n"
        "while True:\n"
        "    open(best + '.tmp', 'wb').write(blobs[i % 2]); os.replace(best + '.tmp', best); i += 1; time.sleep(0.03)\n"
    )
    rewriter = subprocess.Popen([sys.executable, "-c", script, str(best), str(root / "other.pt"), str(root / "original.pt")], start_new_session=True)
    try:
        landed = []
        for i, photos in enumerate((catalogue["tests"][:2], catalogue["tests"][2:4])):
            csv = _confirmed(root, f"c{i}", f"new{i}", photos)
            landed.append(json.loads(_finish(_start(home, "whale", "enroll", str(csv), "--images", str(catalogue["data"] / "test_images"), "--json")))["version"])
    finally:
        _kill(rewriter)  # type: ignore[arg-type]
    assert landed == ["v0003", "v0004"]
    for name in landed:
        _enrolled_embeddings_match(layout, name, catalogue["original"], root)


@pytest.mark.kill
@pytest.mark.parametrize("step", ["staged", "flushed", "renamed"])
def test_kill_at_each_publishing_step_leaves_the_previous_version_current(catalogue: dict, step: str) -> None:
    home, layout = catalogue["home"], catalogue["layout"]
    before = load_version(layout)
    proc = _start(home, "publish", "--pause-at", step)
    _wait_for(catalogue["root"] / f"paused.{step}", proc)
    _kill(proc)
    assert current_version(layout) == "v0001"
    after = load_version(layout)
    assert after.name == "v0001" and after.fallback_from is None and len(after.table) == len(before.table)
    assert all(c is not None for c in after.centres)
    # The next writer publishes, sweeping the dead one's staging folder.
    out = _finish(_start(home, "publish"))
    assert json.loads(out)["version"] == ("v0003" if step == "renamed" else "v0002") == current_version(layout)
    assert not [p for p in layout.gallery_versions_dir.iterdir() if p.name.startswith(".")]
    assert len(load_version(layout).table) == len(before.table) + 1


@pytest.mark.kill
def test_an_enrolment_killed_after_its_ledger_is_carried_by_the_next_one(catalogue: dict) -> None:
    home, root, tests, layout = catalogue["home"], catalogue["root"], catalogue["tests"], catalogue["layout"]
    images = str(catalogue["data"] / "test_images")
    proc = _start(home, "enroll", str(_confirmed(root, "a", "newA", tests[:2])), images, "--pause-at", "ledger")
    _wait_for(root / "paused.ledger", proc)
    _kill(proc)
    assert current_version(layout) == "v0001" and sorted(read_ledger(layout)["image"]) == sorted(tests[:2])
    out = _finish(_start(home, "whale", "enroll", str(_confirmed(root, "b", "newB", tests[2:4])), "--images", images))
    current = load_version(layout)
    assert set(current.table.loc[current.table["source"] == "enrolled", "individual_id"]) == {"newA", "newB"}
    assert current.info["carried_enrolled"] == 2 and current.name in out


def test_a_prune_during_an_enrolment_waits_and_the_enrolment_keeps_its_centres(catalogue: dict) -> None:
    home, root, layout = catalogue["home"], catalogue["root"], catalogue["layout"]
    _finish(_start(home, "publish"))  # v0002 current; v0001 prunable
    enrol = _start(
        home, "enroll", str(_confirmed(root, "a", "newA", catalogue["tests"][:2])), str(catalogue["data"] / "test_images"),
        "--pause-at", "ledger",
    )
    _wait_for(root / "paused.ledger", enrol)
    prune = _start(home, "whale", "prune-gallery", "--keep", "1")
    time.sleep(6)
    assert prune.poll() is None, "the prune waits for the enrolment"
    assert list_versions(layout)["version"].tolist() == ["v0001", "v0002"]
    (root / "go").touch()
    assert json.loads(_finish(enrol)) == {"version": "v0003", "parent": "v0002"}
    assert "deleted 2 gallery version(s): v0001, v0002" in _finish(prune)
    current = load_version(layout)
    assert current.name == "v0003" and all(c is not None for c in current.centres)


def test_readers_see_a_whole_version_or_none_while_versions_are_pruned(catalogue: dict) -> None:
    """A reader process loads a 100k-row version again and again while another process
    publishes a newer one and a third prunes it away. Every read gives the whole version or
    "not found", never a half-deleted one."""
    from whale_ml.gallery import write_version

    home, root, layout = catalogue["home"], catalogue["root"], catalogue["layout"]
    current = load_version(layout)
    n = 100_000
    big = pd.DataFrame(
        {"image": [f"b{i}.jpg" for i in range(n)], "individual_id": [f"i{i % 5000}" for i in range(n)], "species": "orca", "crop_path": "", "source": "pipeline"}
    )
    write_version(layout, big, np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32), current.lineage, "test", centres=current.centres)
    reader = _start(home, "read", "v0002", "120")
    _wait_for(root / "reading", reader)
    _finish(_start(home, "publish"))
    time.sleep(1)
    _finish(_start(home, "prune", "1"))
    time.sleep(1)
    (root / "stop").touch()
    outcomes = [o for o in _finish(reader).split("\n") if o]
    assert all(o in ("whole", "gone") for o in outcomes), sorted(set(outcomes))[:5]
    assert "whole" in outcomes and outcomes[-1] == "gone"
