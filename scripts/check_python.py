"""Refuse to create the virtual environment with a Python the pinned packages cannot use.

Usage: check_python.py

requirements/constraints.txt pins packages (numpy 2.4 among them) that need Python 3.11 or
newer; with an older interpreter pip fails deep inside the install with a resolver error
that does not name the cause. This says it first, and what to do. Only the standard
library, and syntax old interpreters parse: it runs before the environment exists.
"""

import sys

MINIMUM = (3, 11)  # pyproject.toml's requires-python (tests/test_packaging.py checks they agree)


def problem(version=None):
    """Why ``version`` (default: this interpreter's) cannot run the project, or None."""
    version = tuple(version or sys.version_info)[:2]
    if version >= MINIMUM:
        return None
    return (
        "whale-photo-id needs Python {}.{} or newer (the pinned packages in requirements/constraints.txt do); "
        "{} is Python {}.{}. Install Python {}.{} (e.g. `apt-get install python3.11 python3.11-venv`, or pyenv), "
        "then run make with it: `make PYTHON=python3.11 demo`."
    ).format(MINIMUM[0], MINIMUM[1], sys.executable, version[0], version[1], MINIMUM[0], MINIMUM[1])


def main():
    found = problem()
    if found:
        sys.stderr.write(found + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
