"""Loading torch files without running code hidden in them.

A ``.pt`` file is a pickle: loading it with plain ``torch.load`` can call any
function the file names (``os.system`` included). Everything this project
loads goes through :func:`load_weights_only`: torch's ``weights_only``
unpickler, which builds only tensors, containers and the classes passed in
``allowed``, and refuses the file otherwise, with an error that names the file
and what it asked for.
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


class CheckpointError(RuntimeError):
    """A checkpoint was refused: tampered with, made by other code, or not a complete file."""


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


def snapshot_checkpoint(path: Path, cache_dir: Path, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Copy ``path`` into ``cache_dir/<sha256>.pt``, hashing the very bytes copied.

    A fold's ``best.pt`` is rewritten at every improving epoch while it trains, so
    "hash the file, then load it by path" may load other weights than were checked. The
    snapshot is named by the digest of the bytes it holds and is never rewritten with
    other bytes, so loading it loads exactly what was hashed.

    Args:
        expected_sha256: the digest the caller needs; the snapshot is kept only if the
            bytes read have it (a snapshot already cached under it is reused).

    Returns:
        The snapshot's path and its digest.

    Raises:
        CheckpointError: the bytes read are not ``expected_sha256``'s (the file changed).
    """
    from whale_ml.io import durable_replace, remove_stale_temps, sha256_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    if expected_sha256 is not None:
        cached = cache_dir / f"{expected_sha256}.pt"
        if cached.exists() and sha256_file(cached) == expected_sha256:
            return cached, expected_sha256
    remove_stale_temps(cache_dir, "snapshot")
    fd, name = tempfile.mkstemp(prefix=f".snapshot.p{os.getpid()}.", suffix=".tmp.pt", dir=cache_dir)
    tmp = Path(name)
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        sha = digest.hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise CheckpointError(f"{path} is not the checkpoint asked for (sha256 {sha[:12]}, not {expected_sha256[:12]})")
        target = cache_dir / f"{sha}.pt"
        durable_replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, sha
