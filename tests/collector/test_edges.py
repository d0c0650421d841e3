"""The promise at its edges: every reading of an authenticated gateway ends stored, quarantined
(and replayable) or refused with a counted reason; reused keys conflict; bugs and hung databases
cost no data."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import collector.writer
from collector.errors import ConfigError
from collector.outcomes import OUTCOMES, Outcome
from collector.pipeline import Pipeline
from collector.service import running
from collector.settings import parse_settings
from protocol import AckResult, Batch, Reason, Series, encode_frame
from tests.collector.conftest import (
    SCHEMA,
    Databases,
    GatewayClient,
    collector_settings,
    make_batch,
    now_us,
)
from tests.services import SYSTEM_MQTT


def prefix() -> str:
    """A topic prefix of this test's own."""
    return f"e{uuid.uuid4().hex[:10]}"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sensormine-collector`` as a child process."""
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=120
    )


def config_file(path: Path, dbs: Databases, p: str) -> Path:
    """A collector configuration file for the CLI."""
    path.write_text(
        f'[metadata]\ndsn = "{dbs.metadata}"\n[timeseries]\ndsn = "{dbs.timeseries}"\n'
        f'[mqtt]\nprefix = "{p}"\n'
    )
    return path


async def count(dbs: Databases, sql: str, *args: Any) -> int:
    """The single integer a query returns."""
    rows = await dbs.fetch(sql, *args)
    return int(rows[0][0])


def test_every_reason_code_has_exactly_one_outcome() -> None:
    """The outcome table covers every reason code of the protocol, no more, no less."""
    assert set(Reason) == set(OUTCOMES)
    assert {Outcome.REFUSED} == {
        OUTCOMES[r]
        for r in (Reason.TENANT_MISMATCH, Reason.GATEWAY_MISMATCH, Reason.DEVICE_TENANT_MISMATCH)
    }


def test_validation_age_beyond_the_ledger_horizon_is_a_settings_error() -> None:
    """A validation.max_age raised past lifecycle.ledger.horizon stops the collector at start-up."""
    base = {"metadata": {"dsn": "postgresql://h/m"}, "timeseries": {"dsn": "postgresql://h/t"}}
    parse_settings(base)
    with pytest.raises(ConfigError) as refused:
        parse_settings({**base, "validation": {"max_age": "40d"}}, "c.toml")
    assert "lifecycle.ledger.horizon" in str(refused.value) and "c.toml" in str(refused.value)
    parse_settings(
        {**base, "validation": {"max_age": "40d"}, "lifecycle": {"ledger": {"horizon": "41d"}}}
    )


async def test_refused_compressed_frames_are_acked_under_their_own_key(dbs: Databases) -> None:
    """A zstd frame beyond the collector's limits (series, points, frame size) gets an ack with
    its own stream and seq, is kept whole in quarantine once, and a resend is a duplicate."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    settings = collector_settings(
        dbs, *SYSTEM_MQTT, p, validation={"max_points": 500, "max_frame_bytes": "64KiB"}
    )
    t = now_us() - 60_000_000
    many_series = Batch(
        gateway_id=fleet.gateway,
        stream=uuid.uuid4(),
        seq=1,
        created=now_us(),
        series=[
            Series(device_id=fleet.devices[0], metric=f"m{i}", timestamps=[t], values=[i])
            for i in range(10_001)
        ],
    )
    many_points = make_batch(fleet, 2, uuid.uuid4(), values=[20.0 + i / 8 for i in range(600)])
    noise = random.Random(7)
    big = make_batch(fleet, 3, uuid.uuid4(), values=[noise.uniform(-40, 85) for _ in range(10_000)])
    frames = [encode_frame(b, compress=True) for b in (many_series, many_points, big)]
    assert len(frames[0]) < 65536 < len(frames[2])
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            for frame in frames:
                gw.publish(frame)
            acks = await asyncio.to_thread(gw.wait_acks, 3)
            for frame in frames:
                gw.publish(frame)
            again = await asyncio.to_thread(gw.wait_acks, 3)
    sent = [(b.stream, b.seq) for b in (many_series, many_points, big)]
    assert sorted(sent) == sorted((a.stream, a.seq) for a in acks)
    assert {AckResult.QUARANTINED} == {a.result for a in acks}
    assert {"invalid_field", "too_many_points", "too_large"} == {a.reason for a in acks}
    assert {AckResult.DUPLICATE} == {a.result for a in again}
    held = await dbs.fetch("SELECT kind, stream, seq, length(payload) AS n FROM quarantine")
    assert sorted((s, q) for s, q in sent) == sorted((r["stream"], r["seq"]) for r in held)
    assert {"frame"} == {r["kind"] for r in held}
    assert 0 == await count(dbs, "SELECT count(*) FROM ingest_rejects")


