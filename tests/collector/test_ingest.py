"""End-to-end ingest through the real broker into the real databases."""

from __future__ import annotations

import asyncio
import uuid

from collector.service import running
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
        "SELECT device_id, metric, value, value_text FROM telemetry ORDER BY time, metric"
    )
    assert len(rows) == 28
    temps = await dbs.fetch(
        "SELECT value FROM telemetry WHERE metric = 'temperature' ORDER BY time"
    )
    assert [r["value"] for r in temps][:5] == [20.5, 21.0, 22.25, -3.0, 0.0]
    modes = await dbs.fetch("SELECT value, value_text FROM telemetry WHERE metric = 'mode'")
    assert {(r["value"], r["value_text"]) for r in modes} == {(None, "auto")}
    doors = await dbs.fetch("SELECT value FROM telemetry WHERE metric = 'door'")
    assert {r["value"] for r in doors} == {1.0}
    assert 4 == len(await dbs.fetch("SELECT * FROM events"))
    assert 4 == len(await dbs.fetch("SELECT * FROM device_status_history WHERE status = 'error'"))
    ledger = await dbs.fetch("SELECT seq, result, accepted FROM ingest_ledger ORDER BY seq")
    assert [(r["seq"], r["result"], r["accepted"]) for r in ledger] == [
        (s, "ok", 7) for s in range(4)
    ]
    dirty = await dbs.fetch("SELECT count(*) AS n FROM ingest_dirty")
    assert dirty[0]["n"] > 0
