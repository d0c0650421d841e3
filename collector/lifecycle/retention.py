"""Retention of the hypertables and compression of ``telemetry``, on either TimescaleDB edition.

Community (TSL) edition: native background policies (``add_retention_policy``,
``add_compression_policy``), brought in line with the settings by the ``policies`` job; a policy
whose setting changed is replaced. Apache-2 edition: the ``retention`` job drops whole chunks
older than each table's horizon with ``drop_chunks``; compression does not exist there and is
reported as skipped.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from collector.lifecycle.edition import HYPERTABLES
from collector.lifecycle.settings import CompressionSettings, RetentionSettings

log = structlog.get_logger("collector.lifecycle")

# Segmenting by series keeps one series' readings together, so a compressed chunk still answers
# "this device's metric over this range" by decompressing only the matching segments.
SEGMENT_BY = "series_id"
ORDER_BY = "time DESC"

# The community edition's statements (a test checks that each resolves on the Apache edition too,
# where TimescaleDB refuses them only for the license).
NATIVE_SQL = {
    "add_retention": (
        "SELECT add_retention_policy($1::regclass, drop_after => $2::interval, if_not_exists => true)"
    ),
    "remove_retention": "SELECT remove_retention_policy($1::regclass, if_exists => true)",
    "enable_compression": (
        "ALTER TABLE telemetry SET (timescaledb.compress, "
        f"timescaledb.compress_segmentby = '{SEGMENT_BY}', "
        f"timescaledb.compress_orderby = '{ORDER_BY}')"
    ),
    "add_compression": (
        "SELECT add_compression_policy('telemetry', compress_after => $1::interval, "
        "if_not_exists => true)"
    ),
    "remove_compression": "SELECT remove_compression_policy('telemetry', if_exists => true)",
}


async def drop_old_chunks(conn: asyncpg.Connection, settings: RetentionSettings) -> dict[str, Any]:
    """Drop the chunks wholly older than each hypertable's horizon; return the count per table."""
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
    return {"dropped_chunks": dropped}


async def _policy_config(conn: asyncpg.Connection, table: str, proc: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT job_id, config::text AS config FROM timescaledb_information.jobs "
        "WHERE hypertable_name = $1 AND proc_name = $2",
        table,
        proc,
    )
    if row is None:
        return None
    return {"job_id": row["job_id"], **json.loads(row["config"])}


async def _interval_equals(conn: asyncpg.Connection, text: str, seconds: float) -> bool:
    # The policy's config holds the interval as text ("90 days"): let PostgreSQL compare.
    return bool(
        await conn.fetchval(
            "SELECT $1::text::interval = $2::interval", text, timedelta(seconds=seconds)
        )
    )


async def ensure_native_policies(
    conn: asyncpg.Connection, retention: RetentionSettings, compression: CompressionSettings
) -> dict[str, Any]:
    """Community edition: make the native retention and compression policies match the settings."""
    changed: list[str] = []
    for table, seconds in retention.horizons().items():
        current = await _policy_config(conn, table, "policy_retention")
        wanted = retention.enabled
        if current is not None and (
            not wanted or not await _interval_equals(conn, str(current.get("drop_after")), seconds)
        ):
            await conn.execute(NATIVE_SQL["remove_retention"], table)
            changed.append(f"{table}: retention removed")
            current = None
        if wanted and current is None:
            await conn.execute(NATIVE_SQL["add_retention"], table, timedelta(seconds=seconds))
            changed.append(f"{table}: retention {seconds / 86400:g} d")
    enabled = await conn.fetchval(
        "SELECT compression_enabled FROM timescaledb_information.hypertables "
        "WHERE hypertable_name = 'telemetry'"
    )
    current = await _policy_config(conn, "telemetry", "policy_compression")
    if compression.enabled:
        if not enabled:
            await conn.execute(NATIVE_SQL["enable_compression"])
            changed.append("telemetry: compression enabled")
        if current is not None and not await _interval_equals(
            conn, str(current.get("compress_after")), compression.after
        ):
            await conn.execute(NATIVE_SQL["remove_compression"])
            current = None
        if current is None:
            await conn.execute(NATIVE_SQL["add_compression"], timedelta(seconds=compression.after))
            changed.append(f"telemetry: compression after {compression.after / 86400:g} d")
    elif current is not None:
        # Chunks compressed so far stay compressed; only new compression stops.
        await conn.execute(NATIVE_SQL["remove_compression"])
        changed.append("telemetry: compression policy removed")
    for change in changed:
        log.info("lifecycle.policy_changed", change=change)
    return {"changed": changed}


__all__ = ["HYPERTABLES", "NATIVE_SQL", "drop_old_chunks", "ensure_native_policies"]
