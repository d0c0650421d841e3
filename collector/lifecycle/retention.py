"""Retention of the hypertables by the collector's own ``retention`` job, on either edition.

Every ``lifecycle.retention.interval`` the job drops, with ``drop_chunks``, the chunks of each
hypertable that lie wholly before its horizon (compressed chunks too). It runs under the job's
advisory lock like every lifecycle job, so nothing depends on TimescaleDB's background
scheduler; native retention policies, where an earlier release or an operator added them, are
removed so that the two do not compete. The horizons a run applied are recorded in its
``lifecycle_jobs`` row, which ``doctor`` compares with the settings.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from collector.lifecycle.edition import HYPERTABLES
from collector.lifecycle.settings import RetentionSettings

log = structlog.get_logger("collector.lifecycle")

# The community edition's statements the lifecycle jobs use (a test checks that each resolves on
# the Apache edition too, where TimescaleDB refuses them only for the license).
NATIVE_SQL = {
    "remove_retention": "SELECT remove_retention_policy($1::regclass, if_exists => true)",
    "remove_compression": "SELECT remove_compression_policy($1::regclass, if_exists => true)",
    "enable_compression": (
        "ALTER TABLE telemetry SET (timescaledb.compress, "
        "timescaledb.compress_segmentby = 'series_id', timescaledb.compress_orderby = 'time')"
    ),
    "compress_chunk": "SELECT compress_chunk($1::regclass)",
}


async def remove_native_policies(conn: asyncpg.Connection) -> list[str]:
    """Remove TimescaleDB retention policies of our hypertables; the collector's job does the work."""
    rows = await conn.fetch(
        "SELECT hypertable_name FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_retention' AND hypertable_name = ANY($1::text[])",
        list(HYPERTABLES),
    )
    removed = [r["hypertable_name"] for r in rows]
    for table in removed:
        await conn.execute(NATIVE_SQL["remove_retention"], table)
        log.info("lifecycle.native_policy_removed", table=table, policy="retention")
    return removed


async def drop_old_chunks(conn: asyncpg.Connection, settings: RetentionSettings) -> dict[str, Any]:
    """Drop the chunks wholly older than each hypertable's horizon; return the count per table."""
    removed = await remove_native_policies(conn)
    dropped: dict[str, Any] = {}
    for table, seconds in settings.horizons().items():
        rows = await conn.fetch(
            "SELECT drop_chunks($1::regclass, older_than => now() - $2::interval)",
            table,
            timedelta(seconds=seconds),
        )
        dropped[table] = len(rows)
        if rows:
            log.info("lifecycle.chunks_dropped", table=table, chunks=len(rows))
    return {
        "dropped_chunks": dropped,
        "horizons": settings.horizons(),
        "native_policies_removed": removed,
    }


__all__ = ["HYPERTABLES", "NATIVE_SQL", "drop_old_chunks", "remove_native_policies"]
