"""The fold models of a gallery, fetched from the MLflow model registry.

Each registered version of ``whale-arcface`` carries its checkpoint (``best.pt``)
as an artifact of its run and the checkpoint's sha256 as a version tag. Models are
picked by alias (``champion_<fold>`` by default) or by version, checked against
the checkpoints the gallery was embedded with, downloaded once into a cache named
by their digest, and loaded by ``whale_ml.checkpoints`` (torch's weights-only loader): nothing is
unpickled.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from whale_ml.identify.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.io import atomic_path, sha256_file, staging_dir

CHECKPOINT_ARTIFACT = "checkpoint/best.pt"
SHA_TAG = "checkpoint_sha256"
DEFAULT_ALIAS = "champion_{fold}"


@dataclass(frozen=True)
class ResolvedModel:
    """A fold model ready to load: where its checkpoint is and which registry version it is."""

    fold: str
    checkpoint: Path
    checkpoint_sha256: str
    registered_model: str | None
    version: str | None
    alias: str | None
    flip_tta: bool

    def describe(self) -> dict[str, object]:
        return {
            "fold": self.fold,
            "registered_model": self.registered_model,
            "version": self.version,
            "alias": self.alias,
            "checkpoint_sha256": self.checkpoint_sha256,
        }


def _fetch(tracking_uri: str, run_id: str, sha: str, cache_dir: Path, what: str) -> Path:
    """The checkpoint artifact of ``run_id``, cached as ``<sha>.pt`` and checked against ``sha``."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar on stderr
    target = cache_dir / f"{sha}.pt"
    if target.exists() and sha256_file(target) == sha:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(cache_dir, "download")  # a killed download is swept by the next one
    try:
        try:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(tmp), tracking_uri=tracking_uri
                )
            )
        except Exception as exc:
            raise LineageError(
                f"{what}: its run {run_id} has no {CHECKPOINT_ARTIFACT} artifact ({type(exc).__name__}); it was registered "
                "before checkpoints were logged: retrain the fold (job train_folds) and rematerialise the gallery"
            ) from exc
        if sha256_file(got) != sha:
            raise LineageError(f"{what}: the downloaded checkpoint's sha256 is not the one tagged on the version ({sha[:12]})")
        with atomic_path(target) as part:
            shutil.copyfile(got, part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_models(
    lineage: GalleryLineage,
    tracking_uri: str,
    cache_dir: Path,
    gallery_name: str,
    alias: str = DEFAULT_ALIAS,
    versions: list[str] | None = None,
) -> list[ResolvedModel]:
    """The registry's fold models for identification, one per fold of the gallery.

    Args:
        lineage: the gallery's lineage (which checkpoint embedded each fold's part).
        alias: alias template, ``{fold}`` replaced by the fold (``champion_{fold}``,
            ``challenger_{fold}``, ``{fold}`` for the newest).
        versions: registry versions, one per fold in the gallery's fold order;
            overrides ``alias``.

    Raises:
        LineageError: a model is missing, or is not the one the gallery was built with
            (the message says which and what to do).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if versions is not None and len(versions) != len(lineage.models):
        raise LineageError(
            f"{len(versions)} model version(s) given; the gallery has {len(lineage.models)} fold models (one each, fold order)"
        )
    out = []
    for i, want in enumerate(lineage.models):
        name = want.registered_model
        if name is None:
            raise LineageError(
                f"gallery {gallery_name}: its {want.fold} model is not in the MLflow registry; rematerialise "
                "arcface_model, fold_embeddings and gallery"
            )
        label = alias.format(fold=want.fold) if versions is None else None
        try:
            mv = client.get_model_version_by_alias(name, label) if label else client.get_model_version(name, versions[i])  # type: ignore[index]
        except MlflowException as exc:
            what = f"alias {name}@{label}" if label else f"version {name} v{versions[i]}"  # type: ignore[index]
            raise LineageError(f"{what} not found in the registry at {tracking_uri}") from exc
        what = f"{name}@{label} (v{mv.version})" if label else f"{name} v{mv.version}"
        sha = mv.tags.get(SHA_TAG)
        if sha != want.checkpoint_sha256:
            built = f"v{want.version}" if want.version else f"checkpoint {want.checkpoint_sha256[:12]}"
            raise LineageError(
                f"{what} is not the {want.fold} model gallery {gallery_name} was built with ({name} {built}): its embeddings "
                "would not be comparable. Rematerialise the gallery with these models (job ensemble_and_submit), or identify "
                f"with the gallery's own models (--alias '{{fold}}' when they are the newest, or --model-version "
                + " ".join(m.version or "?" for m in lineage.models)
                + ")"
            )
        path = _fetch(tracking_uri, mv.run_id, sha, cache_dir, what)
        out.append(ResolvedModel(want.fold, path, sha, name, str(mv.version), label, want.flip_tta))
    return out


def gallery_models(lineage: GalleryLineage, model_dir: object, tracking_uri: str | None, cache_dir: Path) -> list[ResolvedModel]:
    """The very checkpoints the gallery was built with (to embed photos into it): the
    home's ``best.pt`` when it is still that file, else the gallery's registry version.

    Args:
        model_dir: fold -> the folder of its ``best.pt`` (``HomeLayout.model_dir``).
    """
    out = []
    for want in lineage.models:
        local = Path(model_dir(want.fold)) / "best.pt"  # type: ignore[operator]
        if local.exists() and sha256_file(local) == want.checkpoint_sha256:
            out.append(_resolved(want, local, None))
            continue
        if tracking_uri is None or want.registered_model is None or want.version is None:
            raise LineageError(f"the {want.fold} model the gallery was built with is gone (not at {local}, not registered)")
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        mv = client.get_model_version(want.registered_model, want.version)
        path = _fetch(tracking_uri, mv.run_id, want.checkpoint_sha256, cache_dir, f"{want.registered_model} v{want.version}")
        out.append(_resolved(want, path, None))
    return out


def _resolved(want: FoldModel, path: Path, alias: str | None) -> ResolvedModel:
    return ResolvedModel(want.fold, path, want.checkpoint_sha256, want.registered_model, want.version, alias, want.flip_tta)
