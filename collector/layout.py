"""Moving readings from storage layout 1 (``telemetry_v1``, ``metrics_v1``, ``ingest_dirty_v1``).

Migration 0004 renamed the tables of layout 1; this module moves their rows into the series
catalog and the narrow tables, a slice of one source chunk's heap pages (a TID range) per
transaction. Each slice resolves the series it needs, inserts its rows and advances the chunk's
``layout_move.next_block`` in the same transaction, so an interruption at any point (a kill, a
database restart) loses nothing and repeats nothing: the next run starts at the first slice that
did not commit. A chunk whose last slice is in is dropped in that same transaction, so disk
space comes back as the move goes.

Order: the rollups (``metrics_v1``) first, then the readings newest chunk first (the data people
look at), then the rollups' to-do list (``ingest_dirty_v1``) last, and the rollup job waits until
everything is in, so that no bucket is recomputed from half-moved readings. On the community
edition a compressed chunk is decompressed before its slices are read.

Run by ``sensormine-collector migrate`` (to the end, with progress) or by the ``layout``
lifecycle job of a running collector (a bounded number of slices per run), under one advisory
lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from collector.lifecycle.jobs import lock_key

log = structlog.get_logger("collector.layout")

LOCK = lock_key("layout")
OLD_TABLES = ("telemetry_v1", "metrics_v1", "ingest_dirty_v1")

_PENDING = "SELECT to_regclass('telemetry_v1') IS NOT NULL OR to_regclass('metrics_v1') IS NOT NULL OR to_regclass('ingest_dirty_v1') IS NOT NULL"

_PLAN = """
INSERT INTO layout_move (source, kind, range_end, blocks)
SELECT format('%I.%I', c.chunk_schema, c.chunk_name), $2, c.range_end, 0
FROM timescaledb_information.chunks c
WHERE c.hypertable_name = $1
ON CONFLICT (source) DO NOTHING
"""

# The rows of one slice; {src} is a chunk, the TID range bounds its heap pages [$1, $2).
_SLICE = "SELECT * FROM {src} WHERE ctid >= format('(%s,0)', $1::bigint)::tid AND ctid < format('(%s,0)', $2::bigint)::tid"

_SERIES_FROM_READINGS = """
INSERT INTO series (tenant_id, device_id, metric, kind, first_seen)
SELECT DISTINCT ON (tenant_id, device_id, metric) tenant_id, device_id, metric,
       CASE WHEN value_text IS NOT NULL THEN 'text' ELSE 'number' END, time
