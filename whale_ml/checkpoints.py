"""Loading torch files without running code hidden in them.

A ``.pt`` file is a pickle: loading it with plain ``torch.load`` can call any
function the file names (``os.system`` included). Everything this project
loads goes through :func:`load_weights_only`: torch's ``weights_only``
unpickler, which builds only tensors, containers and the classes passed in
``allowed``, and refuses the file otherwise, with an error that names the file
and what it asked for.

A checkpoint that another process may replace (training rewrites ``best.pt`` at
every improving epoch) is read through :func:`snapshot_checkpoint`: its bytes are
read once, hashed while copied into a content-addressed cache, and the copy is what
gets loaded, so that a recorded hash is the hash of the weights actually used.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from whale_ml.io import durable_replace, remove_stale_temps, write_error


class CheckpointError(RuntimeError):
    """A checkpoint was refused: tampered with, made by other code, or not a complete file."""


def snapshot_checkpoint(path: Path, cache_dir: Path, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Read ``path`` once, hash it and return an immutable copy of exactly those bytes.

    Hashing a checkpoint and loading it by name are two reads: a writer that replaces
    the file between them (training saving a better ``best.pt``) makes the hash name
    one set of weights and the model another. Here the bytes are hashed while they are
    copied, so the copy ``<cache_dir>/<sha256>.pt`` (written atomically: a killed copy
    never appears under that name) holds the very bytes the returned hash is of. The
    name is the content, so the copy is never rewritten with other bytes and may be
    shared by every reader of that checkpoint.

    Args:
        path: the checkpoint to read (it may be replaced while this runs: a file is
            replaced by rename, so the open file stays the one read).
        cache_dir: where the copies live (``<home>/model_cache``).
        expected_sha256: the hash the caller was told the checkpoint has (a lineage
            record, a registry tag); None to take whatever the file holds now.

    Returns:
        The copy's path and its sha256 (hex).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        CheckpointError: ``expected_sha256`` was given and the bytes read have another
            hash (nothing is left in the cache then).
    """
    path, cache_dir = Path(path), Path(cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache_dir, "snapshot", ".pt")  # copies a killed process left
        fd, name = tempfile.mkstemp(prefix=f".snapshot.p{os.getpid()}.", suffix=".tmp.pt", dir=cache_dir)
    except OSError as exc:
        raise write_error(cache_dir / "snapshot.pt", exc) from exc
    part = Path(name)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as src, os.fdopen(fd, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        sha = digest.hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise CheckpointError(
                f"{path}: its sha256 is {sha[:12]}, not the expected {expected_sha256[:12]}: the file was replaced "
                "(retrained?) since that hash was recorded"
            )
        target = cache_dir / f"{sha}.pt"
        # Replaced even when cached already: the same bytes, and a damaged copy heals itself;
        # a reader that has the old copy open keeps reading it whole.
        durable_replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target, sha


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def unsafe_globals(path: str | Path) -> list[str]:
    """The functions and classes a ``torch.save`` zip file names that torch does not build
    under ``weights_only`` by default (read statically: nothing is imported or called)."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu", allowed: Iterable[object] = ()) -> Any:
    """``torch.load(path, weights_only=True)``, with the refusal explained.

    Args:
        allowed: classes (or functions) the file may name beyond torch's own safe
            set, e.g. the module classes of a full-model checkpoint.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file names a function or class outside the allowed set
            (the message lists them; none was called), or it is truncated or not a
            torch file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    is_zip = _is_zip(path)
    if not is_zip:
        start = _first_bytes(path)
        if start.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{path}: not a complete torch checkpoint: a zip file cut off or corrupted (truncated copy?)")
        if not start.startswith(b"\x80"):  # the PROTO opcode that starts every pickle since protocol 2
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a torch.save zip file nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names: list[str] = []
        if is_zip:
            try:
                with torch.serialization.safe_globals(list(allowed)):
                    names = unsafe_globals(path)
            except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError, KeyError):  # the static read only improves the message
                names = []
        what = (
            f"it references {', '.join(names)}" if names else f"it holds something torch will not build safely ({_unpickler_reason(exc)})"
        )
        raise CheckpointError(
            f"{path}: refused to load: {what}. A weights checkpoint holds only tensors and plain "
            "containers, so this file was tampered with or made by other code; nothing in it was run. "
            "Re-create it, or load it yourself only if you trust where it came from."
        ) from exc
    except Exception as exc:  # a cut-off zip, a garbled pickle: torch raises RuntimeError, EOFError, KeyError...
        raise CheckpointError(f"{path}: not a complete torch checkpoint (truncated or corrupted?): {_first_line(exc)}") from exc


def _first_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def _unpickler_reason(exc: BaseException) -> str:
    """The one informative line of torch's long weights_only message (e.g. 'Unsupported operand 149')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
