"""How many CPU threads torch, OpenMP and OpenCV use, and keeping it that way.

Libraries change these process-wide settings behind the pipeline's back:
ultralytics sets ``OMP_NUM_THREADS=1`` at import when it is unset, turns OpenCV's
threads off, and its ``select_device`` (called by every YOLO training and
prediction) sets torch to ``cpu_count - 1`` threads (at most 8). In one process
(``whale run``, Dagster's in-process executor, a notebook) every later torch stage
then ran on fewer cores: 1 of 2 on a 2-core machine, 8 of 16 on a GPU machine.

Here, every torch-heavy stage runs inside :func:`using_threads` (the count from
``WHALE_THREADS``, default every core this process may use), and every call into
ultralytics inside :func:`preserved_threads`, which puts back what it found.
docs/deployment.md lists the setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from whale_ml.environment import threads_setting


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cpusets), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def pipeline_threads(threads: int | None = None) -> int:
    """The thread count a stage runs with: ``threads`` when given, else ``$WHALE_THREADS``, else every core.

    Raises:
        ValueError: ``threads`` below 1 (a malformed ``WHALE_THREADS`` raises
            :class:`~whale_ml.environment.BadEnvironmentVariable`, naming it).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads if threads is not None else threads_setting() or available_cores()


def _torch() -> ModuleType:
    import torch  # here, not at the top: whale_ml.offline imports this module where torch is not needed yet

    return torch


def _cv2() -> ModuleType | None:
    try:
        import cv2
    except ImportError:  # OpenCV comes with ultralytics; without it there is nothing to keep
        return None
    return cv2


@dataclass(frozen=True)
class ThreadSettings:
    """A snapshot of the process-wide thread settings: torch intra-op and inter-op, OpenCV (None without it)."""

    torch_threads: int
    torch_interop_threads: int
    cv2_threads: int | None

    @classmethod
    def current(cls) -> ThreadSettings:
        cv2, torch = _cv2(), _torch()
        return cls(torch.get_num_threads(), torch.get_num_interop_threads(), cv2.getNumThreads() if cv2 is not None else None)

    def apply(self) -> None:
        """Set every value that differs from now.

        torch's inter-op pool can only be sized before its first parallel work; once it
        has started, its size cannot have changed either, so there is nothing to restore.
        """
        now, torch = ThreadSettings.current(), _torch()
        if now.torch_threads != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if now.torch_interop_threads != self.torch_interop_threads:
            try:
                torch.set_num_interop_threads(self.torch_interop_threads)
            except RuntimeError:
                pass
        cv2 = _cv2()
        if cv2 is not None and self.cv2_threads is not None and now.cv2_threads != self.cv2_threads:
            cv2.setNumThreads(self.cv2_threads)


@contextmanager
def preserved_threads() -> Iterator[ThreadSettings]:
    """Whatever runs inside may change the thread settings: they are put back on leaving, error or not."""
    before = ThreadSettings.current()
    try:
        yield before
    finally:
        before.apply()


@contextmanager
def using_threads(threads: int | None = None) -> Iterator[int]:
    """Run a stage with ``threads`` torch threads (see :func:`pipeline_threads`); the previous settings come back after.

    Yields:
        The count in force inside.
    """
    n, torch = pipeline_threads(threads), _torch()
    with preserved_threads():
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        yield n


def set_thread_env_defaults(threads: int | None = None) -> None:
    """Give ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` the pipeline's count where unset, before ultralytics is imported.

    Ultralytics' import writes ``OMP_NUM_THREADS=1`` when it is unset, which a torch
    imported after it, and every child process (DDP workers), would start with. A
    value the user set is kept.
    """
    n = str(pipeline_threads(threads))
    os.environ.setdefault("OMP_NUM_THREADS", n)
    os.environ.setdefault("MKL_NUM_THREADS", n)
