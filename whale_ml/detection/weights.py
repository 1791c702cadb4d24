"""Checking an ultralytics ``.pt`` before ultralytics unpickles it.

Ultralytics loads its checkpoints with torch.load and weights_only off: a
full pickle, which runs whatever a crafted file asks for. A user may hand the
pipeline any ``.pt`` (``source='weights'``), so every file goes through
:func:`check_detector_weights` first:

1. a static read of the globals the pickle names (nothing imported or run),
   each of which must be on the allowlist below;
2. a complete load with torch's ``weights_only`` unpickler, allowing exactly
   those classes: anything the static read cannot see (a global built on the
   stack, say) is refused there.

Only then is the path given to ultralytics, which reads the same bytes.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from whale_ml.checkpoints import CheckpointError, load_weights_only, unsafe_globals

# Network layers: classes only (a function in these modules, e.g. ultralytics'
# torch_safe_load, would be a way back to an unrestricted load), and only
# torch.nn.Module subclasses, whose constructors build layers.
_MODULE_CLASS_PREFIXES = ("ultralytics.nn.modules.", "ultralytics.nn.tasks.", "torch.nn.modules.")
# Never: modules whose classes load other files (AutoBackend) or fetch text models.
_REFUSED_PREFIXES = ("ultralytics.nn.autobackend.", "ultralytics.nn.text_model.")
# Plain data some ultralytics versions store beside the model (training args, dtypes).
_DATA_GLOBALS = {
    "ultralytics.utils.IterableSimpleNamespace",
    "types.SimpleNamespace",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}


def _resolve(qualified: str) -> object | None:
    """The object a pickle global names, imported only from an allowlisted module."""
    module, _, name = qualified.rpartition(".")
    try:
        obj: object = importlib.import_module(module)
    except ImportError:
        return None
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _allowed(qualified: str) -> object | None:
    if qualified.startswith(_REFUSED_PREFIXES):
        return None
    if qualified in _DATA_GLOBALS:
        return _resolve(qualified)
    if qualified.startswith(_MODULE_CLASS_PREFIXES):
        obj = _resolve(qualified)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return obj
    return None


def check_detector_weights(path: str | Path) -> None:
    """Refuse a detector ``.pt`` that could run code when ultralytics loads it.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: naming the file and the functions or classes it references
            that a YOLO checkpoint never needs (nothing of it was run), or saying it
            is not a ``torch.save`` zip file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: detector weights not found")
    try:
        referenced = unsafe_globals(path)
    except Exception as exc:  # not a zip, cut off, or pickle opcodes torch's reader does not know
        raise CheckpointError(
            f"{path}: refused as detector weights: it cannot be checked before loading ({str(exc).strip() or type(exc).__name__}). "
            "Ultralytics saves a torch.save zip file with pickle protocol 2; nothing in this file was run."
        ) from exc
    allowed, refused = [], []
    for qualified in referenced:
        obj = _allowed(qualified)
        (refused if obj is None else allowed).append(qualified if obj is None else obj)
    if refused:
        raise CheckpointError(
            f"{path}: refused as detector weights: it references {', '.join(refused)}, which a YOLO checkpoint "
            "never needs (it may have been tampered with); nothing in it was run. Use weights saved by "
            "ultralytics (model.save or training), or a file you trust loaded outside the pipeline."
        )
    load_weights_only(path, "cpu", allowed)
