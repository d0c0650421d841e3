"""Alert rules evaluated by real collectors on real batches: transitions in ``alerts`` and
``events``, published on the tenant's alerts topic, exactly once under redelivery, a SIGKILL,
two collectors, late backlogs, rule edits and disabled rules."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.alerts.evaluator import State, Transition, evaluate
from collector.alerts.rules import Rule
from collector.service import running
from protocol import Batch, Series, Value
from tests.collector.conftest import (
    Databases,
    GatewayClient,
    collector_settings,
    deliver_all,
    now_us,
)
from tests.services import SYSTEM_MQTT

S = 1_000_000
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


async def add_rule(dbs: Databases, **fields: Any) -> uuid.UUID:
    """Insert an alert rule of the test fleet's tenant; returns its id."""
    assert dbs.fleet is not None
    values: dict[str, Any] = {
        "tenant_id": dbs.fleet.tenant,
        "name": "hot",
        "metric": "temperature",
        "condition": ">",
        "threshold": 30.0,
        **fields,
    }
    cols = ", ".join(values)
    marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    conn = await asyncpg.connect(dbs.metadata)
    try:
        rid: uuid.UUID = await conn.fetchval(
            f"INSERT INTO alert_rules ({cols}) VALUES ({marks}) RETURNING id", *values.values()
        )
        return rid
    finally:
        await conn.close()


async def until(check: Callable[[], Awaitable[bool]], within: float = 20.0, what: str = "") -> None:
    """Wait until ``check()`` is true."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


def batch_of(dbs: Databases, seq: int, stream: uuid.UUID, start: int, values: list[float]) -> Batch:
    """One batch of the first device's temperature, one reading per second from ``start``."""
    assert dbs.fleet is not None
    return Batch(
        gateway_id=dbs.fleet.gateway,
        stream=stream,
        seq=seq,
        created=now_us(),
        series=[
            Series(
                device_id=dbs.fleet.devices[0],
                metric="temperature",
                timestamps=[start + i * S for i in range(len(values))],
                values=list[Value](values),
            )
        ],
    )


async def transitions(dbs: Databases) -> list[tuple[str, int]]:
    """Every alert transition in ``events``: (kind, time µs), in time order."""
    rows = await dbs.fetch(
        "SELECT kind, time FROM events WHERE kind LIKE 'alert.%' ORDER BY time, kind DESC"
    )
    return [(r["kind"], int(r["time"].timestamp() * S)) for r in rows]


def expected(rule: Rule, batches: list[Batch]) -> list[tuple[str, int]]:
    """What in-order evaluation of every reading gives."""
    state = State(rule.digest)
    readings = [
        (t, float(v))
        for b in batches
        for s in b.series
        for t, v in zip(s.timestamps, s.values, strict=True)
    ]
    outcome = evaluate(rule, state, readings)
    assert outcome.rewind_from is None
    out: list[Transition] = outcome.transitions
    return [(f"alert.{t.kind}", t.time) for t in out]


class AlertsSubscriber:
    """Collects what is published on a tenant's alerts topic."""

    def __init__(self, prefix: str, tenant: uuid.UUID) -> None:
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"alerts-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.topic = f"{prefix}/v1/{tenant}/alerts"

    def __enter__(self) -> AlertsSubscriber:
        import threading

        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, m: self.messages.put(json.loads(m.payload))
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        self.client.connect(*SYSTEM_MQTT)
        self.client.loop_start()
        assert subscribed.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def take(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.messages.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} alert messages of {n}: {out}") from None
        return out


