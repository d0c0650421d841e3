"""End-to-end ingest through the real broker into the real databases."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import msgpack

from collector.service import running
from collector.writer import FlushReport
from protocol import AckResult, Batch, DeviceStatus, Event, Series
from tests.collector.conftest import (
    Databases,
    GatewayClient,
    collector_settings,
    make_batch,
    now_us,
)
from tests.services import SYSTEM_MQTT


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def test_batches_arrive_as_exact_rows_and_acks_carry_counts(dbs: Databases) -> None:
    """Every reading of every batch is one telemetry row; each ack says ok with its count."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    stream = uuid.uuid4()
    t0 = now_us() - 3_600_000_000
    batches = [
        Batch(
            gateway_id=fleet.gateway,
            stream=stream,
            seq=seq,
            created=now_us(),
            series=[
                Series(
                    device_id=fleet.devices[0],
                    metric="temperature",
                    timestamps=[t0 + seq * 10_000_000 + i for i in range(5)],
                    values=[20.5, 21, 22.25, -3, 0],
                ),
                Series(
                    device_id=fleet.devices[1],
                    metric="mode",
                    timestamps=[t0 + seq],
                    values=["auto"],
                ),
                Series(
                    device_id=fleet.devices[1], metric="door", timestamps=[t0 + seq], values=[True]
                ),
            ],
            events=[
                Event(
                    time=t0,
                    device_id=fleet.devices[0],
                    severity="warning",
                    kind="probe",
                    message="m",
                    attributes={"a": 1},
                )
            ],
            status=[
                DeviceStatus(
                    time=t0 + seq, device_id=fleet.devices[2], status="error", reason="timeout"
                )
            ],
        )
        for seq in range(4)
    ]
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            for b in batches:
                gw.publish(b)
            acks = await asyncio.to_thread(gw.wait_acks, 4)
    assert [
        (a.seq, a.result, a.accepted, a.rejected) for a in sorted(acks, key=lambda a: a.seq)
    ] == [(seq, AckResult.OK, 7, 0) for seq in range(4)]
    rows = await dbs.fetch(
        "SELECT device_id, metric, value, value_text FROM readings ORDER BY time, metric"
    )
    assert len(rows) == 28
    temps = await dbs.fetch("SELECT value FROM readings WHERE metric = 'temperature' ORDER BY time")
    assert [r["value"] for r in temps][:5] == [20.5, 21.0, 22.25, -3.0, 0.0]
    modes = await dbs.fetch("SELECT value, value_text FROM readings WHERE metric = 'mode'")
    assert {(r["value"], r["value_text"]) for r in modes} == {(None, "auto")}
    doors = await dbs.fetch("SELECT value FROM readings WHERE metric = 'door'")
    assert {r["value"] for r in doors} == {1.0}
    assert 4 == len(await dbs.fetch("SELECT * FROM events"))
    assert 4 == len(await dbs.fetch("SELECT * FROM device_status_history WHERE status = 'error'"))
    ledger = await dbs.fetch("SELECT seq, result, accepted FROM ingest_ledger ORDER BY seq")
    assert [(r["seq"], r["result"], r["accepted"]) for r in ledger] == [
        (s, "ok", 7) for s in range(4)
    ]
    dirty = await dbs.fetch("SELECT count(*) AS n FROM ingest_dirty")
    assert dirty[0]["n"] > 0
    latest = await dbs.fetch(
        "SELECT device_id, metric, kind, time, value, value_text FROM latest_readings ORDER BY metric"
    )
    newest = t0 + 3 * 10_000_000 + 4  # seq 3, its fifth temperature reading
    assert [
        (fleet.devices[1], "door", "boolean", t0 + 3, 1.0, None),
        (fleet.devices[1], "mode", "text", t0 + 3, None, "auto"),
        (fleet.devices[0], "temperature", "number", newest, 0.0, None),
    ] == [
        (r["device_id"], r["metric"], r["kind"], _us(r["time"]), r["value"], r["value_text"])
        for r in latest
    ]


async def test_late_readings_never_move_the_latest_value_back(dbs: Databases) -> None:
    """A backlog delivered after newer readings is stored, but latest_readings keeps the newest."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    t0 = now_us() - 600_000_000
    new = make_batch(fleet, 1, uuid.uuid4(), values=[5.0, 6.0], start=t0)
    late = make_batch(fleet, 1, uuid.uuid4(), values=[1.0, 2.0], start=t0 - 300_000_000)
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(new)
            await asyncio.to_thread(gw.wait_acks, 1)
            gw.publish(late)
            await asyncio.to_thread(gw.wait_acks, 1)
    assert 4 == (await dbs.fetch("SELECT count(*) AS n FROM readings"))[0]["n"]
    latest = await dbs.fetch("SELECT time, value FROM latest_readings")
    assert [(t0 + 1000 + 1_000_000, 6.0)] == [(_us(r["time"]), r["value"]) for r in latest]


async def test_redelivered_batch_is_stored_once_and_acked_duplicate(dbs: Databases) -> None:
    """The same batch three times: one ok, two duplicates, its rows once."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    batch = make_batch(fleet, 7, uuid.uuid4(), points=25)
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            for _ in range(3):
                gw.publish(batch)
            acks = await asyncio.to_thread(gw.wait_acks, 3)
    assert sorted(a.result.value for a in acks) == ["duplicate", "duplicate", "ok"]
    assert [r["n"] for r in await dbs.fetch("SELECT count(*) AS n FROM readings")] == [25]
    assert [r["n"] for r in await dbs.fetch("SELECT count(*) AS n FROM ingest_ledger")] == [1]


