"""Ack outcomes on the gateway (issue 11): stored, quarantined in the cloud, refused, per reason.

A technician on site must see that readings wait in the collector's quarantine (for a device's
registration, a schema fix) rather than read "delivered" and believe they are stored.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.buffer import AckOutcome, Buffer
from agent.shipper import OutcomeLog
from protocol import Ack, AckResult, Batch
from tests.agent.conftest import Acknowledger, agent_cli, start_agent, write_config
from tests.waiting import wait_for

GATEWAY = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
DEVICE = uuid.UUID("00000000-0000-4000-8000-0000000000bb")
T0 = 1_700_000_000_000_000


async def test_counters_split_delivered_readings_by_outcome_and_reason(tmp_path: Path) -> None:
    """Each final ack adds its stored/quarantined/refused readings and per-reason totals, in the
    file; ``delivered`` stays the readings of finally acknowledged batches."""
    path = tmp_path / "buffer.db"
    async with Buffer(path, gateway_id=GATEWAY, max_points=10) as buffer:
        await buffer.append([(DEVICE.bytes, "m", T0 + v, v) for v in range(40)])
        assert [0, 1, 2, 3] == await buffer.seal()
        stream = buffer.stream
        acks = [
            Ack(stream=stream, seq=0, result=AckResult.OK, accepted=10),
            Ack(
                stream=stream,
                seq=1,
                result=AckResult.QUARANTINED,
                quarantined=10,
                reason="unknown_device",
                reasons={"unknown_device": (10, 0)},
            ),
            Ack(
                stream=stream,
                seq=2,
                result=AckResult.PARTIAL,
                accepted=6,
                quarantined=3,
                rejected=1,
                reason="no_schema",
                reasons={"no_schema": (3, 0), "device_tenant_mismatch": (0, 1)},
            ),
            # A rejection without counts refuses the whole batch.
            Ack(stream=stream, seq=3, result=AckResult.REJECTED, reason="tenant_mismatch"),
        ]
        outcomes = [await buffer.settle(a) for a in acks]
        assert [(10, 0, 0), (0, 10, 0), (6, 3, 1), (0, 0, 10)] == [
            (o.stored, o.quarantined, o.refused) for o in outcomes if o is not None
        ]
        assert await buffer.settle(acks[0]) is None  # already settled
        other = Ack(stream=uuid.uuid4(), seq=0, result=AckResult.OK)
        assert await buffer.settle(other) is None  # not a stream of this file
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        stats = await buffer.stats()
    assert (40, 16, 13, 11) == (stats.delivered, stats.stored, stats.quarantined, stats.refused)
    assert {
        "device_tenant_mismatch": (0, 1),
        "no_schema": (3, 0),
        "tenant_mismatch": (0, 10),
        "unknown_device": (10, 0),
    } == stats.by_reason
    assert 1 == stats.rejected_batches


def test_outcome_log_is_rate_limited_per_reason_with_counts_since_the_last_line() -> None:
    """One ``batch.quarantined`` line per reason at once, then at most one a minute carrying
    the readings and batches since the previous line; a forced flush (stop) says the rest."""
    now = [1000.0]
    sink = structlog.testing.CapturingLogger()
    outcomes = OutcomeLog(
        60.0, clock=lambda: now[0], logger=structlog.wrap_logger(sink, processors=[])
    )

    def settled(quarantined: int, refused: int, reason: str) -> AckOutcome:
        return AckOutcome(0, 10, False, reasons={reason: (quarantined, refused)})

    outcomes.add(settled(4, 0, "unknown_device"))
    for t in range(1, 59):
        now[0] = 1000.0 + t
        outcomes.add(settled(2, 0, "unknown_device"))
        outcomes.add(settled(0, 1, "tenant_mismatch"))
        outcomes.flush()
    now[0] = 1061.0
    outcomes.flush()
    now[0] = 1070.0
    outcomes.add(settled(5, 0, "unknown_device"))
    outcomes.flush(force=True)
    lines = [(c.method_name, c.kwargs["event"], c.kwargs) for c in sink.calls]
    assert [
        ("warning", "batch.quarantined", "unknown_device", 4, 1),
        ("warning", "batch.refused", "tenant_mismatch", 1, 1),
        ("warning", "batch.quarantined", "unknown_device", 58 * 2, 58),
        ("warning", "batch.refused", "tenant_mismatch", 57, 57),
        ("warning", "batch.quarantined", "unknown_device", 5, 1),
    ] == [(m, e, k["reason"], k["readings"], k["batches"]) for m, e, k in lines]
    assert [None, None, 61.0, 60.0, 9.0] == [k["since_s"] for _, _, k in lines]


def test_status_and_log_show_stored_quarantined_and_refused_readings(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """Against a collector that quarantines and refuses readings, ``status`` says how many are
    stored, quarantined in the cloud (waiting for registration or a schema fix) and refused, by
    reason; the log warns once per reason (plus the remainder at stop), and the counts agree."""
    expected: dict[tuple[uuid.UUID, int], tuple[int, int, int, dict[str, tuple[int, int]]]] = {}

    def policy(batch: Batch, seen: int) -> Ack | None:
        n = batch.point_count
        if batch.seq % 3 == 0 and n:
            reasons = {"unknown_device": (n, 0)}
            ack = Ack(
                stream=batch.stream,
                seq=batch.seq,
                result=AckResult.QUARANTINED,
                quarantined=n,
                reason="unknown_device",
                reasons=reasons,
            )
        elif batch.seq % 3 == 1 and n >= 3:
            reasons = {"no_schema": (2, 0), "device_tenant_mismatch": (0, 1)}
            ack = Ack(
                stream=batch.stream,
                seq=batch.seq,
                result=AckResult.PARTIAL,
                accepted=n - 3,
                quarantined=2,
                rejected=1,
                reason="no_schema",
                reasons=reasons,
            )
        else:
            reasons = {}
            ack = Ack(stream=batch.stream, seq=batch.seq, result=AckResult.OK, accepted=n)
        expected.setdefault(
            (batch.stream, batch.seq), (ack.accepted, ack.quarantined, ack.rejected, reasons)
        )
        return ack

    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=mqtt_address[1],
        prefix=prefix,
        interval="50ms",
        extra_batch='max_age = "200ms"',
    )
    acknowledger_factory(*mqtt_address, prefix, policy)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        wait_for(lambda: len(expected) >= 12)
        agent.send_signal(signal.SIGTERM)
        assert 0 == agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
    result = agent_cli("status", "--config", str(config), "--json")
    assert 0 == result.returncode, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    stored = sum(e[0] for e in expected.values())
    quarantined = sum(e[1] for e in expected.values())
    refused = sum(e[2] for e in expected.values())
    by_reason: Counter[tuple[str, int]] = Counter()
    for *_, reasons in expected.values():
        for reason, (q, r) in reasons.items():
            by_reason[(reason, 0)] += q
            by_reason[(reason, 1)] += r
    assert (stored, quarantined, refused) == (
        status["stored"],
        status["quarantined"],
        status["refused"],
    )
    assert {
        "unknown_device": by_reason[("unknown_device", 0)],
        "no_schema": by_reason[("no_schema", 0)],
    } == status["quarantined_by_reason"]
    assert {"device_tenant_mismatch": by_reason[("device_tenant_mismatch", 1)]} == status[
        "refused_by_reason"
    ]
    assert status["delivered"] == stored + quarantined + refused
    assert status["produced"] == status["delivered"] + status["readings"] + status["dropped"]

    text = agent_cli("status", "--config", str(config)).stdout
    [line] = [line for line in text.splitlines() if "quarantined" in line]
    assert f"in the cloud: {quarantined} (" in line
    assert f"unknown_device {by_reason[('unknown_device', 0)]}" in line
    assert f"no_schema {by_reason[('no_schema', 0)]}" in line
    assert "waiting for registration or a schema fix, not stored" in line or (
        "waiting for a schema fix or registration, not stored" in line
    )
    [refused_line] = [line for line in text.splitlines() if "refused" in line]
    assert f"{refused} (device_tenant_mismatch {refused})" in refused_line

    events = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    for kind, column, reason in (
        ("batch.quarantined", 0, "unknown_device"),
        ("batch.quarantined", 0, "no_schema"),
        ("batch.refused", 1, "device_tenant_mismatch"),
    ):
        lines = [e for e in events if e["event"] == kind and e["reason"] == reason]
        # Within a minute: the first occurrence, and the rest when the shipper stops.
        assert 1 <= len(lines) <= 2, lines
        assert all("warning" == e["level"] for e in lines)
        assert by_reason[(reason, column)] == sum(e["readings"] for e in lines)
