"""Fixtures of the lifecycle tests: migrated time-series and metadata databases, the edition."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from collector import migrations
from collector.series import SeriesCatalog, value_kind
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_PG_DSN


async def _read_license() -> str:
    try:
        dsn = await create_database(SYSTEM_PG_DSN, "smprobe")
    except (OSError, asyncpg.PostgresError):
        return "unavailable"
    try:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SELECT current_setting('timescaledb.license')"))
        finally:
            await conn.close()
    finally:
        await drop_database(SYSTEM_PG_DSN, dsn)


# Read once at collection, so that TSL-only tests are skipped with the reason in the report.
LICENSE = asyncio.run(_read_license())
needs_tsl = pytest.mark.skipif(
    LICENSE != "timescale",
    reason=f"needs the community (TSL) edition of TimescaleDB: timescaledb.license is {LICENSE!r} here",
)
needs_apache = pytest.mark.skipif(
    LICENSE != "apache",
    reason=f"tests the Apache-2 edition's path: timescaledb.license is {LICENSE!r} here",
)


@pytest.fixture
async def ts_dsn(scratch_db: str) -> str:
    """A scratch time-series database with the collector's migrations applied."""
    await migrations.apply(scratch_db, "timeseries")
    return scratch_db


@pytest.fixture
async def ts(ts_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the migrated time-series database."""
    conn = await asyncpg.connect(ts_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def metadata_dsn() -> AsyncIterator[str]:
    """A scratch metadata database with the collector's migrations applied."""
    dsn = await create_database(SYSTEM_PG_DSN, "smmeta", timescale=False)
    try:
        await migrations.apply(dsn, "metadata")
        yield dsn
    finally:
        await drop_database(SYSTEM_PG_DSN, dsn)


async def write_readings(
    conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    device_id: uuid.UUID,
    metric: str,
    points: list[tuple[datetime, Any]],
) -> None:
    """Write readings and their dirty range in one transaction, as the collector's writer does."""
    key = (tenant_id, device_id, metric)
    times = [t for t, _ in points]
    async with conn.transaction():
        ids = await SeriesCatalog().resolve(conn, {key: value_kind(v for _, v in points)})
        sid = ids[key]
        numbers = [(t, sid, float(v)) for t, v in points if not isinstance(v, str)]
        texts = [(t, sid, v) for t, v in points if isinstance(v, str)]
        if numbers:
            await conn.copy_records_to_table(
                "telemetry", records=numbers, columns=("time", "series_id", "value")
            )
        if texts:
            await conn.copy_records_to_table(
                "telemetry_text", records=texts, columns=("time", "series_id", "value")
            )
        await conn.execute(
            "INSERT INTO ingest_dirty (series_id, first_time, last_time) VALUES ($1, $2, $3)",
            sid,
            min(times),
            max(times),
        )
