"""The agent's disk buffer: one SQLite file in WAL mode that loses nothing it has committed.

Readings are appended in grouped transactions (one commit per ``commit_interval``, not per
reading). A batch is *sealed* before its first send: in one transaction its readings, pending
events and device status changes are encoded into a protocol frame, the frame is stored with the
next ``seq`` of the buffer's ``stream`` and the readings are deleted. Every resend therefore
sends the stored bytes, byte for byte. A batch is deleted only when the collector's ack is final.

The file is bounded by ``max_bytes`` (an estimate of the stored data, see :data:`READING_COST`):
``drop_oldest`` deletes the oldest batches (never one in flight) and then the oldest readings,
``drop_newest`` refuses what does not fit. Every dropped reading is counted in the file and
reported as a ``readings.dropped`` event in a later batch. A full disk (``SQLITE_FULL``) rolls the
transaction back explicitly, counts the readings as dropped and keeps going; writing resumes as
soon as SQLite finds room again.

Bookkeeping lives in the ``meta`` table and survives restarts: ``produced`` (readings accepted
from inputs), ``delivered`` (readings in acknowledged batches) and the dropped counts, so that
``produced == delivered + buffered + dropped`` holds at every commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import aiosqlite
import msgpack
import structlog

from agent.errors import BufferFileError
from protocol import Batch, DeviceStatus, Event, Series, Value, encode_frame

log = structlog.get_logger("agent.buffer")

T = TypeVar("T")

Overflow = Literal["drop_oldest", "drop_newest"]
Synchronous = Literal["FULL", "NORMAL"]
DropReason = Literal["drop_oldest", "drop_newest", "disk_full", "write_error"]
DROP_REASONS: tuple[DropReason, ...] = ("drop_oldest", "drop_newest", "disk_full", "write_error")

READING_COST = 40
"""Estimated bytes of one stored reading besides its metric name and text value (row + index)."""
BATCH_COST = 64
"""Estimated bytes of one sealed batch besides its frame."""
MAX_NOTES_PER_BATCH = 200
SCHEMA_VERSION = 1

ReadingRow = tuple[bytes, str, int, Value]
"""One reading as the buffer takes it: 16-byte device id, metric, time (µs), value."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    device BLOB NOT NULL,
    metric TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value,
    is_bool INTEGER
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
    oldest_us INTEGER
);
"""

_READING_BYTES_SQL = (
    f"SELECT COALESCE(SUM({READING_COST} + length(metric)"
    " + CASE WHEN typeof(value) = 'text' THEN length(value) ELSE 0 END), 0) FROM readings"
)
_BATCH_BYTES_SQL = f"SELECT COALESCE(SUM({BATCH_COST} + length(frame)), 0) FROM batches"
_COUNTERS = (
    "produced",
    "delivered",
    "rejected_batches",
    "next_seq",
    "last_ack_us",
    *(f"dropped_{r}" for r in DROP_REASONS),
    *(f"unreported_{r}" for r in DROP_REASONS),
)
SQLITE_FULL = 13
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def reading_cost(metric: str, value: Value) -> int:
    """Estimated bytes a reading occupies in the buffer (the unit of ``max_bytes``)."""
    return READING_COST + len(metric) + (len(value) if value.__class__ is str else 0)  # type: ignore[arg-type]


def _storage_fault(exc: sqlite3.Error) -> DropReason | None:
    """``disk_full`` or ``write_error`` for faults of the storage, ``None`` for our own bugs."""
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(
        exc
    ):
        return "disk_full"
    # I/O errors, a locked file and the like: the storage failed us, not our SQL.
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return "write_error"
    return None


@dataclass(slots=True)
class SealedBatch:
    """A sealed batch as the shipper sends it: its seq and the frame stored at sealing."""

    seq: int
    frame: bytes
    readings: int


@dataclass(slots=True)
class AppendResult:
    """What an append did: readings stored, and readings dropped by overflow or a full disk."""

    stored: int
    dropped: int


@dataclass(slots=True)
class AckOutcome:
    """What acknowledging a batch did (``None`` from :meth:`Buffer.acknowledge` if unknown)."""

    seq: int
    readings: int
    rejected: bool


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


class Store:
    """The synchronous core of the buffer, running on one ``sqlite3`` connection.

    :class:`Buffer` runs each method in aiosqlite's worker thread, one thread hop per transaction;
    the CLI uses it directly, read-only, while the agent runs.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        gateway_id: uuid.UUID,
        max_bytes: int,
        overflow: Overflow,
        max_points: int,
        max_frame_bytes: int,
    ) -> None:
        self.conn = conn
        self.gateway_id = gateway_id
        self.max_bytes = max_bytes
        self.overflow: Overflow = overflow
        self.max_points = max_points
        self.max_frame_bytes = max_frame_bytes
        self.stream = uuid.UUID(int=0)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        # Drops that could not be written (full disk); folded into the next successful commit.
        self.unpersisted: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.unpersisted_produced = 0
        self.bytes = 0
        self.unsealed = 0
        self.notes_pending = 0
        self.batch_count = 0
        self.batched_readings = 0
        self.protected: set[int] = set()

    # --- set-up ---------------------------------------------------------------------------

    def create(self) -> None:
        """Create the schema and, in a new file, the stream id."""
        self.conn.executescript(_SCHEMA)
        with self._transaction():
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
            if row is None:
                self.conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [
                        ("stream", str(uuid.uuid4())),
                        ("schema", SCHEMA_VERSION),
                        ("created_us", now_us()),
                        *((k, 0) for k in _COUNTERS),
                    ],
                )
        self.load()

    def load(self) -> None:
        """Read the stream id, counters and sizes from the file."""
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if "stream" not in meta:
            raise BufferFileError("the buffer file has no stream id (not a Sensormine buffer)")
        self.stream = uuid.UUID(str(meta["stream"]))
        for key in _COUNTERS:
            self.counters[key] = int(meta.get(key) or 0)
        self.unsealed = int(self.conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
        self.notes_pending = int(self.conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0])
        self.batch_count, self.batched_readings = (
            int(v)
            for v in self.conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(readings), 0) FROM batches"
            ).fetchone()
        )
        self.bytes = int(self.conn.execute(_READING_BYTES_SQL).fetchone()[0]) + int(
            self.conn.execute(_BATCH_BYTES_SQL).fetchone()[0]
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            # After SQLITE_FULL SQLite may or may not have rolled back already: do it explicitly.
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _write_counters(self, counters: dict[str, int]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(counters.items())
        )

    def _with_unpersisted(self, counters: dict[str, int]) -> None:
        for reason, n in self.unpersisted.items():
            if n:
                counters[f"dropped_{reason}"] += n
                counters[f"unreported_{reason}"] += n
        counters["produced"] += self.unpersisted_produced

    def _clear_unpersisted(self) -> None:
        self.unpersisted = dict.fromkeys(DROP_REASONS, 0)
        self.unpersisted_produced = 0

    # --- append ---------------------------------------------------------------------------

    def append(self, rows: Sequence[ReadingRow]) -> AppendResult:
        """Store readings in one transaction, applying the overflow policy."""
        n = len(rows)
        if n == 0:
            return AppendResult(0, 0)
        costs = [reading_cost(r[1], r[3]) for r in rows]
        incoming = sum(costs)
        counters = dict(self.counters)
        self._with_unpersisted(counters)
        counters["produced"] += n
        keep_from, keep_to = 0, n
        freed = freed_readings = freed_batches = batched_freed = 0
        dropped_oldest = dropped_newest = 0
        try:
            with self._transaction():
                excess = self.bytes + incoming - self.max_bytes
                if excess > 0:
                    if self.overflow == "drop_newest":
                        room = self.max_bytes - self.bytes
                        total = 0
                        keep_to = 0
                        for c in costs:
                            if total + c > room:
                                break
                            total += c
                            keep_to += 1
                        dropped_newest = n - keep_to
                    else:
                        freed, dropped, freed_readings, freed_batches = self._drop_oldest(excess)
                        batched_freed = dropped - freed_readings
                        dropped_oldest += dropped
                        # What is still too much comes out of the oldest of the incoming rows.
                        rest = excess - freed
                        while rest > 0 and keep_from < n:
                            rest -= costs[keep_from]
                            keep_from += 1
                        dropped_oldest += keep_from
                kept = rows[keep_from:keep_to]
                if kept:
                    self.conn.executemany(
                        "INSERT INTO readings(device, metric, ts, value, is_bool)"
                        " VALUES (?, ?, ?, ?, ?)",
                        [(d, m, t, v, 1 if v.__class__ is bool else None) for d, m, t, v in kept],
                    )
                if dropped_oldest:
                    counters["dropped_drop_oldest"] += dropped_oldest
                    counters["unreported_drop_oldest"] += dropped_oldest
                if dropped_newest:
                    counters["dropped_drop_newest"] += dropped_newest
                    counters["unreported_drop_newest"] += dropped_newest
                self._write_counters(counters)
        except sqlite3.Error as exc:
            fault = _storage_fault(exc)
            if fault is None:
                raise
            self.unpersisted[fault] += n
            self.unpersisted_produced += n
            log.warning(f"buffer.{fault}", readings_dropped=n, error=str(exc))
            return AppendResult(0, n)
        self._clear_unpersisted()
        self.counters = counters
        stored = keep_to - keep_from
        self.bytes += sum(costs[keep_from:keep_to]) - freed
        self.unsealed += stored - freed_readings
        self.batch_count -= freed_batches
        self.batched_readings -= batched_freed
        dropped = dropped_oldest + dropped_newest
        if dropped:
            log.warning("buffer.full", policy=self.overflow, readings_dropped=dropped)
        return AppendResult(stored, dropped)

    def _drop_oldest(self, excess: int) -> tuple[int, int, int, int]:
        """Delete the oldest batches not in flight, then the oldest readings, to free ``excess``.

        Returns bytes freed, readings dropped, unsealed readings deleted, batches deleted.
        """
        freed = dropped = readings_deleted = batches_deleted = 0
        cursor = self.conn.execute(
            f"SELECT seq, {BATCH_COST} + length(frame), readings FROM batches ORDER BY seq"
        )
        doomed: list[int] = []
        for seq, size, count in cursor:
            if freed >= excess:
                break
            if seq in self.protected:
                continue
            doomed.append(seq)
            freed += size
            dropped += count
        cursor.close()
        if doomed:
            self.conn.executemany("DELETE FROM batches WHERE seq = ?", [(s,) for s in doomed])
            batches_deleted = len(doomed)
        last_id = None
        if freed < excess:
            cursor = self.conn.execute(
                f"SELECT id, {READING_COST} + length(metric)"
                " + CASE WHEN typeof(value) = 'text' THEN length(value) ELSE 0 END"
                " FROM readings ORDER BY id"
            )
            for rid, size in cursor:
                if freed >= excess:
                    break
                freed += size
                dropped += 1
                readings_deleted += 1
                last_id = rid
            cursor.close()
            if last_id is not None:
                self.conn.execute("DELETE FROM readings WHERE id <= ?", (last_id,))
        return freed, dropped, readings_deleted, batches_deleted

    def add_notes(self, notes: Sequence[tuple[str, bytes]]) -> bool:
        """Store events (``"event"``) and device status changes (``"status"``), msgpack bodies."""
        if not notes:
            return True
        try:
            with self._transaction():
                self.conn.executemany("INSERT INTO notes(kind, body) VALUES (?, ?)", notes)
        except sqlite3.Error as exc:
            fault = _storage_fault(exc)
            if fault is None:
                raise
            log.warning(f"buffer.{fault}", notes_dropped=len(notes), error=str(exc))
            return False
        self.notes_pending += len(notes)
        return True

    # --- sealing --------------------------------------------------------------------------

    def seal(self, force: bool) -> list[int]:
        """Seal full batches; with ``force`` also the remainder. Returns the new seqs."""
        sealed: list[int] = []
        while self.unsealed >= self.max_points or (force and self.has_unsealed()):
            seq = self._seal_one()
            if seq is None:
                break
            sealed.append(seq)
        return sealed

    def has_unsealed(self) -> bool:
        """Whether readings, notes or unreported drop counts wait to be sealed."""
        return (
            self.unsealed > 0
            or self.notes_pending > 0
            or any(self.counters[f"unreported_{r}"] for r in DROP_REASONS)
            or any(self.unpersisted.values())
        )

    def _drop_event(self, counters: dict[str, int], time_us: int) -> Event | None:
        unreported = {r: counters[f"unreported_{r}"] for r in DROP_REASONS}
        total = sum(unreported.values())
        if not total:
            return None
        for r in DROP_REASONS:
            counters[f"unreported_{r}"] = 0
        return Event.model_construct(
            time=time_us,
            device_id=None,
            severity="warning",
            kind="readings.dropped",
            message=f"{total} readings were dropped by the agent's buffer",
            attributes={
                "count": total,
                **{r: n for r, n in unreported.items() if n},
                "dropped_total": sum(counters[f"dropped_{r}"] for r in DROP_REASONS),
            },
        )

    def _seal_one(self) -> int | None:
        created = now_us()
        counters = dict(self.counters)
        self._with_unpersisted(counters)
        try:
            with self._transaction():
                rows = self.conn.execute(
                    "SELECT id, device, metric, ts, value, is_bool FROM readings ORDER BY id"
                    " LIMIT ?",
                    (self.max_points,),
                ).fetchall()
                notes = self.conn.execute(
                    "SELECT id, kind, body FROM notes ORDER BY id LIMIT ?",
                    (MAX_NOTES_PER_BATCH,),
                ).fetchall()
                events: list[Event] = []
                status: list[DeviceStatus] = []
                for _, note_kind, body in notes:
                    data = msgpack.unpackb(body, raw=False)
                    if note_kind == "status":
                        status.append(DeviceStatus.model_construct(**_status_fields(data)))
                    else:
                        events.append(Event.model_construct(**_event_fields(data)))
                drop_event = self._drop_event(counters, created)
                if drop_event is not None:
                    events.append(drop_event)
                if not rows and not events and not status:
                    return None
                seq = counters["next_seq"]
                n = len(rows)
                while True:
                    frame = encode_frame(
                        Batch.model_construct(
                            gateway_id=self.gateway_id,
                            stream=self.stream,
                            seq=seq,
                            created=created,
                            series=_series(rows[:n]),
                            events=events,
                            status=status,
                        )
                    )
                    if len(frame) <= self.max_frame_bytes or n <= 1:
                        break
                    # Shrink in proportion to the overshoot, a little more to land below the limit.
                    n = max(1, min(n - 1, math.floor(n * self.max_frame_bytes / len(frame) * 0.9)))
                taken = rows[:n]
                oldest = min((r[3] for r in taken), default=None)
                self.conn.execute(
                    "INSERT INTO batches(seq, frame, readings, notes, created_us, oldest_us)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, frame, n, len(notes), created, oldest),
                )
                taken_bytes = 0
                if taken:
                    self.conn.execute("DELETE FROM readings WHERE id <= ?", (taken[-1][0],))
                    taken_bytes = sum(
                        reading_cost(r[2], r[4] if not r[5] else bool(r[4])) for r in taken
                    )
                if notes:
                    self.conn.execute("DELETE FROM notes WHERE id <= ?", (notes[-1][0],))
                counters["next_seq"] = seq + 1
                self._write_counters(counters)
        except sqlite3.Error as exc:
            fault = _storage_fault(exc)
            if fault is None:
                raise
            # Nothing is lost: the readings stay unsealed and the next seal tries again.
            log.warning(f"buffer.{fault}", action="seal", error=str(exc))
            return None
        self._clear_unpersisted()
        self.counters = counters
        self.unsealed -= n
        self.notes_pending -= len(notes)
        self.batch_count += 1
        self.batched_readings += n
        self.bytes += BATCH_COST + len(frame) - taken_bytes
        return seq

    # --- shipping -------------------------------------------------------------------------

    def batches(
        self,
        *,
        after: int = -1,
        upto: int | None = None,
        exclude: Sequence[int] = (),
        limit: int,
        protect: bool = False,
    ) -> list[SealedBatch]:
        """Sealed batches with ``after < seq <= upto`` not in ``exclude``, oldest first.

        ``protect`` marks them in flight in the same step, so that no ``drop_oldest`` can slip
        between reading a batch for sending and protecting it.
        """
        upper = upto if upto is not None else 2**63 - 1
        marks = ",".join("?" * len(exclude))
        where = f" AND seq NOT IN ({marks})" if exclude else ""
        rows = self.conn.execute(
            f"SELECT seq, frame, readings FROM batches WHERE seq > ? AND seq <= ?{where}"
            " ORDER BY seq LIMIT ?",
            (after, upper, *exclude, limit),
        ).fetchall()
        if protect:
            self.protected.update(seq for seq, _, _ in rows)
        return [SealedBatch(seq, bytes(frame), count) for seq, frame, count in rows]

    def last_seq(self) -> int:
        """The highest sealed seq still in the buffer, or -1."""
        row = self.conn.execute("SELECT MAX(seq) FROM batches").fetchone()
        return -1 if row[0] is None else int(row[0])

    def acknowledge(self, seq: int, rejected: bool, reason: str = "") -> AckOutcome | None:
        """Delete batch ``seq`` after a final ack; a rejection is recorded as an event."""
        counters = dict(self.counters)
        self._with_unpersisted(counters)
        try:
            with self._transaction():
                row = self.conn.execute(
                    f"SELECT readings, {BATCH_COST} + length(frame) FROM batches WHERE seq = ?",
                    (seq,),
                ).fetchone()
                if row is None:
                    return None
                count, size = int(row[0]), int(row[1])
                self.conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                counters["delivered"] += count
                counters["last_ack_us"] = now_us()
                if rejected:
                    counters["rejected_batches"] += 1
                if rejected and count:
                    # Only for batches with readings: a rejected batch of events alone (say, for
                    # an unregistered gateway) would otherwise beget another, forever.
                    note = event_note(
                        kind="batch.rejected",
                        message=f"the collector rejected batch {seq} ({reason or 'no reason'})",
                        severity="error",
                        attributes={"seq": seq, "reason": reason, "readings": count},
                    )
                    self.conn.execute("INSERT INTO notes(kind, body) VALUES (?, ?)", note)
                self._write_counters(counters)
        except sqlite3.Error as exc:
            fault = _storage_fault(exc)
            if fault is None:
                raise
            # The batch stays; it is resent and the collector answers "duplicate".
            log.warning(f"buffer.{fault}", action="acknowledge", seq=seq, error=str(exc))
            return None
        self._clear_unpersisted()
        self.counters = counters
        self.batch_count -= 1
        self.batched_readings -= count
        self.bytes -= size
        if rejected and count:
            self.notes_pending += 1
        return AckOutcome(seq, count, rejected)

    # --- inspection -----------------------------------------------------------------------

    def stats(self, reload: bool = True) -> BufferStats:
        """Counts, sizes and ages (``reload`` re-reads counters and sizes from the file)."""
        self.conn.execute("BEGIN")
        try:
            if reload:
                self.load()
            oldest_reading = self.conn.execute("SELECT MIN(ts) FROM readings").fetchone()[0]
            oldest_batch = self.conn.execute("SELECT MIN(oldest_us) FROM batches").fetchone()[0]
            in_batches = self.conn.execute("SELECT COALESCE(SUM(readings), 0) FROM batches")
            batch_readings = int(in_batches.fetchone()[0])
        finally:
            self.conn.execute("COMMIT")
        oldest = [v for v in (oldest_reading, oldest_batch) if v is not None]
        counters = self.counters
        return BufferStats(
            stream=str(self.stream),
            readings=self.unsealed + batch_readings,
            batches=self.batch_count,
            bytes=self.bytes,
            max_bytes=self.max_bytes,
            oldest_us=min(oldest) if oldest else None,
            produced=counters["produced"] + self.unpersisted_produced,
            delivered=counters["delivered"],
            dropped={r: counters[f"dropped_{r}"] + self.unpersisted[r] for r in DROP_REASONS},
            rejected_batches=counters["rejected_batches"],
            last_ack_us=counters["last_ack_us"] or None,
            next_seq=counters["next_seq"],
        )


def _series(rows: Sequence[Any]) -> list[Series]:
    grouped: dict[tuple[bytes, str], tuple[list[int], list[Value]]] = {}
    for _, device, metric, ts, value, is_bool in rows:
        entry = grouped.get((device, metric))
        if entry is None:
            entry = grouped[(device, metric)] = ([], [])
        entry[0].append(ts)
        entry[1].append(bool(value) if is_bool else value)
    return [
        Series.model_construct(
            device_id=uuid.UUID(bytes=bytes(device)), metric=metric, timestamps=ts, values=values
        )
        for (device, metric), (ts, values) in grouped.items()
    ]


def event_note(
    kind: str,
    message: str,
    *,
    severity: str = "info",
    device_id: uuid.UUID | None = None,
    attributes: dict[str, Any] | None = None,
    time_us: int | None = None,
) -> tuple[str, bytes]:
    """An event as the ``notes`` table stores it."""
    body = {
        "time": time_us if time_us is not None else now_us(),
        "device": device_id.bytes if device_id else None,
        "severity": severity,
        "kind": kind,
        "message": message[:1024],
        "attributes": attributes or {},
    }
    return ("event", msgpack.packb(body, use_bin_type=True))


def status_note(
    device_id: uuid.UUID, status: str, reason: str = "", time_us: int | None = None
) -> tuple[str, bytes]:
    """A device status change as the ``notes`` table stores it."""
    body = {
        "time": time_us if time_us is not None else now_us(),
        "device": device_id.bytes,
        "status": status,
        "reason": reason[:256],
    }
    return ("status", msgpack.packb(body, use_bin_type=True))


def _event_fields(data: dict[str, Any]) -> dict[str, Any]:
    device = data.get("device")
    return {
        "time": data["time"],
        "device_id": uuid.UUID(bytes=device) if device else None,
        "severity": data["severity"],
        "kind": data["kind"],
        "message": data["message"],
        "attributes": data["attributes"],
    }


def _status_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": data["time"],
        "device_id": uuid.UUID(bytes=data["device"]),
        "status": data["status"],
        "reason": data["reason"],
    }


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
        if _is_corruption(exc):
            return str(exc)
        raise
    return "ok"