async def test_a_reused_key_with_other_content_is_a_conflict_not_a_duplicate(
    dbs: Databases,
) -> None:
    """The same (gateway, stream, seq) with other content is answered conflict and writes
    nothing; the same bytes again are a duplicate; the ledger keeps the first content's digest."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    stream = uuid.uuid4()
    first = make_batch(fleet, 7, stream, values=[1.0, 2.0])
    reissued = make_batch(fleet, 7, stream, values=[3.0, 4.0, 5.0])
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(first)
            (ok,) = await asyncio.to_thread(gw.wait_acks, 1)
            gw.publish(reissued)
            (conflict,) = await asyncio.to_thread(gw.wait_acks, 1)
            gw.publish(first)
            (duplicate,) = await asyncio.to_thread(gw.wait_acks, 1)
            # Both in one flush: the first copy wins, the other conflicts.
            other = uuid.uuid4()
            gw.publish(make_batch(fleet, 1, other, values=[6.0]))
            gw.publish(make_batch(fleet, 1, other, values=[7.0, 8.0]))
            pair = await asyncio.to_thread(gw.wait_acks, 2)
    assert (AckResult.OK, AckResult.CONFLICT, "conflict", AckResult.DUPLICATE) == (
        ok.result,
        conflict.result,
        conflict.reason,
        duplicate.result,
    )
    assert [AckResult.OK, AckResult.CONFLICT] == [a.result for a in pair]
    values = await dbs.fetch("SELECT value FROM readings ORDER BY value")
    assert [1.0, 2.0, 6.0] == [r["value"] for r in values]
    digests = await dbs.fetch("SELECT digest FROM ingest_ledger WHERE digest IS NOT NULL")
    assert 2 == len(digests)


async def test_quarantined_data_replays_exactly_once_after_the_cause_is_fixed(
    dbs: Databases, tmp_path: Path
) -> None:
    """An unregistered gateway's batches and a schema violation wait in quarantine; after the
    gateway is registered and the schema widened they are stored by the collector itself; a
    manual replay afterwards, and a second one, store nothing twice; clock refusals replay with
    --any-time only; purge needs --yes."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    newcomer = uuid.uuid4()
    late = now_us() - 3_600_000_000
    unregistered = Batch(
        gateway_id=newcomer,
        stream=uuid.uuid4(),
        seq=1,
        created=now_us(),
        series=[
            Series(
                device_id=fleet.devices[1],
                metric="temperature",
                timestamps=[late, late + 1],
                values=[10.0, 11.0],
            )
        ],
    )
    hot = make_batch(fleet, 1, uuid.uuid4(), values=[90.0, 20.0], start=late)
    future = make_batch(fleet, 2, uuid.uuid4(), values=[21.0], start=now_us() + 86_400_000_000)
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, quarantine={"replay_delay": "200ms"})
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, newcomer) as newgw:
            newgw.publish(unregistered)
            (held_gw,) = await asyncio.to_thread(newgw.wait_acks, 1)
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(hot)
            gw.publish(future)
            held_hot, held_future = await asyncio.to_thread(gw.wait_acks, 2)
        assert (AckResult.QUARANTINED, "unknown_gateway", 2) == (
            held_gw.result,
            held_gw.reason,
            held_gw.quarantined,
        )
        assert (AckResult.PARTIAL, "out_of_range", 1) == (
            held_hot.result,
            held_hot.reason,
            held_hot.quarantined,
        )
        assert "timestamp_out_of_window" == held_future.reason
        assert 3 == await count(dbs, "SELECT count(*) FROM quarantine")
        # Fix the causes: register the gateway (the device moves to it), widen the schema.
        await dbs.meta(
            "INSERT INTO gateways (id, tenant_id, name) VALUES ($1, $2, 'late')",
            newcomer,
            fleet.tenant,
        )
        await dbs.meta(
            "UPDATE devices SET gateway_id = $1 WHERE id = $2", newcomer, fleet.devices[1]
        )
        wide = json.loads(json.dumps(SCHEMA))
        wide["properties"]["temperature"]["maximum"] = 120
        await dbs.meta(
            "INSERT INTO schema_versions (schema_id, version, json_schema) VALUES ($1, 2, $2::jsonb)",
            fleet.schema,
            json.dumps(wide),
        )
        for _ in range(100):
            if await count(dbs, "SELECT count(*) FROM quarantine") == 1:
                break
            await asyncio.sleep(0.1)
    stored = await dbs.fetch("SELECT device_id, value FROM readings ORDER BY value")
    assert [
        (fleet.devices[1], 10.0),
        (fleet.devices[1], 11.0),
        (fleet.devices[0], 20.0),
        (fleet.devices[0], 90.0),
    ] == [tuple(r) for r in stored]
    config = config_file(tmp_path / "c.toml", dbs, p)
    listed = cli("quarantine", "list", "--json", "--config", str(config))
    assert 0 == listed.returncode, listed.stderr
    assert ["timestamp_out_of_window"] == [r["reason"] for r in json.loads(listed.stdout)]
    for _ in range(2):
        result = cli("quarantine", "replay", "--config", str(config))
        assert 0 == result.returncode, result.stderr
        assert "stored 0 readings" in result.stdout and "1 rows unchanged" in result.stdout
    result = cli("quarantine", "replay", "--any-time", "--config", str(config))
    assert "stored 1 readings" in result.stdout, result.stdout
    assert 5 == await count(dbs, "SELECT count(*) FROM readings")
    assert 0 == await count(dbs, "SELECT count(*) FROM quarantine")
    again = cli("quarantine", "replay", "--any-time", "--config", str(config))
    assert "examined 0 rows" in again.stdout
    assert 5 == await count(dbs, "SELECT count(*) FROM readings")
    assert 0 == await count(dbs, "SELECT coalesce(sum(bytes), 0) FROM quarantine_usage")
    refused = cli("quarantine", "purge", "--reason", "unknown_device", "--config", str(config))
    assert 0 != refused.returncode and "--yes" in refused.stderr


