"""The collector's lifecycle task: runs the edition's jobs, survives a missing database, stops on time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import asyncpg
from structlog.testing import capture_logs

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


async def _logged(logs: list[MutableMapping[str, Any]], event: str, times: int = 1) -> None:
    """Wait (20 s at most) until ``event`` has been logged ``times`` times."""
    deadline = time.monotonic() + 20
    while sum(entry["event"] == event for entry in logs) < times:
        assert time.monotonic() < deadline, f"{event} not logged {times} times: {logs}"
        await asyncio.sleep(0.05)


async def test_an_unreachable_database_only_delays_the_jobs(ts_dsn: str) -> None:
    """With no database listening the task keeps retrying quietly and still stops when told."""
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(run_lifecycle(_settings(dsn), stop))
        await _logged(logs, "lifecycle.db_unavailable", times=2)  # tried, waited, tried again
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
    assert task.exception() is None
    assert {"warning"} == {e["log_level"] for e in logs if e["event"] == "lifecycle.db_unavailable"}


async def test_a_disabled_lifecycle_runs_nothing(ts: asyncpg.Connection, ts_dsn: str) -> None:
    """enabled = false: the task says so, idles until stopped and records no job."""
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(run_lifecycle(_settings(ts_dsn, enabled=False), stop))
        await _logged(logs, "lifecycle.disabled")
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
    assert ["lifecycle.disabled"] == [e["event"] for e in logs]
    assert 0 == await ts.fetchval("SELECT count(*) FROM lifecycle_jobs")


async def test_a_changed_setting_is_applied_at_the_next_start(
    ts: asyncpg.Connection, ts_dsn: str
) -> None:
    """Retention ran with 90 days an instant ago (not due for an hour); a collector started with
    30 days runs it at once with the new horizon instead of waiting for its interval."""

    async def run_until(settings: Settings, done: object) -> list[str]:
        """Run the task until retention's last run is ``done`` (runs, horizon) and a whole round
        has gone by: the ledger job, made due now, comes after retention in every round."""
        await ts.execute("DELETE FROM lifecycle_jobs WHERE job = 'ledger'")
        stop = asyncio.Event()
        ran: list[str] = []
        task = asyncio.create_task(
            run_lifecycle(settings, stop, runner="runner-test", on_run=lambda r: ran.append(r.job))
        )
        deadline = time.monotonic() + 20
        while "ledger" not in ran or (await retention()) != done:
            assert time.monotonic() < deadline, f"ran {ran}, retention {await retention()}"
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 5)
        return ran

    async def retention() -> tuple[int, str] | None:
        row = await ts.fetchrow(
            "SELECT runs, last_detail->'horizons'->>'telemetry' AS h FROM lifecycle_jobs "
            "WHERE job = 'retention' AND last_result = 'ok'"
        )
        return None if row is None else (row["runs"], row["h"])

    await run_until(_settings(ts_dsn), (1, str(90 * 86400.0)))
    # Started again with the same settings: a round goes by and retention is not run again.
    assert "retention" not in await run_until(_settings(ts_dsn), (1, str(90 * 86400.0)))
    assert 1 == await ts.fetchval("SELECT runs FROM lifecycle_jobs WHERE job = 'retention'")

    await run_until(_settings(ts_dsn, retention={"telemetry": "30d"}), (2, str(30 * 86400.0)))

    row = await ts.fetchrow(
        "SELECT runs, last_detail->'horizons'->>'telemetry' AS h FROM lifecycle_jobs "
        "WHERE job = 'retention'"
    )
    assert (2, str(30 * 86400.0)) == (row["runs"], row["h"])
