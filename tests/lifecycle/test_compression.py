"""Compression and retention by the collector's own jobs on the community (TSL) edition.

These run where ``timescaledb.license`` is ``timescale`` (see DEVELOPERS.md: a private
PostgreSQL with the community edition, selected with ``SENSORMINE_TEST_PG``); on the Apache-2
edition they are skipped with that reason.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from collector.lifecycle.compression import compress_all, compress_old_chunks, horizons
from collector.lifecycle.retention import drop_old_chunks
from collector.lifecycle.rollups import rollup
from collector.lifecycle.settings import DAY, CompressionSettings, RetentionSettings
from tests.lifecycle.conftest import needs_tsl, write_readings

pytestmark = [pytest.mark.tsl, needs_tsl]

TENANT = uuid.UUID(int=0x7C)
DEVICES = [uuid.UUID(int=0xD0 + i) for i in range(4)]
SETTINGS = CompressionSettings(after=7 * DAY, metrics_after=30 * DAY)


def _start() -> datetime:
    return (datetime.now(UTC) - timedelta(days=12)).replace(minute=0, second=0, microsecond=0)


async def _fill(ts: asyncpg.Connection, days: int = 10) -> None:
    """Ten days of readings every five minutes: four devices, a float, a counter and a boolean."""
    start = _start()
    for n, device in enumerate(DEVICES):
        steps = range(days * 24 * 12)
        temps = [(start + timedelta(minutes=5 * i), 20 + n + (i % 17) / 10) for i in steps]
        counts = [(start + timedelta(minutes=5 * i), float(1000 * n + i)) for i in steps]
        doors = [(start + timedelta(minutes=5 * i), (i // 50) % 2 == 0) for i in steps]
        for metric, points in (("temperature", temps), ("count", counts), ("door", doors)):
            await write_readings(ts, TENANT, device, metric, points)
    await rollup(ts, (60.0, 3600.0), 100_000)


async def _checksums(
    ts: asyncpg.Connection, table: str = "telemetry"
) -> dict[str, tuple[int, str]]:
    """Per chunk (by its time range): the row count and an md5 of its rows in key order."""
    time_column = "bucket" if table == "metrics" else "time"
    rows = await ts.fetch(
        f"""
        SELECT c.range_start,
               (SELECT count(*) FROM {table} t
                 WHERE t.{time_column} >= c.range_start AND t.{time_column} < c.range_end) AS n,
               (SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t
                 WHERE t.{time_column} >= c.range_start AND t.{time_column} < c.range_end) AS digest
        FROM timescaledb_information.chunks c WHERE c.hypertable_name = $1
        """,
        table,
    )
    return {r["range_start"].isoformat(): (int(r["n"]), r["digest"]) for r in rows}


async def _compressed(ts: asyncpg.Connection, table: str) -> list[bool]:
    rows = await ts.fetch(
        "SELECT is_compressed FROM timescaledb_information.chunks WHERE hypertable_name = $1 "
        "ORDER BY range_start",
        table,
    )
    return [bool(r["is_compressed"]) for r in rows]


async def test_the_job_compresses_old_chunks_by_series_and_changes_no_value(
    ts: asyncpg.Connection,
) -> None:
    """Chunks older than `after` become compressed, segmented by series_id and ordered by time;
    every chunk's rows (count and checksum) are exactly what they were; newer chunks are left."""
    await _fill(ts)
    before = await _checksums(ts)
    metrics_before = await _checksums(ts, "metrics")

    done = await compress_old_chunks(ts, horizons(SETTINGS))

    assert done["compressed_chunks"]["telemetry"] >= 4
    flags = await _compressed(ts, "telemetry")
    assert any(flags) and not all(flags)
    assert sum(flags) == done["compressed_chunks"]["telemetry"]
    assert before == await _checksums(ts)
    assert metrics_before == await _checksums(ts, "metrics")
    segment = await ts.fetch(
        "SELECT attname FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = 'telemetry' AND segmentby_column_index IS NOT NULL"
    )
    assert ["series_id"] == [r["attname"] for r in segment]
    order = await ts.fetch(
        "SELECT attname FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = 'telemetry' AND orderby_column_index IS NOT NULL"
    )
    assert ["time"] == [r["attname"] for r in order]
    # A second run finds nothing to do.
    again = await compress_old_chunks(ts, horizons(SETTINGS))
    assert (
        0 == sum(again["compressed_chunks"].values()) == sum(again["recompressed_chunks"].values())
    )