async def test_quarantine_quota_of_an_unknown_gateway_refuses_and_counts_the_excess(
    dbs: Databases,
) -> None:
    """Beyond its quota, an unknown gateway's frames are refused with quota_exceeded and
    counted; the quota's usage is what the quarantine holds."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    stranger = uuid.uuid4()
    settings = collector_settings(
        dbs, *SYSTEM_MQTT, p, quarantine={"max_bytes_per_unknown_gateway": "4KiB"}
    )
    batches = [
        Batch(
            gateway_id=stranger,
            stream=uuid.uuid4(),
            seq=i,
            created=now_us(),
            series=[
                Series(
                    device_id=uuid.uuid4(),
                    metric="x",
                    timestamps=[now_us() - j for j in range(100, 0, -1)],
                    values=[float(j) + 0.123 for j in range(100)],
                )
            ],
        )
        for i in range(8)
    ]
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, stranger) as gw:
            for b in batches:
                gw.publish(encode_frame(b, compress=False))
            acks = await asyncio.to_thread(gw.wait_acks, 8)
    results = [a.result for a in acks]
    assert AckResult.QUARANTINED in results and AckResult.REJECTED in results
    refused = [a for a in acks if a.result is AckResult.REJECTED]
    assert {"quota_exceeded"} == {a.reason for a in refused}
    assert all(a.rejected == 100 for a in refused)
    used = await dbs.fetch(
        "SELECT bytes, rows, refused_points FROM quarantine_usage WHERE id = $1", stranger
    )
    held = await count(
        dbs, "SELECT coalesce(sum(bytes), 0) FROM quarantine WHERE gateway_id = $1", stranger
    )
    assert held == used[0]["bytes"] <= 4096
    assert 100 * len(refused) == used[0]["refused_points"]


async def test_a_collector_bug_is_retried_then_quarantined_never_dropped(
    dbs: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that makes the pipeline (or the writer) raise gets no ack at first (the agent
    resends), then after max_attempts its raw frame is quarantined as internal_error and acked;
    other batches are unaffected."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    poison_device, writer_poison = fleet.devices[1], fleet.devices[2]
    evaluate = Pipeline.evaluate

    async def buggy(self: Pipeline, staged: Any, address: Any, batch: Batch, **kw: Any) -> None:
        if any(s.device_id == poison_device for s in batch.series):
            raise KeyError("a bug in the pipeline")
        await evaluate(self, staged, address, batch, **kw)

    copy_data = collector.writer.item_copy_data

    def buggy_copy(item: Any, ids: Any) -> tuple[bytes, bytes]:
        if any(s.device_id == writer_poison for s in item.series):
            raise TypeError("a bug in the writer")
        return copy_data(item, ids)

    monkeypatch.setattr(Pipeline, "evaluate", buggy)
    monkeypatch.setattr(collector.writer, "item_copy_data", buggy_copy)
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, quarantine={"max_attempts": 3})
    poison = make_batch(fleet, 1, uuid.uuid4(), device=poison_device)
    poison_w = make_batch(fleet, 1, uuid.uuid4(), device=writer_poison)
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            for attempt in range(3):
                gw.publish(poison)
                gw.publish(poison_w)
                gw.publish(make_batch(fleet, 10 + attempt, uuid.uuid4()))
                acks = await asyncio.to_thread(gw.wait_acks, 1 if attempt < 2 else 3)
                if attempt < 2:
                    assert [AckResult.OK] == [a.result for a in acks]
    by_stream = {a.stream: a for a in acks}
    for batch in (poison, poison_w):
        ack = by_stream[batch.stream]
        assert (AckResult.QUARANTINED, "internal_error") == (ack.result, ack.reason)
    held = await dbs.fetch("SELECT kind, reason, stream FROM quarantine ORDER BY seq")
    assert {("frame", "internal_error")} == {(r["kind"], r["reason"]) for r in held}
    assert {poison.stream, poison_w.stream} == {r["stream"] for r in held}
    assert 30 == await count(dbs, "SELECT count(*) FROM readings")


async def test_a_held_lock_times_out_the_flush_and_nothing_is_lost(dbs: Databases) -> None:
    """A lock held by a wedged session makes the flush fail after lock_timeout (retried, not
    acknowledged) instead of stalling the collector; once the lock goes the batch is stored."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    settings = collector_settings(
        dbs,
        *SYSTEM_MQTT,
        p,
        timeseries={"dsn": dbs.timeseries, "lock_timeout": "300ms", "statement_timeout": "2s"},
        writer={"retry_min": "100ms", "retry_max": "200ms"},
    )
    blocker = await asyncpg.connect(dbs.timeseries)
    try:
        async with running(settings) as c:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE ingest_ledger IN ACCESS EXCLUSIVE MODE")
            with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
                gw.publish(make_batch(fleet, 1, uuid.uuid4()))
                assert c.writer is not None
                for _ in range(100):
                    if "lock" in c.writer.last_error:
                        break
                    await asyncio.sleep(0.05)
                assert "lock timeout" in c.writer.last_error
                assert gw.acks.empty()
                await tx.rollback()
                (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
    finally:
        await blocker.close()
    assert AckResult.OK == ack.result
    assert 10 == await count(dbs, "SELECT count(*) FROM readings")
    assert "" == c.stall()


async def test_a_flush_hung_beyond_its_bound_stops_the_watchdog(
    dbs: Databases, tmp_path: Path
) -> None:
    """With every timeout off and a lock held forever, the flush hangs: after twice the drain
    deadline the collector reports a stall and stops feeding systemd's watchdog (which then
    restarts it); once the lock goes, the watchdog is fed again."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    environ = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
    off = {"statement_timeout": "0s", "lock_timeout": "0s", "command_timeout": "0s"}
    settings = collector_settings(
        dbs, *SYSTEM_MQTT, p, timeseries={"dsn": dbs.timeseries, **off}, drain_deadline="1s"
    )

    def watchdogs() -> int:
        n = 0
        while True:
            try:
                n += sock.recv(4096).count(b"WATCHDOG=1")
            except BlockingIOError:
                return n

    blocker = await asyncpg.connect(dbs.timeseries)
    try:
        async with running(settings, environ) as c:
            await asyncio.sleep(0.5)
            assert watchdogs() > 0
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE ingest_ledger IN ACCESS EXCLUSIVE MODE")
            with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
                gw.publish(make_batch(fleet, 1, uuid.uuid4()))
                await asyncio.sleep(2.5)
                assert "a flush has been running" in c.stall()
                watchdogs()
                await asyncio.sleep(0.5)
                assert 0 == watchdogs()
                await tx.rollback()
                (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
                await asyncio.sleep(0.5)
                assert watchdogs() > 0
    finally:
        await blocker.close()
        sock.close()
    assert AckResult.OK == ack.result


def test_protocol_doc_lists_every_reason_with_its_outcome() -> None:
    """docs/protocol.md's outcome table is the outcome table: every reason, the same outcome."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (stored|quarantined|refused|retry) \|", doc, re.M)
    assert {r.value: o.value for r, o in OUTCOMES.items()} == dict(rows)
    assert len(rows) == len(OUTCOMES)


def test_quarantine_commands_explain_bad_input(tmp_path: Path) -> None:
    """An unknown reason or a time that is not ISO 8601 is a usage error naming the option."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[metadata]\ndsn = "postgresql://h/m"\n[timeseries]\ndsn = "postgresql://h/t"\n'
    )
    bad_reason = cli("quarantine", "list", "--reason", "nope", "--config", str(config))
    assert 2 == bad_reason.returncode and "unknown reason nope" in bad_reason.stderr
    bad_time = cli("quarantine", "replay", "--since", "yesterday", "--config", str(config))
    assert 2 == bad_time.returncode and "--since" in bad_time.stderr
    no_filter = cli("quarantine", "purge", "--yes", "--config", str(config))
    assert 2 == no_filter.returncode and "at least one filter" in no_filter.stderr


async def test_what_was_registered_while_no_collector_ran_is_replayed_at_start(
    dbs: Databases,
) -> None:
    """A device registered while every collector was stopped: the next collector to start
    replays the readings that waited for it."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    newcomer = uuid.uuid4()
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, quarantine={"replay_delay": "100ms"})
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(make_batch(fleet, 1, uuid.uuid4(), device=newcomer))
            (ack,) = await asyncio.to_thread(gw.wait_acks, 1)
    assert AckResult.QUARANTINED == ack.result
    await dbs.meta(
        "INSERT INTO devices (id, tenant_id, device_type_id, gateway_id, name) VALUES ($1, $2, $3, $4, 'n')",
        newcomer,
        fleet.tenant,
        fleet.device_type,
        fleet.gateway,
    )
    async with running(settings):
        for _ in range(100):
            if await count(dbs, "SELECT count(*) FROM quarantine") == 0:
                break
            await asyncio.sleep(0.1)
    assert 0 == await count(dbs, "SELECT count(*) FROM quarantine")
    assert 10 == await count(dbs, "SELECT count(*) FROM readings WHERE device_id = $1", newcomer)


