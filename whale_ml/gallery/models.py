"""The fold models a gallery was built with, as checkpoints ready to load.

A photo is only comparable with a gallery when the very checkpoints that embedded the
gallery embed it. Two ways to get them: :func:`resolve_models` takes the registry
versions an alias (``champion_<fold>``) or version numbers name and refuses any that are
not the gallery's own (``whale identify``); :func:`gallery_models` takes the gallery's
own checkpoints, the home's ``best.pt`` while it is still that file, else the registry
version its lineage records (enrolled photos embedded into the gallery). The registry
itself (MLflow, finding versions, downloading checkpoints) is :mod:`whale_ml.registry`;
this module decides which versions a gallery needs and checks them against its lineage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from whale_ml.home import fold_label
from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.mlflow_errors import is_missing
from whale_ml.registry import DEFAULT_ALIAS, SHA_TAG, CheckpointFetchError, alias_missing, fetch_checkpoint, model_version


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


def resolve_models(
    lineage: GalleryLineage,
    tracking_uri: str,
    cache_dir: Path,
    gallery_name: str,
    alias: str = DEFAULT_ALIAS,
    versions: list[str] | None = None,
    round: str | None = None,
) -> list[ResolvedModel]:
    """The registry's fold models for identification, one per fold of the gallery.

    Args:
        lineage: the gallery's lineage (which checkpoint embedded each fold's part).
        alias: alias template, ``{fold}`` replaced by the fold's label (``champion_{fold}``,
            ``challenger_{fold}``, ``{fold}`` for the newest).
        round: the training round of the gallery's models (the layout's ``round``): a later
            round's aliases carry its name (``champion_round2_fold0``: :func:`whale_ml.home.fold_label`).
        versions: registry versions, one per fold in the gallery's fold order;
            overrides ``alias``.

    Raises:
        LineageError: a model is missing, or is not the one the gallery was built with
            (the message says which and what to do).
    """
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
        label = alias.format(fold=fold_label(round, want.fold)) if versions is None else None
        try:
            if label:
                mv = model_version(tracking_uri, name, alias=label)
            else:
                mv = model_version(tracking_uri, name, version=versions[i])  # type: ignore[index]
        except Exception as exc:
            if not (alias_missing(exc) if label else is_missing(exc)):
                raise  # the registry could not be asked: not a missing model
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
    """The very checkpoints the gallery was built with (to embed photos into it): a
    snapshot of the home's ``best.pt`` when it is still that file, else the gallery's
    registry version.

    The home's ``best.pt`` is copied into ``cache_dir`` while it is hashed
    (:func:`whale_ml.checkpoints.snapshot_checkpoint`) and the copy is what gets loaded:
    a fold training beside this rewrites ``best.pt`` at every improving epoch, and a
    file checked by hash and then loaded by path could be other weights by then.

    Args:
        model_dir: fold -> the folder of its ``best.pt`` (``HomeLayout.model_dir``).

    Raises:
        LineageError: a fold's model is neither in the home nor in the registry.
    """
    from whale_ml.checkpoints import CheckpointError, snapshot_checkpoint

    out = []
    for want in lineage.models:
        local = Path(model_dir(want.fold)) / "best.pt"  # type: ignore[operator]
        if local.exists():
            try:
                path, _ = snapshot_checkpoint(local, cache_dir, want.checkpoint_sha256)
                out.append(_resolved(want, path, None))
                continue
            except (CheckpointError, FileNotFoundError):
                pass  # retrained (or removed) since: the registry keeps the gallery's own version
        if tracking_uri is None or want.registered_model is None or want.version is None:
            raise LineageError(f"the {want.fold} model the gallery was built with is gone (not at {local}, not registered)")
        mv = model_version(tracking_uri, want.registered_model, version=want.version)
        path = _fetch(tracking_uri, mv.run_id, want.checkpoint_sha256, cache_dir, f"{want.registered_model} v{want.version}")
        out.append(_resolved(want, path, None))
    return out


def _fetch(tracking_uri: str, run_id: str, sha: str, cache_dir: Path, what: str) -> Path:
    """:func:`whale_ml.registry.fetch_checkpoint`, a checkpoint that is gone or is another
    file reported as the gallery's :class:`LineageError` (its message unchanged)."""
    try:
        return fetch_checkpoint(tracking_uri, run_id, sha, cache_dir, what)
    except CheckpointFetchError as exc:
        raise LineageError(str(exc)) from exc


def _resolved(want: FoldModel, path: Path, alias: str | None) -> ResolvedModel:
    return ResolvedModel(want.fold, path, want.checkpoint_sha256, want.registered_model, want.version, alias, want.flip_tta)
