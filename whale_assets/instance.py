"""The Dagster instance home, created with telemetry off."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from whale_ml.io import pid_alive, write_text

try:
    import fcntl
except ImportError:  # Windows: runs are judged by pid and start time only
    fcntl = None  # type: ignore[assignment]
from whale_ml.environment import default_home
from whale_ml.home import HomeLayout

DAGSTER_YAML = """\
# Written by whale_assets.instance; edit freely, it is not overwritten.
telemetry:
  enabled: false
# No "join the community" sign-up dialog in the UI (it needs the internet anyway).
nux:
  enabled: false
# GPU-heavy assets (detector, training, embeddings) are in the "gpu" pool: one at a
# time across all runs. More at once: `dagster instance concurrency set gpu 2`.
concurrency:
  pools:
    default_limit: 1
# The daemon (started by `dagster dev` / `make ui`) fails runs whose worker died, which
# gives their pool slots back.
run_monitoring:
  enabled: true
"""


def prepare_dagster_home(home: Path | None = None) -> Path:
    """Set ``DAGSTER_HOME`` (unless set) to ``$WHALE_HOME/dagster_home`` and create it."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or HomeLayout(home or default_home()).dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        write_text(dagster_home / "dagster.yaml", DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


# Tags of a ``whale run``'s runs: who executed them, to tell later whether it still lives.
LAUNCHED_BY = {"whale/launched_by": "whale run"}
PID_TAG, START_TAG, LOCK_TAG = "whale/pid", "whale/pid_start", "whale/lock"
RUN_LOCKS = "whale_run_locks"  # in DAGSTER_HOME: one flock-held file per live `whale run`


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat`` field 22);
    None where there is no such process or no ``/proc``. A pid and its start time name one
    process: a later process given the same pid (PID 1 of the next container) starts later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces and ')'
    return fields[19] if len(fields) > 19 else None


def _lock_dir(instance: object) -> Path:
    root = getattr(instance, "root_directory", None) or os.environ.get("DAGSTER_HOME") or "."
    return Path(root) / RUN_LOCKS


@contextlib.contextmanager
def cli_run_tags(instance: object) -> Iterator[dict[str, str]]:
    """The tags of a ``whale run``'s runs, valid while the block runs: they let
    :func:`release_dead_cli_runs` tell, later and from another process, whether the process
    that executed a run is still alive.

    A pid alone cannot: in the Docker image ``whale run`` is PID 1, and so is the next
    container's ``whale run``, which would take a dead run for its own live one and wait for
    its ``gpu`` pool slot for ever. So the process also holds an exclusive ``flock`` on a
    file of its own under ``DAGSTER_HOME`` (the kernel drops it when the process dies,
    whatever pid the next one gets), and its start time is recorded beside its pid for
    where locks are not available.
    """
    pid = os.getpid()
    tags = {**LAUNCHED_BY, PID_TAG: str(pid)}
    start = process_start_time(pid)
    if start is not None:
        tags[START_TAG] = start
    if fcntl is None:
        yield tags
        return
    folder = _lock_dir(instance)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    path = folder / f"{token}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        yield {**tags, LOCK_TAG: token}
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # drops the lock


def _lock_released(path: Path) -> bool | None:
    """Whether the ``whale run`` that held ``path`` is gone (its lock free, or the file removed);
    None where this file system cannot say (no flock support)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True  # removed by its process at its end, or by an earlier release
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # held: that process lives (in this container or another on this host)
    except OSError:
        return None
    else:
        path.unlink(missing_ok=True)  # ours now, and nobody's after: sweep it
        return True
    finally:
        os.close(fd)


def cli_run_process_gone(tags: Mapping[str, str], lock_dir: Path) -> bool:
    """Whether the process that executed a ``whale run`` run (by its tags) has ended.

    By its lock where it has one; else by its pid and start time (a live process with that pid
    but another start time is another process: pid reuse); runs tagged with a pid alone (from
    before start times were kept) by the pid. Runs without these tags are never judged gone.
    """
    token = tags.get(LOCK_TAG)
    if token:
        gone = _lock_released(lock_dir / f"{Path(token).name}.lock")
        if gone is not None:
            return gone
    pid = int(tags.get(PID_TAG, "0") or 0)
    if not pid:
        return False
    if not pid_alive(pid):
        return True
    recorded, now = tags.get(START_TAG), process_start_time(pid)
    return recorded is not None and now is not None and recorded != now


def release_dead_cli_runs(instance: object) -> list[str]:
    """Fail the ``whale run`` runs whose process is gone, and free their pool slots.

    A run executed in-process holds its ``gpu`` pool slot while a step runs; if the
    process is killed (kill -9, a crash, a stopped container) nothing gives the slot back
    and the next run would wait for it forever. ``whale run`` tags its runs
    (:func:`cli_run_tags`) and calls this first. Runs of live processes, and runs launched
    from the UI, are left alone.
    """
    import dagster as dg

    released = []
    live = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]
    lock_dir = _lock_dir(instance)
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=live, tags=LAUNCHED_BY)):  # type: ignore[attr-defined]
        if cli_run_process_gone(run.tags, lock_dir):
            pid = run.tags.get(PID_TAG, "?")
            instance.report_run_failed(run, f"the whale run process (pid {pid}) that executed this run is gone")  # type: ignore[attr-defined]
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)  # type: ignore[attr-defined]
            released.append(run.run_id)
    return released