async def test_rule_raises_and_clears_with_events_alerts_and_publication(dbs: Databases) -> None:
    """Readings crossing the threshold raise at the breaching reading's time and clear below the
    clear threshold: an ``alerts`` row with both times, two events, two published messages."""
    fleet = dbs.fleet
    assert fleet is not None
    rid = await add_rule(dbs, clear_threshold=25.0, device_type_id=fleet.device_type)
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    start = now_us() - 30 * S
    values = [20.0, 31.0, 33.0, 27.0, 26.0, 24.0, 20.0]
    with AlertsSubscriber(p, fleet.tenant) as sub:
        async with running(settings):
            with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
                acks = await asyncio.to_thread(
                    deliver_all, gw, [batch_of(dbs, 0, uuid.uuid4(), start, values)]
                )
                assert {0: ["ok"]} == acks
            published = await asyncio.to_thread(sub.take, 2)

            async def outbox_empty() -> bool:
                return not await dbs.fetch("SELECT * FROM alert_outbox")

            await until(outbox_empty, what="the outbox emptied after publishing")
    rows = await dbs.fetch("SELECT * FROM alerts")
    assert 1 == len(rows)
    a = rows[0]
    assert (rid, "hot", fleet.devices[0], 31.0, 24.0) == (
        a["rule_id"],
        a["rule_name"],
        a["device_id"],
        a["raised_value"],
        a["cleared_value"],
    )
    assert start + 1 * S == int(a["raised_at"].timestamp() * S)
    assert start + 5 * S == int(a["cleared_at"].timestamp() * S)
    assert (False, "threshold") == (a["raised_late"], a["clear_reason"])
    assert [("alert.raised", start + S), ("alert.cleared", start + 5 * S)] == await transitions(dbs)
    events = await dbs.fetch("SELECT * FROM events WHERE kind = 'alert.raised'")
    attrs = json.loads(events[0]["attributes"])
    assert (str(rid), 31.0, 30.0, 25.0) == (
        attrs["rule_id"],
        attrs["value"],
        attrs["threshold"],
        attrs["clear_threshold"],
    )
    assert ["alert.raised", "alert.cleared"] == [m["kind"] for m in published]
    assert str(fleet.devices[0]) == published[0]["device_id"]
    # The published JSON has exactly the fields docs/protocol.md shows.
    doc = PROTOCOL_DOC.read_text()
    section = doc[doc.index("## Alert transitions") :]
    example = json.loads(section[section.index("```json") + 7 : section.index("```\n", 20)])
    assert sorted(example) == sorted(published[0])
    assert (31.0, str(rid), "threshold") == (
        published[0]["value"],
        published[0]["rule_id"],
        published[0]["reason"],
    )


async def test_a_redelivered_batch_changes_nothing(dbs: Databases) -> None:
    """The same batch again is acknowledged duplicate and adds no transition or state change."""
    fleet = dbs.fleet
    assert fleet is not None
    await add_rule(dbs)
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    stream = uuid.uuid4()
    start = now_us() - 30 * S
    batch = batch_of(dbs, 0, stream, start, [20.0, 35.0, 20.0, 35.0])
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            assert {0: ["ok"]} == await asyncio.to_thread(deliver_all, gw, [batch])
            state = await dbs.fetch("SELECT * FROM alert_state")
            before = await transitions(dbs)
            assert {0: ["duplicate"]} == await asyncio.to_thread(deliver_all, gw, [batch])
    assert 3 == len(before)
    assert before == await transitions(dbs)
    assert [dict(r) for r in state] == [
        dict(r) for r in await dbs.fetch("SELECT * FROM alert_state")
    ]
    assert 2 == len(await dbs.fetch("SELECT * FROM alerts"))


async def test_late_backlog_raises_and_clears_at_the_readings_times_marked_late(
    dbs: Databases,
) -> None:
    """A gateway back after three hours delivers its backlog: the alert is raised and cleared at
    the times the readings say, with ``for`` counted on those times, and marked late."""
    fleet = dbs.fleet
    assert fleet is not None
    await add_rule(dbs, duration=timedelta(seconds=10))
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    stream = uuid.uuid4()
    t0 = now_us() - 3 * 3600 * S
    values = [20.0] * 5 + [40.0] * 20 + [20.0] * 5
    batches = [
        batch_of(dbs, i, stream, t0 + i * 10 * S, values[i * 10 : i * 10 + 10]) for i in range(3)
    ]
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            await asyncio.to_thread(deliver_all, gw, batches)
    assert [("alert.raised", t0 + 15 * S), ("alert.cleared", t0 + 25 * S)] == await transitions(dbs)
    a = (await dbs.fetch("SELECT * FROM alerts"))[0]
    assert (True, True) == (a["raised_late"], a["cleared_late"])