def _is_corruption(exc: sqlite3.Error) -> bool:
    """Corruption or not-a-database, as opposed to a lock, I/O error or permission problem."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    return "malformed" in str(exc) or "not a database" in str(exc)


def _configure(conn: sqlite3.Connection, synchronous: Synchronous, journal_size_limit: int) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA journal_size_limit={int(journal_size_limit)}")
    conn.execute("PRAGMA busy_timeout=5000")


def _exclusive_lock(path: Path) -> IO[bytes]:
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


def open_store_readonly(path: Path) -> Store:
    """Open a buffer file for inspection (``status``, ``buffer export``) beside a running agent."""
    if not path.exists():
        raise BufferFileError(f"{path}: no buffer file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=5000")
        store = Store(
            conn,
            gateway_id=uuid.UUID(int=0),
            max_bytes=0,
            overflow="drop_oldest",
            max_points=1,
            max_frame_bytes=1,
        )
        store.load()
    except sqlite3.DatabaseError as exc:
        raise BufferFileError(f"{path}: cannot read the buffer: {exc}") from None
    return store


class Buffer:
    """The async buffer used by the runtime and the shipper (an async context manager)."""

    def __init__(
        self,
        path: Path,
        *,
        gateway_id: uuid.UUID,
        max_bytes: int = 512 * 2**20,
        overflow: Overflow = "drop_oldest",
        synchronous: Synchronous = "FULL",
        journal_size_limit: int = 64 * 2**20,
        max_points: int = 5000,
        max_frame_bytes: int = 256 * 2**10,
        max_page_count: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.gateway_id = gateway_id
        self._max_bytes = max_bytes
        self._overflow: Overflow = overflow
        self._max_points = max_points
        self._max_frame_bytes = max_frame_bytes
        self._synchronous: Synchronous = synchronous
        self._journal_size_limit = journal_size_limit
        self._max_page_count = max_page_count
        self._db: aiosqlite.Connection | None = None
        self._lock: IO[bytes] | None = None
        self._store: Store | None = None
        self.startup_events: list[tuple[str, bytes]] = []
        self.moved_to: Path | None = None

    @property
    def store(self) -> Store:
        """The synchronous core; only touch it through :meth:`_run` while the buffer is open."""
        if self._store is None:
            raise BufferFileError("the buffer is not open")
        return self._store

    @property
    def stream(self) -> uuid.UUID:
        """The buffer's stream id (made with the file)."""
        return self.store.stream

    @property
    def protected(self) -> set[int]:
        """Seqs in flight: ``drop_oldest`` never deletes these."""
        return self.store.protected

    @property
    def unsealed(self) -> int:
        """Readings stored but not yet sealed into a batch."""
        return self.store.unsealed

    @property
    def batch_count(self) -> int:
        """Sealed batches in the buffer."""
        return self.store.batch_count

    @property
    def size_bytes(self) -> int:
        """Estimated bytes of buffered data (the quantity ``max_bytes`` bounds)."""
        return self.store.bytes

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._db is None:
            raise BufferFileError("the buffer is not open")
        # One hop to aiosqlite's thread per transaction, not per statement: the whole transaction
        # runs there, so appends and seals cost one context switch each.
        return await self._db._execute(fn, *args)  # type: ignore[no-untyped-call,no-any-return]

    async def open(self) -> None:
        """Open (or create) the file; a corrupt file is moved aside and a fresh one started."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _exclusive_lock(Path(f"{self.path}.lock"))
            problem = "ok"
            if self.path.exists():
                problem = await _check_file(self.path)
        except (OSError, sqlite3.Error) as exc:
            # Not corruption (a permission, a lock, an I/O error): moving the file would be wrong.
            raise BufferFileError(f"{self.path}: cannot open the buffer: {exc}") from None
        if problem != "ok":
            self.moved_to = move_aside(self.path)
            log.error(
                "buffer.corrupt", path=str(self.path), moved_to=str(self.moved_to), problem=problem
            )
            self.startup_events.append(
                event_note(
                    kind="buffer.corrupt",
                    message=f"corrupt buffer moved aside to {self.moved_to.name}; started a fresh one",
                    severity="error",
                    attributes={"moved_to": str(self.moved_to), "problem": problem[:200]},
                )
            )
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db._execute(  # type: ignore[no-untyped-call]
            _configure, self._db._conn, self._synchronous, self._journal_size_limit
        )
        store = Store(
            self._db._conn,
            gateway_id=self.gateway_id,
            max_bytes=self._max_bytes,
            overflow=self._overflow,
            max_points=self._max_points,
            max_frame_bytes=self._max_frame_bytes,
        )
        self._store = store
        if self._max_page_count is not None:
            await self.set_max_page_count(self._max_page_count)
        await self._run(store.create)
        if self.startup_events:
            await self._run(store.add_notes, self.startup_events)
        log.info(
            "buffer.opened",
            path=str(self.path),
            stream=str(store.stream),
            readings=store.unsealed,
            batches=store.batch_count,
            bytes=store.bytes,
            synchronous=self._synchronous,
        )

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only statement on the buffer's connection (inspection, tests)."""
        conn = self.store.conn
        return await self._run(lambda: conn.execute(sql, params).fetchall())

    async def set_max_page_count(self, pages: int) -> int:
        """Cap the file at ``pages`` pages (SQLite then reports ``SQLITE_FULL``, as a full disk)."""
        store = self.store
        return int(
            await self._run(
                lambda: store.conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0]
            )
        )

    async def close(self) -> None:
        """Close the file (a WAL checkpoint happens on the last close)."""
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    async def __aenter__(self) -> Buffer:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def append(self, rows: Sequence[ReadingRow]) -> AppendResult:
        """Store readings in one transaction (the overflow policy applies)."""
        return await self._run(self.store.append, rows)

    async def add_notes(self, notes: Sequence[tuple[str, bytes]]) -> bool:
        """Store events and device status changes for the next batch."""
        return await self._run(self.store.add_notes, notes)

    async def seal(self, force: bool = False) -> list[int]:
        """Seal full batches (and with ``force`` the remainder); return the new seqs."""
        return await self._run(self.store.seal, force)

    def has_unsealed(self) -> bool:
        """Whether anything (readings, events, drop counts) waits to be sealed."""
        return self.store.has_unsealed()

    async def batches(
        self,
        *,
        after: int = -1,
        upto: int | None = None,
        exclude: Sequence[int] = (),
        limit: int,
        protect: bool = False,
    ) -> list[SealedBatch]:
        """Sealed batches oldest first, within ``(after, upto]``, minus ``exclude``."""
        store = self.store
        return await self._run(
            lambda: store.batches(
                after=after, upto=upto, exclude=exclude, limit=limit, protect=protect
            )
        )

    async def last_seq(self) -> int:
        """The highest seq still buffered, or -1."""
        return await self._run(self.store.last_seq)

    async def acknowledge(self, seq: int, rejected: bool, reason: str = "") -> AckOutcome | None:
        """Delete a batch on a final ack; ``None`` when it is not (or no longer) buffered."""
        return await self._run(self.store.acknowledge, seq, rejected, reason)

    async def stats(self) -> BufferStats:
        """A snapshot of counts, sizes and ages."""
        stats = await self._run(self.store.stats, False)
        with contextlib.suppress(OSError):
            stats.file_bytes = self.path.stat().st_size + _size(Path(f"{self.path}-wal"))
        return stats


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def _check_file(path: Path) -> str:
    def check() -> str:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            return integrity(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(check)
