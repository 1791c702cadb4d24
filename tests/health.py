"""Waiting for a server the tests started to answer ``/health``."""

from __future__ import annotations

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
