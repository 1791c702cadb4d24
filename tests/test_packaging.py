"""What a user runs before any code: the Dockerfile, CI entry and README commands."""

from __future__ import annotations

import re
import subprocess
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