async def test_rule_edited_while_pending(dbs: Databases) -> None:
    """A rename while pending keeps the pending time; a new threshold restarts it."""
    fleet = dbs.fleet
    assert fleet is not None
    rid = await add_rule(dbs, duration=timedelta(seconds=10))
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    stream = uuid.uuid4()
    t0 = now_us() - 600 * S
    async with running(settings) as collector:
        engine = collector.alerts
        assert engine is not None
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            await asyncio.to_thread(deliver_all, gw, [batch_of(dbs, 0, stream, t0, [40.0] * 6)])
            await dbs.meta("UPDATE alert_rules SET name = 'hotter' WHERE id = $1", rid)

            async def renamed() -> bool:
                return engine.index.rules[rid].name == "hotter"

            await until(renamed, what="the rename reaching the collector")
            await asyncio.to_thread(
                deliver_all, gw, [batch_of(dbs, 1, stream, t0 + 6 * S, [40.0] * 6)]
            )
            assert [("alert.raised", t0 + 10 * S)] == await transitions(dbs)
            # Firing now. Raising the threshold above the values keeps the alert open until the
            # next reading judged by the new condition; the new alert needs its full `for`.
            await dbs.meta("UPDATE alert_rules SET threshold = 45 WHERE id = $1", rid)

            async def moved() -> bool:
                return engine.index.rules[rid].threshold == 45

            await until(moved, what="the new threshold")
            # 40 is not above 45: the open alert clears at the next reading.
            await asyncio.to_thread(
                deliver_all, gw, [batch_of(dbs, 2, stream, t0 + 12 * S, [50.0] * 1 + [40.0])]
            )
            # 50 > 45 holds (firing stays), 40 clears it.
            await asyncio.to_thread(
                deliver_all, gw, [batch_of(dbs, 3, stream, t0 + 14 * S, [50.0] * 12)]
            )
    assert [
        ("alert.raised", t0 + 10 * S),
        ("alert.cleared", t0 + 13 * S),
        ("alert.raised", t0 + 24 * S),
    ] == await transitions(dbs)


async def test_rule_disabled_while_firing_clears_with_a_reason(dbs: Databases) -> None:
    """Disabling a firing rule closes its alert with the reason, in events and published."""
    fleet = dbs.fleet
    assert fleet is not None
    rid = await add_rule(dbs, device_id=fleet.devices[0])
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    with AlertsSubscriber(p, fleet.tenant) as sub:
        async with running(settings):
            with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
                b = batch_of(dbs, 0, uuid.uuid4(), now_us() - 10 * S, [40.0, 41.0])
                await asyncio.to_thread(deliver_all, gw, [b])
                await dbs.meta("UPDATE alert_rules SET enabled = false WHERE id = $1", rid)

                async def closed() -> bool:
                    rows = await dbs.fetch("SELECT clear_reason FROM alerts")
                    return bool(rows[0]["clear_reason"] == "rule disabled")

                await until(closed, what="the alert of the disabled rule closed")
            published = await asyncio.to_thread(sub.take, 2)
    assert ["alert.raised", "alert.cleared"] == [m["kind"] for m in published]
    assert "rule disabled" == published[1]["reason"]
    assert [] == await dbs.fetch("SELECT * FROM alert_state")


