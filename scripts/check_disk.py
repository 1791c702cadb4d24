"""Refuse to create the virtual environment on a disk that cannot hold it.

Usage: check_disk.py VENV_DIR MIN_FREE_GB

pip fails with "[Errno 28] No space left on device" after minutes of work and leaves a
half-installed environment; this says up front how much is needed and where. Only the
standard library: it runs before the environment exists.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    venv, need_gb = argv[1], float(argv[2])
    # pip unpacks downloads under TMPDIR, which may be another file system.
    places = {_existing_parent(venv): f"the virtual environment {venv}"}
    places.setdefault(_existing_parent(tempfile.gettempdir()), f"pip's temp dir {tempfile.gettempdir()}")
    for where, what in places.items():
        free_gb = shutil.disk_usage(where).free / 1e9
        if free_gb < need_gb:
            print(
                f"error: {free_gb:.1f} GB free on the disk of {what} ({where}); installing "
                f"needs about {need_gb:g} GB (CUDA-enabled PyTorch and its libraries). Free "
                "some space, or point VENV=... (and TMPDIR=...) at a larger disk.",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
