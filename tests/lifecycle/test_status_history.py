"""Device status history follows the gateway: its will marks its devices offline, its return online."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import asyncpg
import pytest

from collector.lifecycle.status import gateway_status_rows, insert_status_rows
from collector.service import running
from protocol import Backlog, DeviceStatus, GatewayStatus, TopicKind, build_topic, encode_frame
from tests.collector.conftest import (
    Databases,
    GatewayClient,
    collector_settings,
    make_batch,
    make_databases,
    now_us,
)
from tests.conftest import drop_database
from tests.services import SYSTEM_MQTT, SYSTEM_PG_DSN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def dbs() -> AsyncIterator[Databases]:
    """Migrated metadata and time-series databases with a registered fleet."""
    d = await make_databases()
    try:
        yield d
    finally:
        await drop_database(SYSTEM_PG_DSN, d.metadata)
        await drop_database(SYSTEM_PG_DSN, d.timeseries)


async def _wait_rows(
    dbs: Databases, sql: str, n: int, within: float = 20.0
) -> list[asyncpg.Record]:
    deadline = time.monotonic() + within
    while True:
        rows = await dbs.fetch(sql)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


async def test_gateway_status_rows_name_each_device_of_the_gateway(dbs: Databases) -> None:
    """Going offline yields one ``offline``/``gateway_offline`` row per device of that gateway only."""
    fleet = dbs.fleet
    assert fleet is not None
    when = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    meta = await asyncpg.connect(dbs.metadata)
    try:
        offline = await gateway_status_rows(meta, fleet.tenant, fleet.gateway, "offline", when)
        online = await gateway_status_rows(meta, fleet.tenant, fleet.gateway, "online", when)
        other = await gateway_status_rows(meta, fleet.tenant, fleet.other_gateway, "offline", when)
    finally:
        await meta.close()

    assert sorted(
        (when, fleet.tenant, fleet.gateway, d, "offline", "gateway_offline") for d in fleet.devices
    ) == sorted(offline)
    assert {("online", "gateway_online")} == {(r[4], r[5]) for r in online}
    # The other gateway's device belongs to another tenant than the one asked about: left out.
    assert [] == other
    ts = await asyncpg.connect(dbs.timeseries)
    try:
        async with ts.transaction():
            assert len(fleet.devices) == await insert_status_rows(ts, offline)
        assert len(fleet.devices) == await ts.fetchval(
            "SELECT count(*) FROM device_status_history WHERE reason = 'gateway_offline'"
        )
    finally:
        await ts.close()


async def test_a_gateways_will_through_the_broker_marks_its_devices_offline(dbs: Databases) -> None:
    """A gateway killed without a goodbye: the broker's will reaches the running collector, which
    writes the gateway's offline row and one ``gateway_offline`` row per device; online before it."""
    fleet = dbs.fleet
    assert fleet is not None
    host, port = SYSTEM_MQTT
    p = f"t{uuid.uuid4().hex[:10]}"
    topic = build_topic(p, fleet.tenant, fleet.gateway, TopicKind.STATUS)
    settings = collector_settings(dbs, host, port, p)
    async with running(settings):
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.lifecycle.gateway_child",
            host,
            str(port),
            topic,
            str(fleet.gateway),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 20)
            assert b"ready\n" == line
            online = await _wait_rows(
                dbs,
                "SELECT * FROM device_status_history WHERE reason = 'gateway_online'",
                len(fleet.devices),
            )
            assert set(fleet.devices) == {r["device_id"] for r in online}
            child.send_signal(signal.SIGKILL)
            await asyncio.wait_for(child.wait(), 10)
            offline = await _wait_rows(
                dbs,
                "SELECT * FROM device_status_history WHERE status = 'offline' AND device_id IS NOT NULL",
                len(fleet.devices),
            )
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    assert sorted(fleet.devices) == sorted(r["device_id"] for r in offline)
    assert {"gateway_offline"} == {r["reason"] for r in offline}
    assert {fleet.gateway} == {r["gateway_id"] for r in offline}
    # The will was composed when the gateway connected; its rows still come after the online ones,
    # so every device's latest status is offline.
    latest = await dbs.fetch(
        "SELECT DISTINCT ON (device_id) device_id, status FROM device_status_history "
        "WHERE device_id IS NOT NULL ORDER BY device_id, time DESC"
    )
    assert {(d, "offline") for d in fleet.devices} == {
        (r["device_id"], r["status"]) for r in latest
    }
    gateway_rows = await dbs.fetch(
        "SELECT status, reason FROM device_status_history WHERE device_id IS NULL ORDER BY status"
    )
    assert ["offline", "online"] == [r["status"] for r in gateway_rows]
    # The other tenant's device (another gateway) got nothing.
    assert [] == await dbs.fetch(
        f"SELECT * FROM device_status_history WHERE device_id = '{fleet.other_device}'"
    )
    # The retained will would be cleared by a real agent's next birth; clear it for the broker's sake.
    with GatewayClient(host, port, p, fleet.tenant, fleet.gateway) as gw:
        assert gw.client is not None
        gw.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)


