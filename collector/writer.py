"""The TimescaleDB writer: stages processed messages and flushes them in one transaction each.

One flush, one transaction, in this order:

1. the quarantine quota of the flush's batches is checked against ``quarantine_usage``; rows
   that do not fit become ``quota_exceeded`` refusals;
2. the ledger rows ``(gateway_id, stream, seq)`` of the flush's batches, with a digest of each
   frame, inserted with ``ON CONFLICT DO NOTHING RETURNING``: only the batches whose key comes
   back are new; the rest were committed before (by this collector or another one racing on the
   same batch) and are acknowledged as ``duplicate`` when the stored digest is the same, and as
   ``conflict`` when it differs (a gateway reissued the key for other content), without
   writing anything;
3. the series ids of the new batches' readings, from the cache or resolved (and created) in
   this transaction (:mod:`collector.series`);
4. binary COPY of the readings into ``telemetry`` (numbers, booleans) and ``telemetry_text``
   (strings), one upsert of ``series_latest`` (one row per series written, whatever the number
   of readings), then events, device status changes, quarantine rows (and their quota usage),
   reject samples, and the touched (series, hour) ranges into ``ingest_dirty``;
5. the alert rules on the readings' metrics (:mod:`collector.alerts`): state per (rule, series)
   locked, evaluated in event-time order, transitions into ``alerts``, ``events`` and the
   outbox;
6. COMMIT; only then are the new series ids cached.

Only after the commit does the writer hand the flushed items to ``on_committed``, which sends
the ack frames and the PUBACKs. A failing database leaves the transaction rolled back; the
items stay staged and the flush is retried with capped backoff, so nothing is half-written,
nothing is acknowledged and nothing is lost. If the commit's outcome is unknown (the connection
broke during COMMIT), the retry finds the ledger rows and acknowledges ``duplicate``.

Hooks registered with :meth:`Writer.add_flush_hook` receive a :class:`FlushReport` after each
committed flush: the rows written and the exact (series, time range) set, which the
rollup jobs use to recompute only the buckets that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from collector import copy_format
from collector.copy_format import series_rows
from collector.errors import DatabaseUnavailable
from collector.lifecycle.status import GatewayDevicesLookup, StatusRow, insert_status_rows
from collector.observability import CollectorMetrics
from collector.outcomes import REJECT_COLUMNS
from collector.pipeline import Incoming, Staged, to_datetime, to_datetime_or_none
from collector.quarantine import QuotaSettings, apply_quota, insert_rows
from collector.series import Kind, SeriesCatalog, SeriesKey, value_kind
from protocol import AckResult, Reason

if TYPE_CHECKING:
    from collector.alerts.engine import AlertEngine

log = structlog.get_logger("collector.writer")

HOUR_US = 3_600_000_000
TELEMETRY_COLUMNS = copy_format.COLUMNS
EVENT_COLUMNS = (
    "time",
    "tenant_id",
    "gateway_id",
    "device_id",
    "severity",
    "kind",
    "message",
    "attributes",
)
STATUS_COLUMNS = ("time", "tenant_id", "gateway_id", "device_id", "status", "reason")
DIRTY_COLUMNS = ("series_id", "first_time", "last_time")

# One row per series written by the flush; a late reading never moves the latest value back.
# Sorted by series id so that two collectors updating the same series cannot deadlock.
_LATEST_SQL = """
INSERT INTO series_latest (series_id, time, value, value_text)
SELECT * FROM unnest($1::int[], $2::timestamptz[], $3::float8[], $4::text[])
    AS t(series_id, time, value, value_text)
ORDER BY series_id
ON CONFLICT (series_id) DO UPDATE
SET time = EXCLUDED.time, value = EXCLUDED.value, value_text = EXCLUDED.value_text
WHERE EXCLUDED.time >= series_latest.time
"""

_LEDGER_SQL = """
INSERT INTO ingest_ledger (gateway_id, stream, seq, tenant_id, result, accepted, rejected, reason,
                           created, digest, quarantined)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[], $6::int[],
                     $7::int[], $8::text[], $9::timestamptz[], $10::bytea[], $11::int[])
    AS t(gateway_id, stream, seq, tenant_id, result, accepted, rejected, reason, created, digest,
         quarantined)