async def test_no_data_rule_raises_on_silence_and_clears_on_data(dbs: Databases) -> None:
    """A metric silent longer than the rule's duration raises; its next reading clears."""
    fleet = dbs.fleet
    assert fleet is not None
    await add_rule(dbs, name="silent", no_data_for=timedelta(seconds=2))
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, alerts={"no_data_interval": "200ms"})
    stream = uuid.uuid4()
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            first = now_us() - S
            await asyncio.to_thread(deliver_all, gw, [batch_of(dbs, 0, stream, first, [20.0])])

            async def raised() -> bool:
                return len(await transitions(dbs)) == 1

            await until(raised, what="the no-data alert")
            await asyncio.to_thread(deliver_all, gw, [batch_of(dbs, 1, stream, now_us(), [20.0])])
    got = await transitions(dbs)
    assert [k for k, _ in got] == ["alert.raised", "alert.cleared"]
    assert first + 2 * S == got[0][1]


def blocky(n: int) -> list[float]:
    """Readings that breach in blocks of 25 (with dips, so hysteresis and for matter)."""
    return [40.0 if (i // 25) % 2 else 20.0 for i in range(n)]


async def test_two_collectors_keep_one_state_and_the_in_order_transitions(dbs: Databases) -> None:
    """Two collectors share one gateway's batches and commit them in whatever order: one state
    row, and exactly the transitions of in-order evaluation, each once (a batch committed before
    its predecessor waits for it in alert_parked)."""
    fleet = dbs.fleet
    assert fleet is not None
    rid = await add_rule(dbs, duration=timedelta(seconds=3))
    p = f"al{uuid.uuid4().hex[:8]}"
    group = f"g{uuid.uuid4().hex[:6]}"
    first = collector_settings(dbs, *SYSTEM_MQTT, p, mqtt={"group": group})
    second = collector_settings(dbs, *SYSTEM_MQTT, p, mqtt={"group": group})
    stream = uuid.uuid4()
    t0 = now_us() - 3600 * S
    values = blocky(400)
    batches = [
        batch_of(dbs, i, stream, t0 + i * 5 * S, values[i * 5 : i * 5 + 5]) for i in range(80)
    ]
    async with running(first) as a, running(second) as b:
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            await asyncio.to_thread(deliver_all, gw, batches[:1], 30.0)
            await asyncio.to_thread(deliver_all, gw, batches[1:], 60.0, 5.0, 0.002)
        assert a.committed_batches > 0 and b.committed_batches > 0
    rule = Rule(rid, fleet.tenant, "hot", "temperature", ">", 30.0, 30.0, for_us=3 * S)
    state = await dbs.fetch("SELECT skipped, evaluated FROM alert_state")
    assert [(0, 400)] == [(r["skipped"], r["evaluated"]) for r in state]
    assert expected(rule, batches) == await transitions(dbs)
    assert [] == await dbs.fetch("SELECT * FROM alert_parked")
    marks = await dbs.fetch("SELECT evaluated_seq FROM alert_streams")
    assert [79] == [r["evaluated_seq"] for r in marks]


async def test_a_batch_whose_predecessor_never_comes_is_evaluated_after_the_wait(
    dbs: Databases,
) -> None:
    """Seq 2 arrives, seq 1 never does: seq 2 waits park_timeout, then its alert is raised."""
    fleet = dbs.fleet
    assert fleet is not None
    await add_rule(dbs)
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(
        dbs, *SYSTEM_MQTT, p, alerts={"park_timeout": "1s", "no_data_interval": "200ms"}
    )
    stream = uuid.uuid4()
    t0 = now_us() - 60 * S
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            await asyncio.to_thread(deliver_all, gw, [batch_of(dbs, 0, stream, t0, [20.0])])
            await asyncio.to_thread(
                deliver_all, gw, [batch_of(dbs, 2, stream, t0 + 10 * S, [40.0])]
            )
            assert [] == await transitions(dbs)
            assert 1 == len(await dbs.fetch("SELECT * FROM alert_parked"))

            async def raised() -> bool:
                return len(await transitions(dbs)) == 1

            await until(raised, what="the parked batch evaluated after the wait")
    assert [("alert.raised", t0 + 10 * S)] == await transitions(dbs)
    assert [] == await dbs.fetch("SELECT * FROM alert_parked")


def _config(path: Path, dbs: Databases, prefix: str) -> None:
    path.write_text(
        f"""
[metadata]
dsn = "{dbs.metadata}"
[timeseries]
dsn = "{dbs.timeseries}"
[mqtt]
host = "{SYSTEM_MQTT[0]}"
port = {SYSTEM_MQTT[1]}
prefix = "{prefix}"
client_id = "alerts-kill-{prefix}"
group = "kill"
reconnect_min = "1s"
reconnect_max = "2s"
[writer]
max_age = "50ms"
[metrics]
listen = ""
"""
    )


def _spawn(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "collector", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(config.with_suffix(".log"), "ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_collector_sigkilled_mid_stream_neither_loses_nor_repeats_a_transition(
    dbs: Databases, tmp_path: Path
) -> None:
    """SIGKILL while batches are committed and not yet acknowledged, then a restart: the
    redelivered batches are duplicates and every transition is there exactly once."""
    fleet = dbs.fleet
    assert fleet is not None
    rid = await add_rule(dbs, keep_firing_for=timedelta(seconds=2))
    p = f"ak{uuid.uuid4().hex[:8]}"
    config = tmp_path / "collector.toml"
    _config(config, dbs, p)
    stream = uuid.uuid4()
    t0 = now_us() - 3600 * S
    values = blocky(1000)
    batches = [
        batch_of(dbs, i, stream, t0 + i * 5 * S, values[i * 5 : i * 5 + 5]) for i in range(200)
    ]
    proc = _spawn(config)
    try:
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            await asyncio.to_thread(deliver_all, gw, batches[:5], 30.0)
            sender = asyncio.create_task(
                asyncio.to_thread(deliver_all, gw, batches[5:], 90.0, 8.0, 0.005)
            )

            async def some() -> bool:
                rows = await dbs.fetch("SELECT count(*) AS n FROM ingest_ledger")
                return int(rows[0]["n"]) >= 60

            await until(some, what="60 batches committed")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = _spawn(config)
            await sender
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    rule = Rule(rid, fleet.tenant, "hot", "temperature", ">", 30.0, 30.0, keep_firing_for_us=2 * S)
    assert 200 == len(await dbs.fetch("SELECT 1 FROM ingest_ledger"))
    got = await transitions(dbs)
    assert expected(rule, batches) == got
    assert len(got) == len(set(got))


async def test_status_and_doctor_show_alerts_and_rules_that_cannot_work(
    dbs: Databases, tmp_path: Path
) -> None:
    """``status`` lists the open alert; ``doctor`` names the rule on an unknown metric and the
    old rule that was never evaluated."""
    fleet = dbs.fleet
    assert fleet is not None
    await add_rule(dbs, device_type_id=fleet.device_type)
    await add_rule(dbs, name="typo", metric="temprature")
    await add_rule(dbs, name="quiet", metric="humidity", threshold=99.0)
    await dbs.meta("UPDATE alert_rules SET created_at = now() - interval '2 hours'")
    p = f"al{uuid.uuid4().hex[:8]}"
    settings = collector_settings(dbs, *SYSTEM_MQTT, p)
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            b = batch_of(dbs, 0, uuid.uuid4(), now_us() - 10 * S, [40.0, 41.0])
            await asyncio.to_thread(deliver_all, gw, [b])
    config = tmp_path / "collector.toml"
    _config(config, dbs, p)
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "collector", "status", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert 0 == status.returncode, status.stderr
    assert "alerts: 1 open; 3 rules enabled (0 disabled)" in status.stdout
    assert "warning  hot: dev0 temperature = 40.0 since" in status.stdout
    doctor = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "collector", "doctor", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    report = json.loads(doctor.stdout)
    problems = [x for x in report["problems"] if x.startswith("alert rule")]
    assert [
        "alert rule acme/quiet: never evaluated in 2 h: no device in its scope has sent 'humidity'",
        "alert rule acme/typo: metric 'temprature' is not a metric of any device type in its"
        " scope (the schemas do not admit it): it can never fire",
    ] == sorted(problems)
    assert 1 == len(report["alerts"]["open"])
