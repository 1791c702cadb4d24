"""The model registry (whale_ml.registry) on a real SQLite MLflow store: register a model,
find versions by alias or number, download checked checkpoints; and a gallery's fold models
resolved through it (whale_ml.gallery.models). The champion decision on releases, and the
release runs: tests/test_release.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch

from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.gallery.models import gallery_models, resolve_models
from whale_ml.io import sha256_file
from whale_ml.registry import (
    CHECKPOINT_ARTIFACT,
    SERIALIZATION_TAG,
    SHA_TAG,
    CheckpointFetchError,
    export_check,
    fetch_checkpoint,
    model_version,
    register_model,
)

NAME = "test-arcface"


class TinyEmbedder(torch.nn.Module):
    """uint8 images (N, 3, 8, 8) -> (N, 2) embeddings, as the fold models take and give them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.float().flatten(1) / 255.0)


class FixedBatchEmbedder(TinyEmbedder):
    """The same, written for batches of exactly two: torch.export cannot keep its batch dynamic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.float().reshape(2, -1) / 255.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A registry with one fold0 version: a tiny model registered from a run that also
    logged the fold's checkpoint, tagged with its digest. Shared (a store takes seconds
    to create): the tests only read it."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    checkpoint = root / "best.pt"
    torch.save({"w": torch.arange(4)}, checkpoint)
    sha = sha256_file(checkpoint)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.log_artifact(str(checkpoint), artifact_path=CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])
                info = register_model(uri, NAME, TinyEmbedder(), 8, 2, alias="fold0", tags={"fold": "fold0", SHA_TAG: sha})
            yield {"uri": uri, "run": run, "info": info, "sha": sha, "checkpoint": checkpoint}
        finally:
            mlflow.set_tracking_uri(None)


def _lineage(sha: str, version: str | None = "1") -> GalleryLineage:
    return GalleryLineage(
        models=[FoldModel(fold="fold0", checkpoint_sha256=sha, registered_model=NAME, version=version)],
        detector_sha256=None,
        detector_imgsz=64,
        min_confidence=0.25,
        expand=1.2,
        crop_size=64,
        resize="pad",
    )


def test_register_model_tags_the_version_and_points_the_alias(store: dict) -> None:
    client = mlflow.MlflowClient(tracking_uri=store["uri"])
    version = client.get_model_version_by_alias(NAME, "fold0")
    assert store["info"].version == str(version.version) == "1"
    assert version.tags == {"fold": "fold0", SHA_TAG: store["sha"], SERIALIZATION_TAG: "pt2"}
    assert version.run_id == store["run"].info.run_id and version.source == f"models:/{store['info'].model_id}"
    assert (store["info"].serialization, store["info"].export_error) == ("pt2", None)
    signature = mlflow.models.get_model_info(f"models:/{NAME}@fold0").signature
    spec = signature.inputs.to_dict()[0]["tensor-spec"]
    assert spec["dtype"] == "uint8" and list(spec["shape"]) == [-1, 3, 8, 8]


def test_a_model_torch_export_cannot_keep_batch_dynamic_is_registered_pickled_and_says_why(store: dict) -> None:
    """The fallback: MLflow's own export (Dim.AUTO) would keep a fixed batch of 2 silently;
    the check exports with a dynamic batch first, so the model is pickled instead, and the
    log line and the version's tag say so."""
    assert export_check(TinyEmbedder(), 8) is None
    why = export_check(FixedBatchEmbedder(), 8)
    assert why is not None
    said: list[str] = []
    mlflow.set_tracking_uri(store["uri"])
    try:
        with mlflow.start_run(experiment_id=store["run"].info.experiment_id):
            got = register_model(store["uri"], NAME, FixedBatchEmbedder(), 8, 2, alias="fixed", tags={}, log=said.append)
    finally:
        mlflow.set_tracking_uri(None)
    assert (got.serialization, got.export_error) == ("pickle", why)
    assert len(said) == 1 and why in said[0] and "pickled" in said[0]
    version = mlflow.MlflowClient(tracking_uri=store["uri"]).get_model_version_by_alias(NAME, "fixed")
    assert version.tags[SERIALIZATION_TAG] == "pickle"