-- A fixed order keeps two collectors that race on the same batches from deadlocking.
ORDER BY gateway_id, stream, seq
ON CONFLICT DO NOTHING
RETURNING gateway_id, stream, seq
"""

# A redelivered status frame must not add a second row; status frames carry no ledger key.
# Neither does an ``online`` frame of a gateway already online: the agent says ``online`` again
# with its backlog figures while a backlog drains, which changes no state.
_GATEWAY_STATUS_SQL = """
INSERT INTO device_status_history (time, tenant_id, gateway_id, device_id, status, reason)
SELECT $1, $2, $3, NULL, $4, $5
WHERE NOT EXISTS (
    SELECT 1 FROM device_status_history
    WHERE time = $1 AND gateway_id = $3 AND device_id IS NULL AND status = $4
) AND NOT ($4 = 'online' AND EXISTS (
    SELECT 1 FROM (
        SELECT status FROM device_status_history
        WHERE gateway_id = $3 AND device_id IS NULL AND time <= $1
        ORDER BY time DESC LIMIT 1
    ) latest WHERE latest.status = 'online'
))
"""

# The latest figures per gateway; older ones (a frame arriving late) change nothing.
_GATEWAY_BACKLOG_SQL = """
INSERT INTO gateway_backlog (gateway_id, tenant_id, time, readings, batches, oldest_age_s,
                             ack_rate, production_rate, drain_s, draining)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (gateway_id) DO UPDATE SET
    tenant_id = EXCLUDED.tenant_id, time = EXCLUDED.time, readings = EXCLUDED.readings,
    batches = EXCLUDED.batches, oldest_age_s = EXCLUDED.oldest_age_s,
    ack_rate = EXCLUDED.ack_rate, production_rate = EXCLUDED.production_rate,
    drain_s = EXCLUDED.drain_s, draining = EXCLUDED.draining
WHERE gateway_backlog.time < EXCLUDED.time
"""

_DIGESTS_SQL = """
SELECT l.gateway_id, l.stream, l.seq, l.digest
FROM ingest_ledger l
JOIN unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS k(gateway_id, stream, seq)
  ON l.gateway_id = k.gateway_id AND l.stream = k.stream AND l.seq = k.seq
