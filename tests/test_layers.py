"""The layers of whale_ml only point down: no module imports a module of a layer above its own.

Read from the source with ``ast``, nothing imported: every ``import`` and ``from ... import``
counts wherever it stands (module level, inside a function, under ``TYPE_CHECKING``), and so
does ``importlib.import_module("...")`` with a literal name. Modules of one layer may import
each other. The order and why it is so: docs/architecture.md, "Layers".
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "whale_ml"

# Bottom to top. A key is a top-level module or a package of whale_ml ("whale_ml" itself is
# the package's __init__); a module belongs to the layer of its first two name parts.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "whale_ml",
            "whale_ml.checkpoints",
            "whale_ml.environment",
            "whale_ml.filesets",
            "whale_ml.home",
            "whale_ml.io",
            "whale_ml.mlflow_errors",
            "whale_ml.offline",
            "whale_ml.progress",
            "whale_ml.stage_configs",
            "whale_ml.threads",
        ),
    ),
    ("data", ("whale_ml.data",)),
    ("detection", ("whale_ml.detection",)),
    ("models", ("whale_ml.models",)),
    ("retrieval", ("whale_ml.retrieval",)),
    ("training", ("whale_ml.training",)),
    ("registry", ("whale_ml.registry",)),
    ("gallery", ("whale_ml.gallery",)),
    ("applications", ("whale_ml.identify", "whale_ml.submission", "whale_ml.cli", "whale_ml.__main__")),
    ("review", ("whale_ml.review",)),
)

# Top-level packages the core never imports: the Dagster layer and Dagster itself.
FORBIDDEN = ("whale_assets", "dagster")

LAYER_OF: dict[str, int] = {key: rank for rank, (_, keys) in enumerate(LAYERS) for key in keys}


def _layer(module: str) -> int | None:
    return LAYER_OF.get(".".join(module.split(".")[:2]))


def _describe(module: str) -> str:
    rank = _layer(module)
    return f"{module} (layer {rank}, {LAYERS[rank][0]})" if rank is not None else module


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _core_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(CORE.rglob("*.py"))}


def imported_modules(source: str, module: str, is_package: bool, known: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """Every module ``source`` imports, with its line: ``from a import b`` is ``a.b`` when
    that is a module in ``known``, else ``a``; relative imports are resolved against ``module``."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.args[0].value, node.lineno))
    return found


@functools.cache
def _all_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import in whale_ml."""
    known = frozenset(_core_modules())
    return [
        (module, imported, line)
        for module, path in _core_modules().items()
        for imported, line in imported_modules(path.read_text(), module, path.name == "__init__.py", known)
    ]


def _upward_imports() -> set[tuple[str, str, int]]:
    return {
        (module, imported, line)
        for module, imported, line in _all_imports()
        if imported.split(".")[0] == "whale_ml" and (_layer(imported) or 0) > (_layer(module) or 0)
    }


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in _core_modules() if _layer(m) is None)
    assert not unplaced, f"modules in no layer (add each to LAYERS here and to docs/architecture.md): {unplaced}"
    assert len(_core_modules()) > 60 and len(_all_imports()) > 200, "the scan found the core and its imports"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = sorted(_upward_imports())
    assert not upward, "imports that point up the layers (move the code down, or the caller up):\n" + "\n".join(
        f"  {_describe(module)} imports {_describe(imported)} ({_core_modules()[module].relative_to(REPO)}, line {line})"
        for module, imported, line in upward
    )


def test_the_core_imports_neither_the_dagster_layer_nor_dagster() -> None:
    offenders = sorted(
        f"{module} imports {imported} (line {line})"
        for module, imported, line in _all_imports()
        if imported.split(".")[0] in FORBIDDEN or imported.startswith("dagster_")
    )
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("def f():\n    from whale_ml.gallery import search\n", "whale_ml.registry", False, ["whale_ml.gallery.search"]),
        ("from whale_ml.gallery import LineageError\n", "whale_ml.registry", False, ["whale_ml.gallery"]),
        ("if TYPE_CHECKING:\n    import whale_ml.identify.enroll\n", "whale_ml.io", False, ["whale_ml.identify.enroll"]),
        ("from ..gallery.search import match_queries\n", "whale_ml.retrieval.pseudo_labels", False, ["whale_ml.gallery.search"]),
        ("from . import ranking\n", "whale_ml.retrieval", True, ["whale_ml.retrieval.ranking"]),
        ("importlib.import_module('whale_assets.rounds')\n", "whale_ml.io", False, ["whale_assets.rounds"]),
    ],
)
def test_imports_are_found_wherever_they_stand(source: str, module: str, is_package: bool, expected: list[str]) -> None:
    known = frozenset({"whale_ml.gallery.search", "whale_ml.retrieval.ranking"})
    assert [name for name, _ in imported_modules(source, module, is_package, known)] == expected
