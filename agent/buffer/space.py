"""Room on the buffer's file system: the reserve file beside the buffer and the disk-full state.

A full file system used to livelock the agent: SQLite needs room in the WAL even to delete, so
acknowledged batches could not be deleted and were sent again and again. The agent therefore
keeps ``buffer.reserve_bytes`` of real, allocated blocks in ``<buffer>.reserve``. When SQLite
reports ``SQLITE_FULL`` and the file system really is (nearly) full, the store releases the
reserve, caps the database at about its present size (new data then goes only into pages freed
by deleted batches, and the released room stays for the WAL and checkpoints), deletes the
acknowledged batches and checkpoints. When the file system has room again the reserve is made
anew and the cap lifted.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import structlog

log = structlog.get_logger("agent.buffer")

MIN_ROOM = 1 << 20
"""Free bytes below which a ``SQLITE_FULL`` is taken for a full file system (with no reserve)."""
CHUNK = 1 << 16


class Space:
    """The reserve file and what the store knows about its file system's free room."""

    def __init__(self, reserve_path: Path | None, reserve_bytes: int) -> None:
        self.path = reserve_path
        self.size = reserve_bytes if reserve_path is not None else 0
        self.full = False
        """``SQLITE_FULL`` on a full file system was seen and room has not come back yet."""
        self.entry_free: int | None = None
        """Free bytes right after the reserve was released (and the WAL truncated)."""
        self.next_check = 0.0

    @property
    def directory(self) -> Path | None:
        """The directory whose file system holds the buffer."""
        return None if self.path is None else self.path.parent

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer may still allocate there (``None``: unknown)."""
        if self.directory is None:
            return None
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def low(self) -> bool:
        """Whether the file system is (nearly) full, not just the database capped."""
        free = self.free_bytes()
        return free is not None and free < max(self.size, MIN_ROOM)

    def room_back(self) -> bool:
        """Whether room came back: space for the reserve and as much again, and (after a full
        disk) at least that much more than right after the reserve was released, so that the
        room the agent itself made (reserve, truncated WAL) does not count as returned."""
        free = self.free_bytes()
        if free is None:
            return False
        margin = max(self.size, MIN_ROOM)
        if self.entry_free is not None and free < self.entry_free + margin:
            return False
        return free >= self.size + margin

    def reserve_present(self) -> bool:
        """Whether the reserve file holds its allocated blocks."""
        if self.path is None or self.size <= 0:
            return False
        try:
            st = self.path.stat()
        except OSError:
            return False
        # Blocks, not the length: a sparse file reserves nothing.
        return st.st_size >= self.size and st.st_blocks * 512 >= self.size

    def ensure_reserve(self) -> bool:
        """Make the reserve file if it is missing; ``False`` when there is no room for it."""
        if self.path is None or self.size <= 0 or self.reserve_present():
            return True
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # No fallocate here: write the blocks (random bytes, which no compressing
                    # file system turns back into holes).
                    written = 0
                    while written < self.size:
                        written += os.write(fd, os.urandom(min(CHUNK, self.size - written)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("buffer.reserve_missing", path=str(self.path), error=str(exc))
            return False
        return True

    def release_reserve(self) -> int:
        """Delete the reserve file; the bytes it gave back (0 if there was none)."""
        if self.path is None:
            return 0
        try:
            size = self.path.stat().st_blocks * 512
            self.path.unlink()
        except OSError:
            return 0
        return size