"""

# Errors that say "this item's data cannot be written", as opposed to "the database is not
# there": the item is isolated, the rest of the flush goes on.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class ItemFailed(Exception):
    """Writing a flush failed because of its data or our own code, not the database."""


@dataclass(frozen=True, slots=True)
class DirtyRange:
    """Readings of one series written by a flush, within one hour."""

    tenant_id: uuid.UUID
    device_id: uuid.UUID
    metric: str
    first_us: int
    last_us: int
    series_id: int


@dataclass(slots=True)
class FlushReport:
    """What one committed flush did."""

    messages: int = 0
    batches: int = 0
    duplicates: int = 0
    conflicts: int = 0
    readings: int = 0
    events: int = 0
    status: int = 0
    quarantined: int = 0
    rejects: int = 0
    alerts: int = 0  # alert transitions written
    seconds: float = 0.0
    ranges: list[DirtyRange] = field(default_factory=list)


FlushHook = Callable[[FlushReport], Awaitable[None] | None]


def series_key(s: Any) -> SeriesKey:
    """The catalog key of a staged series."""
    return (s.tenant_id, s.device_id, s.metric)


def dirty_ranges(items: list[Staged], ids: dict[SeriesKey, int]) -> list[DirtyRange]:
    """The (series, hour) ranges that ``items`` (all being written) write."""
    ranges: dict[tuple[int, int], list[Any]] = {}
    for item in items:
        for s in item.series:
            sid = ids[series_key(s)]
            lo, hi = min(s.timestamps), max(s.timestamps)
            if lo // HOUR_US == hi // HOUR_US:
                spans = [(lo // HOUR_US, lo, hi)]
            else:
                per_hour: dict[int, list[int]] = {}
                for t in s.timestamps:
                    span = per_hour.setdefault(t // HOUR_US, [t, t])
                    if t < span[0]:
                        span[0] = t
                    elif t > span[1]:
                        span[1] = t
                spans = [(h, a, b) for h, (a, b) in per_hour.items()]
            for hour, a, b in spans:
                key = (sid, hour)
                known = ranges.get(key)
                if known is None:
                    ranges[key] = [s, a, b]
                else:
                    known[1] = min(known[1], a)
                    known[2] = max(known[2], b)
    return [
        DirtyRange(s.tenant_id, s.device_id, s.metric, a, b, sid)
        for (sid, _), (s, a, b) in ranges.items()
    ]


def latest_rows(
    items: list[Staged], ids: dict[SeriesKey, int]
) -> tuple[list[int], list[datetime], list[float | None], list[str | None]]:
    """The newest reading of each series in ``items``, as the columns of ``series_latest``."""
    newest: dict[int, tuple[int, Any]] = {}
    for item in items:
        for s in item.series:
            sid = ids[series_key(s)]
            t = max(s.timestamps)
            v = s.values[s.timestamps.index(t)]
            known = newest.get(sid)
            if known is None or t >= known[0]:
                newest[sid] = (t, v)
    sids = sorted(newest)
    values = [newest[sid][1] for sid in sids]
    return (
        sids,
        [to_datetime(newest[sid][0]) for sid in sids],
        [None if type(v) is str else float(v) for v in values],
        [v if type(v) is str else None for v in values],
    )


def item_copy_data(item: Staged, ids: Mapping[SeriesKey, int]) -> tuple[bytes, bytes]:
    """Binary COPY rows of one item's accepted readings: (``telemetry``, ``telemetry_text``)."""
    numeric: list[bytes] = []
    text: list[bytes] = []
    for s in item.series:
        n, t = series_rows(ids[series_key(s)], s.timestamps, s.values)
        numeric.append(n)
        text.append(t)
    return b"".join(numeric), b"".join(text)


async def _stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    yield copy_format.HEADER
    for part in parts:
        yield part
    yield copy_format.TRAILER


def wanted_series(items: list[Staged]) -> dict[SeriesKey, Kind]:
    """Every series of ``items`` with the kind of its first value."""
    wanted: dict[SeriesKey, Kind] = {}
    for item in items:
        for s in item.series:
            key = series_key(s)
            if key not in wanted:
                wanted[key] = value_kind(s.values)
    return wanted


