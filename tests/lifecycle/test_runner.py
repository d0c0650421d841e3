"""The collector's lifecycle task: runs the edition's jobs, survives a missing database, stops on time."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from collector.lifecycle.runner import run_lifecycle
from collector.settings import Settings, parse_settings
from tests.lifecycle.conftest import LICENSE
from tests.services import free_port


def _settings(ts_dsn: str, **lifecycle: object) -> Settings:
    return parse_settings(
        {
            "metadata": {"dsn": ts_dsn},
            "timeseries": {"dsn": ts_dsn, "connect_timeout": "2s"},
            "lifecycle": lifecycle,
        }
    )


async def test_the_task_runs_every_job_of_the_edition_and_stops_when_told(
    ts: asyncpg.Connection, ts_dsn: str
) -> None:
    """Started against a migrated database, each job runs once and is recorded; stop ends the task."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_lifecycle(_settings(ts_dsn), stop, runner="runner-test"))
    expected = {"rollups", "ledger", "retention"} | (
        {"compression"} if LICENSE == "timescale" else set()
    )
    deadline = time.monotonic() + 20
    rows: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        rows = await ts.fetch("SELECT job, last_result, last_runner FROM lifecycle_jobs")
        if {r["job"] for r in rows if r["last_result"] == "ok"} >= expected:
            break
        await asyncio.sleep(0.1)
    stopped = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 5)

    assert time.monotonic() - stopped < 2
    assert {(job, "ok", "runner-test") for job in expected} == {
        (r["job"], r["last_result"], r["last_runner"]) for r in rows
    }


async def test_an_unreachable_database_only_delays_the_jobs(ts_dsn: str) -> None:
    """With no database listening the task keeps retrying quietly and still stops when told."""
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    stop = asyncio.Event()
    task = asyncio.create_task(run_lifecycle(_settings(dsn), stop))
    await asyncio.sleep(1.5)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert task.exception() is None


async def test_a_disabled_lifecycle_runs_nothing(ts: asyncpg.Connection, ts_dsn: str) -> None:
    """enabled = false: the task idles until stopped and records no job."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_lifecycle(_settings(ts_dsn, enabled=False), stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert 0 == await ts.fetchval("SELECT count(*) FROM lifecycle_jobs")


async def test_a_changed_setting_is_applied_at_the_next_start(
    ts: asyncpg.Connection, ts_dsn: str
) -> None:
    """Retention ran with 90 days an instant ago (not due for an hour); a collector started with
    30 days runs it at once with the new horizon instead of waiting for its interval."""

    async def run_until(settings: Settings, done: object, linger: float = 0.0) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_lifecycle(settings, stop, runner="runner-test"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            row = await ts.fetchrow(
                "SELECT runs, last_detail->'horizons'->>'telemetry' AS h FROM lifecycle_jobs "
                "WHERE job = 'retention' AND last_result = 'ok'"
            )
            if row is not None and (row["runs"], row["h"]) == done:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(linger)  # time for a run that should not happen
        stop.set()
        await asyncio.wait_for(task, 5)

    await run_until(_settings(ts_dsn), (1, str(90 * 86400.0)))
    await run_until(_settings(ts_dsn), (1, str(90 * 86400.0)), linger=1.5)
    assert 1 == await ts.fetchval("SELECT runs FROM lifecycle_jobs WHERE job = 'retention'")

    await run_until(_settings(ts_dsn, retention={"telemetry": "30d"}), (2, str(30 * 86400.0)))

    row = await ts.fetchrow(
        "SELECT runs, last_detail->'horizons'->>'telemetry' AS h FROM lifecycle_jobs "
        "WHERE job = 'retention'"
    )
    assert (2, str(30 * 86400.0)) == (row["runs"], row["h"])