async def test_two_collectors_in_one_group_store_each_batch_once(dbs: Databases) -> None:
    """Two collectors share a subscription; each batch is delivered to both, stored once."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    group = {"group": f"shared{uuid.uuid4().hex[:6]}"}
    a = collector_settings(dbs, *SYSTEM_MQTT, p, mqtt=group)
    b = collector_settings(dbs, *SYSTEM_MQTT, p, mqtt=group)
    stream = uuid.uuid4()
    batches = [make_batch(fleet, seq, stream, points=50) for seq in range(20)]
    async with running(a) as first, running(b) as second:
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            for batch in batches:
                for _ in range(2):
                    gw.publish(batch)
            acks = await asyncio.to_thread(gw.wait_acks, 40)
        handled = [
            sum(
                c.metrics.registry.get_sample_value(
                    "sensormine_collector_messages_total", {"kind": "telemetry", "result": r}
                )
                or 0
                for r in ("ok", "duplicate")
            )
            for c in (first, second)
        ]
    # Both members of the group took deliveries: the ledger, not luck, kept the rows single.
    assert all(n > 0 for n in handled), handled
    assert 40 == sum(handled)
    by_seq: dict[int, list[str]] = {}
    for ack in acks:
        by_seq.setdefault(ack.seq, []).append(ack.result.value)
    assert {seq: sorted(r) for seq, r in by_seq.items()} == {
        seq: ["duplicate", "ok"] for seq in range(20)
    }
    rows = await dbs.fetch("SELECT count(*) AS n, count(DISTINCT time) AS t FROM readings")
    assert (rows[0]["n"], rows[0]["t"]) == (1000, 1000)


async def test_invalid_points_are_refused_and_valid_ones_of_the_batch_stored(
    dbs: Databases,
) -> None:
    """Out-of-range, wrong-type, non-enum, NaN and late points are quarantined, every one of them
    with its value (not a sample); the rest is stored and the ack counts both per reason."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    t = now_us() - 10_000_000
    dev = fleet.devices[0]
    batch = Batch(
        gateway_id=fleet.gateway,
        stream=uuid.uuid4(),
        seq=1,
        created=now_us(),
        series=[
            Series(
                device_id=dev,
                metric="temperature",
                timestamps=[t, t + 1, t + 2, t + 3],
                values=[20.0, 99.0, -41, 85],
            ),
            Series(
                device_id=dev,
                metric="humidity",
                timestamps=[t, t + 1, t + 2],
                values=[100.5, 50, float("nan")],
            ),
            Series(
                device_id=dev, metric="count", timestamps=[t, t + 1, t + 2], values=[3, 2.5, "x"]
            ),
            Series(device_id=dev, metric="mode", timestamps=[t, t + 1], values=["auto", "turbo"]),
            Series(
                device_id=dev,
                metric="door",
                timestamps=[t, t + 400 * 86_400_000_000],
                values=[False, True],
            ),
            Series(device_id=dev, metric="pressure", timestamps=[t], values=[1013.0]),
        ],
    )
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(batch)
            (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
    assert (AckResult.PARTIAL, 6, 9, 0) == (ack.result, ack.accepted, ack.quarantined, ack.rejected)
    assert ack.reason == "out_of_range"
    assert {
        "type_mismatch": (2, 0),
        "timestamp_out_of_window": (1, 0),
        "non_finite": (1, 0),
        "out_of_range": (3, 0),
        "not_in_enum": (1, 0),
        "unknown_metric": (1, 0),
    } == ack.reasons
    stored = await dbs.fetch(
        "SELECT metric, coalesce(value::text, value_text) AS v FROM readings ORDER BY metric, time"
    )
    assert [(r["metric"], r["v"]) for r in stored] == [
        ("count", "3"),
        ("door", "0"),
        ("humidity", "50"),
        ("mode", "auto"),
        ("temperature", "20"),
        ("temperature", "85"),
    ]
    held = await dbs.fetch(
        "SELECT metric, reason, points, payload FROM quarantine ORDER BY metric, reason"
    )
    assert [
        ("count", "type_mismatch", 2, [[t + 1, t + 2], [2.5, "x"]]),
        ("door", "timestamp_out_of_window", 1, [[t + 400 * 86_400_000_000], [True]]),
        ("humidity", "non_finite", 1, None),
        ("humidity", "out_of_range", 1, [[t], [100.5]]),
        ("mode", "not_in_enum", 1, [[t + 1], ["turbo"]]),
        ("pressure", "unknown_metric", 1, [[t], [1013.0]]),
        ("temperature", "out_of_range", 2, [[t + 1, t + 2], [99.0, -41]]),
    ] == [
        (
            r["metric"],
            r["reason"],
            r["points"],
            None if r["reason"] == "non_finite" else msgpack.unpackb(r["payload"]),
        )
        for r in held
    ]
    assert [] == await dbs.fetch("SELECT * FROM ingest_rejects")


def _us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def test_flush_hook_and_dirty_table_name_what_was_written(dbs: Databases) -> None:
    """After a commit, the hook and ingest_dirty both name the (series, hour) ranges written."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    reports: list[FlushReport] = []
    hour = 3_600_000_000
    start = (now_us() // hour - 3) * hour + 10_000_000  # 10 s into an hour three hours ago
    batch = make_batch(fleet, 1, uuid.uuid4(), values=[1.0, 2.0], start=start)
    spanning = Batch(
        gateway_id=fleet.gateway,
        stream=uuid.uuid4(),
        seq=2,
        created=now_us(),
        series=[
            Series(
                device_id=fleet.devices[1],
                metric="humidity",
                timestamps=[start, start + hour],
                values=[40.0, 41.0],
            )
        ],
    )
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)) as collector:
        assert collector.writer is not None
        collector.writer.add_flush_hook(reports.append)
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(batch)
            gw.publish(spanning)
            await asyncio.to_thread(gw.wait_acks, 2)
    ranges = sorted(
        ((r.device_id, r.metric, r.first_us, r.last_us) for rep in reports for r in rep.ranges),
        key=lambda r: (r[1], r[2]),
    )
    t1 = start + 1000  # make_batch offsets by seq * 1 ms
    assert [
        (fleet.devices[1], "humidity", start, start),
        (fleet.devices[1], "humidity", start + hour, start + hour),
        (fleet.devices[0], "temperature", t1, t1 + 1_000_000),
    ] == ranges
    rows = await dbs.fetch(
        "SELECT s.device_id, s.metric, d.first_time, d.last_time "
        "FROM ingest_dirty d JOIN series s ON s.id = d.series_id"
    )
    assert sorted(ranges) == sorted(
        (r["device_id"], r["metric"], _us(r["first_time"]), _us(r["last_time"])) for r in rows
    )


async def test_a_refused_device_costs_only_its_own_readings(dbs: Databases) -> None:
    """Unknown, other-tenant and disabled-type devices are refused; the batch's good device is stored."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    t = now_us() - 10_000_000
    unknown = uuid.uuid4()
    await dbs.meta(
        "INSERT INTO device_types (tenant_id, name, enabled) VALUES ($1, 'retired', false)",
        fleet.tenant,
    )
    retired = uuid.uuid4()
    await dbs.meta(
        "INSERT INTO devices (id, tenant_id, device_type_id, gateway_id, name) "
        "SELECT $1, $2, id, $3, 'old' FROM device_types WHERE name = 'retired'",
        retired,
        fleet.tenant,
        fleet.gateway,
    )
    batch = Batch(
        gateway_id=fleet.gateway,
        stream=uuid.uuid4(),
        seq=1,
        created=now_us(),
        series=[
            Series(
                device_id=fleet.devices[0],
                metric="temperature",
                timestamps=[t, t + 1],
                values=[20.0, 21.0],
            ),
            Series(
                device_id=unknown,
                metric="temperature",
                timestamps=[t, t + 1, t + 2],
                values=[1.0, 2.0, 3.0],
            ),
            Series(
                device_id=fleet.other_device, metric="temperature", timestamps=[t], values=[5.0]
            ),
            Series(device_id=retired, metric="temperature", timestamps=[t], values=[6.0]),
        ],
        events=[Event(time=t, device_id=unknown, kind="device.error", message="new on site")],
        status=[DeviceStatus(time=t, device_id=fleet.devices[0], status="online")],
    )
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(batch)
            (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
    assert (AckResult.PARTIAL, 2, 4, 1, "unknown_device") == (
        ack.result,
        ack.accepted,
        ack.quarantined,
        ack.rejected,
        ack.reason,
    )
    stored = await dbs.fetch("SELECT device_id, value FROM readings ORDER BY time")
    assert [(fleet.devices[0], 20.0), (fleet.devices[0], 21.0)] == [tuple(r) for r in stored]
    # A device of another tenant is a security refusal; the rest waits in quarantine.
    rejects = await dbs.fetch("SELECT device_id, reason, points FROM ingest_rejects")
    assert {(fleet.other_device, "device_tenant_mismatch", 1)} == {tuple(r) for r in rejects}
    held = await dbs.fetch("SELECT device_id, kind, reason, points FROM quarantine")
    assert {
        (unknown, "readings", "unknown_device", 3),
        (unknown, "events", "unknown_device", 0),
        (retired, "readings", "device_disabled", 1),
    } == {tuple(r) for r in held}
    statuses = await dbs.fetch(
        "SELECT device_id, status FROM device_status_history WHERE device_id IS NOT NULL"
    )
    assert [(fleet.devices[0], "online")] == [tuple(r) for r in statuses]
    assert [] == await dbs.fetch("SELECT * FROM events")