async def write_items(
    conn: asyncpg.Connection,
    writes: list[Staged],
    fanout: dict[int, list[StatusRow]] | None = None,
    catalog: SeriesCatalog | None = None,
    alerts: AlertEngine | None = None,
) -> FlushReport:
    """Write the rows of ``writes`` (all to be written) inside the caller's transaction.

    Used by the flush and by the quarantine replay, so replayed data lands exactly as ingested
    data does: readings, latest values, events, status changes, quarantine rows, reject
    samples, dirty ranges, and the alert transitions the readings cause (``alerts``). ``catalog``
    caches series ids (a private one when ``None``); the caller commits or discards it with its
    transaction.
    """
    report = FlushReport()
    catalog = catalog if catalog is not None else SeriesCatalog()
    with_series = [i for i in writes if i.series]
    ids = await catalog.resolve(conn, wanted_series(with_series)) if with_series else {}
    numeric: list[bytes] = []
    text: list[bytes] = []
    for i in with_series:
        n, t = i.copy_data if i.copy_data is not None else item_copy_data(i, ids)
        if n:
            numeric.append(n)
        if t:
            text.append(t)
    if numeric:
        await conn.copy_to_table(
            "telemetry", source=_stream(numeric), columns=TELEMETRY_COLUMNS, format="binary"
        )
    if text:
        await conn.copy_to_table(
            "telemetry_text", source=_stream(text), columns=TELEMETRY_COLUMNS, format="binary"
        )
    if with_series:
        await conn.execute(_LATEST_SQL, *latest_rows(with_series, ids))
    report.readings = sum(i.accepted for i in with_series)
    events = [e for i in writes for e in i.events]
    if events:
        await conn.copy_records_to_table("events", records=events, columns=EVENT_COLUMNS)
    status = [s for i in writes for s in i.status]
    if status:
        await conn.copy_records_to_table(
            "device_status_history", records=status, columns=STATUS_COLUMNS
        )
    for item in writes:
        if item.gateway_status is not None:
            t, tenant, gw, _, state, reason = item.gateway_status
            done = await conn.execute(_GATEWAY_STATUS_SQL, t, tenant, gw, state, reason)
            report.status += 1
            # Only a new gateway row fans out: a redelivered frame adds nothing.
            if done == "INSERT 0 1" and fanout is not None:
                report.status += await insert_status_rows(conn, fanout.get(id(item), []))
        if item.gateway_backlog is not None:
            await conn.execute(_GATEWAY_BACKLOG_SQL, *item.gateway_backlog)
    report.quarantined = await insert_rows(conn, writes)
    rejects = [r.record() for i in writes for r in i.rejects]
    if rejects:
        await conn.copy_records_to_table("ingest_rejects", records=rejects, columns=REJECT_COLUMNS)
    ranges = dirty_ranges(with_series, ids)
    if ranges:
        await conn.copy_records_to_table(
            "ingest_dirty",
            records=[
                (r.series_id, to_datetime(r.first_us), to_datetime(r.last_us)) for r in ranges
            ],
            columns=DIRTY_COLUMNS,
        )
    if alerts is not None and writes:
        # Every new batch, readings or not: the rules see each stream's batches in order.
        report.alerts = await alerts.evaluate(conn, writes, ids)
    report.events = len(events)
    report.status += len(status)
    report.rejects = len(rejects)
    report.ranges = ranges
    return report