FROM ({slice}) AS r
ORDER BY tenant_id, device_id, metric, time
ON CONFLICT (tenant_id, device_id, metric) DO NOTHING
"""

_MOVE_NUMERIC = """
INSERT INTO telemetry (time, series_id, value)
SELECT r.time, s.id, r.value
FROM ({slice}) AS r
JOIN series s ON s.tenant_id = r.tenant_id AND s.device_id = r.device_id AND s.metric = r.metric
WHERE r.value_text IS NULL AND r.value IS NOT NULL
"""

_MOVE_TEXT = """
INSERT INTO telemetry_text (time, series_id, value)
SELECT r.time, s.id, r.value_text
FROM ({slice}) AS r
JOIN series s ON s.tenant_id = r.tenant_id AND s.device_id = r.device_id AND s.metric = r.metric
WHERE r.value_text IS NOT NULL
"""

_EMPTY_ROWS = "SELECT count(*) FROM ({slice}) AS r WHERE r.value IS NULL AND r.value_text IS NULL"

_SERIES_FROM_KEYS = """
INSERT INTO series (tenant_id, device_id, metric, kind)
SELECT DISTINCT tenant_id, device_id, metric, 'number' FROM ({slice}) AS r
ORDER BY tenant_id, device_id, metric
ON CONFLICT (tenant_id, device_id, metric) DO NOTHING
"""

# Rollups move as they are (a bucket older than the readings' retention cannot be recomputed).
_MOVE_METRICS = """
INSERT INTO metrics (bucket, period, series_id, count, sum, min, max, last)
SELECT r.bucket, r.period, s.id, r.count, r.sum, r.min, r.max, r.last
FROM ({slice}) AS r
JOIN series s ON s.tenant_id = r.tenant_id AND s.device_id = r.device_id AND s.metric = r.metric
ON CONFLICT (series_id, period, bucket) DO NOTHING
"""

_MOVE_DIRTY = """
INSERT INTO ingest_dirty (flushed_at, series_id, first_time, last_time)
SELECT r.flushed_at, s.id, r.first_time, r.last_time
FROM ingest_dirty_v1 AS r
JOIN series s ON s.tenant_id = r.tenant_id AND s.device_id = r.device_id AND s.metric = r.metric
"""


@dataclass(frozen=True)
class Progress:
    """Where the move stands after a slice."""

    sources_done: int
    sources: int
    blocks_done: int
    blocks: int
    rows_moved: int
    seconds: float

    def line(self) -> str:
        """One line for people."""
        share = 100.0 if not self.blocks else 100.0 * self.blocks_done / self.blocks
        return (
            f"layout move: {share:5.1f} % of pages, {self.sources_done}/{self.sources} chunks, "
            f"{self.rows_moved} rows moved, {self.seconds:.0f} s"
        )


async def pending(conn: asyncpg.Connection) -> bool:
    """Whether tables of layout 1 are still there."""
    return bool(await conn.fetchval(_PENDING))


async def _blocks(conn: asyncpg.Connection, source: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::int", source
        )
    )


async def _plan(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        if await conn.fetchval("SELECT to_regclass('metrics_v1') IS NOT NULL"):
            await conn.execute(_PLAN, "metrics_v1", "metrics")
        if await conn.fetchval("SELECT to_regclass('telemetry_v1') IS NOT NULL"):
            await conn.execute(_PLAN, "telemetry_v1", "telemetry")
        for row in await conn.fetch(
            "SELECT source FROM layout_move WHERE NOT finished AND blocks = 0"
        ):
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", row["source"]):
                await conn.execute(
                    "UPDATE layout_move SET blocks = $2 WHERE source = $1",
                    row["source"],
                    await _blocks(conn, row["source"]),
                )


async def _progress(conn: asyncpg.Connection, started: float) -> Progress:
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE finished) AS done, count(*) AS n, "
        "coalesce(sum(CASE WHEN finished THEN blocks ELSE least(next_block, blocks) END), 0) AS bd, "
        "coalesce(sum(blocks), 0) AS b, coalesce(sum(rows_moved), 0) AS rows FROM layout_move"
    )
    assert row is not None
    return Progress(
        int(row["done"]),
        int(row["n"]),
        int(row["bd"]),
        int(row["b"]),
        int(row["rows"]),
        time.monotonic() - started,
    )


async def _decompress_if_needed(conn: asyncpg.Connection, source: str) -> None:
    # Compressed rows live in another table: the chunk's own heap is empty until decompressed.
    compressed = await conn.fetchval(
        "SELECT is_compressed FROM timescaledb_information.chunks "
        "WHERE format('%I.%I', chunk_schema, chunk_name) = $1",
        source,
    )
    if compressed:
        log.info("layout.decompressing", chunk=source)
        async with conn.transaction():
            await conn.execute("SELECT decompress_chunk($1::regclass)", source)
            await conn.execute(
                "UPDATE layout_move SET blocks = $2 WHERE source = $1",
                source,
                await _blocks(conn, source),
            )


async def _slice(conn: asyncpg.Connection, row: asyncpg.Record, slice_blocks: int) -> int:
    """Move one slice of ``row``'s source; return the rows moved."""
    source, kind = row["source"], row["kind"]
    lo = int(row["next_block"])
    hi = lo + slice_blocks
    last = hi >= int(row["blocks"])
    if last:
        # Pages added since planning (there are none: layout 1 is no longer written) or not
        # counted: the last slice takes everything from lo on.
        hi = 2**31
    sql = _SLICE.format(src=source)
    moved = 0
    async with conn.transaction():
        if kind == "telemetry":
            empty = int(await conn.fetchval(_EMPTY_ROWS.format(slice=sql), lo, hi))
            if empty:
                log.warning("layout.rows_without_value", chunk=source, rows=empty)
            await conn.execute(_SERIES_FROM_READINGS.format(slice=sql), lo, hi)
            for statement in (_MOVE_NUMERIC, _MOVE_TEXT):
                status = await conn.execute(statement.format(slice=sql), lo, hi)
                moved += int(status.rsplit(" ", 1)[-1])
        else:
            await conn.execute(_SERIES_FROM_KEYS.format(slice=sql), lo, hi)
            status = await conn.execute(_MOVE_METRICS.format(slice=sql), lo, hi)
            moved += int(status.rsplit(" ", 1)[-1])
        await conn.execute(
            "UPDATE layout_move SET next_block = $2, rows_moved = rows_moved + $3, finished = $4 "
            "WHERE source = $1",
            source,
            min(hi, int(row["blocks"])) if not last else int(row["blocks"]),
            moved,
            last,
        )
        if last:
            # TimescaleDB removes a chunk dropped this way from its catalog too.
            await conn.execute(f"DROP TABLE {source}")
    return moved


