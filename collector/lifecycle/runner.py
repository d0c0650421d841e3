"""The lifecycle task of a running collector: runs each job when it is due, until told to stop.

Jobs, per edition:

- ``rollups`` (both): every ``rollups.lag``, recompute the buckets the writer marked dirty.
- ``retention`` (both): every ``retention.interval``, ``drop_chunks`` past each horizon.
- ``compression`` (community/TSL): every ``compression.interval``, compress the chunks past
  ``compression.after`` (``metrics_after`` for ``metrics``), again those late data made partial.
- ``ledger`` (both): every ``ledger.interval``, trim ``ingest_ledger`` and ``ingest_rejects``.
- ``layout`` (both, only while tables of storage layout 1 remain): move their rows into the
  series catalog and narrow tables (:mod:`collector.layout`); rollups wait until it is done.

Nothing depends on TimescaleDB's background scheduler: the jobs run here, under advisory locks,
and remove native policies of the same kind where they find them. A job whose settings differ
from those its last run applied (recorded in ``lifecycle_jobs``) runs at start, so a settings
change reaches the database at the next start rather than an interval later.

A database that is away only delays the jobs: the task reconnects with backoff and never ends
the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from collector import layout
from collector.lifecycle.compression import compress_old_chunks
from collector.lifecycle.compression import horizons as compression_ages
from collector.lifecycle.edition import Edition, detect
from collector.lifecycle.jobs import Job, JobRun, job_states, run_job
from collector.lifecycle.ledger import trim_ledger
from collector.lifecycle.retention import drop_old_chunks
from collector.lifecycle.rollups import rollup
from collector.lifecycle.settings import LifecycleSettings

if TYPE_CHECKING:
    from collector.settings import Settings

log = structlog.get_logger("collector.lifecycle")

# A pending layout move runs in bounded turns, so that the other jobs are not held up.
LAYOUT_SLICE_SECONDS = 20.0
LAYOUT_INTERVAL = 1.0

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def lifecycle_jobs(
    edition: Edition,
    settings: LifecycleSettings,
    stop: asyncio.Event | None = None,
    *,
    layout_pending: bool = False,
) -> list[Job]:
    """The jobs this edition needs, with their intervals, as configured."""
    jobs: list[Job] = []
    if settings.rollups.enabled:
        r = settings.rollups

        async def rollups(conn: asyncpg.Connection) -> dict[str, Any]:
            if await layout.pending(conn):
                # Buckets recomputed from half-moved readings would be wrong until recomputed.
                return {"dirty_rows": 0, "waiting_for": "layout move"}
            return await rollup(conn, r.periods, r.claim_rows, stop=stop)

        jobs.append(Job("rollups", r.lag, rollups, retry_after=r.lag))
    if settings.retention.enabled:

        async def retention(conn: asyncpg.Connection) -> dict[str, Any]:
            return await drop_old_chunks(conn, settings.retention)

        jobs.append(Job("retention", settings.retention.interval, retention))
    if edition.native_policies and settings.compression.enabled:
        ages = compression_ages(settings.compression)

        async def compression(conn: asyncpg.Connection) -> dict[str, Any]:
            return await compress_old_chunks(conn, ages, stop)

        jobs.append(Job("compression", settings.compression.interval, compression))

    async def ledger(conn: asyncpg.Connection) -> dict[str, Any]:
        return await trim_ledger(conn, settings.ledger)

    jobs.append(Job("ledger", settings.ledger.interval, ledger))
    if layout_pending:

        async def move(conn: asyncpg.Connection) -> dict[str, Any]:
            return await layout.move(conn, max_seconds=LAYOUT_SLICE_SECONDS)

        jobs.append(Job("layout", LAYOUT_INTERVAL, move, retry_after=LAYOUT_INTERVAL))
    return jobs


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))


async def run_lifecycle(
    settings: Settings,
    stop: asyncio.Event,
    *,
    runner: str | None = None,
    connect_kwargs: dict[str, Any] | None = None,
    on_run: Callable[[JobRun], None] | None = None,
) -> None:
    """Run the lifecycle jobs of ``settings.lifecycle`` until ``stop`` is set; ``on_run`` is
    told of every run that happened (for the collector's metrics)."""
    from collector.settings import connect_params

    lc: LifecycleSettings = settings.lifecycle
    if not lc.enabled:
        log.info("lifecycle.disabled")
        await stop.wait()
        return
    kwargs = dict(connect_kwargs or connect_params(settings.timeseries, "timeseries").kwargs())
    kwargs.setdefault("timeout", settings.timeseries.connect_timeout)
    name = runner or settings.mqtt.client_id
    backoff = 1.0
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(**kwargs)
        except _DB_ERRORS as exc:
            log.warning("lifecycle.db_unavailable", error=str(exc), retry_in=backoff)
            await _sleep(stop, backoff)
            backoff = min(backoff * 2, 60.0)
            continue
        try:
            await _run_jobs(conn, lc, stop, name, on_run)
            return
        except _DB_ERRORS as exc:
            log.warning("lifecycle.db_failed", error=str(exc), retry_in=backoff)
            await _sleep(stop, backoff)
            backoff = min(backoff * 2, 60.0)
        finally:
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except (*_DB_ERRORS, asyncio.CancelledError):
                    conn.terminate()
                    raise


def applied_settings(settings: LifecycleSettings) -> dict[str, tuple[str, dict[str, float]]]:
    """Per job, the detail key its runs record and the values these settings make it apply."""
    return {
        "retention": ("horizons", settings.retention.horizons()),
        "compression": ("after", compression_ages(settings.compression)),
    }


async def changed_settings(conn: asyncpg.Connection, settings: LifecycleSettings) -> set[str]:
    """Jobs whose last run applied other values than ``settings`` do (they run at once)."""
    states = await job_states(conn)
    changed: set[str] = set()
    for job, (key, wanted) in applied_settings(settings).items():
        state = states.get(job)
        if state is None or state.last_result != "ok":
            continue
        last = state.last_detail.get(key)
        if last is not None and {k: float(v) for k, v in last.items()} != wanted:
            changed.add(job)
    return changed


async def _run_jobs(
    conn: asyncpg.Connection,
    lc: LifecycleSettings,
    stop: asyncio.Event,
    runner: str,
    on_run: Callable[[JobRun], None] | None = None,
) -> None:
    edition = await detect(conn)
    jobs = lifecycle_jobs(edition, lc, stop, layout_pending=await layout.pending(conn))
    log.info(
        "lifecycle.started",
        edition=edition.license,
        timescaledb=edition.version,
        jobs=[j.name for j in jobs],
    )
    if not edition.native_policies and lc.compression.enabled:
        log.warning(
            "lifecycle.compression_unavailable",
            edition=edition.license,
            detail="telemetry stays uncompressed: compression needs the community (TSL) edition",
        )
    next_at = {job.name: 0.0 for job in jobs}
    force = await changed_settings(conn, lc)
    if force:
        log.info("lifecycle.settings_changed", jobs=sorted(force))
    while not stop.is_set():
        for job in jobs:
            if stop.is_set():
                return
            if next_at[job.name] <= time.monotonic():
                try:
                    run = await run_job(conn, job, runner, force=job.name in force)
                    if run.ran:
                        force.discard(job.name)
                    wait = run.wait
                    if run.ran and on_run is not None:
                        on_run(run)
                except _DB_ERRORS:
                    raise
                except Exception:
                    # A defect in one job must not end the collector nor starve the other jobs.
                    log.exception("lifecycle.job_crashed", job=job.name)
                    wait = job.retry_after
                next_at[job.name] = time.monotonic() + max(wait, 1.0)
        await _sleep(stop, min(next_at.values()) - time.monotonic())
