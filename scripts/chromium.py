"""Headless Chromium (Debian's ``chromium``, installed by scripts/setup-services): the DOM of a
page after its scripts ran, or a screenshot of it. Used by the status page's tests and by ``make
demo`` (``DEMO_SCREENSHOT``); loaded by path (scripts/ is not a package)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--hide-scrollbars",
)


def chromium() -> str:
    """The browser's path; a missing one is an error (``make setup`` installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise AssertionError("chromium is not installed: run `make setup` (scripts/setup-services)")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="sm-chromium-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def dump_dom(url: str, budget_ms: int = 15_000, timeout: float = 120.0) -> str:
    """The page's DOM after its scripts ran for ``budget_ms`` of virtual time."""
    done = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    if done.returncode != 0:
        raise AssertionError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def screenshot(
    url: str, path: Path, size: str = "1400,1100", budget_ms: int = 15_000, timeout: float = 120.0
) -> None:
    """Save a PNG of the page after its scripts ran for ``budget_ms`` of virtual time."""
    done = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size}",
            f"--screenshot={path}",
            url,
        ],
        timeout,
    )
    if done.returncode != 0 or not path.is_file():
        raise AssertionError(
            f"chromium made no screenshot ({done.returncode}): {done.stderr[-2000:]}"
        )
