"""What the benchmarks share: the machine record, readers of ``/proc``, timing, writing results.

The benchmarks run as scripts (``python benchmarks/x.py``), so this folder is first on
``sys.path`` and they import this module as ``common``; one loaded some other way (a test,
a ``python -c`` child) puts ``benchmarks/`` on ``sys.path`` first. Only the standard
library is imported at the top: a parent process that must stay small (``kaggle_scale.py``)
imports it too, and the libraries whose versions are recorded are imported only when asked
for. The ``/proc`` readers are Linux-only and answer 0 (or nothing) elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from whale_ml.stage_configs import TrainConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# --------------------------------------------------------------------------- /proc: this process's memory


def status_kib(field: str, pid: int | str = "self") -> int:
    """A ``VmXXX`` line of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...), in KiB; 0 when the
    process or the line is gone, or there is no ``/proc``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current resident set (Linux >= 4.0), so that the next
    reading is the peak since now; False where that is refused (the peak then counts what came
    before). ``ru_maxrss`` cannot do this, and survives ``exec``: a child would start at its
    parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tree_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in KiB (0 once it is gone)."""
    return sum(status_kib("VmRSS", p) for p in process_tree(pid))


# --------------------------------------------------------------------------- /proc: CPU use

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks (0 when it is gone)."""
    try:
        # The command name may hold spaces: the fields start after its closing ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a DataLoader's workers, a process pool), through each
    thread's ``/proc/<pid>/task/<tid>/children``."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def system_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) ticks of all CPUs since boot, from ``/proc/stat``."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal, sum(v)


@contextmanager
def cpu_meter() -> Iterator[dict[str, float]]:
    """CPU cores used while the block runs: by this process tree, by the whole machine, stolen.

    Yields a dict filled in when the block ends: ``process_cores``, ``system_busy_cores``,
    ``other_cores`` (machine - ours: anything else running at the same time, another job or a
    build, competes for the same cores and lowers every rate) and ``steal_cores`` (taken by the
    hypervisor). Empty without ``/proc``.
    """
    result: dict[str, float] = {}
    if not Path("/proc/stat").exists():
        yield result
        return
    t0 = time.perf_counter()
    busy0, steal0, _ = system_ticks()
    own0 = {p: process_ticks(p) for p in process_tree(os.getpid())}
    yield result
    ticks = (time.perf_counter() - t0) * _CLK_TCK
    busy1, steal1, _ = system_ticks()
    own = sum(t - own0.get(p, 0) for p, t in ((p, process_ticks(p)) for p in process_tree(os.getpid())))
    process, system = own / ticks, (busy1 - busy0) / ticks
    result.update(
        {
            "process_cores": round(process, 2),
            "system_busy_cores": round(system, 2),
            "other_cores": round(max(0.0, system - process), 2),
            "steal_cores": round((steal1 - steal0) / ticks, 2),
        }
    )


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform`` says only ``x86_64``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (``MemTotal``, ``MemAvailable``...); empty without it."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, value = line.split(":", 1)
        number, *unit = value.split()
        out[key] = int(number) * (1024 if unit == ["kB"] else 1)
    return out


def mem_available_bytes() -> int:
    """Memory the kernel could give without swapping (``MemAvailable``), 0 when unknown."""
    return meminfo().get("MemAvailable", 0)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity: a container's or ``taskset``'s share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timestamp(seconds: float | None = None) -> str:
    """Local time with its UTC offset, to the second (now, or at ``time.time()`` ``seconds``)."""
    return _dt.datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone().isoformat(timespec="seconds")


def machine_summary() -> str:
    """One line for a result's ``machine`` field: the CPU model and the usable cores."""
    return f"{cpu_model()}, {usable_cores()} cores"


_IMPORT_NAMES = {"pillow": "PIL"}


def library_versions(*names: str) -> dict[str, str]:
    """``{name: version}`` of each library (``pillow`` is imported as ``PIL``); importing them is the caller's cost."""
    return {name: import_module(_IMPORT_NAMES.get(name, name)).__version__ for name in names}


