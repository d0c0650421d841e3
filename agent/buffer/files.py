"""The buffer file on disk: its connection settings, the one-agent lock, corruption checks and
moving a bad file aside, and telling a storage fault (full disk, I/O error) from a bug of ours.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import os
import sqlite3
import uuid
from pathlib import Path
from typing import IO

from agent.buffer.schema import DropReason, Synchronous
from agent.errors import BufferFileError

SQLITE_FULL = 13
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


def storage_fault(exc: sqlite3.Error) -> DropReason | None:
    """``disk_full`` or ``write_error`` for faults of the storage, ``None`` for our own bugs."""
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(
        exc
    ):
        return "disk_full"
    # I/O errors, a locked file and the like: the storage failed us, not our SQL.
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return "write_error"
    return None


def integrity(conn: sqlite3.Connection) -> str:
    """``"ok"`` or what ``PRAGMA integrity_check`` (or opening the file) found wrong."""
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            return "; ".join(str(r[0]) for r in rows[:5])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
            if row is None:
                return "meta table has no stream id"
            uuid.UUID(str(row[0]))
        elif tables:
            return f"not a Sensormine buffer (tables: {', '.join(sorted(tables))})"
    except ValueError as exc:
        return str(exc)
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return str(exc)
        raise
    return "ok"


def is_corruption(exc: sqlite3.Error) -> bool:
    """Corruption or not-a-database, as opposed to a lock, I/O error or permission problem."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    return "malformed" in str(exc) or "not a database" in str(exc)


def configure(conn: sqlite3.Connection, synchronous: Synchronous, journal_size_limit: int) -> None:
    """WAL, the chosen ``synchronous`` level, a bounded WAL and a busy timeout."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA journal_size_limit={int(journal_size_limit)}")
    conn.execute("PRAGMA busy_timeout=5000")


def exclusive_lock(path: Path) -> IO[bytes]:
    """Hold an exclusive flock on ``path``: one agent per buffer file."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BufferFileError(
            f"{path.with_suffix('')}: another agent process is using this buffer"
        ) from None
    return handle


def move_aside(path: Path) -> Path:
    """Rename a corrupt buffer (and its WAL and shared memory) to ``<name>.corrupt-<time>``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{target}{suffix}"))
    return target


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes, 0 when it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def check_file(path: Path) -> str:
    """Run :func:`integrity` on ``path`` in a thread, on a connection of its own."""

    def check() -> str:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            return integrity(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(check)
