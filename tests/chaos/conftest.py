"""Fixtures of the chaos test: a small real file system for one agent's buffer."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SMALL_DISK = "48m"


@dataclass(frozen=True)
class SmallDisk:
    """A mounted tmpfs (``path``), or ``None`` and why it could not be mounted."""

    path: Path | None
    reason: str = ""


@pytest.fixture
def small_disk() -> Iterator[SmallDisk]:
    """A tmpfs of SMALL_DISK mounted for the test (a real ``ENOSPC``, WAL included).

    ``PRAGMA max_page_count`` never limits the WAL, so only a real file system shows what a full
    disk does to the buffer (issue 11, defect 7). Where mounting is not permitted the fixture
    says why instead, and the test leaves its full-disk phase out.
    """
    where = Path(tempfile.mkdtemp(prefix="sensormine-chaos-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        where.rmdir()
        yield SmallDisk(
            None,
            f"`mount -t tmpfs` is not permitted here "
            f"({mounted.stderr.strip() or f'exit {mounted.returncode}'})",
        )
        return
    try:
        yield SmallDisk(where)
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode:
            # Still busy (a child that outlived its test): detach it; it goes when they do.
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            where.rmdir()
