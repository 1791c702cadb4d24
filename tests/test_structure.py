"""The layout rules of docs/architecture.md, checked on the source: thin assets, short core
functions, no import from the core back into the Dagster layer, and stages selected by
group rather than by lists of asset names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSET_DECORATORS = {"asset", "multi_asset", "asset_check", "graph_asset"}
MAX_ASSET_LINES = 60
MAX_CORE_FUNCTION_LINES = 120


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end of the body: signature and docstring included, decorators not."""
    return (fn.end_lineno or fn.lineno) - fn.lineno + 1


def _asset_functions() -> list[tuple[str, int]]:
    found = []
    for path in sorted((REPO / "whale_assets" / "defs").glob("*.py")):
        for fn in _functions(path):
            if any(_decorator_name(d) in ASSET_DECORATORS for d in fn.decorator_list):
                found.append((f"{path.name}::{fn.name}", _body_lines(fn)))
    return found


def test_asset_functions_are_thin() -> None:
    assets = _asset_functions()
    assert len(assets) >= 13, assets  # every asset and check was found
    too_long = {name: n for name, n in assets if n > MAX_ASSET_LINES}
    assert not too_long, f"asset functions over {MAX_ASSET_LINES} lines (move the logic into whale_ml): {too_long}"


def test_core_functions_are_short() -> None:
    too_long = {
        f"{path.relative_to(REPO)}::{fn.name}": _body_lines(fn)
        for path in sorted((REPO / "whale_ml").rglob("*.py"))
        for fn in _functions(path)
        if _body_lines(fn) > MAX_CORE_FUNCTION_LINES
    }
    assert not too_long, f"core functions over {MAX_CORE_FUNCTION_LINES} lines: {too_long}"


def test_the_core_never_imports_the_dagster_layer() -> None:
    offenders = []
    for path in sorted((REPO / "whale_ml").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("dagster", "whale_assets")]
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["whale_assets/run.py", "whale_assets/defs/jobs.py", "whale_assets/defs/automation.py"])
def test_stages_are_selected_not_listed(module: str) -> None:
    """No list, tuple or set literal of asset names: stages come from whale_assets/stages.py."""
    from whale_assets.stages import all_asset_names

    names = set(all_asset_names())
    for node in ast.walk(ast.parse((REPO / module).read_text())):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            listed = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
            assert len(listed) < 2, f"{module}:{node.lineno} lists asset names {listed}"
        if isinstance(node, ast.Call) and _decorator_name(node) == "assets":
            raise AssertionError(f"{module}:{node.lineno} selects assets by name (AssetSelection.assets)")


def test_every_stage_is_a_set_of_groups_covering_the_graph() -> None:
    from whale_assets.stages import all_asset_names, asset_names, stages

    staged = [name for stage in stages() for name in asset_names(stage.selection)]
    assert sorted(staged) == all_asset_names(), "every asset in exactly one stage"
    per_fold = {name for stage in stages() if stage.per_fold for name in asset_names(stage.selection)}
    import dagster as dg

    from whale_assets.definitions import defs

    d = defs()
    for name in all_asset_names():
        partitioned = d.resolve_assets_def(dg.AssetKey.from_user_string(name)).partitions_def is not None
        assert partitioned == (name in per_fold), f"{name}: partitioned={partitioned} but per_fold stage={name in per_fold}"