def _library_fields(name: str) -> dict[str, Any]:
    fields: dict[str, Any] = library_versions(name)
    if name == "torch":
        import torch

        fields.update(torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads())
    elif name == "faiss":
        import faiss

        fields["faiss_omp_max_threads"] = faiss.omp_get_max_threads()
    return fields


def environment(*libraries: str, **extra: Any) -> dict[str, Any]:
    """The machine a run measured, recorded with its results (``"environment"``).

    The date, host, CPU model, usable cores (as ``nproc`` and as ``cores``) and all CPUs,
    total and available memory, the load average at the start (callers add ``loadavg_end``
    when they write, see :func:`save_results`), Python and the thread settings of the
    environment. ``libraries`` adds each one's version at the top level (``numpy``,
    ``faiss``, ``torch``, ``torchvision``, ``timm``, ``pillow``, ``pandas``,
    ``pytorch_metric_learning``...), with torch's thread counts and faiss's OpenMP threads;
    they are imported here, so a parent process that must stay small passes none.
    ``extra`` fields are added last (and win).
    """
    mem = meminfo()
    cores = usable_cores()
    env: dict[str, Any] = {
        "date": timestamp(),
        "hostname": platform.node(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "nproc": cores,
        "cores": cores,
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "mem_available_start_bytes": mem.get("MemAvailable"),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }
    for name in libraries:
        env.update(_library_fields(name))
    env.update(extra)
    return env


# --------------------------------------------------------------------------- timing


def timed_runs(fn: Callable[[], Any], repeats: int = 1) -> tuple[list[float], Any]:
    """Wall seconds of each of ``repeats`` calls of ``fn``, and the last call's result.

    Before each call the previous result is dropped and garbage collected, so that one
    call's leftovers neither cost the next its time nor add to its memory.
    """
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def best_time(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls (on a shared machine, the least disturbed), and the last result."""
    times, out = timed_runs(fn, repeats)
    return min(times), out


# --------------------------------------------------------------------------- results


def _json_default(o: Any) -> Any:
    """numpy scalars and arrays as numbers and lists, anything else (paths...) as its text."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_json(path: Path | str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, its folder made; written to a temporary file and
    renamed, so an interrupted write leaves the previous results whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def print_json(obj: Any, out: Path | str | None = None) -> None:
    """Print ``obj`` as indented JSON, and write it to ``out`` when given."""
    print(json.dumps(obj, indent=2, default=_json_default))
    if out:
        write_json(out, obj)


def save_results(res: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str] | None = None, started: float | None = None) -> None:
    """Finish and write a run's results: the load average at the end (``environment.loadavg_end``),
    ``total_s`` since ``time.perf_counter()`` was ``started``, the Markdown table (``markdown``,
    from ``markdown(res)``). Called after each part as well, it keeps what a stopped run measured."""
    res["environment"]["loadavg_end"] = loadavg()
    if started is not None:
        res["total_s"] = round(time.perf_counter() - started, 1)
    if markdown is not None:
        res["markdown"] = markdown(res)
    write_json(out, res)


def json_child(cmd: list[str], what: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``cmd`` (a measurement in a fresh process) and read the last line of its output as JSON;
    if it fails, raise with the end of its error output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with exit status {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


# --------------------------------------------------------------------------- recipes


def recipe_train_config(path: Path | str, **overrides: Any) -> TrainConfig:
    """A recipe's ``arcface_model`` settings (e.g. ``configs/demo.yaml``) as a ``TrainConfig`` on the CPU, with ``overrides``."""
    import yaml

    from whale_ml.stage_configs import TrainConfig  # noqa: F811  (the annotation's import is for type checkers only)

    settings = yaml.safe_load(Path(path).read_text())["ops"]["arcface_model"]["config"]
    return TrainConfig(**{**settings, "device": "cpu", **overrides})