async def test_late_readings_into_a_compressed_chunk_are_stored_once_rolled_up_and_recompressed(
    ts: asyncpg.Connection,
) -> None:
    """A gateway's backlog landing in a compressed chunk is stored once, its buckets are rolled up
    from the compressed data, and the next compression run compresses the chunk again."""
    await _fill(ts)
    await compress_old_chunks(ts, horizons(SETTINGS))
    late_at = _start() + timedelta(days=1, minutes=2, seconds=30)  # between two stored readings
    device = DEVICES[0]
    await write_readings(ts, TENANT, device, "temperature", [(late_at, 99.0)])
    hour = late_at.replace(minute=0, second=0)

    await rollup(ts, (60.0, 3600.0), 1000)

    stored = await ts.fetchval(
        "SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'temperature' AND time = $2",
        device,
        late_at,
    )
    assert 1 == stored
    bucket = await ts.fetchrow(
        "SELECT count, max FROM rollups WHERE device_id = $1 AND metric = 'temperature' "
        "AND period = interval '1 hour' AND bucket = $2",
        device,
        hour,
    )
    assert (13, 99.0) == (bucket["count"], bucket["max"])
    before = await _checksums(ts)

    done = await compress_old_chunks(ts, horizons(SETTINGS))

    assert 1 == done["recompressed_chunks"]["telemetry"]
    assert before == await _checksums(ts)
    partial = await ts.fetchval(
        "SELECT count(*) FROM _timescaledb_catalog.chunk ch "
        "JOIN _timescaledb_catalog.hypertable h ON h.id = ch.hypertable_id "
        "WHERE h.table_name = 'telemetry' AND ch.status & 8 <> 0"
    )
    assert 0 == partial


async def test_retention_drops_compressed_chunks_and_removes_native_policies(
    ts: asyncpg.Connection,
) -> None:
    """The retention job drops compressed chunks past the horizon, keeps the rest, and removes
    native policies so that TimescaleDB's scheduler does not compete with the collector."""
    await _fill(ts)
    await compress_old_chunks(ts, horizons(SETTINGS))
    # Not due for an hour: TimescaleDB's scheduler must not change chunks during the test.
    await ts.execute(
        "SELECT add_retention_policy('events', drop_after => interval '1 day', "
        "initial_start => now() + interval '1 hour')"
    )
    await ts.execute(
        "SELECT add_compression_policy('telemetry', compress_after => interval '1 day', "
        "initial_start => now() + interval '1 hour')"
    )
    compressed_before = sum(await _compressed(ts, "telemetry"))

    done = await drop_old_chunks(ts, RetentionSettings(telemetry=9 * DAY))
    await compress_old_chunks(ts, horizons(SETTINGS))

    assert done["dropped_chunks"]["telemetry"] >= 2
    assert ["events"] == done["native_policies_removed"]
    assert 0 == await ts.fetchval(
        "SELECT count(*) FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL"
    )
    assert (
        sum(await _compressed(ts, "telemetry"))
        == compressed_before - done["dropped_chunks"]["telemetry"]
    )
    oldest = await ts.fetchval("SELECT min(time) FROM telemetry")
    assert oldest >= datetime.now(UTC) - timedelta(days=10)


async def test_late_readings_roll_up_into_compressed_metrics_chunks(ts: asyncpg.Connection) -> None:
    """A backlog older than `metrics_after` updates its buckets inside compressed `metrics` chunks
    (the upsert meets compressed rows): the bucket is right, no row is doubled."""
    await _fill(ts, days=2)
    await compress_all(ts)
    assert any(await _compressed(ts, "metrics"))
    buckets = await ts.fetchval("SELECT count(*) FROM metrics")
    late_at = _start() + timedelta(hours=5, minutes=2, seconds=30)
    await write_readings(ts, TENANT, DEVICES[1], "temperature", [(late_at, -5.0)])

    await rollup(ts, (60.0, 3600.0), 1000)

    hour = await ts.fetchrow(
        "SELECT count, min FROM rollups WHERE device_id = $1 AND metric = 'temperature' "
        "AND period = interval '1 hour' AND bucket = $2",
        DEVICES[1],
        late_at.replace(minute=0, second=0),
    )
    assert (13, -5.0) == (hour["count"], hour["min"])
    # One new 1-minute bucket (the late reading's minute had none); nothing else added.
    assert buckets + 1 == await ts.fetchval("SELECT count(*) FROM metrics")
