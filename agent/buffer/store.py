"""The synchronous core of the buffer: one ``sqlite3`` connection, one transaction per call.

:class:`Store` creates and migrates the file, appends readings (the overflow policy applies),
stores notes, seals (:mod:`agent.buffer.sealing`), hands out batches, settles acks and keeps the
counters: ``produced == delivered + buffered + dropped`` holds at every commit, and the readings
of every finally acknowledged batch are split into ``stored``, ``quarantined`` and ``refused`` as
the ack says, with per-reason totals in ``outcomes``.

Storage faults never escape: a full disk (``SQLITE_FULL``) or an I/O error rolls the transaction
back explicitly and keeps what could not be written in memory, within bounds. Readings wait in
``held`` (at most ``hold_readings``; beyond that they are counted as dropped), acknowledged
batches whose delete failed in ``pending_deletes`` (final all the same: never sent again, the
delete is retried), conflicting batches whose re-encoding failed in ``pending_conflicts``. On a
full file system the reserve file is released first (:mod:`agent.buffer.space`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent import clock as clocks
from agent.buffer import overflow as overflow_policy
from agent.buffer import sealing
from agent.buffer.files import storage_fault
from agent.buffer.notes import Note, event_note
from agent.buffer.schema import (
    BATCH_BYTES_SQL,
    BATCH_COST,
    COUNTERS,
    DROP_REASONS,
    READING_BYTES_SQL,
    SCHEMA,
    SCHEMA_VERSION,
    AckOutcome,
    AppendResult,
    BufferStats,
    DropReason,
    Overflow,
    ReadingRow,
    Reencoded,
    SealedBatch,
    StreamInfo,
    columns,
    migrate,
    now_us,
    reading_cost,
)
from agent.buffer.space import Space
from agent.errors import BufferFileError
from protocol import Ack, AckResult

log = structlog.get_logger("agent.buffer")

HOLD_RETRY = 0.5
"""While the file system is full, held readings are offered to SQLite at most this often
(sooner when an acknowledged batch was deleted and its pages became free)."""
LOG_EVERY = 10.0
"""A repeated storage fault or holding state is logged at most this often."""
MAX_HELD_NOTES = 10_000
FULL_AUTOCHECKPOINT = 100
"""WAL pages between checkpoints while the file system is full (SQLite's default is 1000)."""


@dataclass(slots=True)
class Settlement:
    """A final ack as the store applies it: which batch, and where its readings ended."""

    seq: int
    readings: int
    size: int
    rejected: bool
    reason: str
    stored: int
    quarantined: int
    refused: int
    reasons: dict[str, tuple[int, int]] = field(default_factory=dict)


def split_outcome(
    readings: int,
    result: AckResult | None,
    *,
    quarantined: int,
    refused: int,
    reasons: dict[str, tuple[int, int]],
    reason: str,
) -> tuple[int, int, int, dict[str, tuple[int, int]]]:
    """Readings of a finally acknowledged batch as (stored, quarantined, refused, per reason).

    The batch's own count is the truth: the ack's quarantined and refused counts are capped by
    it and the rest counts as stored. A ``rejected`` (or ``quarantined``) ack that gives no counts
    refuses (or quarantines) the whole batch; per-reason figures fall back to ``reason``.
    """
    q = min(max(0, quarantined), readings)
    r = min(max(0, refused), readings - q)
    if q + r == 0 and readings:
        if result == AckResult.REJECTED:
            r = readings
        elif result == AckResult.QUARANTINED:
            q = readings
    split = {k: (int(v[0]), int(v[1])) for k, v in reasons.items() if v[0] or v[1]}
    if not split and (q or r):
        split = {reason or "unspecified": (q, r)}
    return readings - q - r, q, r, split


class Store:
    """The synchronous core of the buffer, running on one ``sqlite3`` connection.

    :class:`~agent.buffer.Buffer` runs each method in aiosqlite's worker thread, one thread hop
    per transaction; the CLI uses it directly, read-only, while the agent runs.
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
        space: Space | None = None,
        hold_readings: int = 0,
        timebase: clocks.Timebase | None = None,
        max_wait: float | None = None,
    ) -> None:
        self.conn = conn
        self.timebase = timebase if timebase is not None else clocks.current()
        self.max_wait_us = None if max_wait is None else int(max_wait * 1e6)
        """How long readings wait unsealed for a trusted time (``None``: not at all)."""
        self.boot_ref: int | None = None
        """The ``boots`` row of this boot (readings on the boot clock point at it)."""
        self.boots: dict[int, tuple[str, int, str]] = {}
        """``boots`` rows: id -> (boot id, saved offset µs, its source)."""
        self.waiting_since: int | None = None
        """Boot time since which sealing waits for a trusted time (notes alone)."""
        self.has_boot_column = True
        self.untrusted_since: int | None = None
        self.gateway_id = gateway_id
        self.max_bytes = max_bytes
        self.overflow: Overflow = overflow
        self.max_points = max_points
        self.max_frame_bytes = max_frame_bytes
        self.space = space if space is not None else Space(None, 0)
        self.hold_readings = hold_readings
        self.stream = uuid.UUID(int=0)
        self.streams: list[StreamInfo] = []
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.reasons: dict[str, tuple[int, int]] = {}
        # Drops that could not be written (full disk); folded into the next successful commit.
        self.unpersisted: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.unpersisted_produced = 0
        self.bytes = 0
        self.unsealed = 0
        self.notes_pending = 0
        self.batch_count = 0
        self.batched_readings = 0
        self.legacy = False
        self.protected: set[int] = set()
        """Seqs in flight: ``drop_oldest`` never deletes these."""
        self.pending_deletes: dict[int, Settlement] = {}
        self.pending_conflicts: dict[int, uuid.UUID] = {}
        self.held: list[ReadingRow] = []
        self.held_notes: list[Note] = []
        self.retry_at = 0.0
        self.hold_fault: DropReason = "disk_full"
        self.page_cap: int | None = None
        """``max_page_count`` asked for by the owner (tests); the disk-full cap never exceeds it."""
        self._restore_cap = 0
        self._logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self.backlog_note: str | None = None
        """The backlog meter's latest figures (JSON); kept in ``meta`` with the next counters."""
        self._backlog_written: str | None = None

    # --- set-up ---------------------------------------------------------------------------

    def create(self) -> None:
        """Create the schema and, in a new file, the stream id; migrate an older file."""
        self.conn.executescript(SCHEMA)
        with self.transaction():
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
            if row is None:
                stream, created = str(uuid.uuid4()), now_us()
                self.conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [
                        ("stream", stream),
                        ("schema", SCHEMA_VERSION),
                        ("created_us", created),
                        *((k, 0) for k in COUNTERS),
                    ],
                )
                self.conn.execute(
                    "INSERT INTO streams(stream, first_seq, started_us, reason)"
                    " VALUES (?, 0, ?, 'created')",
                    (stream, created),
                )
            elif migrate(self.conn):
                log.info("buffer.migrated", schema=SCHEMA_VERSION)
            self._register_boot()
        self.load()

    def _register_boot(self) -> None:
        """The ``boots`` row of this boot, made with the wall clock's offset (untrusted)."""
        tb = self.timebase
        boot = tb.clock.boot_us()
        local = tb.clock.wall_us() - boot
        self.conn.execute(
            "INSERT OR IGNORE INTO boots(boot_id, offset_us, source, error_us, updated_us)"
            " VALUES (?, ?, 'untrusted', NULL, ?)",
            (tb.boot_id, local, local + boot),
        )
        row = self.conn.execute("SELECT id FROM boots WHERE boot_id = ?", (tb.boot_id,)).fetchone()
        self.boot_ref = int(row[0])

    def load(self) -> None:
        """Read the stream ids, counters and sizes from the file."""
        conn = self.conn
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "stream" not in meta:
            raise BufferFileError("the buffer file has no stream id (not a Sensormine buffer)")
        self.stream = uuid.UUID(str(meta["stream"]))
        for key in COUNTERS:
            self.counters[key] = int(meta.get(key) or 0)
        if meta.get("backlog") is not None:
            self.backlog_note = self._backlog_written = str(meta["backlog"])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.legacy = "stream" not in columns(conn, "batches")
        self.has_boot_column = "boot" in columns(conn, "readings")
        if "boots" in tables:
            self.boots = {
                int(i): (str(b), int(o), str(src))
                for i, b, o, src in conn.execute("SELECT id, boot_id, offset_us, source FROM boots")
            }
        if "streams" in tables:
            self.streams = [
                StreamInfo(uuid.UUID(str(s)), int(first), int(started), str(reason))
                for s, first, started, reason in conn.execute(
                    "SELECT stream, first_seq, started_us, reason FROM streams"
                    " ORDER BY started_us, first_seq"
                )
            ]
        if not any(s.stream == self.stream for s in self.streams):
            self.streams.append(
                StreamInfo(self.stream, 0, int(meta.get("created_us") or 0), "created")
            )
        if "outcomes" in tables:
            self.reasons = {
                str(r): (int(q), int(f))
                for r, q, f in conn.execute("SELECT reason, quarantined, refused FROM outcomes")
            }
        self.unsealed = int(conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
        self.notes_pending = int(conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0])
        self.batch_count, self.batched_readings = (
            int(v)
            for v in conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(readings), 0) FROM batches"
            ).fetchone()
        )
        self.bytes = int(conn.execute(READING_BYTES_SQL).fetchone()[0]) + int(
            conn.execute(BATCH_BYTES_SQL).fetchone()[0]
        )

    # --- transactions and counters ---------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; any exception rolls back explicitly and propagates."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            # After SQLITE_FULL SQLite may or may not have rolled back already: do it explicitly.
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def write_counters(self, counters: dict[str, int]) -> None:
        """Write ``counters`` into ``meta`` (inside the caller's transaction)."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(counters.items())
        )
        note = self.backlog_note
        if note is not None and note != self._backlog_written:
            # Rides on a transaction that commits anyway: no write of its own. Should it roll
            # back, the next figures are written with the next commit.
            self.conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('backlog', ?)", (note,)
            )
            self._backlog_written = note

    def counters_with_unpersisted(self) -> dict[str, int]:
        """A copy of the counters with the drops a full disk kept from being written."""
        counters = dict(self.counters)
        for reason, n in self.unpersisted.items():
            if n:
                counters[f"dropped_{reason}"] += n
                counters[f"unreported_{reason}"] += n
        counters["produced"] += self.unpersisted_produced
        return counters

    def committed(self, counters: dict[str, int]) -> None:
        """``counters`` (from :meth:`counters_with_unpersisted`) are now in the file."""
        self.unpersisted = dict.fromkeys(DROP_REASONS, 0)
        self.unpersisted_produced = 0
        self.counters = counters

    def renewed(self, stream: uuid.UUID, first_seq: int, started_us: int, reason: str) -> None:
        """A new stream is the file's current one (called after its transaction committed)."""
        self.stream = stream
        self.streams.append(StreamInfo(stream, first_seq, started_us, reason))

    def knows_stream(self, stream: uuid.UUID) -> bool:
        """Whether ``stream`` is one of this file's streams, current or earlier."""
        return any(s.stream == stream for s in self.streams)

    # --- storage faults and the full disk ---------------------------------------------------

    def storage_failed(self, fault: DropReason, action: str, exc: sqlite3.Error) -> bool:
        """Note a storage fault; on a full file system release the reserve.

        Returns whether room was made just now (the caller then tries once more).
        """
        self._log_fault(fault, action, exc)
        space = self.space
        if space.full or not space.low():
            # Already handled, or a capped database (max_page_count) on a roomy file system.
            return False
        space.full = True
        space.next_check = time.monotonic() + 1.0
        released = space.release_reserve()
        self._checkpoint()
        free = space.free_bytes() or 0
        space.entry_free = free
        cap = self._cap(free)
        log.warning(
            "buffer.reserve_released",
            reserve_bytes=released,
            page_cap=cap,
            free_bytes=free,
            pending_deletes=len(self.pending_deletes),
        )
        return released > 0

    def _log_fault(self, fault: DropReason, action: str, exc: sqlite3.Error) -> None:
        key = f"{fault}:{action}"
        now = time.monotonic()
        if now - self._logged.get(key, -LOG_EVERY) < LOG_EVERY:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return
        self._logged[key] = now
        log.warning(
            f"buffer.{fault}",
            action=action,
            error=str(exc),
            repeated=self._unlogged.pop(key, 0),
            held=len(self.held),
            pending_deletes=len(self.pending_deletes),
        )

    def _pragma(self, sql: str) -> int:
        return int(self.conn.execute(sql).fetchone()[0])

    def _cap(self, free: int) -> int:
        """Let the database grow only into what is free beyond the WAL's room: deletes and
        checkpoints need the WAL, and new readings then go into pages freed by deleted batches
        (or wait in memory)."""
        with contextlib.suppress(sqlite3.Error):
            self._restore_cap = self._pragma("PRAGMA max_page_count")
            page_size = self._pragma("PRAGMA page_size")
            wal_room = max(self.space.size * 3 // 4, 2 * FULL_AUTOCHECKPOINT * page_size)
            cap = self._pragma("PRAGMA page_count") + max(0, free - wal_room) // page_size
            if self.page_cap is not None:
                cap = min(cap, self.page_cap)
            self.conn.execute(f"PRAGMA wal_autocheckpoint={FULL_AUTOCHECKPOINT}")
            return self._pragma(f"PRAGMA max_page_count={cap}")
        return 0

    def _uncap(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            cap = self.page_cap if self.page_cap is not None else self._restore_cap
            if cap:
                self.conn.execute(f"PRAGMA max_page_count={cap}")
            self.conn.execute("PRAGMA wal_autocheckpoint=1000")

    def _checkpoint(self) -> None:
        # TRUNCATE gives the WAL's blocks back to the file system.
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def maintain(self) -> None:
        """Retry what a storage fault deferred; leave the disk-full state when room is back."""
        if self.pending_conflicts:
            sealing.resolve_conflicts(self)
        if self.pending_deletes:
            self._apply_pending("retry_delete")
        space = self.space
        now = time.monotonic()
        if now < space.next_check:
            return
        if space.full:
            space.next_check = now + 1.0
            if space.room_back() and space.ensure_reserve():
                space.full = False
                space.entry_free = None
                self._uncap()
                self.retry_at = 0.0
                log.info(
                    "buffer.space_restored",
                    reserve_bytes=space.size,
                    free_bytes=space.free_bytes(),
                    held=len(self.held),
                )
        elif space.size and not space.reserve_present():
            space.next_check = now + 10.0
            if space.room_back() and space.ensure_reserve():
                log.info("buffer.reserve_restored", reserve_bytes=space.size)
        else:
            space.next_check = now + 10.0

    # --- append ---------------------------------------------------------------------------

    def append(self, rows: Sequence[ReadingRow]) -> AppendResult:
        """Store readings (after those held in memory) in one transaction, applying overflow.

        On a storage fault the readings are held in memory, at most ``hold_readings`` of them;
        only what exceeds that is counted as dropped.
        """
        if self.held:
            if time.monotonic() < self.retry_at:
                # Not yet: offering everything held to a failing disk every commit costs CPU.
                return self._hold([*self.held, *rows], self.hold_fault)
            rows = [*self.held, *rows]
            self.held = []
        if not rows:
            return AppendResult(0, 0)
        result = self._insert(rows)
        if isinstance(result, AppendResult):
            return result
        fault, exc = result
        if self.storage_failed(fault, "append", exc):
            result = self._insert(rows)
            if isinstance(result, AppendResult):
                return result
            fault, exc = result
        self.retry_at = time.monotonic() + HOLD_RETRY
        self.hold_fault = fault
        return self._hold(list(rows), fault)

    def _hold(self, rows: list[ReadingRow], fault: DropReason) -> AppendResult:
        cap = self.hold_readings
        dropped = max(0, len(rows) - cap)
        if dropped:
            kept = rows[:cap] if self.overflow == "drop_newest" else rows[dropped:]
            self.unpersisted[fault] += dropped
            self.unpersisted_produced += dropped
        else:
            kept = rows
        self.held = kept
        now = time.monotonic()
        if now - self._logged.get("hold", -LOG_EVERY) >= LOG_EVERY:
            self._logged["hold"] = now
            log.warning(
                "buffer.holding",
                reason=fault,
                held=len(kept),
                hold_readings=cap,
                dropped_unwritten=sum(self.unpersisted.values()),
            )
        return AppendResult(0, dropped, held=len(kept))

    def _insert(
        self, rows: Sequence[ReadingRow]
    ) -> AppendResult | tuple[DropReason, sqlite3.Error]:
        n = len(rows)
        costs = [reading_cost(r[1], r[3]) for r in rows]
        incoming = sum(costs)
        counters = self.counters_with_unpersisted()
        counters["produced"] += n
        keep_from, keep_to = 0, n
        freed = overflow_policy.Freed()
        dropped_oldest = dropped_newest = 0
        try:
            with self.transaction():
                excess = self.bytes + incoming - self.max_bytes
                if excess > 0:
                    if self.overflow == "drop_newest":
                        keep_to = overflow_policy.fitting_prefix(costs, self.max_bytes - self.bytes)
                        dropped_newest = n - keep_to
                    else:
                        freed = overflow_policy.drop_oldest(self.conn, excess, self._kept_batches())
                        # What is still too much comes out of the oldest of the incoming rows.
                        keep_from = overflow_policy.oldest_incoming(costs, excess - freed.bytes)
                        dropped_oldest = freed.readings + keep_from
                kept = rows[keep_from:keep_to]
                if kept:
                    boot = self.boot_ref
                    self.conn.executemany(
                        "INSERT INTO readings(device, metric, ts, value, is_bool, boot)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            (
                                r[0],
                                r[1],
                                r[2],
                                r[3],
                                1 if r[3].__class__ is bool else None,
                                boot if len(r) > 4 and r[4] else None,  # type: ignore[misc]
                            )
                            for r in kept
                        ],
                    )
                if dropped_oldest:
                    counters["dropped_drop_oldest"] += dropped_oldest
                    counters["unreported_drop_oldest"] += dropped_oldest
                if dropped_newest:
                    counters["dropped_drop_newest"] += dropped_newest
                    counters["unreported_drop_newest"] += dropped_newest
                self.write_counters(counters)
        except sqlite3.Error as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            return fault, exc
        self.committed(counters)
        stored = keep_to - keep_from
        self.bytes += sum(costs[keep_from:keep_to]) - freed.bytes
        self.unsealed += stored - freed.unsealed
        self.batch_count -= freed.batches
        self.batched_readings -= freed.batched
        dropped = dropped_oldest + dropped_newest
        if dropped:
            log.warning("buffer.full", policy=self.overflow, readings_dropped=dropped)
        return AppendResult(stored, dropped)

    def _kept_batches(self) -> Collection[int]:
        """Batches ``drop_oldest`` must not delete: in flight, or acknowledged and deleted later."""
        if not self.pending_deletes:
            return self.protected
        return self.protected | self.pending_deletes.keys()

    def add_notes(self, notes: Sequence[Note]) -> bool:
        """Store events (``"event"``) and device status changes (``"status"``), msgpack bodies.

        ``False`` when a storage fault kept them out of the file (they wait in memory when the
        store holds readings, else they are dropped and logged).
        """
        if self.held_notes:
            notes = [*self.held_notes, *notes]
            self.held_notes = []
        if not notes:
            return True
        for attempt in (0, 1):
            try:
                with self.transaction():
                    self.conn.executemany("INSERT INTO notes(kind, body) VALUES (?, ?)", notes)
            except sqlite3.Error as exc:
                fault = storage_fault(exc)
                if fault is None:
                    raise
                if attempt == 0 and self.storage_failed(fault, "notes", exc):
                    continue
                cap = min(MAX_HELD_NOTES, self.hold_readings)
                self.held_notes = list(notes[-cap:]) if cap else []
                lost = len(notes) - len(self.held_notes)
                if lost:
                    log.warning(f"buffer.{fault}", action="notes", notes_dropped=lost)
                return False
            break
        self.notes_pending += len(notes)
        return True

    # --- sealing --------------------------------------------------------------------------

    def seal(self, force: bool) -> list[int]:
        """Seal full batches; with ``force`` also the remainder. Returns the new seqs."""
        return sealing.seal(self, force)

    def has_unsealed(self) -> bool:
        """Whether readings, notes or unreported drop counts wait to be sealed."""
        return (
            self.unsealed > 0
            or self.notes_pending > 0
            or any(self.counters[f"unreported_{r}"] for r in DROP_REASONS)
            or any(self.unpersisted.values())
        )

    # --- shipping -------------------------------------------------------------------------

    def batches(
        self,
        *,
        after: int = -1,
        upto: int | None = None,
        exclude: Collection[int] = (),
        limit: int,
        protect: bool = False,
    ) -> list[SealedBatch]:
        """Sealed batches with ``after < seq <= upto`` not in ``exclude``, oldest first.

        Batches that are settled but not yet deleted, or waiting to be re-encoded, are never
        handed out. ``protect`` marks them in flight in the same step, so that no
        ``drop_oldest`` can slip between reading a batch for sending and protecting it.
        """
        skip = {*exclude, *self.pending_deletes, *self.pending_conflicts}
        upper = upto if upto is not None else 2**63 - 1
        marks = ",".join("?" * len(skip))
        where = f" AND seq NOT IN ({marks})" if skip else ""
        stream = "NULL" if self.legacy else "stream"
        rows = self.conn.execute(
            f"SELECT seq, frame, readings, {stream} FROM batches WHERE seq > ? AND seq <= ?{where}"
            " ORDER BY seq LIMIT ?",
            (after, upper, *skip, limit),
        ).fetchall()
        if protect:
            self.protected.update(seq for seq, _, _, _ in rows)
        return [
            SealedBatch(seq, bytes(frame), count, uuid.UUID(s) if s else self.stream)
            for seq, frame, count, s in rows
        ]

    def last_seq(self) -> int:
        """The highest sealed seq still in the buffer, or -1."""
        row = self.conn.execute("SELECT MAX(seq) FROM batches").fetchone()
        return -1 if row[0] is None else int(row[0])

    def settle(self, ack: Ack) -> AckOutcome | None:
        """Apply a final ack (any result but ``conflict``), matched by its stream and seq."""
        return self.acknowledge(
            ack.seq,
            ack.result == AckResult.REJECTED,
            ack.reason,
            stream=ack.stream,
            result=ack.result,
            quarantined=ack.quarantined,
            refused=ack.rejected,
            reasons=dict(ack.reasons),
        )

    def acknowledge(
        self,
        seq: int,
        rejected: bool = False,
        reason: str = "",
        *,
        stream: uuid.UUID | None = None,
        result: AckResult | None = None,
        quarantined: int = 0,
        refused: int = 0,
        reasons: dict[str, tuple[int, int]] | None = None,
    ) -> AckOutcome | None:
        """Delete batch ``seq`` (of ``stream``, when given) after a final ack.

        A rejection is recorded as a ``batch.rejected`` event. ``None`` when the batch is not
        (or no longer) buffered. When a storage fault keeps the delete from happening, the ack
        is remembered: the outcome says ``pending``, the batch is never handed out again and the
        delete is retried by :meth:`maintain`.
        """
        if seq in self.pending_deletes or seq in self.pending_conflicts:
            return None
        row = self.conn.execute(
            f"SELECT readings, {BATCH_COST} + length(frame), "
            f"{'NULL' if self.legacy else 'stream'} FROM batches WHERE seq = ?",
            (seq,),
        ).fetchone()
        if row is None:
            return None
        if stream is not None and row[2] is not None and row[2] != str(stream):
            return None
        count = int(row[0])
        if rejected and result is None:
            result = AckResult.REJECTED
        stored, q, r, split = split_outcome(
            count,
            result,
            quarantined=quarantined,
            refused=refused,
            reasons=reasons or {},
            reason=reason,
        )
        self.pending_deletes[seq] = Settlement(
            seq, count, int(row[1]), rejected, reason, stored, q, r, split
        )
        self._apply_pending("acknowledge")
        return AckOutcome(
            seq,
            count,
            rejected,
            stored=stored,
            quarantined=q,
            refused=r,
            reasons=split,
            pending=seq in self.pending_deletes,
        )

    def _apply_pending(self, action: str) -> bool:
        """Delete every settled batch and count it, in one transaction; ``False`` on a fault."""
        pending = list(self.pending_deletes.values())
        for attempt in (0, 1):
            counters = self.counters_with_unpersisted()
            notes = 0
            gone: list[Settlement] = []
            try:
                with self.transaction():
                    for s in pending:
                        deleted = self.conn.execute("DELETE FROM batches WHERE seq = ?", (s.seq,))
                        if deleted.rowcount == 0:
                            gone.append(s)  # not there any more: nothing to count
                            continue
                        counters["delivered"] += s.readings
                        counters["stored"] += s.stored
                        counters["quarantined"] += s.quarantined
                        counters["refused"] += s.refused
                        counters["last_ack_us"] = now_us()
                        for code, (q, r) in s.reasons.items():
                            self.conn.execute(
                                "INSERT INTO outcomes(reason, quarantined, refused)"
                                " VALUES (?, ?, ?) ON CONFLICT(reason) DO UPDATE SET"
                                " quarantined = quarantined + excluded.quarantined,"
                                " refused = refused + excluded.refused",
                                (code, q, r),
                            )
                        if s.rejected:
                            counters["rejected_batches"] += 1
                        if s.rejected and s.readings:
                            # Only for batches with readings: a rejected batch of events alone
                            # (say, for an unregistered gateway) would otherwise beget another.
                            note = event_note(
                                kind="batch.rejected",
                                message=f"the collector rejected batch {s.seq}"
                                f" ({s.reason or 'no reason'})",
                                severity="error",
                                attributes={
                                    "seq": s.seq,
                                    "reason": s.reason,
                                    "readings": s.readings,
                                },
                            )
                            self.conn.execute("INSERT INTO notes(kind, body) VALUES (?, ?)", note)
                            notes += 1
                    self.write_counters(counters)
            except sqlite3.Error as exc:
                fault = storage_fault(exc)
                if fault is None:
                    raise
                if attempt == 0 and self.storage_failed(fault, action, exc):
                    continue
                return False
            break
        self.committed(counters)
        for s in gone:
            del self.pending_deletes[s.seq]
        for s in pending:
            if s in gone:
                continue
            del self.pending_deletes[s.seq]
            self.batch_count -= 1
            self.batched_readings -= s.readings
            self.bytes -= s.size
            for code, (q, r) in s.reasons.items():
                old = self.reasons.get(code, (0, 0))
                self.reasons[code] = (old[0] + q, old[1] + r)
        self.notes_pending += notes
        self.retry_at = 0.0  # pages were freed: held readings may fit now
        return True

    def conflict(self, stream: uuid.UUID, seq: int) -> list[Reencoded] | None:
        """The collector holds ``(stream, seq)`` with other content: re-encode that batch.

        ``None`` when the batch is not buffered (under that stream); an empty list when a storage
        fault deferred the re-encoding (the batch is not handed out until it is done).
        """
        if seq in self.pending_deletes or seq in self.pending_conflicts:
            return None
        row = self.conn.execute(
            f"SELECT {'NULL' if self.legacy else 'stream'} FROM batches WHERE seq = ?", (seq,)
        ).fetchone()
        if row is None or (row[0] is not None and row[0] != str(stream)):
            return None
        self.pending_conflicts[seq] = stream
        return sealing.resolve_conflicts(self)

    def flush_held(self) -> int:
        """Last try to write held readings and notes (at close); how many readings stay unwritten."""
        self.retry_at = 0.0
        if self.held_notes:
            self.add_notes([])
        if self.held:
            self.append([])
        return len(self.held)

    # --- time -----------------------------------------------------------------------------

    def wall_offset(self, boot: int) -> tuple[int, str]:
        """The offset (µs) and its source that turn boot-clock times of ``boot`` into wall time.

        This boot's offset is the timebase's best now; an earlier boot's is the one saved for it
        at its last seal (or, without one, its wall clock's when the buffer was opened then).
        """
        if boot == self.boot_ref:
            offset = self.timebase.offset()
            return offset.us, offset.source
        saved = self.boots.get(boot)
        if saved is None:
            return self.timebase.offset().us, "untrusted"
        return saved[1], saved[2]

    def wall_time(self, ts: int, boot: int | None) -> int:
        """A stored reading's time as wall time (µs since the epoch)."""
        if boot is None:
            return ts
        return ts + self.wall_offset(boot)[0]

    def clock_state(self) -> dict[str, object] | None:
        """This boot's offset as the file last saved it, and how far the system clock is off it.

        ``status`` reads this from the file while the agent runs: the agent saves its offset at
        every seal.
        """
        try:
            row = self.conn.execute(
                "SELECT offset_us, source, error_us, updated_us FROM boots WHERE boot_id = ?",
                (self.timebase.boot_id,),
            ).fetchone()
        except sqlite3.Error:
            return None  # a file of an older release: no boots table
        if row is None:
            return None
        offset, source, error, updated = int(row[0]), str(row[1]), row[2], int(row[3])
        clock = self.timebase.clock
        local = clock.wall_us() - clock.boot_us()
        return {
            "source": source,
            "trusted": source != "untrusted",
            "error_ms": None if error is None else round(int(error) / 1000, 1),
            "saved_at_us": updated,
            "system_clock_off_s": None
            if source == "untrusted"
            else round((local - offset) / 1e6, 3),
        }

    def oldest_reading(self) -> int | None:
        """Wall time of the oldest unsealed reading, or ``None``."""
        if not self.has_boot_column:
            value = self.conn.execute("SELECT MIN(ts) FROM readings").fetchone()[0]
            return None if value is None else int(value)
        times = [
            self.wall_time(int(ts), None if boot is None else int(boot))
            for boot, ts in self.conn.execute("SELECT boot, MIN(ts) FROM readings GROUP BY boot")
            if ts is not None
        ]
        return min(times) if times else None

    def save_offset(self, offset: clocks.Offset) -> None:
        """Remember this boot's offset (inside the caller's transaction) for after a reboot.

        A trusted offset is never replaced by an untrusted one: the boot clock does not change
        when the wall clock does, so it stays right for this boot.
        """
        if self.boot_ref is None:
            return
        saved = self.boots.get(self.boot_ref)
        if not offset.trusted and saved is not None and saved[2] != "untrusted":
            return
        if saved is not None and saved[1] == offset.us and saved[2] == offset.source:
            return
        self.conn.execute(
            "UPDATE boots SET offset_us = ?, source = ?, error_us = ?, updated_us = ? WHERE id = ?",
            (
                offset.us,
                offset.source,
                offset.error_us,
                self.timebase.clock.boot_us() + offset.us,
                self.boot_ref,
            ),
        )
        self.boots[self.boot_ref] = (self.timebase.boot_id, offset.us, offset.source)

    # --- inspection -----------------------------------------------------------------------

    def stats(self, reload: bool = True) -> BufferStats:
        """Counts, sizes and ages (``reload`` re-reads counters and sizes from the file)."""
        self.conn.execute("BEGIN")
        try:
            if reload:
                self.load()
            oldest_reading = self.oldest_reading()
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
            stored=counters["stored"],
            quarantined=counters["quarantined"],
            refused=counters["refused"],
            by_reason=dict(sorted(self.reasons.items())),
            streams=list(self.streams),
            reencoded_batches=counters["reencoded_batches"],
            clock=self.clock_state(),
            held_readings=len(self.held),
            pending_deletes=len(self.pending_deletes),
            disk_full=self.space.full,
            backlog=self.backlog_note,
        )


def open_store_readonly(path: Path) -> Store:
    """Open a buffer file for inspection (``status``, ``buffer export``) beside a running agent."""
    if not path.exists():
        raise BufferFileError(
            f"{path}: no buffer file (the agent makes it when it first runs; is buffer.path right?)"
        )
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
