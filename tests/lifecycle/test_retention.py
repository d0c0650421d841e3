"""Retention, compression and ledger housekeeping, and the shared job schedule."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from collector.lifecycle.jobs import Job, run_job
from collector.lifecycle.ledger import trim_ledger
from collector.lifecycle.retention import NATIVE_SQL, drop_old_chunks
from collector.lifecycle.settings import (
    DAY,
    LedgerSettings,
    RetentionSettings,
)
from tests.lifecycle.conftest import LICENSE, needs_apache

TENANT = "11111111-1111-4111-8111-111111111111"
DEVICE = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"


async def _fill_telemetry(conn: asyncpg.Connection, days_ago: list[float]) -> None:
    now = datetime.now(UTC)
    await conn.executemany(
        "INSERT INTO telemetry (time, series_id, value) VALUES ($1, 1, 1)",
        [(now - timedelta(days=d),) for d in days_ago],
    )


async def _chunks(conn: asyncpg.Connection, table: str) -> list[tuple[datetime, datetime]]:
    rows = await conn.fetch(
        "SELECT range_start, range_end FROM timescaledb_information.chunks "
        "WHERE hypertable_name = $1 ORDER BY range_start",
        table,
    )
    return [(r["range_start"], r["range_end"]) for r in rows]


async def test_drop_chunks_removes_chunks_past_the_horizon_and_keeps_newer_ones(
    ts: asyncpg.Connection,
) -> None:
    """Both editions: chunks wholly older than 90 days go; every reading inside the horizon stays."""
    await _fill_telemetry(ts, [200, 120, 95, 91, 90.5, 89.9, 30, 1, 0.01])
    before = await _chunks(ts, "telemetry")
    kept_rows = await ts.fetchval(
        "SELECT count(*) FROM telemetry WHERE time >= now() - interval '90 days'"
    )

    done = await drop_old_chunks(ts, RetentionSettings(telemetry=90 * DAY))

    after = await _chunks(ts, "telemetry")
    horizon = datetime.now(UTC) - timedelta(days=90)
    assert [c for c in before if c[1] > horizon] == after
    assert len(before) - len(after) == done["dropped_chunks"]["telemetry"]
    # 200, 120, 95 and 91 days old are always wholly past; 90.5 depends on the time of day.
    assert sum(1 for c in before if c[1] <= horizon) == done["dropped_chunks"]["telemetry"] >= 4
    assert kept_rows == await ts.fetchval(
        "SELECT count(*) FROM telemetry WHERE time >= now() - interval '90 days'"
    )
    assert all(c[1] > horizon for c in after)


async def test_each_table_has_its_own_horizon(ts: asyncpg.Connection) -> None:
    """Events, metrics and status history are trimmed by their own horizons, not telemetry's."""
    now = datetime.now(UTC)
    old = now - timedelta(days=40)
    await _fill_telemetry(ts, [40])
    await ts.execute(
        "INSERT INTO events (time, tenant_id, gateway_id, severity, kind) VALUES ($1, $2, $2, 'info', 'x')",
        old,
        TENANT,
    )
    await ts.execute(
        "INSERT INTO device_status_history (time, tenant_id, gateway_id, device_id, status) VALUES ($1, $2, $2, $3, 'online')",
        old,
        TENANT,
        DEVICE,
    )
    settings = RetentionSettings(
        telemetry=10 * DAY, events=10 * DAY, metrics=10 * DAY, device_status_history=400 * DAY
    )
    if LICENSE == "apache":
        await drop_old_chunks(ts, settings)
    else:
        await ts.execute(
            "SELECT drop_chunks('telemetry', older_than => now() - interval '10 days')"
        )
        await ts.execute("SELECT drop_chunks('events', older_than => now() - interval '10 days')")
    assert 0 == await ts.fetchval("SELECT count(*) FROM telemetry")
    assert 0 == await ts.fetchval("SELECT count(*) FROM events")
    assert 1 == await ts.fetchval("SELECT count(*) FROM device_status_history")


