"""Fixtures of the operations tests: migrated databases and child processes cleaned up."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from collector import migrations
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_PG_DSN


@dataclass
class Databases:
    """The run's migrated metadata and time-series databases."""

    metadata: str
    timeseries: str


@pytest.fixture
async def databases() -> AsyncIterator[Databases]:
    """Fresh, migrated metadata and time-series databases on the machine's PostgreSQL."""
    meta = await create_database(SYSTEM_PG_DSN, "smopsmeta", timescale=False)
    ts = await create_database(SYSTEM_PG_DSN, "smopsts", timescale=True)
    try:
        await migrations.apply(meta, "metadata")
        await migrations.apply(ts, "timeseries")
        yield Databases(meta, ts)
    finally:
        await drop_database(SYSTEM_PG_DSN, meta)
        await drop_database(SYSTEM_PG_DSN, ts)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes of the test; any still alive at teardown (a timeout) are killed."""
    spawned: list[subprocess.Popen[bytes]] = []
    yield spawned
    for process in spawned:
        if process.poll() is None:
            process.kill()
            process.wait()
