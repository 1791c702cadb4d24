"""What a user runs before any code: the Dockerfile, CI entry and README commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_dockerfile_copies_only_files_that_exist() -> None:
    """No Docker engine runs here, so check what can be checked: every COPY source exists."""
    text = (REPO / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE) for src in line.split()[:-1]]
    assert sources, "Dockerfile copies nothing"
    missing = [s for s in sources if not (REPO / s).exists()]
    assert missing == []
    assert re.search(r"^USER\s+(?!root)\w+", text, flags=re.MULTILINE), "the image must not run as root"
    assert "HEALTHCHECK" in text
    assert re.search(r"^FROM\s+\S+:\d+\.\d+\.\d+", text, flags=re.MULTILINE), "pin the base image version"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_workspace_loads_the_definitions_module() -> None:
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    assert entry["python_module"]["module_name"] == "whale_assets.definitions"


def test_core_never_imports_dagster() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "whale_ml").rglob("*.py")
        if re.search(r"^\s*(import dagster|from dagster)", p.read_text(), flags=re.MULTILINE)
    ]
    assert offenders == []


def test_make_refuses_a_disk_too_small_for_the_venv(tmp_path: Path) -> None:
    """A full disk is a clear message before pip starts, and no half-made .venv is left."""

    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "-C", str(REPO), f"VENV={venv}", "VENV_MIN_FREE_GB=1000000", "venv"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "installing needs about 1e+06 GB" in done.stderr and str(venv) in done.stderr
    assert not venv.exists()
    # The same check passes where there is room (0 GB needed).
    ok = subprocess.run(["python3", str(REPO / "scripts" / "check_disk.py"), str(venv), "0"], capture_output=True, check=False)
    assert ok.returncode == 0


def test_the_licence_is_declared_and_ultralytics_agpl_is_explained() -> None:
    """pyproject's SPDX licence is the LICENSE file's; the README's Licence section names the
    AGPL of the ultralytics actually installed (a relicensed release would make it stale)."""
    import tomllib
    from importlib.metadata import metadata

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert re.search(r"^COPY .*\bLICENSE\b", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE), "pip install needs LICENSE"
    installed = metadata("ultralytics")
    assert "AGPL-3.0" in (installed.get("License") or installed.get("License-Expression") or "")
    section = (REPO / "README.md").read_text().split("## Licence", 1)[1]
    assert "AGPL-3.0" in section and "§13" in section and "Enterprise" in section


def _requirement_names(requirements: list[str]) -> set[str]:
    """Normalised distribution names of requirement strings (``"faiss-cpu>=1.8"`` -> ``faiss-cpu``)."""
    return {re.split(r"[\s<>=!~\[;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _third_party_imports(roots: list[Path], local: set[str]) -> dict[str, str]:
    """Top-level module -> the first file under ``roots`` importing it, for every module
    neither in the standard library nor in ``local``."""
    import ast

    imported: dict[str, str] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        imported.setdefault(top, str(path.relative_to(REPO)))
    return imported


def test_every_package_the_code_imports_is_declared() -> None:
    """A third-party module imported by whale_ml or whale_assets comes from a distribution
    pyproject.toml names (a dependency, or an extra for optional parts such as the Kubernetes
    executor), not one that arrives only because another package happens to need it."""
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    declared |= {n for extra in project["optional-dependencies"].values() for n in _requirement_names(extra)}
    providers = md.packages_distributions()
    imported = _third_party_imports([REPO / "whale_ml", REPO / "whale_assets"], {"whale_ml", "whale_assets"})
    assert {"torch", "cv2", "sklearn", "faiss"} <= set(imported), "the scan found the code's imports"
    undeclared = {
        module: (where, providers.get(module))
        for module, where in imported.items()
        if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml (module: first importer, distributions): {undeclared}"


def test_every_package_the_tests_import_is_in_the_dev_install() -> None:
    """A third-party module the tests import (websocket-client for the Chromium driver, ...)
    comes from a distribution that `pip install -e ".[dev]"` (make venv) installs by name:
    a dependency or the dev extra, not one that arrives with another package."""
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"]) | _requirement_names(project["optional-dependencies"]["dev"])
    local = {p.stem for p in (REPO / "tests").glob("*.py")} | {"whale_ml", "whale_assets"}
    providers = md.packages_distributions()
    imported = _third_party_imports([REPO / "tests"], local)
    assert {"pytest", "websocket", "yaml"} <= set(imported), "the scan found the tests' imports"
    undeclared = {
        module: (where, providers.get(module))
        for module, where in imported.items()
        if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared
    }
    assert not undeclared, f"imported by the tests but not a dependency or in the dev extra (module: first importer, distributions): {undeclared}"


def test_make_checks_the_python_version_before_creating_the_venv() -> None:
    """The pins need the Python that pyproject.toml requires; an older one is refused up front,
    with the version it found and what to run instead."""
    import tomllib

    script = REPO / "scripts" / "check_python.py"
    namespace: dict[str, object] = {"__name__": "check_python"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    minimum = namespace["MINIMUM"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">={}.{}".format(*minimum)  # type: ignore[str-format]
    problem = namespace["problem"]
    assert problem(minimum) is None and problem((3, 13)) is None  # type: ignore[operator]
    message = problem((3, 10))  # type: ignore[operator]
    assert "Python 3.11 or newer" in message and "is Python 3.10" in message and "make PYTHON=python3.11" in message
    assert subprocess.run([sys.executable, str(script)], capture_output=True).returncode == 0  # this interpreter runs the project
    makefile = (REPO / "Makefile").read_text()
    assert makefile.index("scripts/check_python.py") < makefile.index("-m venv"), "checked before the venv is made"