async def test_disabled_gateway_moved_device_missing_schema_and_bad_topic(
    dbs: Databases,
) -> None:
    """gateway_disabled, device_gateway_mismatch and no_schema are quarantined (enabling the
    gateway replays its frame); a topic whose ids are not UUIDs is refused as bad_topic."""
    fleet = dbs.fleet
    assert fleet is not None
    p = prefix()
    moved = fleet.devices[2]
    await dbs.meta("UPDATE devices SET gateway_id = $1 WHERE id = $2", fleet.other_gateway, moved)
    bare_schema = uuid.uuid4()
    bare = uuid.uuid4()
    await dbs.meta(
        "INSERT INTO schemas (id, tenant_id, name) VALUES ($1, $2, 'bare')",
        bare_schema,
        fleet.tenant,
    )
    await dbs.meta(
        "INSERT INTO device_types (tenant_id, name, schema_id) VALUES ($1, 'bare', $2)",
        fleet.tenant,
        bare_schema,
    )
    await dbs.meta(
        "INSERT INTO devices (id, tenant_id, device_type_id, gateway_id, name)"
        " SELECT $1, $2, id, $3, 'b' FROM device_types WHERE name = 'bare'",
        bare,
        fleet.tenant,
        fleet.gateway,
    )
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, quarantine={"replay_delay": "100ms"})
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(make_batch(fleet, 1, uuid.uuid4(), device=moved))
            gw.publish(make_batch(fleet, 2, uuid.uuid4(), device=bare))
            mismatch, no_schema = await asyncio.to_thread(gw.wait_acks, 2)
            assert gw.client is not None
            gw.client.publish(f"{p}/v1/not-a-tenant/{fleet.gateway}/telemetry", b"SM", qos=1)
            await dbs.meta("UPDATE gateways SET enabled = false WHERE id = $1", fleet.gateway)
            await asyncio.sleep(0.3)
            disabled_batch = make_batch(fleet, 3, uuid.uuid4())
            gw.publish(disabled_batch)
            (disabled,) = await asyncio.to_thread(gw.wait_acks, 1)
            await dbs.meta("UPDATE gateways SET enabled = true WHERE id = $1", fleet.gateway)
            for _ in range(100):
                if await count(dbs, "SELECT count(*) FROM quarantine WHERE kind = 'frame'") == 0:
                    break
                await asyncio.sleep(0.1)
    assert [
        (AckResult.QUARANTINED, "device_gateway_mismatch"),
        (AckResult.QUARANTINED, "no_schema"),
        (AckResult.QUARANTINED, "gateway_disabled"),
    ] == [(a.result, a.reason) for a in (mismatch, no_schema, disabled)]
    assert 10 == await count(
        dbs, "SELECT count(*) FROM readings WHERE device_id = $1", fleet.devices[0]
    )
    held = await dbs.fetch("SELECT reason FROM quarantine ORDER BY reason")
    assert ["device_gateway_mismatch", "no_schema"] == [r["reason"] for r in held]
    refused = await dbs.fetch("SELECT reason FROM ingest_rejects")
    assert ["bad_topic"] == [r["reason"] for r in refused]
