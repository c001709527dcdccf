"""The headless Chromium the browser tests drive, and what they do when it is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--ignore-certificate-errors",
]


def require_browser(chromium: str = CHROMIUM) -> None:
    """Fail in CI, skip locally, when the browser or its driver is missing."""
    missing = []
    if not (Path(chromium).exists() or shutil.which("chromium")):
        missing.append("Chromium: apt-get install chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("Playwright: pip install playwright (no browser download needed)")
    if not missing:
        return
    message = "browser test needs " + "; ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
