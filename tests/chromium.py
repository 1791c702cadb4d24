"""Headless Chromium for the tests that look at pages in a real browser."""

from __future__ import annotations

import shutil
from pathlib import Path

SKIP_REASON = "needs headless Chromium (make test installs it from Debian packages when it can)"


def browser() -> str | None:
    """The Chromium executable, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_command(profile: Path, *flags: str) -> list[str]:
    """Headless Chromium (as root in CI: no sandbox) with a fresh profile; append the URL."""
    return [
        str(browser()),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        *flags,
        f"--user-data-dir={profile}",
    ]
