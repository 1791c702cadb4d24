"""The release as one MLflow model: a ``pyfunc`` that answers photos as ``whale identify`` does.

:func:`log_release_model` gathers what the release answers with (its fold checkpoints, one
gallery version, the matcher tuned for them, the detector and, when the matcher re-ranks,
the local features of the gallery's photos) into a *release home*: a folder laid out as a
first-round :class:`~whale_ml.home.HomeLayout` holding nothing else. It is logged as the
model's one artifact beside a copy of ``whale_ml``. :class:`ReleaseModel` reads that home
with the very functions ``whale identify`` uses (:func:`~whale_ml.gallery.load_version`,
:func:`~whale_ml.gallery.models.gallery_models`, :func:`~whale_ml.gallery.matchers.load_matcher`)
and answers each batch with :func:`~whale_ml.identify.matching.identify_photos`: one code
path, so its predictions are ``whale identify``'s. Serving it: docs/serving.md.

The one module besides :mod:`whale_ml.registry` that imports MLflow; nothing else in the
core imports it, so ``whale_ml.identify`` stays usable without MLflow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from whale_ml.gallery.catalogue import versions_lock
from whale_ml.gallery.embed import detector_for
from whale_ml.gallery.lineage import GalleryLineage, LineageError
from whale_ml.gallery.matchers import check_matcher, load_matcher, matcher_path
from whale_ml.gallery.models import ResolvedModel, gallery_models
from whale_ml.gallery.versions import GalleryVersion, load_version
from whale_ml.home import HomeLayout
from whale_ml.identify.matching import identify_photos
from whale_ml.io import sha256_file, write_json
from whale_ml.offline import configure_environment
from whale_ml.retrieval.local_features import home_feature_store, save_features
from whale_ml.retrieval.matcher import TunedMatcher

INPUT_COLUMN = "image_path"
OUTPUT_COLUMNS = ("image", "predictions", "error")
ARTIFACT = "release"  # the key of the release home among the model's artifacts
MANIFEST = "release_model.json"  # in the release home: where its parts came from

# What the serving path imports, pinned to this environment's versions (inferring the
# requirements instead would load the whole model in a subprocess at logging time).
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "ultralytics",
    "faiss-cpu",
    "opencv-python",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "scikit-learn",
    "matplotlib",
)


_ENTRY_POINT = """\
import mlflow

from whale_ml.identify.serving import ReleaseModel

mlflow.models.set_model(ReleaseModel())
"""


class ReleaseModel(mlflow.pyfunc.PythonModel):
    """A release that answers photos: ``image_path`` in; ``image``, ``predictions`` and ``error`` out.

    ``predictions`` is the submission's format, five ids joined by spaces with
    ``new_individual`` where the matcher decides it; a photo that cannot be read gets the
    empty string, as ``whale identify`` gives it no predictions, and ``error`` says why (it
    is None on the other rows). A Kaggle submission fills such a row with the prior
    instead (:func:`whale_ml.submission.prior_predictions`); the model leaves that choice
    to its caller. The device is ``cpu`` unless the loader's ``model_config`` names one
    (``{"device": "cuda"}``, ``"auto"``).
    """

    def load_context(self, context: Any) -> None:
        from whale_ml.training.trainer import resolve_device

        layout = HomeLayout(Path(context.artifacts[ARTIFACT]))
        # Ultralytics' settings, the checkpoint snapshots and each batch's crops go here,
        # never into the model's own folder (served in place, it may be the artifact store).
        self._scratch = tempfile.TemporaryDirectory(prefix="whale-release-model-")
        scratch = Path(self._scratch.name)
        configure_environment(scratch)
        self._layout = layout
        self._gallery = load_version(layout)
        self._models = gallery_models(self._gallery.lineage, layout.model_dir, None, scratch / "model_cache")
        self._matcher = load_matcher(layout, self._gallery.lineage, self._gallery.name)
        self._device = str(resolve_device(str((context.model_config or {}).get("device", "cpu"))))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per input row, in order.

        Raises:
            ValueError: the input is not a DataFrame with an ``image_path`` column.
        """
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise ValueError(f"the release model needs a DataFrame with a column {INPUT_COLUMN!r} (photo paths); got {found}")
        paths = [Path("" if pd.isna(p) else str(p)) for p in model_input[INPUT_COLUMN]]
        if not paths:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in OUTPUT_COLUMNS})
        with tempfile.TemporaryDirectory(prefix="batch-", dir=self._scratch.name) as work:
            result = identify_photos(paths, self._layout, self._gallery, self._models, self._matcher, Path(work), self._device)
        rows = result["photos"]
        return pd.DataFrame(
            {
                "image": [r["image"] for r in rows],
                "predictions": [" ".join(r["predictions"]) for r in rows],
                "error": [r["error"] for r in rows],
            }
        )


