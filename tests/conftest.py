"""Fixtures giving tests real services: the running broker and database, or private ones."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.services import SYSTEM_MQTT, SYSTEM_PG_DSN, MosquittoBroker, PostgresCluster


@pytest.fixture(scope="session")
def mqtt_address() -> tuple[str, int]:
    """Host and port of the machine's Mosquitto (started by ``make setup``)."""
    return SYSTEM_MQTT


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto of the test's own, on a free port, that the test may stop and restart."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the test's own with TimescaleDB preloaded."""
    # Not under pytest's basetemp: that is 0700 root, and the cluster runs as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="sensormine-pg-"))
    cluster = PostgresCluster(workdir)
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


async def create_database(server_dsn: str, prefix: str = "smtest", timescale: bool = True) -> str:
    """Create a uniquely named database on ``server_dsn``'s server; return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _with_database(server_dsn, name)
    if timescale:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "SET client_min_messages = warning; CREATE EXTENSION IF NOT EXISTS timescaledb"
            )
        finally:
            await conn.close()
    return dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop the database at ``dsn``, disconnecting whoever is still on it."""
    name = dsn.rpartition("/")[2]
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def scratch_db() -> AsyncIterator[str]:
    """URL of a fresh database with the timescaledb extension on the machine's PostgreSQL."""
    dsn = await create_database(SYSTEM_PG_DSN)
    try:
        yield dsn
    finally:
        await drop_database(SYSTEM_PG_DSN, dsn)


@pytest.fixture(scope="session")
def timescale_license() -> str:
    """``timescaledb.license`` of the machine's server: ``apache`` or ``timescale``."""

    async def read() -> str:
        dsn = await create_database(SYSTEM_PG_DSN, "smprobe")
        try:
            conn = await asyncpg.connect(dsn)
            try:
                return str(await conn.fetchval("SELECT current_setting('timescaledb.license')"))
            finally:
                await conn.close()
        finally:
            await drop_database(SYSTEM_PG_DSN, dsn)

    return asyncio.run(read())


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the TimescaleDB edition in the test run's header."""

    async def read() -> str:
        try:
            dsn = await create_database(SYSTEM_PG_DSN, "smprobe")
        except Exception as exc:
            return f"unavailable ({exc})"
        try:
            conn = await asyncpg.connect(dsn)
            try:
                row = await conn.fetchrow(
                    "SELECT current_setting('timescaledb.license') AS license, extversion FROM pg_extension WHERE extname = 'timescaledb'"
                )
                return f"{row['extversion']}, timescaledb.license={row['license']}"
            finally:
                await conn.close()
        finally:
            await drop_database(SYSTEM_PG_DSN, dsn)

    return [f"TimescaleDB: {asyncio.run(read())}"]
