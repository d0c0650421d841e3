"""The async buffer that the runtime and the shipper use: :class:`Buffer`.

It owns the file (the lock, the corruption check at open, the reserve file) and runs every
:class:`~agent.buffer.store.Store` call in aiosqlite's worker thread: one thread hop per
transaction, never per statement.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import aiosqlite
import structlog

from agent.buffer.files import check_file, configure, exclusive_lock, file_size, move_aside
from agent.buffer.notes import Note, event_note
from agent.buffer.schema import (
    AckOutcome,
    AppendResult,
    BufferStats,
    Overflow,
    ReadingRow,
    Reencoded,
    SealedBatch,
    Synchronous,
)
from agent.buffer.space import Space
from agent.buffer.store import Store
from agent.clock import Timebase
from agent.errors import BufferFileError
from protocol import Ack

log = structlog.get_logger("agent.buffer")

T = TypeVar("T")

DEFAULT_RESERVE = 4 * 2**20
DEFAULT_HOLD = 100_000


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
        reserve_bytes: int = DEFAULT_RESERVE,
        hold_readings: int = DEFAULT_HOLD,
        timebase: Timebase | None = None,
        max_wait: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.timebase = timebase
        self.max_wait = max_wait
        self.gateway_id = gateway_id
        self._max_bytes = max_bytes
        self._overflow: Overflow = overflow
        self._max_points = max_points
        self._max_frame_bytes = max_frame_bytes
        self._synchronous: Synchronous = synchronous
        self._journal_size_limit = journal_size_limit
        self._max_page_count = max_page_count
        self._hold_readings = hold_readings
        self.space = Space(self.reserve_path, reserve_bytes)
        self._db: aiosqlite.Connection | None = None
        self._lock: IO[bytes] | None = None
        self._store: Store | None = None
        self.startup_events: list[Note] = []
        self.moved_to: Path | None = None

    @property
    def reserve_path(self) -> Path:
        """The reserve file beside the buffer (``<buffer>.reserve``)."""
        return Path(f"{self.path}.reserve")

    @property
    def store(self) -> Store:
        """The synchronous core; only touch it through :meth:`_run` while the buffer is open."""
        if self._store is None:
            raise BufferFileError("the buffer is not open")
        return self._store

    @property
    def stream(self) -> uuid.UUID:
        """The stream new batches are sealed under (made with the file, renewed on a conflict)."""
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

    def knows_stream(self, stream: uuid.UUID) -> bool:
        """Whether ``stream`` is one of this file's streams, current or earlier."""
        return self.store.knows_stream(stream)

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
            self._lock = exclusive_lock(Path(f"{self.path}.lock"))
            problem = "ok"
            if self.path.exists():
                problem = await check_file(self.path)
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
            configure, self._db._conn, self._synchronous, self._journal_size_limit
        )
        store = Store(
            self._db._conn,
            gateway_id=self.gateway_id,
            max_bytes=self._max_bytes,
            overflow=self._overflow,
            max_points=self._max_points,
            max_frame_bytes=self._max_frame_bytes,
            space=self.space,
            hold_readings=self._hold_readings,
            timebase=self.timebase,
            max_wait=self.max_wait,
        )
        self._store = store
        if self._max_page_count is not None:
            await self.set_max_page_count(self._max_page_count)
        await self._run(store.create)
        if self.startup_events:
            await self._run(store.add_notes, self.startup_events)
        reserve = await self._run(self.space.ensure_reserve)
        log.info(
            "buffer.opened",
            path=str(self.path),
            stream=str(store.stream),
            readings=store.unsealed,
            batches=store.batch_count,
            bytes=store.bytes,
            synchronous=self._synchronous,
            reserve_bytes=self.space.size if reserve else 0,
        )

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only statement on the buffer's connection (inspection, tests)."""
        conn = self.store.conn
        return await self._run(lambda: conn.execute(sql, params).fetchall())

    async def set_max_page_count(self, pages: int) -> int:
        """Cap the file at ``pages`` pages (SQLite then reports ``SQLITE_FULL``, as a full disk)."""
        store = self.store
        store.page_cap = int(pages)
        store.retry_at = 0.0
        return int(
            await self._run(
                lambda: store.conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0]
            )
        )

    async def close(self) -> None:
        """Close the file (a WAL checkpoint happens on the last close)."""
        if self._db is not None:
            if self._store is not None:
                unwritten = await self._run(self._store.flush_held)
                if unwritten:
                    log.error("buffer.held_lost", readings=unwritten, reason="disk_full at close")
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

    async def add_notes(self, notes: Sequence[Note]) -> bool:
        """Store events and device status changes for the next batch."""
        return await self._run(self.store.add_notes, notes)

    async def seal(self, force: bool = False) -> list[int]:
        """Seal full batches (and with ``force`` the remainder); return the new seqs."""
        return await self._run(self.store.seal, force)

    async def maintain(self) -> None:
        """Retry deferred deletes and re-encodings; track the full disk and the reserve file."""
        await self._run(self.store.maintain)

    def has_unsealed(self) -> bool:
        """Whether anything (readings, events, drop counts) waits to be sealed."""
        return self.store.has_unsealed()

    async def batches(
        self,
        *,
        after: int = -1,
        upto: int | None = None,
        exclude: Collection[int] = (),
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

    async def settle(self, ack: Ack) -> AckOutcome | None:
        """Apply a final ack, matched by (stream, seq); ``None`` when no such batch is buffered."""
        return await self._run(self.store.settle, ack)

    async def conflict(self, stream: uuid.UUID, seq: int) -> list[Reencoded] | None:
        """Re-encode the batch the collector answered ``conflict`` under a newer stream."""
        return await self._run(self.store.conflict, stream, seq)

    async def stats(self) -> BufferStats:
        """A snapshot of counts, sizes and ages."""
        stats = await self._run(self.store.stats, False)
        with contextlib.suppress(OSError):
            stats.file_bytes = self.path.stat().st_size + file_size(Path(f"{self.path}-wal"))
        return stats