async def test_the_running_collector_rolls_up_what_it_wrote_including_a_late_backlog(
    dbs: Databases,
) -> None:
    """The collector's own lifecycle task turns committed readings into ``metrics`` rows; a batch
    of six-hour-old readings arriving later adds its own buckets and leaves the others untouched."""
    fleet = dbs.fleet
    assert fleet is not None
    host, port = SYSTEM_MQTT
    p = f"t{uuid.uuid4().hex[:10]}"
    settings = collector_settings(dbs, host, port, p, lifecycle={"rollups": {"lag": "200ms"}})
    stream = uuid.uuid4()
    rollups = (
        "SELECT bucket, period, count, sum, xmin::text AS xmin FROM metrics ORDER BY period, bucket"
    )
    async with running(settings):
        with GatewayClient(host, port, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(make_batch(fleet, 1, stream, points=10))
            await asyncio.to_thread(gw.wait_acks, 1)
            live = await _wait_rows(dbs, rollups, 2)
            # The gateway's backlog from six hours ago, delivered after the live data.
            six_hours_ago = now_us() - 6 * 3_600_000_000
            gw.publish(make_batch(fleet, 2, stream, points=5, start=six_hours_ago))
            await asyncio.to_thread(gw.wait_acks, 1)
            both = await _wait_rows(dbs, rollups, len(live) + 2)
        jobs = await dbs.fetch("SELECT job, last_result FROM lifecycle_jobs ORDER BY job")
    hour = [r for r in live if r["period"].total_seconds() == 3600]
    minute = [r for r in live if r["period"].total_seconds() == 60]
    assert 10 == sum(r["count"] for r in hour) == sum(r["count"] for r in minute)
    old = [r for r in both if r["bucket"] < datetime.now(UTC) - timedelta(hours=5)]
    assert 5 == sum(r["count"] for r in old if r["period"].total_seconds() == 3600)
    assert 5 == sum(r["count"] for r in old if r["period"].total_seconds() == 60)
    # The live buckets were not rewritten: same values, same row versions.
    assert [tuple(r) for r in live] == [tuple(r) for r in both if r not in old]
    assert {"ledger", "retention", "rollups"} <= {r["job"] for r in jobs}


async def test_a_gateway_coming_online_never_overrides_a_devices_own_error(dbs: Databases) -> None:
    """A device in ``error`` before its gateway went offline is in ``error`` again when the gateway
    returns (with its own reason), not ``online``; a device without a status of its own gets
    ``online``/``gateway_online``."""
    fleet = dbs.fleet
    assert fleet is not None
    broken, other = fleet.devices[0], fleet.devices[1]
    host, port = SYSTEM_MQTT
    p = f"t{uuid.uuid4().hex[:10]}"
    settings = collector_settings(dbs, host, port, p)
    t0 = now_us() - 60_000_000
    stream = uuid.uuid4()

    def status(state: Literal["online", "offline"], at: int) -> bytes:
        return encode_frame(
            GatewayStatus(gateway_id=fleet.gateway, state=state, time=at, version="test")
        )

    latest_sql = (
        "SELECT DISTINCT ON (device_id) device_id, status, reason FROM device_status_history"
        " WHERE device_id IS NOT NULL ORDER BY device_id, time DESC"
    )
    async with running(settings):
        with GatewayClient(host, port, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(status("online", t0), TopicKind.STATUS)
            batch = make_batch(fleet, 1, stream, points=1, start=t0)
            batch = batch.model_copy(
                update={
                    "status": [
                        DeviceStatus(
                            time=t0 + 1000,
                            device_id=broken,
                            status="error",
                            reason="command not found",
                        )
                    ]
                }
            )
            gw.publish(batch)
            await asyncio.to_thread(gw.wait_acks, 1)
            gw.publish(status("offline", t0 + 2_000_000), TopicKind.STATUS)
            await _wait_rows(
                dbs,
                "SELECT * FROM device_status_history WHERE reason = 'gateway_offline'",
                len(fleet.devices),
            )
            # The collector stamps an offline frame no earlier than its arrival: come back after.
            await asyncio.sleep(0.1)
            gw.publish(status("online", now_us()), TopicKind.STATUS)
            await _wait_rows(
                dbs,
                "SELECT * FROM device_status_history WHERE device_id IS NOT NULL AND time >"
                " (SELECT max(time) FROM device_status_history WHERE reason = 'gateway_offline')",
                len(fleet.devices),
            )
    latest = {r["device_id"]: (r["status"], r["reason"]) for r in await dbs.fetch(latest_sql)}
    assert ("error", "command not found") == latest[broken]
    assert ("online", "gateway_online") == latest[other]


async def test_backlog_figures_of_status_frames_keep_the_latest_and_add_no_history(
    dbs: Databases,
) -> None:
    """Status frames with backlog figures (at connect, then while the backlog drains) keep the
    gateway's latest figures in ``gateway_backlog``; an ``online`` frame of a gateway already
    online adds no history row, and figures older than the kept ones change nothing."""
    fleet = dbs.fleet
    assert fleet is not None
    host, port = SYSTEM_MQTT
    p = f"t{uuid.uuid4().hex[:10]}"
    t0 = now_us() - 30_000_000

    def online(at: int, readings: int, drain: float | None) -> bytes:
        figures = Backlog(
            readings=readings,
            batches=readings // 100,
            oldest_age_s=3600.0,
            ack_rate=500.0,
            production_rate=100.0,
            drain_s=drain,
            draining=True,
        )
        return encode_frame(
            GatewayStatus(gateway_id=fleet.gateway, state="online", time=at, backlog=figures)
        )

    async with running(collector_settings(dbs, host, port, p)):
        with GatewayClient(host, port, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(online(t0, 40_000, None), TopicKind.STATUS)
            gw.publish(online(t0 + 10_000_000, 20_000, 50.0), TopicKind.STATUS)
            gw.publish(online(t0 + 5_000_000, 30_000, 75.0), TopicKind.STATUS)  # late
            await _wait_rows(
                dbs, "SELECT * FROM gateway_backlog WHERE readings = 20000", 1, within=20
            )
            await asyncio.sleep(0.5)
    (row,) = await dbs.fetch("SELECT * FROM gateway_backlog")
    assert (20_000, 200, 50.0, True) == (
        row["readings"],
        row["batches"],
        row["drain_s"],
        row["draining"],
    )
    rows = await dbs.fetch(
        "SELECT status FROM device_status_history WHERE device_id IS NULL ORDER BY time"
    )
    assert ["online"] == [r["status"] for r in rows]
