"""Schema and counters of the buffer file: its tables, their migration, the ``meta`` counters,
the size estimates that ``max_bytes`` bounds, and the plain values the buffer hands out.

Schema version 2 (this release) added the ``stream`` column of ``batches`` (the stream whose
frame the row holds: a conflict ack starts a new stream, and batches of several streams may wait
side by side), the ``streams`` table (every stream of the file, oldest first, with the first seq
it used and why it was started) and the ``outcomes`` table (readings the collector quarantined or
refused, per reason code). A version 1 file is migrated in one transaction when the agent opens
it: its batches belong to the file's original stream.

Schema version 3 stamps readings on the boot clock (:mod:`agent.clock`): ``readings.boot``
names the row of ``boots`` (the kernel's boot id and the best offset to wall time known for
that boot, saved at every seal) whose ``CLOCK_BOOTTIME`` the reading's ``ts`` is on; ``NULL``
means ``ts`` is wall time already (readings that carry their own time, and every reading of an
older file, which the migration keeps as they are).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from protocol import Value

Overflow = Literal["drop_oldest", "drop_newest"]
Synchronous = Literal["FULL", "NORMAL"]
DropReason = Literal["drop_oldest", "drop_newest", "disk_full", "write_error"]
DROP_REASONS: tuple[DropReason, ...] = ("drop_oldest", "drop_newest", "disk_full", "write_error")

READING_COST = 40
"""Estimated bytes of one stored reading besides its metric name and text value (row + index)."""
BATCH_COST = 64
"""Estimated bytes of one sealed batch besides its frame."""
MAX_NOTES_PER_BATCH = 200
SCHEMA_VERSION = 3

ReadingRow = tuple[bytes, str, int, Value] | tuple[bytes, str, int, Value, bool]
"""One reading as the buffer takes it: 16-byte device id, metric, time (µs), value, and whether
the time is on this boot's boot clock (``True``) or wall time (``False`` or absent)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    device BLOB NOT NULL,
    metric TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value,
    is_bool INTEGER,
    boot INTEGER
);
CREATE TABLE IF NOT EXISTS boots (
    id INTEGER PRIMARY KEY,
    boot_id TEXT NOT NULL UNIQUE,
    offset_us INTEGER NOT NULL,
    source TEXT NOT NULL,
    error_us INTEGER,
    updated_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    frame BLOB NOT NULL,
    readings INTEGER NOT NULL,
    notes INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    oldest_us INTEGER,
    stream TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    started_us INTEGER NOT NULL,
    reason TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    reason TEXT PRIMARY KEY,
    quarantined INTEGER NOT NULL,
    refused INTEGER NOT NULL
) WITHOUT ROWID;
"""

READING_BYTES_SQL = (
    f"SELECT COALESCE(SUM({READING_COST} + length(metric)"
    " + CASE WHEN typeof(value) = 'text' THEN length(value) ELSE 0 END), 0) FROM readings"
)
BATCH_BYTES_SQL = f"SELECT COALESCE(SUM({BATCH_COST} + length(frame)), 0) FROM batches"

COUNTERS = (
    "produced",
    "delivered",
    "rejected_batches",
    "next_seq",
    "last_ack_us",
    # What the collector did with the readings of finally acknowledged batches (their sum is
    # ``delivered``): stored as rows, kept in its quarantine (durable, replayable), refused.
    "stored",
    "quarantined",
    "refused",
    # Batches answered ``conflict`` and sent again under a newer stream.
    "reencoded_batches",
    *(f"dropped_{r}" for r in DROP_REASONS),
    *(f"unreported_{r}" for r in DROP_REASONS),
)


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def reading_cost(metric: str, value: Value) -> int:
    """Estimated bytes a reading occupies in the buffer (the unit of ``max_bytes``)."""
    return READING_COST + len(metric) + (len(value) if value.__class__ is str else 0)  # type: ignore[arg-type]


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column names of ``table`` (empty when it does not exist)."""
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}


def migrate(conn: sqlite3.Connection) -> bool:
    """Bring a version 1 or 2 file to version 3 inside the caller's transaction; ``True`` if it did.

    The batches of a version 1 file all carry the file's original stream, which becomes the first
    entry of ``streams``. The readings of a version 1 or 2 file keep their wall times (``boot``
    is ``NULL``): every one of them is kept and sealed as it was stamped.
    """
    changed = False
    if "stream" not in columns(conn, "batches"):
        _add_streams(conn)
        changed = True
    if "boot" not in columns(conn, "readings"):
        conn.execute("ALTER TABLE readings ADD COLUMN boot INTEGER")
        changed = True
    if changed:
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
        )
    return changed


def _add_streams(conn: sqlite3.Connection) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
    stream = str(row[0])
    conn.execute("ALTER TABLE batches ADD COLUMN stream TEXT NOT NULL DEFAULT ''")
    conn.execute("UPDATE batches SET stream = ?", (stream,))
    created = conn.execute("SELECT value FROM meta WHERE key = 'created_us'").fetchone()
    conn.execute(
        "INSERT OR IGNORE INTO streams(stream, first_seq, started_us, reason) VALUES (?, 0, ?, ?)",
        (stream, int(created[0]) if created else now_us(), "created"),
    )


@dataclass(slots=True)
class SealedBatch:
    """A sealed batch as the shipper sends it: its key and the frame stored at sealing."""

    seq: int
    frame: bytes
    readings: int
    stream: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))


@dataclass(slots=True)
class AppendResult:
    """What an append did: readings stored, dropped (overflow, full disk) and held in memory."""

    stored: int
    dropped: int
    held: int = 0


@dataclass(slots=True)
class AckOutcome:
    """What acknowledging a batch did (``None`` from :meth:`Store.settle` if unknown).

    ``pending`` says the batch could not be deleted yet (a full disk): it is final all the same,
    never sent again, and its delete is retried.
    """

    seq: int
    readings: int
    rejected: bool
    stored: int = 0
    quarantined: int = 0
    refused: int = 0
    reasons: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending: bool = False


@dataclass(slots=True)
class StreamInfo:
    """One stream of the buffer file: since which seq it is used, and why it was started."""

    stream: uuid.UUID
    first_seq: int
    started_us: int
    reason: str


@dataclass(slots=True)
class Reencoded:
    """A batch answered ``conflict`` that now waits under a newer stream with a fresh seq."""

    old_stream: uuid.UUID
    old_seq: int
    stream: uuid.UUID
    seq: int
    readings: int


@dataclass(slots=True)
class BufferStats:
    """A snapshot of the buffer for ``status`` and the runtime's STATUS line."""

    stream: str
    readings: int
    batches: int
    bytes: int
    max_bytes: int
    oldest_us: int | None
    produced: int
    delivered: int
    dropped: dict[str, int] = field(default_factory=dict)
    rejected_batches: int = 0
    last_ack_us: int | None = None
    next_seq: int = 0
    file_bytes: int = 0
    stored: int = 0
    quarantined: int = 0
    refused: int = 0
    by_reason: dict[str, tuple[int, int]] = field(default_factory=dict)
    streams: list[StreamInfo] = field(default_factory=list)
    reencoded_batches: int = 0
    # Only known inside the agent process (``status`` from the command line reads the file):
    clock: dict[str, object] | None = None
    """This boot's time as last saved (source, error, how far the system clock is off it)."""
    held_readings: int = 0
    pending_deletes: int = 0
    disk_full: bool = False
    backlog: str | None = None
    """The running agent's latest backlog figures (JSON of ``agent.backlog.DrainFigures``)."""
