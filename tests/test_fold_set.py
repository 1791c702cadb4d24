"""fold_embeddings publishes one whole set made by one checkpoint, whatever happens beside it.

Real parts only: tiny timm checkpoints saved as training saves them, JPEG crops, real
Dagster materialisations of ``fold_embeddings`` (with its MLflow run), a second process
replacing ``best.pt`` mid-embedding, and writers killed with SIGKILL.

Run as a script (``python tests/test_fold_set.py <home> <photos>``) it is the writer
process the kill test starts: one materialisation of ``fold_embeddings[fold0]``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

FOLD = "fold0"
SIZE = 32
N_TRAIN, N_TEST = 12, 120  # many test photos at batch size 1: a window after train.npy is written


def _write_checkpoint(path: Path, seed: int) -> str:
    """A tiny fold model with class centres, saved the way training saves best.pt; its sha256."""
    from whale_ml.models.embedding import create_embedding_model
    from whale_ml.retrieval.centres import CHECKPOINT_KEY, ClassCentres
    from whale_ml.stage_configs import TrainConfig
    from whale_ml.training.checkpoint_saver import save_checkpoint

    cfg = TrainConfig(backbone="test_resnet", image_size=SIZE, embedding_size=8, pretrained=False, device="cpu")
    torch.manual_seed(seed)
    model = create_embedding_model(cfg, pretrained=False)
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(3, 1, 8)).astype(np.float32)
    centres = ClassCentres(np.array(["a", "b", "c"], dtype=object), vectors / np.linalg.norm(vectors, axis=2, keepdims=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.model_dump(), CHECKPOINT_KEY: centres.to_checkpoint()})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _photos(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{split}{i:03d}.jpg")
    return folder


def _crops(photos: Path) -> pd.DataFrame:
    paths = sorted(photos.glob("*.jpg"))
    return pd.DataFrame(
        {
            "image": [p.name for p in paths],
            "crop_path": [str(p) for p in paths],
            "split": ["train" if p.name.startswith("train") else "test" for p in paths],
        }
    )


def materialise(home: Path, photos: Path) -> None:
    """One real materialisation of fold_embeddings[fold0] on ``photos``' crops."""
    import dagster as dg

    from whale_assets.defs.training import fold_embeddings_asset
    from whale_assets.resources import MlflowTracking, WhaleHome
    from whale_assets.rounds import Round

    fold_embeddings = fold_embeddings_asset(Round(1, 1))

    table = _crops(photos)

    @dg.asset(name="crops")
    def crops() -> pd.DataFrame:
        return table

    io = dg.FilesystemIOManager(base_dir=str(home / "io"))
    resources = {"whale": WhaleHome(home=str(home)), "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home}/mlflow.db"), "io_manager": io}
    dg.materialize([crops], resources=resources, instance=dg.DagsterInstance.ephemeral())
    result = dg.materialize(
        [crops, fold_embeddings],
        selection=[fold_embeddings],
        partition_key=FOLD,
        resources=resources,
        run_config={"ops": {"fold_embeddings": {"config": {"batch_size": 1, "device": "cpu"}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success


def _model_embeddings(checkpoint: Path, paths: list[str]) -> np.ndarray:
    from whale_ml.retrieval.embeddings import embed_paths
    from whale_ml.training.trainer import load_model

    model, cfg = load_model(checkpoint, "cpu")
    return embed_paths(model, paths, cfg.image_size, torch.device("cpu"), 8)


def _made_by(home: Path, photos: Path, checkpoints: dict[str, Path]) -> dict[str, str]:
    """Which of ``checkpoints`` (sha -> a copy) made each part of the fold's current set:
    train, test, centres, and the sha its record names."""
    from whale_ml.gallery.lineage import EMBEDDINGS_RECORD
    from whale_ml.home import HomeLayout
    from whale_ml.io import read_json
    from whale_ml.retrieval.centres import ClassCentres
    from whale_ml.retrieval.store import load_embeddings
    from whale_ml.training.trainer import load_class_centres

    folder = HomeLayout(home).embeddings_dir(FOLD)  # resolved once: every part read from it
    made: dict[str, str] = {"record": read_json(folder / EMBEDDINGS_RECORD)["checkpoint_sha256"]}
    for split in ("train", "test"):
        emb, images = load_embeddings(folder, split)
        probe = [str(photos / img) for img in images[:3]]
        made[split] = next(sha for sha, ckpt in checkpoints.items() if np.allclose(_model_embeddings(ckpt, probe), emb[:3], atol=1e-5))
    centres = ClassCentres.load(folder)
    assert centres is not None
    of_checkpoint = {sha: load_class_centres(ckpt) for sha, ckpt in checkpoints.items()}
    made["centres"] = next(sha for sha, c in of_checkpoint.items() if c is not None and np.array_equal(c.vectors, centres.vectors))
    return made


def _keep_copy(best: Path, tmp: Path, name: str) -> Path:
    copy = tmp / name
    copy.write_bytes(best.read_bytes())
    return copy


_REWRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    root, best, replacement = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    print("watching", flush=True)
    while not any(p.name == "train.npy" for p in root.rglob("*")):
        time.sleep(0.002)
    tmp = best.with_name(".best.rewriter.tmp.pt")
    tmp.write_bytes(replacement.read_bytes())
    os.replace(tmp, best)  # training's own way of saving a better checkpoint
    print("replaced", flush=True)
    """
)


@pytest.mark.slow
def test_a_checkpoint_replaced_while_embedding_changes_nothing_that_was_embedded_or_recorded(whale_env: Path, tmp_path: Path) -> None:
    """Training saves a better best.pt (a second process, by rename) once the train crops are
    embedded: the set's embeddings, centres and recorded sha256 are all the first checkpoint's."""
    home, photos = whale_env, _photos(tmp_path / "photos")
    best = home / "models" / FOLD / "best.pt"
    sha_b = _write_checkpoint(best, seed=2)
    copy_b = _keep_copy(best, tmp_path, "b.pt")
    sha_a = _write_checkpoint(best, seed=1)
    copy_a = _keep_copy(best, tmp_path, "a.pt")
    rewriter = subprocess.Popen(
        [sys.executable, "-c", _REWRITER, str(home / "embeddings" / FOLD), str(best), str(copy_b)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert rewriter.stdout is not None and rewriter.stdout.readline().strip() == "watching"
        materialise(home, photos)
        assert rewriter.wait(timeout=30) == 0 and rewriter.stdout.readline().strip() == "replaced"
    finally:
        rewriter.kill()
    assert hashlib.sha256(best.read_bytes()).hexdigest() == sha_b  # best.pt did change mid-run
    made = _made_by(home, photos, {sha_a: copy_a, sha_b: copy_b})
    assert made == {"record": sha_a, "train": sha_a, "test": sha_a, "centres": sha_a}


def _wait_for(root: Path, name: str, since: float, proc: subprocess.Popen[bytes], timeout: float = 240.0) -> None:
    """Until a file ``name`` written after ``since`` (a time.time()) appears anywhere under ``root``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in root.rglob(name):
            try:
                if p.stat().st_mtime >= since:
                    return
            except FileNotFoundError:  # a staging file renamed meanwhile
                continue
        assert proc.poll() is None, f"the writer ended (rc {proc.returncode}) before {name} appeared"
        time.sleep(0.002)
    raise AssertionError(f"no {name} under {root} within {timeout} s")


@pytest.mark.kill
@pytest.mark.parametrize("moment", ["train.npy", "test.npy", "centres.npy", "embeddings.json"])
def test_a_writer_killed_mid_set_leaves_the_previous_set_whole(whale_env: Path, tmp_path: Path, moment: str) -> None:
    """A set written with checkpoint A; then a writer with checkpoint B is killed (SIGKILL) as
    soon as ``moment`` appears: the current set is whole and of one checkpoint, with its record
    (A's, or B's had the writer published it already), and the next writer still publishes."""
    home, photos = whale_env, _photos(tmp_path / "photos")
    best = home / "models" / FOLD / "best.pt"
    sha_a = _write_checkpoint(best, seed=1)
    copy_a = _keep_copy(best, tmp_path, "a.pt")
    materialise(home, photos)
    sha_b = _write_checkpoint(best, seed=2)
    copy_b = _keep_copy(best, tmp_path, "b.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    time.sleep(1.1)  # the writer's files are newer than the first set's, even on a coarse clock
    since = time.time()
    writer = subprocess.Popen(
        [sys.executable, __file__, str(home), str(photos)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for(home / "embeddings" / FOLD, moment, since, writer)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    made = _made_by(home, photos, {sha_a: copy_a, sha_b: copy_b})
    assert len(set(made.values())) == 1, f"a mixed set after a kill at {moment}: {made}"
    materialise(home, photos)  # what the killed writer left does not stop the next one
    assert _made_by(home, photos, {sha_a: copy_a, sha_b: copy_b}) == dict.fromkeys(["record", "train", "test", "centres"], sha_b)


def test_a_pinned_reader_keeps_its_set_while_new_ones_are_published_and_old_ones_swept(tmp_path: Path) -> None:
    """Readers resolve a fold's set once (HomeLayout.with_current_embeddings) and read all of it
    from there; publishing keeps the current set and the newest two, and removes loose files
    from before sets."""
    from whale_ml.home import HomeLayout
    from whale_ml.filesets import SETS
    from whale_ml.retrieval.store import load_embeddings, new_embedding_set, save_embeddings

    layout = HomeLayout(tmp_path)
    root = layout.embeddings_root(FOLD)
    save_embeddings(root, "train", np.zeros((1, 4), np.float32), ["loose.jpg"])  # a fold folder from before sets
    assert layout.embeddings_dir(FOLD) == root

    def publish(value: float) -> None:
        with new_embedding_set(root, f"{int(value):064x}") as folder:
            save_embeddings(folder, "train", np.full((1, 4), value, np.float32), ["x.jpg"])

    publish(1.0)
    pinned = layout.with_current_embeddings([FOLD])
    assert not (root / "train.npy").exists() and pinned.embeddings_dir(FOLD).parent == root / SETS
    publish(2.0)
    assert load_embeddings(layout.embeddings_dir(FOLD), "train")[0][0, 0] == 2.0
    assert load_embeddings(pinned.embeddings_dir(FOLD), "train")[0][0, 0] == 1.0  # the gallery being built still reads set 1
    publish(3.0)
    publish(4.0)
    assert sorted(p.name.split("-")[1] for p in (root / SETS).iterdir()) == ["3", "4"]
    with pytest.raises(RuntimeError, match="nothing published"):
        with new_embedding_set(root, "f" * 64) as folder:
            save_embeddings(folder, "train", np.zeros((1, 4), np.float32), ["y.jpg"])
            raise RuntimeError("nothing published")
    assert load_embeddings(layout.embeddings_dir(FOLD), "train")[0][0, 0] == 4.0
    assert sorted(p.name.split("-")[1] for p in (root / SETS).iterdir()) == ["3", "4"]  # no staging folder left


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    materialise(Path(sys.argv[1]), Path(sys.argv[2]))
