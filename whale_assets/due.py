"""What a ``whale run`` stage has left to do: the assets that are missing or stale.

An asset is due when Dagster's own staleness says so (missing; or stale: its code
version changed, or an input's data version is not the one it was built from), when its
settings in the recipe are not those of its last materialisation (Dagster does not
version run config), or when it reads the world outside the graph: a root asset (no
asset inputs: the data set's CSVs and the enrolment ledger) is re-read on every run,
and its content digest (``whale_assets/versions.py``) then decides what is stale below
it. Everything else is skipped.

A stage is run in waves. An asset that is fresh now but sits below a due one is decided
after that one ran: a rerun that gives the same data version (a table read again
unchanged, a detector reused) leaves it fresh, so a changed row of ``train.csv`` reruns
what depends on that row and nothing else. docs/architecture.md, "Runs that skip".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.definitions.temporal_context import TemporalContext
from dagster._time import get_current_datetime

ROOT = "reads the data set"
READS_FILES = {"whale/reads_files": "true"}  # an asset's tag: it reads files Dagster cannot watch, so every run reads them again
SETTINGS = "settings changed"
FORCED = "--force"


@dataclass
class Due:
    """One wave of a stage: what to materialise now and why, and what is left as it is.

    Attributes:
        run: the keys to materialise now (whole ops: a multi-asset's keys together).
        why: key -> the reason it is due (``missing``, ``stale: ...``, :data:`SETTINGS`, :data:`ROOT`).
        fresh: keys that are up to date.
        waiting: keys fresh now but below a due key: decided once it has run.
    """

    run: list[dg.AssetKey] = field(default_factory=list)
    why: dict[dg.AssetKey, str] = field(default_factory=dict)
    fresh: list[dg.AssetKey] = field(default_factory=list)
    waiting: list[dg.AssetKey] = field(default_factory=list)


def status_resolver(instance: dg.DagsterInstance, graph: Any) -> CachingStaleStatusResolver:
    """Dagster's stale-status resolver over ``graph`` as the instance holds it now (it caches:
    make a new one after a run)."""
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None), instance=instance, asset_graph=graph
    )
    return CachingStaleStatusResolver(instance, graph, view)


def _stale_reason(resolver: CachingStaleStatusResolver, key: dg.AssetKey, partition: str | None) -> str:
    causes = resolver.get_stale_causes(key, partition)
    if not causes:
        return "stale"
    first = causes[0]
    if first.dependency is not None:
        dep = first.dependency
        what = f"{first.reason}: {dep.asset_key.to_user_string()}" + (f" [{dep.partition_key}]" if dep.partition_key else "")
    else:
        what = first.reason
    return f"stale, {what}" + (f" (and {len(causes) - 1} more)" if len(causes) > 1 else "")


def last_config(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None, op: str) -> tuple[bool, Any]:
    """The ``config`` of ``op`` in the run that last materialised ``key`` (``partition``):
    ``(True, config)``, or ``(False, None)`` when there is no such run (a runless event, e.g.
    ``whale enroll``'s gallery version, which changes no settings)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1, ascending=False
    ).records
    if not records or not records[0].run_id:
        return False, None
    run = instance.get_run_by_id(records[0].run_id)
    if run is None:
        return False, None
    return True, _config_of(run.run_config, op)


def _config_of(run_config: Mapping[str, Any] | None, op: str) -> Any:
    return (((run_config or {}).get("ops") or {}).get(op) or {}).get("config") or {}


def due_now(
    instance: dg.DagsterInstance,
    graph: Any,
    keys: Sequence[dg.AssetKey],
    partition: str | None,
    run_config: Mapping[str, Any],
    done: Iterable[dg.AssetKey] = (),
) -> Due:
    """The next wave of a stage of ``keys`` (one fold ``partition`` of it, or none).

    Args:
        graph: the code location's asset graph (``Definitions.resolve_asset_graph()``).
        run_config: the run config the stage runs with: its ``ops`` section is compared with
            the last materialisation's.
        done: keys already materialised in an earlier wave of this stage: never due again
            (a root asset was re-read, a multi-asset's other key was written with it).
    """
    resolver = status_resolver(instance, graph)
    stage, done = set(keys), set(done)
    order = [k for k in graph.toposorted_asset_keys if k in stage]
    op_of = {k: graph.get(k).assets_def.node_def.name for k in order}
    due = Due()
    for key in order:
        if key in done:
            continue
        node = graph.get(key)
        if not node.parent_keys or all(node.tags.get(k) == v for k, v in READS_FILES.items()):
            due.why[key] = ROOT
            continue
        status = resolver.get_status(key, partition)
        if status == StaleStatus.MISSING:
            due.why[key] = "missing"
        elif status == StaleStatus.STALE:
            due.why[key] = _stale_reason(resolver, key, partition)
        else:
            found, config = last_config(instance, key, partition, op_of[key])
            if found and config != _config_of(run_config, op_of[key]):
                due.why[key] = SETTINGS
    # Fresh now but below a due key (in this stage): its inputs may be about to change, or not.
    unsure: set[dg.AssetKey] = set()
    for key in order:
        if key in done or key in due.why:
            continue
        if set(graph.get(key).parent_keys) & (set(due.why) | unsure):
            unsure.add(key)
    # A due key below an undecided one waits for it too: it would otherwise run twice.
    blocked = {k for k in due.why if _ancestors(graph, k, stage) & unsure}
    chosen = {k for k in due.why if k not in blocked}
    for key in list(chosen):  # an op computes all of its keys: the stage's others run with it
        chosen |= {k for k in order if op_of[k] == op_of[key] and k not in done}
    due.run = [k for k in order if k in chosen]
    due.why = {k: due.why.get(k, f"computed with {op_of[k]}") for k in due.run}
    due.waiting = [k for k in order if k in (unsure | blocked) - chosen]
    due.fresh = [k for k in order if k not in chosen and k not in unsure | blocked and k not in done]
    return due


def _ancestors(graph: Any, key: dg.AssetKey, within: set[dg.AssetKey]) -> set[dg.AssetKey]:
    found: set[dg.AssetKey] = set()
    todo = [key]
    while todo:
        for parent in graph.get(todo.pop()).parent_keys:
            if parent in within and parent not in found:
                found.add(parent)
                todo.append(parent)
    return found


def describe(due: Due) -> str:
    """``train_metadata (reads the data set), cv_folds (stale: ...)``."""
    return ", ".join(f"{k.to_user_string()} ({due.why[k]})" for k in due.run)
