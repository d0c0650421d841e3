"""A world for the API tests: two tenants' data written by a real collector from real MQTT
frames, rollups run by the lifecycle code, tokens made by the CLI, and the API as a child process.

Tenant ``acme`` (A) has gateway gw1 with dev0..dev2; tenant ``other`` (B) has gw-other with device
x. Everything the API shows exists for both tenants, so that a leak would be visible.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from collector.lifecycle.rollups import rollup
from collector.service import running
from protocol import Batch, DeviceStatus, Event, GatewayStatus, Series, TopicKind, encode_frame
from tests.collector.conftest import (
    Databases,
    Fleet,
    GatewayClient,
    collector_settings,
    make_databases,
)
from tests.conftest import drop_database
from tests.services import SYSTEM_MQTT, SYSTEM_PG_DSN, free_port, wait_for_port

HOUR = 3_600_000_000
MINUTE = 60_000_000


@dataclass
class World:
    """The filled databases, the running API and a token per tenant."""

    dbs: Databases
    fleet: Fleet
    url: str
    config: Path
    token_a: str
    token_b: str
    start: datetime
    gap_from: datetime
    gap_to: datetime
    process: subprocess.Popen[bytes]

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def a(self) -> httpx.Client:
        return self.client(self.token_a)

    def b(self) -> httpx.Client:
        return self.client(self.token_b)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sensormine-collector ARGS`` as a child process."""
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def _series(device: uuid.UUID, metric: str, t0: int, n: int, step: int, f: Any) -> Series:
    return Series(
        device_id=device,
        metric=metric,
        timestamps=[t0 + i * step for i in range(n)],
        values=[f(i) for i in range(n)],
    )


def _backlog_events(t0: int) -> list[Event]:
    """A backlog draining as the agent reports it (backlog.draining, progress, drained)."""
    figures = [(50_000, 120.0), (30_000, 72.0), (10_000, 24.0)]
    out = [
        Event(
            time=t0 + i * MINUTE,
            kind="backlog.draining" if i == 0 else "backlog.progress",
            message=f"{buffered} readings to go",
            attributes={
                "buffered_readings": buffered,
                "ack_rate": 500.0,
                "production_rate": 83.0,
                "estimate_s": est,
                **({"done_percent": round(100 - buffered / 500)} if i else {}),
            },
        )
        for i, (buffered, est) in enumerate(figures)
    ]
    out.append(
        Event(
            time=t0 + 3 * MINUTE,
            kind="backlog.drained",
            message="backlog of 50000 readings drained in 180 s",
            attributes={
                "buffered_readings": 40,
                "ack_rate": 500.0,
                "production_rate": 83.0,
                "estimate_s": 0.0,
                "backlog_readings": 50_000,
                "seconds": 180.0,
            },
        )
    )
    return out