def test_resolve_models_downloads_the_checked_checkpoint_once(store: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (model,) = resolve_models(_lineage(store["sha"]), store["uri"], cache, "v0001", alias="{fold}")
    assert (model.version, model.alias, model.checkpoint) == ("1", "fold0", cache / f"{store['sha']}.pt")
    assert model.checkpoint.read_bytes() == store["checkpoint"].read_bytes()
    assert [p.name for p in cache.iterdir()] == [model.checkpoint.name], "no staging folder left behind"
    stamp = model.checkpoint.stat().st_mtime_ns
    (again,) = resolve_models(_lineage(store["sha"]), store["uri"], cache, "v0001", versions=["1"])
    assert again.checkpoint == model.checkpoint and again.checkpoint.stat().st_mtime_ns == stamp  # from the cache
    with pytest.raises(LineageError, match=f"{NAME}@champion_fold0 not found"):
        resolve_models(_lineage(store["sha"]), store["uri"], cache, "v0001")
    with pytest.raises(LineageError, match=f"{NAME}@fold0 \\(v1\\) is not the fold0 model gallery v0002 was built with"):
        resolve_models(_lineage("f" * 64), store["uri"], cache, "v0002", alias="{fold}")


def test_model_version_by_alias_or_number(store: dict) -> None:
    by_alias, by_number = model_version(store["uri"], NAME, alias="fold0"), model_version(store["uri"], NAME, version="1")
    assert str(by_alias.version) == str(by_number.version) == "1" and by_alias.tags[SHA_TAG] == store["sha"]
    with pytest.raises(ValueError, match="an alias or a version"):
        model_version(store["uri"], NAME)


def test_fetch_checkpoint_refuses_a_file_of_another_digest(store: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointFetchError, match="is not the one tagged on the version"):
        fetch_checkpoint(store["uri"], store["run"].info.run_id, "0" * 64, tmp_path / "cache", "the test model")
    assert not (tmp_path / "cache" / f"{'0' * 64}.pt").exists()


def test_gallery_models_prefer_the_homes_own_checkpoint(store: dict, tmp_path: Path) -> None:
    model_dir = lambda fold: tmp_path / "models" / fold  # noqa: E731
    local_file = model_dir("fold0") / "best.pt"
    local_file.parent.mkdir(parents=True)
    local_file.write_bytes(store["checkpoint"].read_bytes())
    (local,) = gallery_models(_lineage(store["sha"]), model_dir, None, tmp_path / "cache")
    # A snapshot of the very bytes hashed, not the home's file (training may rewrite it).
    assert local.checkpoint == tmp_path / "cache" / f"{store['sha']}.pt" and local.checkpoint.read_bytes() == local_file.read_bytes()
    local_file.write_bytes(b"retrained since")  # the home's file is another model now: the registry's
    (fetched,) = gallery_models(_lineage(store["sha"]), model_dir, store["uri"], tmp_path / "cache2")
    assert fetched.checkpoint == tmp_path / "cache2" / f"{store['sha']}.pt" and sha256_file(fetched.checkpoint) == store["sha"]
    assert not (tmp_path / "cache2" / f"{sha256_file(local_file)}.pt").exists()  # the other bytes are not kept
    with pytest.raises(LineageError, match="the fold0 model the gallery was built with is gone"):
        gallery_models(_lineage(store["sha"]), model_dir, None, tmp_path / "cache3")
    # The registry's file is not the one the lineage names: the gallery's own error, as before.
    with pytest.raises(LineageError, match="is not the one tagged on the version") as other:
        gallery_models(_lineage("0" * 64), model_dir, store["uri"], tmp_path / "cache4")
    assert isinstance(other.value.__cause__, CheckpointFetchError)
