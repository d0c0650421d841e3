"""The move from storage layout 1 keeps every reading, rollup and dirty range, across interruptions."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector import layout, migrations
from collector.lifecycle.rollups import rollup
from tests.lifecycle.conftest import needs_tsl

ROOT = Path(__file__).resolve().parents[2]

TENANTS = [uuid.UUID(int=0xA1), uuid.UUID(int=0xA2)]
DEVICES = [
    (TENANTS[0], uuid.UUID(int=0xD1)),
    (TENANTS[0], uuid.UUID(int=0xD2)),
    (TENANTS[1], uuid.UUID(int=0xD3)),
]
V1_COLUMNS = ("tenant_id", "device_id", "metric", "time", "value", "value_text")

Reading = tuple[uuid.UUID, uuid.UUID, str, datetime, float | None, str | None]


def _first_release_readings(days: int = 3, step: timedelta = timedelta(minutes=2)) -> list[Reading]:
    """What the first release stored: numbers, booleans (1/0), strings and a mixed series."""
    rng = random.Random(20)
    start = (datetime.now(UTC) - timedelta(days=days)).replace(second=0, microsecond=0)
    out: list[Reading] = []
    t = start
    i = 0
    while t < start + timedelta(days=days):
        for tenant, device in DEVICES:
            out.append((tenant, device, "temperature", t, 20 + rng.gauss(0, 2), None))
            out.append((tenant, device, "door", t, float(i % 7 == 0), None))
            out.append((tenant, device, "energy", t, float(i * 3), None))
            if i % 30 == 0:
                out.append(
                    (tenant, device, "mode", t, None, rng.choice(["auto", "manual", "off ✓"]))
                )
            if i % 45 == 0:
                out.append(
                    (tenant, device, "state", t, *((None, "fault") if i % 2 else (1.5, None)))
                )
        t += step
        i += 1
    out.append((DEVICES[0][0], DEVICES[0][1], "noise", start, float("nan"), None))
    return out


def _norm(row: Any) -> tuple[Any, ...]:
    """A row with NaN made comparable and sums rounded (summing order differs)."""
    return tuple(
        "NaN"
        if isinstance(v, float) and math.isnan(v)
        else round(v, 6)
        if isinstance(v, float)
        else v
        for v in row
    )


def _key(r: Any) -> tuple[Any, ...]:
    value = r[4]
    if isinstance(value, float) and math.isnan(value):
        value = "NaN"
    return (r[0], r[1], r[2], r[3], value, r[5])


async def _first_release_database(dsn: str, readings: list[Reading]) -> None:
    """Migrations of the first release, its readings, its rollups and a rollup backlog."""
    await migrations.apply(dsn, "timeseries", target=3)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table("telemetry", records=readings, columns=V1_COLUMNS)
        await conn.execute(
            """
            INSERT INTO metrics (bucket, period, tenant_id, device_id, metric, count, sum, min, max, last)
            SELECT time_bucket('1 hour', time), interval '1 hour', tenant_id, device_id, metric,
                   count(*), sum(value), min(value), max(value), last(value, time)
            FROM telemetry WHERE value IS NOT NULL
            GROUP BY 1, tenant_id, device_id, metric
            """
        )
        await conn.execute(
            """
            INSERT INTO ingest_dirty (tenant_id, device_id, metric, first_time, last_time)
            SELECT tenant_id, device_id, metric, max(time) - interval '10 minutes', max(time)
            FROM telemetry WHERE value IS NOT NULL GROUP BY tenant_id, device_id, metric
            """
        )
    finally:
        await conn.close()


async def _snapshot_v1(conn: asyncpg.Connection) -> tuple[list[Any], list[Any], list[Any]]:
    metrics = await conn.fetch(
        "SELECT bucket, period, tenant_id, device_id, metric, count, sum, min, max, last "
        "FROM metrics_v1 ORDER BY 1, 2, 3, 4, 5"
    )
    dirty = await conn.fetch(
        "SELECT flushed_at, tenant_id, device_id, metric, first_time, last_time "
        "FROM ingest_dirty_v1 ORDER BY 2, 3, 4, 5"
    )
    return [_norm(r) for r in metrics], [tuple(r) for r in dirty], []


async def test_an_interrupted_move_keeps_every_row_rollup_and_dirty_range(scratch_db: str) -> None:
    """Data of the first release, migrated, moved with a stop and a killed connection in between,
    reads back through the new layout with the same rows, values, rollups and dirty ranges."""
    readings = _first_release_readings()
    await _first_release_database(scratch_db, readings)
    await migrations.apply(scratch_db, "timeseries")
    conn = await asyncpg.connect(scratch_db)
    victim = await asyncpg.connect(scratch_db)
    blocker = await asyncpg.connect(scratch_db)
    try:
        assert await layout.pending(conn)
        metrics_v1, dirty_v1, _ = await _snapshot_v1(conn)
        chunks_v1 = await conn.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'telemetry_v1'"
        )
        assert chunks_v1 >= 3

        # Interruption 1: the move stops after its first slice (as the lifecycle job's turn ends).
        first = await layout.move(conn, slice_blocks=40, max_seconds=0)
        assert first["pending"] and first["rows_moved"] > 0

        # Interruption 2: the connection dies in the middle of a slice of readings.
        pid = victim.get_server_pid()
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        before = await conn.fetch("SELECT * FROM layout_move ORDER BY source")
        task = asyncio.create_task(layout.move(victim, slice_blocks=40))
        for _ in range(200):
            waiting = await conn.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await task
        await tx.rollback()
        # Only the slices that committed before the kill count; the interrupted one left nothing.
        after = await conn.fetch("SELECT * FROM layout_move ORDER BY source")
        assert sum(
            r["rows_moved"] for r in after if r["kind"] == "telemetry"
        ) == await conn.fetchval(
            "SELECT (SELECT count(*) FROM telemetry) + (SELECT count(*) FROM telemetry_text)"
        )
        assert sum(r["rows_moved"] for r in after if r["kind"] == "metrics") == len(metrics_v1)
        assert len(before) == len(after)

        lines: list[str] = []
        done = await layout.move(
            conn, slice_blocks=40, on_progress=lambda p: lines.append(p.line())
        )
        assert not done["pending"]
        assert lines and "100.0 %" in lines[-1]
        assert not await layout.pending(conn)
        for table in layout.OLD_TABLES:
            assert await conn.fetchval("SELECT to_regclass($1) IS NULL", table)
        assert 0 == await conn.fetchval("SELECT count(*) FROM layout_move WHERE NOT finished")

        moved = await conn.fetch(
            "SELECT tenant_id, device_id, metric, time, value, value_text FROM readings"
        )
        assert sorted(map(_key, readings)) == sorted(map(_key, moved))
        assert len(readings) == await conn.fetchval(
            "SELECT sum(rows_moved) FROM layout_move WHERE kind = 'telemetry'"
        )
        kinds = dict(
            (r["metric"], r["kind"])
            for r in await conn.fetch("SELECT DISTINCT metric, kind FROM series")
        )
        assert {"temperature": "number", "mode": "text", "door": "number"}.items() <= kinds.items()

        metrics = await conn.fetch(
            "SELECT bucket, period, tenant_id, device_id, metric, count, sum, min, max, last "
            "FROM rollups ORDER BY 1, 2, 3, 4, 5"
        )
        assert metrics_v1 == [_norm(r) for r in metrics]
        dirty = await conn.fetch(
            "SELECT d.flushed_at, s.tenant_id, s.device_id, s.metric, d.first_time, d.last_time "
            "FROM ingest_dirty d JOIN series s ON s.id = d.series_id ORDER BY 2, 3, 4, 5"
        )
        assert dirty_v1 == [tuple(r) for r in dirty]

        # The backlog of dirty ranges is rolled up from the moved readings: the same buckets.
        await rollup(conn, (3600.0,), 1000)
        recomputed = await conn.fetch(
            "SELECT bucket, period, tenant_id, device_id, metric, count, sum, min, max, last "
            "FROM rollups ORDER BY 1, 2, 3, 4, 5"
        )
        assert metrics_v1 == [_norm(r) for r in recomputed]
    finally:
        victim.terminate()
        await blocker.close()
        await conn.close()


async def test_migrate_moves_the_layout_and_prints_progress(
    scratch_db: str, metadata_dsn: str, tmp_path: Path
) -> None:
    """`sensormine-collector migrate` applies 0004 and moves the old rows to the end, saying so."""
    readings = _first_release_readings(days=1, step=timedelta(minutes=5))
    await _first_release_database(scratch_db, readings)
    config = tmp_path / "collector.toml"
    config.write_text(f'[metadata]\ndsn = "{metadata_dsn}"\n[timeseries]\ndsn = "{scratch_db}"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "collector",
        "migrate",
        "--config",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    output = out.decode()
    assert 0 == proc.returncode, output
    assert "timeseries: 0004" in output
    assert "timeseries: layout move finished" in output
    conn = await asyncpg.connect(scratch_db)
    try:
        assert len(readings) == await conn.fetchval("SELECT count(*) FROM readings")
        assert not await layout.pending(conn)
    finally:
        await conn.close()


async def test_a_new_database_has_nothing_to_move(scratch_db: str) -> None:
    """On a fresh installation the empty tables of layout 1 are gone right after the migration."""
    await migrations.apply(scratch_db, "timeseries")
    conn = await asyncpg.connect(scratch_db)
    try:
        assert not await layout.pending(conn)
        assert {"pending": False, "rows_moved": 0} == await layout.move(conn)
    finally:
        await conn.close()


@pytest.mark.tsl
@needs_tsl
async def test_compressed_chunks_of_the_first_layout_are_moved_too(scratch_db: str) -> None:
    """TSL: chunks the first release compressed (segmented by device and metric) are decompressed
    one at a time and moved like the others; every reading arrives."""
    readings = _first_release_readings(days=3, step=timedelta(minutes=5))
    await _first_release_database(scratch_db, readings)
    conn = await asyncpg.connect(scratch_db)
    try:
        await conn.execute(
            "ALTER TABLE telemetry SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'device_id, metric', "
            "timescaledb.compress_orderby = 'time DESC')"
        )
        compressed = await conn.fetch(
            "SELECT compress_chunk(c) FROM show_chunks('telemetry', older_than => now() - interval '1 day') c"
        )
        assert len(compressed) >= 2
        await migrations.apply(scratch_db, "timeseries")
        done = await layout.move(conn, slice_blocks=10)
        assert not done["pending"]
        moved = await conn.fetch(
            "SELECT tenant_id, device_id, metric, time, value, value_text FROM readings"
        )
        assert sorted(map(_key, readings)) == sorted(map(_key, moved))
    finally:
        await conn.close()
