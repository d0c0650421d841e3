"""Compression of old chunks by the collector's own ``compression`` job (community/TSL edition).

Readings are segmented by ``series_id`` and ordered by ``time``: a compressed chunk still
answers "this series over this range" by decompressing only that series' segments, and the
values of one series, side by side in time order, are what TimescaleDB's delta and Gorilla
encodings shrink best. ``metrics`` is compressed too, segmented by ``series_id, period``.

The job compresses every chunk whose whole range is older than the table's ``after``, one chunk
per transaction, and compresses again the chunks that late readings made partial (inserts into
a compressed chunk land uncompressed beside it until then). It runs under the job's advisory
lock like every lifecycle job, so nothing depends on TimescaleDB's background scheduler; native
compression policies, where an earlier release or an operator added them, are removed so that
the two do not compete.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from collector.lifecycle.settings import CompressionSettings

log = structlog.get_logger("collector.lifecycle")

# table: (segment by, order by)
LAYOUT: dict[str, tuple[str, str]] = {
    "telemetry": ("series_id", "time"),
    "telemetry_text": ("series_id", "time"),
    "metrics": ("series_id, period", "bucket"),
}

# Bits of _timescaledb_catalog.chunk.status (TimescaleDB 2.x): 1 compressed, 8 partially
# compressed (rows were inserted after compression).
_COMPRESSED = 1
_PARTIAL = 8

_DUE = f"""
SELECT format('%I.%I', ch.schema_name, ch.table_name) AS chunk, ch.status
FROM _timescaledb_catalog.chunk ch
JOIN _timescaledb_catalog.hypertable h ON h.id = ch.hypertable_id
JOIN timescaledb_information.chunks c
  ON c.chunk_schema = ch.schema_name AND c.chunk_name = ch.table_name
WHERE h.schema_name = current_schema() AND h.table_name = $1 AND NOT ch.dropped
  AND c.range_end <= now() - $2::interval
  AND (ch.status & {_COMPRESSED} = 0 OR ch.status & {_PARTIAL} <> 0)
ORDER BY c.range_end
"""


def horizons(settings: CompressionSettings) -> dict[str, float]:
    """Table to the age (seconds) after which its chunks are compressed."""
    return {
        "telemetry": settings.after,
        "telemetry_text": settings.after,
        "metrics": settings.metrics_after,
    }


async def enable(conn: asyncpg.Connection, table: str) -> bool:
    """Turn compression on for ``table`` with our segmenting and order; True if it changed."""
    enabled = await conn.fetchval(
        "SELECT compression_enabled FROM timescaledb_information.hypertables "
        "WHERE hypertable_schema = current_schema() AND hypertable_name = $1",
        table,
    )
    if enabled:
        return False
    segment_by, order_by = LAYOUT[table]
    await conn.execute(
        f"ALTER TABLE {table} SET (timescaledb.compress, "
        f"timescaledb.compress_segmentby = '{segment_by}', "
        f"timescaledb.compress_orderby = '{order_by}')"
    )
    log.info("lifecycle.compression_enabled", table=table, segment_by=segment_by)
    return True


async def remove_native_policies(conn: asyncpg.Connection) -> list[str]:
    """Remove TimescaleDB compression policies of our tables; the collector's job does the work."""
    removed: list[str] = []
    for table in LAYOUT:
        job = await conn.fetchval(
            "SELECT job_id FROM timescaledb_information.jobs "
            "WHERE hypertable_name = $1 AND proc_name = 'policy_compression'",
            table,
        )
        if job is not None:
            await conn.execute("SELECT remove_compression_policy($1::regclass)", table)
            removed.append(table)
            log.info("lifecycle.native_policy_removed", table=table, policy="compression")
    return removed


async def compress_old_chunks(
    conn: asyncpg.Connection,
    ages: dict[str, float],
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Compress (or compress again) every chunk older than its table's age in ``ages`` (seconds,
    see :func:`horizons`); return the counts."""
    compressed: dict[str, int] = {}
    recompressed: dict[str, int] = {}
    enabled = [t for t in LAYOUT if await enable(conn, t)]
    removed = await remove_native_policies(conn)
    for table, seconds in ages.items():
        compressed[table] = recompressed[table] = 0
        for row in await conn.fetch(_DUE, table, timedelta(seconds=seconds)):
            if stop is not None and stop.is_set():
                break
            partial = bool(row["status"] & _COMPRESSED) and bool(row["status"] & _PARTIAL)
            # compress_chunk on a partially compressed chunk merges the rows inserted since.
            await conn.execute("SELECT compress_chunk($1::regclass)", row["chunk"])
            if partial:
                recompressed[table] += 1
            else:
                compressed[table] += 1
    done = {k: v for k, v in compressed.items() if v}
    again = {k: v for k, v in recompressed.items() if v}
    if done or again:
        log.info("lifecycle.chunks_compressed", compressed=done, recompressed=again)
    return {
        "compressed_chunks": compressed,
        "recompressed_chunks": recompressed,
        "after": dict(ages),
        "compression_enabled": enabled,
        "native_policies_removed": removed,
    }


async def compress_all(conn: asyncpg.Connection) -> dict[str, Any]:
    """Compress every chunk of the reading tables whatever its age (benchmarks, tests)."""
    return await compress_old_chunks(conn, dict.fromkeys(LAYOUT, -3650 * 86400.0))