async def test_ledger_and_rejects_older_than_the_horizon_are_removed(
    ts: asyncpg.Connection,
) -> None:
    """Rows received before the horizon go, in slices; younger rows stay."""
    ages = [40, 36, 35.5, 34, 1, 0]
    await ts.executemany(
        "INSERT INTO ingest_ledger (gateway_id, stream, seq, tenant_id, result, received_at) "
        "VALUES ($1, $1, $2, $1, 'ok', now() - $3::interval)",
        [(TENANT, i, timedelta(days=d)) for i, d in enumerate(ages)],
    )
    await ts.executemany(
        "INSERT INTO ingest_rejects (reason, received_at) VALUES ('out_of_range', now() - $1::interval)",
        [(timedelta(days=d),) for d in ages],
    )

    done = await trim_ledger(ts, LedgerSettings(horizon=35 * DAY, delete_rows=2))

    assert {"ingest_ledger": 3, "ingest_rejects": 3} == done["removed"]
    assert [3, 4, 5] == [
        r["seq"] for r in await ts.fetch("SELECT seq FROM ingest_ledger ORDER BY seq")
    ]
    assert 3 == await ts.fetchval("SELECT count(*) FROM ingest_rejects")


async def test_a_job_runs_once_per_interval_across_restarts_and_never_twice_at_once(
    ts: asyncpg.Connection, ts_dsn: str
) -> None:
    """The schedule lives in lifecycle_jobs: a second collector (or a restarted one) finds the job
    not due; while one holds the job's lock, another skips it."""
    runs: list[str] = []
    release = asyncio.Event()
    started = asyncio.Event()

    async def body(conn: asyncpg.Connection) -> dict[str, Any]:
        runs.append("run")
        started.set()
        await release.wait()
        return {"n": len(runs)}

    job = Job("probe", interval=3600, body=body)
    other = await asyncpg.connect(ts_dsn)
    try:
        first = asyncio.create_task(run_job(ts, job, "collector-a"))
        await started.wait()
        while_running = await run_job(other, job, "collector-b")
        release.set()
        done = await first
        # A collector that starts afresh later: its new connection reads the same schedule.
        await other.close()
        other = await asyncpg.connect(ts_dsn)
        after_restart = await run_job(other, job, "collector-b")
    finally:
        await other.close()

    assert ("locked", False) == (while_running.result, while_running.ran)
    assert ("ok", True, {"n": 1}) == (done.result, done.ran, done.detail)
    assert ("not_due", False) == (after_restart.result, after_restart.ran)
    assert 3500 < after_restart.wait <= 3600
    row = await ts.fetchrow("SELECT * FROM lifecycle_jobs WHERE job = 'probe'")
    assert ("ok", "collector-a", 1) == (row["last_result"], row["last_runner"], row["runs"])
    assert ["run"] == runs


async def test_a_failed_job_is_recorded_and_retried_sooner(ts: asyncpg.Connection) -> None:
    """A job whose SQL fails records the error and becomes due again after retry_after."""

    async def body(conn: asyncpg.Connection) -> dict[str, Any]:
        await conn.execute("SELECT * FROM no_such_table")
        return {}

    job = Job("broken", interval=3600, body=body, retry_after=60)
    run = await run_job(ts, job, "c")
    again = await run_job(ts, job, "c")

    assert "error" == run.result
    assert "not_due" == again.result and again.wait <= 60
    row = await ts.fetchrow(
        "SELECT last_result, last_error FROM lifecycle_jobs WHERE job = 'broken'"
    )
    assert "error" == row["last_result"]
    assert "no_such_table" in row["last_error"]


_NATIVE_ARGS: dict[str, tuple[Any, ...]] = {
    "remove_retention": ("telemetry",),
    "remove_compression": ("telemetry",),
    "enable_compression": (),
    "compress_chunk": (),
}


@needs_apache
async def test_native_statements_resolve_and_are_refused_only_for_the_license(
    ts: asyncpg.Connection,
) -> None:
    """The community edition's statements name real functions and arguments: the Apache edition
    parses and binds each of them and refuses it only because of its license."""
    await _fill_telemetry(ts, [3])
    chunk = await ts.fetchval("SELECT show_chunks('telemetry') LIMIT 1")
    assert set(NATIVE_SQL) == set(_NATIVE_ARGS)
    for name, sql in NATIVE_SQL.items():
        args = _NATIVE_ARGS[name] or ((str(chunk),) if "$1" in sql else ())
        with pytest.raises(asyncpg.FeatureNotSupportedError, match='"apache" license'):
            await ts.execute(sql, *args)
