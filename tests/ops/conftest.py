"""Fixtures of the operations tests: migrated databases and child processes cleaned up."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
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


@dataclass
class Site:
    """The registry of a run: one tenant, its gateways and each gateway's devices."""

    tenant: uuid.UUID
    devices: dict[uuid.UUID, list[uuid.UUID]]


async def register_site(
    metadata: str, *, name: str, schema: dict[str, Any], gateways: int, devices: int
) -> Site:
    """A tenant with ``gateways`` gateways of ``devices`` devices each, of one device type."""
    conn = await asyncpg.connect(metadata)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", name)
        schema_id = await conn.fetchval(
            "INSERT INTO schemas (tenant_id, name) VALUES ($1, 'env') RETURNING id", tenant
        )
        await conn.execute(
            "INSERT INTO schema_versions (schema_id, version, json_schema) VALUES ($1, 1, $2::jsonb)",
            schema_id,
            json.dumps(schema),
        )
        dtype = await conn.fetchval(
            "INSERT INTO device_types (tenant_id, name, schema_id) VALUES ($1, 'env', $2) RETURNING id",
            tenant,
            schema_id,
        )
        found: dict[uuid.UUID, list[uuid.UUID]] = {}
        for g in range(gateways):
            gateway = await conn.fetchval(
                "INSERT INTO gateways (tenant_id, name) VALUES ($1, $2) RETURNING id",
                tenant,
                f"gw{g}",
            )
            found[gateway] = [
                await conn.fetchval(
                    "INSERT INTO devices (tenant_id, device_type_id, gateway_id, name) VALUES ($1, $2, $3, $4) RETURNING id",
                    tenant,
                    dtype,
                    gateway,
                    f"gw{g}-dev{d}",
                )
                for d in range(devices)
            ]
    finally:
        await conn.close()
    return Site(tenant, found)
