"""Fixtures of the collector tests: migrated databases, registry rows, a test gateway over MQTT."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector import migrations
from collector.settings import Settings, parse_settings
from protocol import Ack, Batch, Series, TopicKind, build_topic, decode_ack, encode_frame
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_PG_DSN

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "temperature": {"type": "number", "minimum": -40, "maximum": 85, "unit": "°C"},
        "humidity": {"type": "number", "minimum": 0, "exclusiveMaximum": 100.5},
        "count": {"type": "integer", "minimum": 0},
        "mode": {"type": "string", "enum": ["auto", "manual"]},
        "door": {"type": "boolean"},
    },
}


@dataclass
class Fleet:
    """Registry rows made for one test: a tenant with a gateway and devices, and another tenant."""

    tenant: uuid.UUID
    gateway: uuid.UUID
    devices: list[uuid.UUID]
    device_type: uuid.UUID
    schema: uuid.UUID
    other_tenant: uuid.UUID
    other_gateway: uuid.UUID
    other_device: uuid.UUID


@dataclass
class Databases:
    """The two migrated databases of one test."""

    metadata: str
    timeseries: str
    server: str = SYSTEM_PG_DSN
    fleet: Fleet | None = None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run a query on the time-series database."""
        conn = await asyncpg.connect(self.timeseries)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def meta(self, sql: str, *args: Any) -> None:
        """Run a statement on the metadata database."""
        conn = await asyncpg.connect(self.metadata)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()


async def make_fleet(
    metadata_dsn: str, devices: int = 3, schema: dict[str, Any] | None = None
) -> Fleet:
    """Insert tenants, gateways, a schema, a device type and devices with plain SQL."""
    conn = await asyncpg.connect(metadata_dsn)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('acme') RETURNING id")
        other = await conn.fetchval("INSERT INTO tenants (name) VALUES ('other') RETURNING id")
        gateway = await conn.fetchval(
            "INSERT INTO gateways (tenant_id, name) VALUES ($1, 'gw1') RETURNING id", tenant
        )
        other_gw = await conn.fetchval(
            "INSERT INTO gateways (tenant_id, name) VALUES ($1, 'gw-other') RETURNING id", other
        )
        schema_id = await conn.fetchval(
            "INSERT INTO schemas (tenant_id, name) VALUES ($1, 'env') RETURNING id", tenant
        )
        await conn.execute(
            "INSERT INTO schema_versions (schema_id, version, json_schema) VALUES ($1, 1, $2::jsonb)",
            schema_id,
            json.dumps(schema or SCHEMA),
        )
        dtype = await conn.fetchval(
            "INSERT INTO device_types (tenant_id, name, schema_id) VALUES ($1, 'env', $2) RETURNING id",
            tenant,
            schema_id,
        )
        other_type = await conn.fetchval(
            "INSERT INTO device_types (tenant_id, name) VALUES ($1, 'free') RETURNING id", other
        )
        ids = []
        for i in range(devices):
            ids.append(
                await conn.fetchval(
                    "INSERT INTO devices (tenant_id, device_type_id, gateway_id, name) VALUES ($1, $2, $3, $4) RETURNING id",
                    tenant,
                    dtype,
                    gateway,
                    f"dev{i}",
                )
            )
        other_device = await conn.fetchval(
            "INSERT INTO devices (tenant_id, device_type_id, gateway_id, name) VALUES ($1, $2, $3, 'x') RETURNING id",
            other,
            other_type,
            other_gw,
        )
    finally:
        await conn.close()
    return Fleet(tenant, gateway, ids, dtype, schema_id, other, other_gw, other_device)


async def make_databases(server: str = SYSTEM_PG_DSN) -> Databases:
    """Create and migrate a metadata and a time-series database on ``server``."""
    meta = await create_database(server, "smmeta", timescale=False)
    ts = await create_database(server, "smts", timescale=True)
    await migrations.apply(meta, "metadata")
    await migrations.apply(ts, "timeseries")
    dbs = Databases(meta, ts, server)
    dbs.fleet = await make_fleet(meta)
    return dbs


@pytest.fixture
async def dbs() -> AsyncIterator[Databases]:
    """Migrated databases of this test with a fleet registered, dropped afterwards."""
    d = await make_databases()
    try:
        yield d
    finally:
        await drop_database(SYSTEM_PG_DSN, d.metadata)
        await drop_database(SYSTEM_PG_DSN, d.timeseries)