async def fill(dbs: Databases, prefix: str) -> tuple[datetime, datetime, datetime]:
    """Both tenants' data through a real collector; returns (start, gap start, gap end)."""
    fleet = dbs.fleet
    assert fleet is not None
    host, port = SYSTEM_MQTT
    now = datetime.now(UTC).replace(microsecond=0)
    # Whole hours, so that the test knows every bucket: the readings end at the last full hour.
    start = now.replace(minute=0, second=0) - timedelta(hours=3)
    t0 = _us(start)
    # dev0: temperature every 10 s for 3 hours, with a 20-minute gap in the middle.
    gap_from = start + timedelta(minutes=80)
    gap_to = start + timedelta(minutes=100)
    a_batches: list[Batch] = []
    stream_a = uuid.uuid4()
    seq = 0
    for hour in range(3):
        series = []
        for device_index, device in enumerate(fleet.devices[:2]):
            base = t0 + hour * HOUR
            s = _series(
                device,
                "temperature",
                base,
                360,
                10_000_000,
                lambda i, d=device_index: 20.0 + d + (i % 60) / 10,
            )
            keep = [
                (t, v)
                for t, v in zip(s.timestamps, s.values, strict=True)
                if not (device_index == 0 and _us(gap_from) <= t < _us(gap_to))
            ]
            series.append(
                Series(
                    device_id=device,
                    metric="temperature",
                    timestamps=[t for t, _ in keep],
                    values=[v for _, v in keep],
                )
            )
            series.append(_series(device, "humidity", base, 60, MINUTE, lambda i: 40.0 + i % 7))
        series.append(
            _series(fleet.devices[0], "mode", t0 + hour * HOUR, 2, 30 * MINUTE, lambda i: "auto")
        )
        seq += 1
        a_batches.append(
            Batch(
                gateway_id=fleet.gateway,
                stream=stream_a,
                seq=seq,
                created=t0 + hour * HOUR + HOUR - 1,
                series=series,
                events=_backlog_events(t0 + hour * HOUR + 5 * MINUTE) if hour == 2 else [],
                status=[
                    DeviceStatus(
                        time=t0 + hour * HOUR, device_id=fleet.devices[0], status="online"
                    ),
                    DeviceStatus(
                        time=t0 + hour * HOUR + 1000,
                        device_id=fleet.devices[1],
                        status="error" if hour == 1 else "online",
                        reason="modbus timeout" if hour == 1 else "",
                    ),
                ],
            )
        )
    # dev2 is disabled: its readings wait in quarantine.
    seq += 1
    a_batches.append(
        Batch(
            gateway_id=fleet.gateway,
            stream=stream_a,
            seq=seq,
            created=_us(now),
            series=[_series(fleet.devices[2], "temperature", t0, 5, MINUTE, lambda i: 1.0)],
        )
    )
    b_batch = Batch(
        gateway_id=fleet.other_gateway,
        stream=uuid.uuid4(),
        seq=1,
        created=_us(now),
        series=[_series(fleet.other_device, "secret", t0, 100, MINUTE, lambda i: 99.0)],
        events=[
            *_backlog_events(t0 + 10 * MINUTE),
            Event(time=t0, kind="secret.event", message="tenant B only"),
        ],
        status=[DeviceStatus(time=t0, device_id=fleet.other_device, status="online")],
    )
    await dbs.meta("UPDATE devices SET enabled = false WHERE id = $1", fleet.devices[2])
    # Alert rules of both tenants: A's temperature crosses 25.5 once a minute, B's secret is
    # above 50 all along (an alert left open).
    await dbs.meta(
        "INSERT INTO alert_rules (tenant_id, name, device_type_id, metric, condition, threshold,"
        " clear_threshold) VALUES ($1, 'temperature-high', $2, 'temperature', '>', 25.5, 25.0)",
        fleet.tenant,
        fleet.device_type,
    )
    await dbs.meta(
        "INSERT INTO alert_rules (tenant_id, name, device_id, metric, condition, threshold,"
        " severity) VALUES ($1, 'secret-high', $2, 'secret', '>', 50, 'critical')",
        fleet.other_tenant,
        fleet.other_device,
    )
    settings = collector_settings(dbs, host, port, prefix)
    async with running(settings):
        with (
            GatewayClient(host, port, prefix, fleet.tenant, fleet.gateway) as gw,
            GatewayClient(host, port, prefix, fleet.other_tenant, fleet.other_gateway) as gb,
        ):
            for state in ("online",):
                for client, gateway, tenant in (
                    (gw, fleet.gateway, fleet.tenant),
                    (gb, fleet.other_gateway, fleet.other_tenant),
                ):
                    client.publish(
                        encode_frame(
                            GatewayStatus(gateway_id=gateway, state=state, time=t0, version="1.0")
                        ),
                        TopicKind.STATUS,
                        tenant=tenant,
                        gateway=gateway,
                    )
            for b in a_batches:
                gw.publish(b)
            gb.publish(b_batch)
            # An unreadable frame on each tenant's topic: refused for good, with its reason.
            gw.publish(b"\x00not a frame")
            gb.publish(b"\x00not a frame either")
            await asyncio.to_thread(gw.wait_acks, len(a_batches) + 1, 30.0)
            # Status frames and unreadable frames have no ack: wait until they are stored.
            deadline = time.monotonic() + 20
            while True:
                gateways = await dbs.fetch(
                    "SELECT count(*) AS n FROM device_status_history WHERE device_id IS NULL"
                )
                refused = await dbs.fetch("SELECT count(*) AS n FROM ingest_rejects")
                if gateways[0]["n"] >= 2 and refused[0]["n"] >= 2:
                    break
                assert time.monotonic() < deadline, "status frames or rejects not stored"
                await asyncio.sleep(0.1)
    conn = await asyncpg.connect(dbs.timeseries)
    try:
        # Rollups for the first two hours only: the API computes what the job has not reached.
        await conn.execute(
            "DELETE FROM ingest_dirty WHERE first_time >= $1", start + timedelta(hours=2)
        )
        await rollup(conn, (60.0, 3600.0), 10_000)
    finally:
        await conn.close()
    return start, gap_from, gap_to


def write_config(path: Path, dbs: Databases, **api: Any) -> Path:
    lines = [
        f'[metadata]\ndsn = "{dbs.metadata}"\n',
        f'[timeseries]\ndsn = "{dbs.timeseries}"\n',
        '[log]\nformat = "json"\n',
        "[api]\n",
    ]
    for k, v in api.items():
        lines.append(f"{k} = {v!r}\n".replace("'", '"'))
    path.write_text("".join(lines))
    return path


def make_token(config: Path, tenant: str, name: str) -> str:
    made = cli("tokens", "create", "--config", str(config), "--tenant", tenant, "--name", name)
    assert 0 == made.returncode, made.stderr
    return made.stdout.strip()


def start_api(config: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "collector", "api", "--config", str(config)),
            *("--listen", f"127.0.0.1:{port}", *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", port, 30)
    except TimeoutError:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"the API did not start: {err.decode()}") from None
    return process


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One filled world for the API tests (reads only: tests must not change it)."""
    dbs = asyncio.run(make_databases())
    try:
        assert dbs.fleet is not None
        start, gap_from, gap_to = asyncio.run(fill(dbs, f"api{uuid.uuid4().hex[:8]}"))
        config = write_config(tmp_path_factory.mktemp("api") / "collector.toml", dbs)
        token_a = make_token(config, "acme", "tests")
        token_b = make_token(config, "other", "tests")
        port = free_port()
        process = start_api(config, port)
        try:
            yield World(
                dbs,
                dbs.fleet,
                f"http://127.0.0.1:{port}",
                config,
                token_a,
                token_b,
                start,
                gap_from,
                gap_to,
                process,
            )
        finally:
            process.terminate()
            process.wait(15)
    finally:
        asyncio.run(drop_database(SYSTEM_PG_DSN, dbs.metadata))
        asyncio.run(drop_database(SYSTEM_PG_DSN, dbs.timeseries))