def log_release_model(
    layout: HomeLayout,
    gallery: GalleryVersion,
    models: Sequence[ResolvedModel],
    tuned: TunedMatcher,
    name: str = "release_model",
    registered_model_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Any:
    """Log the release as one ``pyfunc`` model into the active MLflow run (and register it).

    What it holds (a release home, :data:`ARTIFACT`, plus ``whale_ml`` as code), and how big
    it is at the Kaggle scale (51k gallery photos, 15.6k individuals, the GPU recipe's two
    EfficientNet-B4 folds of 512 dimensions and two ArcFace sub-centres):

    - ``models/<fold>/best.pt``: each fold's checkpoint, the backbone and its ArcFace head
      (about 75 MB + individuals x sub-centres x dimension x 4 B: ~140 MB a fold);
    - ``gallery/versions/<vNNNN>/``: the gallery version as published, its flat index and
      embeddings (about 8 B x dimension x photos: ~420 MB) and the folds' class centres
      (~65 MB a fold);
    - ``gallery/matchers/<key>.json``: the tuned matcher (its out-of-fold top-1 scores make
      it a few MB);
    - ``detector/detector.pt``: the detector the gallery's boxes came from (a YOLOv8s: ~22 MB);
    - ``local_features/train/``: only when the matcher re-ranks, the keypoints of the
      gallery's photos alone (SIFT, 400 a photo: ~55 KB a photo, ~2.8 GB), and an empty
      ``test`` split beside it.

    So about 3.6 GB with re-ranking and under 1 GB without; on the tiny test home
    (``configs/tiny.yaml``), 10.5 MB, 6 MB of it the YOLOv8n detector. Logging stages a copy
    of it in a temporary folder, and MLflow copies that once more before uploading: free
    disk for three times its size. The box and crop settings travel in the version's lineage, the crops do not (a
    prediction never reads them). There is no input example: a photo path means nothing on
    another machine.

    Args:
        layout: the release round's layout (``read_release(...).layout``): where its
            detector, matchers and local features are.
        gallery: the gallery version to serve (normally ``load_version(layout)``).
        models: the fold models the gallery was built with, in its fold order
            (:func:`~whale_ml.gallery.models.resolve_models` or ``gallery_models``).
        tuned: the matcher tuned for them (:func:`~whale_ml.gallery.matchers.load_matcher`).
        name: the model's name in the run.
        registered_model_name: register the logged model under this name (a new version).
        tags: set on the logged model.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``, ...).

    Raises:
        LineageError: the models, the matcher or the home's detector are not the ones the
            gallery was built with, or its version folder is gone.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import whale_ml

    manifest = {
        "round": int(layout.round.removeprefix("round")) if layout.round else 1,
        "gallery_version": gallery.name,
        "gallery_photos": len(gallery.table),
        "gallery_individuals": int(gallery.table["individual_id"].nunique()),
        "matcher": tuned.models_key,
        "local_rerank": tuned.matcher.rerank is not None,
        "models": [m.describe() for m in models],
        "source_home": str(layout.home),
    }
    # MLflow reads the logged folder back once to check it: no per-file bar in a step's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="whale-release-model-") as tmp:
        release = HomeLayout(Path(tmp) / ARTIFACT)
        write_release_home(layout, gallery, models, tuned, release)
        write_json(release.home / MANIFEST, manifest)
        code = Path(tmp) / "code" / "whale_ml"  # the package without its bytecode caches
        shutil.copytree(Path(whale_ml.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # MLflow's "models from code": the model is built by this file at load, never unpickled.
        entry = Path(tmp) / "release_model.py"
        entry.write_text(_ENTRY_POINT)
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
            outputs=Schema([ColSpec("string", "image"), ColSpec("string", "predictions"), ColSpec("string", "error", required=False)]),
        )
        with warnings.catch_warnings():  # none, deliberately: a path means nothing elsewhere
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(entry),
                artifacts={ARTIFACT: str(release.home)},
                code_paths=[str(code)],
                signature=signature,
                pip_requirements=_pinned_requirements(),
                metadata={k: v for k, v in manifest.items() if k != "models"} | {"model_versions": _versions(models)},
                registered_model_name=registered_model_name,
                tags=tags,
            )


def log_release(
    layout: HomeLayout,
    tracking_uri: str | None,
    name: str = "release_model",
    registered_model_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Any:
    """:func:`log_release_model` of ``layout``'s current gallery version, with the very
    checkpoints it was built with (:func:`~whale_ml.gallery.models.gallery_models`: the
    home's ``best.pt`` while it is still that file, else the gallery's registry versions
    from ``tracking_uri``) and the matcher tuned for them.

    Raises:
        LineageError: no gallery, a current version that cannot be read, or parts that are
            not the gallery's (as :func:`log_release_model`).
    """
    gallery = load_version(layout)
    if gallery.fallback_from:
        raise LineageError(f"gallery version {gallery.fallback_from}, the current one, cannot be read: rematerialise the gallery")
    models = gallery_models(gallery.lineage, layout.model_dir, tracking_uri, layout.home / "model_cache")
    tuned = load_matcher(layout, gallery.lineage, gallery.name)
    return log_release_model(layout, gallery, models, tuned, name, registered_model_name, tags)


def write_release_home(
    layout: HomeLayout, gallery: GalleryVersion, models: Sequence[ResolvedModel], tuned: TunedMatcher, out: HomeLayout
) -> None:
    """Copy what the release answers with from ``layout`` into the empty home ``out``
    (:func:`log_release_model` lists it), each file checked against the gallery's lineage,
    and read it back as the model will.

    Raises:
        LineageError: as :func:`log_release_model`.
    """
    lineage = gallery.lineage
    _check_models(lineage, models, gallery.name)
    check_matcher(tuned, lineage, gallery.name)
    detector = detector_for(lineage, layout)
    if detector is not None:
        _copy_checked(detector, out.detector_dir / "detector.pt", lineage.detector_sha256 or "", "the detector")
    for model in models:
        _copy_checked(model.checkpoint, out.model_dir(model.fold) / "best.pt", model.checkpoint_sha256, f"the {model.fold} checkpoint")
    # Versions are immutable once published; the readers' lock keeps a prune from
    # renaming this one away while it is copied.
    with versions_lock(layout.gallery_versions_dir, exclusive=False):
        if not gallery.folder.is_dir():
            raise LineageError(f"gallery version {gallery.name} ({gallery.folder}) is gone (pruned?): load the current version again")
        shutil.copytree(gallery.folder, out.gallery_versions_dir / gallery.name)
    write_json(out.gallery_versions_dir / "current.json", {"version": gallery.name})
    write_json(matcher_path(out, lineage.models), tuned.to_dict())
    if tuned.matcher.rerank is not None:
        # The home's store holds whole splits (every training and test photo); queries are
        # only ever matched against gallery photos, so theirs alone are written, as one set.
        store = home_feature_store(layout)
        config = store.config or tuned.matcher.rerank.features
        images = [image for image in dict.fromkeys(gallery.table["image"]) if image in store]
        save_features(out.local_features_dir("train"), images, [store.get(image) for image in images], config)
        save_features(out.local_features_dir("test"), [], [], config)
    served = load_version(out)  # what load_context will read: whole, and the same version
    if len(served.table) != len(gallery.table) or served.lineage != lineage:
        raise LineageError(f"gallery version {gallery.name} changed while it was copied from {gallery.folder}")
    load_matcher(out, served.lineage, served.name)


def _check_models(lineage: GalleryLineage, models: Sequence[ResolvedModel], gallery_name: str) -> None:
    want = [(m.fold, m.checkpoint_sha256) for m in lineage.models]
    got = [(m.fold, m.checkpoint_sha256) for m in models]
    if got != want:
        described = {name: ", ".join(f"{fold} {sha[:12]}" for fold, sha in pairs) for name, pairs in (("want", want), ("got", got))}
        raise LineageError(f"gallery {gallery_name} was built with the models {described['want']}; given {described['got']}")


def _copy_checked(source: Path, dest: Path, sha256: str, what: str) -> None:
    """Copy ``source`` to ``dest`` and check the copy, the bytes that will be served, by digest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    if sha256_file(dest) != sha256:
        raise LineageError(f"{what} at {source} is not the one the gallery was built with (sha256 {sha256[:12]}...)")


def _versions(models: Sequence[ResolvedModel]) -> str:
    return ", ".join(f"{m.fold}: v{m.version}" if m.version else f"{m.fold}: {m.checkpoint_sha256[:12]}" for m in models)


def _pinned_requirements() -> list[str]:
    pinned = []
    for package in _REQUIREMENTS:
        try:
            pinned.append(f"{package}=={package_version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue  # (a GPU build's faiss is faiss-gpu; the model runs where whale_ml runs)
    return pinned