def collector_settings(
    dbs: Databases,
    host: str,
    port: int,
    prefix: str,
    client_id: str | None = None,
    **sections: Any,
) -> Settings:
    """Settings for a collector of this test (no metrics endpoint, quick retries); a section
    given as a dict updates the default one, anything else replaces a top-level key."""
    data: dict[str, Any] = {
        "metadata": {"dsn": dbs.metadata},
        "timeseries": {"dsn": dbs.timeseries},
        "mqtt": {
            "host": host,
            "port": port,
            "prefix": prefix,
            "client_id": client_id or f"col-{uuid.uuid4().hex[:8]}",
            "group": f"g{uuid.uuid4().hex[:6]}",
            "reconnect_min": "1s",
            "reconnect_max": "2s",
        },
        "writer": {"max_age": "50ms", "retry_min": "200ms", "retry_max": "1s"},
        "metrics": {"listen": ""},
        "registry": {"negative_ttl": "1s"},
        "drain_deadline": "10s",
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return parse_settings(data, "<test>")


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def make_batch(
    fleet: Fleet,
    seq: int,
    stream: uuid.UUID,
    points: int = 10,
    metric: str = "temperature",
    values: list[Any] | None = None,
    device: uuid.UUID | None = None,
    start: int | None = None,
) -> Batch:
    """A batch of one series with ``points`` readings one second apart."""
    t0 = (start or now_us() - 60_000_000) + seq * 1000
    vals = values if values is not None else [20.0 + i * 0.5 for i in range(points)]
    return Batch(
        gateway_id=fleet.gateway,
        stream=stream,
        seq=seq,
        created=now_us(),
        series=[
            Series(
                device_id=device or fleet.devices[0],
                metric=metric,
                timestamps=[t0 + i * 1_000_000 for i in range(len(vals))],
                values=vals,
            )
        ],
    )


@dataclass
class GatewayClient:
    """Publishes frames like an agent and collects the collector's ack frames."""

    host: str
    port: int
    prefix: str
    tenant: uuid.UUID
    gateway: uuid.UUID
    acks: queue.Queue[Ack] = field(default_factory=queue.Queue)
    topics: list[str] = field(default_factory=list)
    client: mqtt.Client | None = None

    def __enter__(self) -> GatewayClient:
        subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"gw-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )

        def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
            self.topics.append(m.topic)
            self.acks.put(decode_ack(m.payload))

        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        # Every gateway's acks: hostile frames on other tenants' or gateways' topics get one too.
        # Subscribed on every connect, as an agent does: a broker restart may forget sessions.
        client.on_connect = lambda c, *a: c.subscribe(f"{self.prefix}/v1/+/+/ack", qos=1)
        client.connect(self.host, self.port)
        client.loop_start()
        assert subscribed.wait(10), "ack subscription not confirmed"
        self.client = client
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def publish(
        self,
        payload: bytes | Batch,
        kind: TopicKind = TopicKind.TELEMETRY,
        tenant: uuid.UUID | None = None,
        gateway: uuid.UUID | None = None,
    ) -> None:
        """Publish a frame (or raw bytes) on this gateway's topic (or another tenant/gateway)."""
        assert self.client is not None
        data = encode_frame(payload) if isinstance(payload, Batch) else payload
        topic = build_topic(self.prefix, tenant or self.tenant, gateway or self.gateway, kind)
        info = self.client.publish(topic, data, qos=1)
        # Offline, paho queues the message and sends it after reconnecting (like the agent).
        with contextlib.suppress(RuntimeError):
            info.wait_for_publish(10)

    def wait_acks(self, n: int, timeout: float = 15.0) -> list[Ack]:
        """The next ``n`` ack frames."""
        out: list[Ack] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(out)} acks of {n}: {out}")
            try:
                out.append(self.acks.get(timeout=remaining))
            except queue.Empty:
                continue
        return out


def deliver_all(
    gw: GatewayClient,
    batches: list[Batch],
    timeout: float = 60.0,
    resend_after: float = 5.0,
    pace: float = 0.0,
) -> dict[int, list[str]]:
    """Publish ``batches`` like an agent: resend those without an ack until each has one.

    Returns the ack results received per seq.
    """
    results: dict[int, list[str]] = {}
    for b in batches:
        gw.publish(b)
        if pace:
            time.sleep(pace)
    deadline = time.monotonic() + timeout
    last_send = time.monotonic()
    wanted = {b.seq for b in batches}
    while not wanted <= results.keys():
        if time.monotonic() > deadline:
            missing = sorted(wanted - results.keys())
            raise AssertionError(
                f"no ack for {len(missing)} batches after {timeout} s: {missing[:20]}"
            )
        try:
            ack = gw.acks.get(timeout=0.5)
            results.setdefault(ack.seq, []).append(ack.result.value)
        except queue.Empty:
            pass
        if time.monotonic() - last_send > resend_after:
            for b in batches:
                if b.seq not in results:
                    gw.publish(b)
            last_send = time.monotonic()
    return results
