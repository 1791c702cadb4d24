"""The servers the tests start: waiting for ``/health``, and stopping them by process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path


def wait_healthy(url: str, log: Path, timeout: float = 120, proc: subprocess.Popen | None = None, interval: float = 0.5) -> None:
    """Return once ``<url>/health`` answers 200; fail with the end of the server's ``log`` when
    ``proc`` (the server, when given) has exited or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc is None or proc.poll() is None, f"the server at {url} exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(interval)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to ``proc``'s process group (started with ``start_new_session=True``), then
    SIGKILL after ``timeout`` seconds (uvicorn, say, waits for idle keep-alive clients)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
