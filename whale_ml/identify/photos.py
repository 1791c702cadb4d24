"""The photos a researcher names on the command line: files and folders of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Photos from files and folders (a folder's image files, sorted by name; not
    recursive). A path that does not exist is kept: it gets an error row later."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        else:
            out.append(path)
    return out