class Writer:
    """Stages items and flushes them; call :meth:`run` in a task and :meth:`stage` per message."""

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        on_committed: Callable[[list[Staged]], None],
        metrics: CollectorMetrics,
        *,
        on_failed: Callable[[Incoming, BaseException], Staged],
        quota: QuotaSettings,
        max_rows: int = 20_000,
        max_age: float = 0.2,
        max_staged_rows: int = 200_000,
        retry_min: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        self._connect_kwargs = connect_kwargs
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._metrics = metrics
        self.quota = quota
        self.max_rows = max_rows
        self.max_age = max_age
        self.max_staged_rows = max_staged_rows
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._staged: list[Staged] = []
        self._staged_rows = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._conn: asyncpg.Connection | None = None
        self._hooks: list[FlushHook] = []
        self.catalog = SeriesCatalog()
        # Set by the service: rules evaluated on the readings of every flush, in its transaction.
        self.alerts: AlertEngine | None = None
        # Set by the service: the devices behind a gateway, for their rows when it goes offline/online.
        self.gateway_devices: GatewayDevicesLookup | None = None
        self.flushing = False
        # When the current flush attempt started (monotonic), None between flushes: the
        # watchdog stops being fed when a flush hangs beyond its bound.
        self.flush_started: float | None = None
        self.last_commit = time.monotonic()
        self.last_error: str = ""

    def add_flush_hook(self, hook: FlushHook) -> None:
        """Call ``hook(report)`` after every committed flush (before the next one starts)."""
        self._hooks.append(hook)

    @property
    def pending(self) -> int:
        """Items staged and not yet committed."""
        return len(self._staged)

    def stage(self, item: Staged) -> None:
        """Add a processed message to the next flush."""
        # Built here, in the consumer's task, so that it overlaps the previous flush's wait on
        # the database instead of delaying the next flush.
        if item.series:
            # Only when every series id is known already; otherwise the flush builds the rows
            # after resolving the new ids in its transaction.
            ids: dict[SeriesKey, int] = {}
            for s in item.series:
                sid = self.catalog.get(series_key(s))
                if sid is None:
                    break
                ids[series_key(s)] = sid
            else:
                try:
                    item.copy_data = item_copy_data(item, ids)
                except Exception:
                    # Met again inside the flush, where a failing item is isolated and retried.
                    item.copy_data = None
        self._staged.append(item)
        self._staged_rows += item.rows
        if self._staged_rows >= self.max_rows or len(self._staged) == 1:
            self._wake.set()
        if self._staged_rows >= self.max_staged_rows:
            self._room.clear()

    async def room(self) -> None:
        """Wait until staging is below its bound (backpressure while the database is slow)."""
        await self._room.wait()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(**self._connect_kwargs)
            except _DB_ERRORS as exc:
                raise DatabaseUnavailable(f"time-series database: {exc}") from exc
        return self._conn

    async def close(self) -> None:
        """Close the database connection."""
        if self._conn is not None and not self._conn.is_closed():
            try:
                await asyncio.wait_for(self._conn.close(), 2)
            except _DB_ERRORS:
                self._conn.terminate()
        self._conn = None

    async def run(self) -> None:
        """Flush whenever staging is full or its oldest item reaches ``max_age``; until closed."""
        while True:
            if not self._staged:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and self._staged_rows < self.max_rows:
                age = time.monotonic() - self._staged[0].incoming.received
                if age < self.max_age:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.max_age - age)
                    continue
            items, self._staged, self._staged_rows = self._staged, [], 0
            self._room.set()
            await self._flush_until_committed(items)

    def close_intake(self) -> None:
        """Flush what is staged without waiting for the age, then let :meth:`run` return."""
        self._closing = True
        self._wake.set()

    async def _flush_until_committed(self, items: list[Staged]) -> None:
        delay = self.retry_min
        while True:
            try:
                report = await self.flush(items)
                break
            except DatabaseUnavailable as exc:
                self._metrics.db_errors.labels(database="timeseries").inc()
                self.last_error = str(exc)
                log.warning("flush.failed", error=str(exc), items=len(items), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
        self.last_error = ""
        self.last_commit = time.monotonic()
        self._on_committed(items)
        for hook in self._hooks:
            result = hook(report)
            if result is not None:
                await result

    async def _gateway_fanout(self, items: list[Staged]) -> dict[int, list[StatusRow]]:
        """Device rows implied by the gateway status frames among ``items``, keyed by ``id(item)``."""
        out: dict[int, list[StatusRow]] = {}
        if self.gateway_devices is None:
            return out
        for item in items:
            if item.gateway_status is None:
                continue
            t, tenant, gw, _, state, _ = item.gateway_status
            try:
                out[id(item)] = await self.gateway_devices(tenant, gw, state, t)
            except DatabaseUnavailable as exc:
                # Status history must not hold up readings: the gateway's own row is still written.
                log.error("status.fanout_failed", gateway_id=str(gw), state=state, error=str(exc))
        return out

    async def flush(self, items: list[Staged]) -> FlushReport:
        """Write ``items`` in one transaction; isolate an item whose data cannot be written."""
        try:
            return await self._write(items)
        except ItemFailed as exc:
            cause = exc.__cause__ or exc
            if len(items) == 1:
                item = items[0]
                replacement = self._on_failed(item.incoming, cause)
                log.error(
                    "flush.item_failed",
                    error=repr(cause),
                    topic=item.incoming.topic,
                    seq=item.seq,
                    then="retry" if replacement.retry else replacement.reason,
                )
                items[0] = replacement
                return await self._write(items)
            log.warning("flush.isolating", error=repr(cause), items=len(items))
            total = FlushReport()
            for i in range(len(items)):
                part = [items[i]]
                _merge(total, await self.flush(part))
                items[i] = part[0]
            return total

    async def _write(self, items: list[Staged]) -> FlushReport:
        started = time.perf_counter()
        conn = await self._connection()
        fanout = await self._gateway_fanout(items)
        first: dict[Any, Staged] = {}
        for item in items:
            if item.key is not None and not item.retry and item.key not in first:
                first[item.key] = item
        self.flushing = True
        self.flush_started = time.monotonic()
        try:
            async with conn.transaction():
                keyed = list(first.values())
                await apply_quota(conn, keyed, self.quota)
                new: set[Any] = set()
                stored: dict[Any, bytes | None] = {}
                if keyed:
                    rows = await conn.fetch(
                        _LEDGER_SQL,
                        [i.key[0] for i in keyed if i.key],
                        [i.key[1] for i in keyed if i.key],
                        [i.key[2] for i in keyed if i.key],
                        [i.tenant_id for i in keyed],
                        [(i.result or AckResult.OK).value for i in keyed],
                        [i.accepted for i in keyed],
                        [i.rejected for i in keyed],
                        [i.reason for i in keyed],
                        [to_datetime_or_none(i.created) for i in keyed],
                        [i.digest for i in keyed],
                        [i.quarantined for i in keyed],
                    )
                    new = {(r[0], r[1], r[2]) for r in rows}
                    old = [i.key for i in keyed if i.key not in new and i.key is not None]
                    if old:
                        found = await conn.fetch(
                            _DIGESTS_SQL,
                            [k[0] for k in old],
                            [k[1] for k in old],
                            [k[2] for k in old],
                        )
                        stored = {(r[0], r[1], r[2]): r[3] for r in found}
                writes = [
                    i
                    for i in items
                    if not i.retry and (i.key is None or (i.key in new and first[i.key] is i))
                ]
                report = await write_items(conn, writes, fanout, self.catalog, self.alerts)
            self.catalog.commit()
        except DatabaseUnavailable:
            self.catalog.discard()
            raise
        except _DATA_ERRORS as exc:
            self.catalog.discard()
            raise ItemFailed(str(exc)) from exc
        except _DB_ERRORS as exc:
            self.catalog.discard()
            # The connection may be unusable; a new one is made for the retry.
            if self._conn is not None:
                self._conn.terminate()
            self._conn = None
            raise DatabaseUnavailable(f"time-series database: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            self.catalog.discard()
            # Our own code failed on this data (a bug): isolate it rather than stop the writer.
            raise ItemFailed(repr(exc)) from exc
        finally:
            self.flushing = False
            self.flush_started = None
        report.messages = len(items)
        for item in items:
            if item.key is None or item.retry:
                continue
            if item.key in new and first[item.key] is item:
                continue
            earlier = first[item.key].digest if item.key in new else stored.get(item.key)
            if earlier is not None and item.digest is not None and earlier != item.digest:
                item.result, item.reason = AckResult.CONFLICT, Reason.CONFLICT.value
                report.conflicts += 1
                log.warning(
                    "batch.conflict",
                    gateway_id=str(item.key[0]),
                    stream=str(item.key[1]),
                    seq=item.key[2],
                    hint="the gateway reissued a committed seq with other content (its buffer"
                    " was rolled back); it sends the batch again under a new stream",
                )
            else:
                item.result, item.reason = AckResult.DUPLICATE, ""
                report.duplicates += 1
            item.drop_writes()
        report.batches = len(new)
        report.seconds = time.perf_counter() - started
        self._metrics.flush_rows.observe(report.readings)
        self._metrics.flush_seconds.observe(report.seconds)
        self._metrics.duplicates.inc(report.duplicates)
        log.debug(
            "flush.committed",
            messages=report.messages,
            batches=report.batches,
            duplicates=report.duplicates,
            conflicts=report.conflicts,
            readings=report.readings,
            quarantined=report.quarantined,
            rejects=report.rejects,
            seconds=round(report.seconds, 4),
        )
        return report


def _merge(total: FlushReport, part: FlushReport) -> None:
    total.messages += part.messages
    total.batches += part.batches
    total.duplicates += part.duplicates
    total.conflicts += part.conflicts
    total.readings += part.readings
    total.events += part.events
    total.status += part.status
    total.quarantined += part.quarantined
    total.rejects += part.rejects
    total.alerts += part.alerts
    total.seconds += part.seconds
    total.ranges.extend(part.ranges)
