"""The registry cache follows changes made in the metadata database while the collector runs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from collector.pipeline import to_datetime
from collector.registry import Registry
from collector.service import running
from protocol import AckResult, Batch
from tests.collector.conftest import (
    SCHEMA,
    Databases,
    GatewayClient,
    collector_settings,
    make_batch,
    now_us,
)
from tests.services import SYSTEM_MQTT


async def _ack_within(
    gw: GatewayClient, fleet_batch_factory: Callable[[int], Batch], want: AckResult, within: float
) -> float:
    """Publish fresh batches until one is acked ``want``; return how long that took."""
    started = time.monotonic()
    seq = 0
    while time.monotonic() - started < within:
        seq += 1
        gw.publish(fleet_batch_factory(seq))
        (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
        if ack.result is want:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {want} ack within {within} s")


async def test_device_registered_while_running_is_accepted_within_two_seconds(
    dbs: Databases,
) -> None:
    """A device inserted with plain SQL is accepted within 2 s, though it was negatively cached,
    and the readings quarantined before its registration are replayed into telemetry by the
    collector itself, exactly once."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"r{uuid.uuid4().hex[:10]}"
    new_device = uuid.uuid4()
    stream = uuid.uuid4()
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, registry={"negative_ttl": "60s"})
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            early = make_batch(fleet, 0, stream, device=new_device, start=now_us() - 3_600_000_000)
            gw.publish(early)
            (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
            assert (AckResult.QUARANTINED, "unknown_device", 10, {"unknown_device": (10, 0)}) == (
                ack.result,
                ack.reason,
                ack.quarantined,
                ack.reasons,
            )
            await dbs.meta(
                "INSERT INTO devices (id, tenant_id, device_type_id, gateway_id, name) VALUES ($1, $2, $3, $4, 'late')",
                new_device,
                fleet.tenant,
                fleet.device_type,
                fleet.gateway,
            )
            took = await _ack_within(
                gw, lambda seq: make_batch(fleet, seq, stream, device=new_device), AckResult.OK, 2.0
            )
            for _ in range(100):
                held = await dbs.fetch("SELECT count(*) AS n FROM quarantine")
                if held[0]["n"] == 0:
                    break
                await asyncio.sleep(0.1)
            # A resend of the quarantined batch changes nothing: its key is in the ledger.
            gw.publish(early)
            (again,) = await asyncio.to_thread(gw.wait_acks, 1)
    assert took < 2.0
    assert AckResult.DUPLICATE == again.result
    assert 0 == held[0]["n"]
    replayed = await dbs.fetch(
        "SELECT time, value FROM readings WHERE device_id = $1 AND time <= $2 ORDER BY time",
        new_device,
        to_datetime(early.series[0].timestamps[-1]),
    )
    assert [float(v) for v in early.series[0].values] == [r["value"] for r in replayed]


async def test_narrowed_schema_range_takes_effect_within_two_seconds(dbs: Databases) -> None:
    """A new schema version with a narrower range refuses values the old one accepted, without a restart."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"r{uuid.uuid4().hex[:10]}"
    stream = uuid.uuid4()
    narrowed = json.loads(json.dumps(SCHEMA))
    narrowed["properties"]["temperature"]["maximum"] = 25
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(make_batch(fleet, 0, stream, values=[30.0]))
            (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
            assert ack.result is AckResult.OK
            await dbs.meta(
                "INSERT INTO schema_versions (schema_id, version, json_schema) VALUES ($1, 2, $2::jsonb)",
                fleet.schema,
                json.dumps(narrowed),
            )
            took = await _ack_within(
                gw,
                lambda seq: make_batch(fleet, seq, stream, values=[30.0]),
                AckResult.QUARANTINED,
                2.0,
            )
    assert took < 2.0
    held = await dbs.fetch("SELECT reason FROM quarantine")
    assert {"out_of_range"} == {r["reason"] for r in held}


async def test_unknown_gateway_flood_costs_one_lookup(dbs: Databases) -> None:
    """Repeated lookups of an unknown gateway are answered from the negative cache."""
    async with Registry({"dsn": dbs.metadata}, negative_ttl=30.0) as registry:
        unknown = uuid.uuid4()
        for _ in range(100):
            assert await registry.gateway(unknown) is None
        assert registry.queries == 1
        assert fleet_gateway_is_found(
            await registry.gateway(dbs.fleet.gateway if dbs.fleet else unknown)
        )
        assert registry.queries == 2


def fleet_gateway_is_found(entry: object) -> bool:
    """Whether a lookup found a gateway."""
    return entry is not None
