"""Shared bookkeeping of the lifecycle jobs: one runner at a time, a schedule that survives restarts.

Every job runs on one connection that first takes the job's advisory lock with
``pg_try_advisory_lock``: a second collector that finds it taken skips the job (the holder is
running it). Under the lock, the job's row in ``lifecycle_jobs`` says when it last started; the
job runs only when its interval has passed since then (or its last run failed and the retry
delay has passed), so a collector that restarts does not run retention again right away, and
two collectors never run the same job twice in a row. Database time (``now()``) is the clock,
so the collectors' own clocks do not matter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("collector.lifecycle")

JobBody = Callable[[asyncpg.Connection], Awaitable[dict[str, Any]]]


def lock_key(job: str) -> int:
    """The advisory lock key of ``job``: stable across collector versions and processes."""
    digest = hashlib.sha256(f"sensormine.lifecycle.{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class Job:
    """One lifecycle job: its name, how often it runs, and what it does."""

    name: str
    interval: float
    body: JobBody
    retry_after: float = 60.0


@dataclass(frozen=True)
class JobRun:
    """What one attempt at a job did: ``ran`` is False when it was locked or not due."""

    job: str
    ran: bool
    result: str
    detail: dict[str, Any]
    wait: float


async def _due_in(conn: asyncpg.Connection, job: Job) -> float:
    """Seconds until ``job`` is due (0 or less: due now), from its row in ``lifecycle_jobs``."""
    await conn.execute(
        "INSERT INTO lifecycle_jobs (job) VALUES ($1) ON CONFLICT (job) DO NOTHING", job.name
    )
    row = await conn.fetchrow(
        "SELECT last_result, extract(epoch FROM now() - last_started) AS age "
        "FROM lifecycle_jobs WHERE job = $1",
        job.name,
    )
    assert row is not None
    if row["age"] is None:
        return 0.0
    # "running" here means a run that never finished (its collector died): retry like an error.
    wait = job.interval if row["last_result"] == "ok" else min(job.retry_after, job.interval)
    return wait - float(row["age"])


async def run_job(
    conn: asyncpg.Connection, job: Job, runner: str, *, force: bool = False
) -> JobRun:
    """Run ``job`` on ``conn`` if it is due and no other collector holds it; record the outcome."""
    key = lock_key(job.name)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        return JobRun(job.name, False, "locked", {}, job.interval)
    try:
        due_in = await _due_in(conn, job)
        if due_in > 0 and not force:
            return JobRun(job.name, False, "not_due", {}, due_in)
        await conn.execute(
            "UPDATE lifecycle_jobs SET last_started = now(), last_result = 'running', "
            "last_runner = $2, runs = runs + 1 WHERE job = $1",
            job.name,
            runner,
        )
        try:
            detail = await job.body(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("lifecycle.job_failed", job=job.name, error=error)
            if not conn.is_closed():
                await conn.execute(
                    "UPDATE lifecycle_jobs SET last_finished = now(), last_result = 'error', "
                    "last_error = $2 WHERE job = $1",
                    job.name,
                    error[:2000],
                )
            return JobRun(
                job.name, True, "error", {"error": error}, min(job.retry_after, job.interval)
            )
        await conn.execute(
            "UPDATE lifecycle_jobs SET last_finished = now(), last_result = 'ok', last_error = '', "
            "last_detail = $2::jsonb WHERE job = $1",
            job.name,
            json.dumps(detail, default=str),
        )
        # A rollup run with nothing to do happens every few seconds: not worth an info line.
        idle = detail.get("dirty_rows") == 0
        (log.debug if idle else log.info)("lifecycle.job_done", job=job.name, **detail)
        return JobRun(job.name, True, "ok", detail, job.interval)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", key)


@dataclass(frozen=True)
class JobState:
    """A job's row in ``lifecycle_jobs``, as ``doctor`` shows it."""

    job: str
    last_started: datetime | None
    last_finished: datetime | None
    last_result: str
    last_error: str
    last_detail: dict[str, Any]
    last_runner: str
    runs: int
    age: float | None


async def job_states(conn: asyncpg.Connection) -> dict[str, JobState]:
    """Every recorded job's last run, keyed by job name."""
    rows = await conn.fetch(
        "SELECT job, last_started, last_finished, last_result, last_error, last_detail::text AS detail, "
        "last_runner, runs, extract(epoch FROM now() - last_finished) AS age FROM lifecycle_jobs"
    )
    return {
        r["job"]: JobState(
            r["job"],
            r["last_started"],
            r["last_finished"],
            r["last_result"],
            r["last_error"],
            json.loads(r["detail"]),
            r["last_runner"],
            int(r["runs"]),
            None if r["age"] is None else float(r["age"]),
        )
        for r in rows
    }