async def _finish(conn: asyncpg.Connection) -> None:
    """Move the dirty ranges and drop the emptied tables of layout 1, in one transaction."""
    async with conn.transaction():
        if await conn.fetchval("SELECT to_regclass('ingest_dirty_v1') IS NOT NULL"):
            await conn.execute(
                _SERIES_FROM_KEYS.format(slice="SELECT * FROM ingest_dirty_v1"),
            )
            await conn.execute(_MOVE_DIRTY)
            await conn.execute("DROP TABLE ingest_dirty_v1")
        for table in ("telemetry_v1", "metrics_v1"):
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                await conn.execute(f"DROP TABLE {table}")
    log.info("layout.finished")


async def move(
    conn: asyncpg.Connection,
    *,
    slice_blocks: int = 2000,
    max_seconds: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Move layout 1's rows (all, or for about ``max_seconds``); return what was done.

    Takes the layout advisory lock for the duration; returns ``{"locked": True}`` at once when
    another collector holds it.
    """
    if not await pending(conn):
        return {"pending": False, "rows_moved": 0}
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK):
        return {"pending": True, "locked": True, "rows_moved": 0}
    started = time.monotonic()
    moved = 0
    try:
        await _plan(conn)
        while True:
            row = await conn.fetchrow(
                "SELECT source, kind, next_block, blocks FROM layout_move WHERE NOT finished "
                "ORDER BY kind = 'telemetry', range_end DESC NULLS LAST, source LIMIT 1"
            )
            if row is None:
                await _finish(conn)
                break
            if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", row["source"]):
                # Dropped meanwhile (retention of layout 1 ran before the upgrade finished).
                await conn.execute(
                    "UPDATE layout_move SET finished = true WHERE source = $1", row["source"]
                )
                continue
            if int(row["next_block"]) == 0:
                await _decompress_if_needed(conn, row["source"])
                row = await conn.fetchrow(
                    "SELECT source, kind, next_block, blocks FROM layout_move WHERE source = $1",
                    row["source"],
                )
                assert row is not None
            moved += await _slice(conn, row, slice_blocks)
            if on_progress is not None:
                on_progress(await _progress(conn, started))
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK)
    still = await pending(conn)
    return {"pending": still, "rows_moved": moved, "seconds": round(time.monotonic() - started, 1)}


async def status(conn: asyncpg.Connection) -> Progress | None:
    """Where a pending move stands (``None``: nothing of layout 1 is left)."""
    if not await pending(conn):
        return None
    return await _progress(conn, time.monotonic())
