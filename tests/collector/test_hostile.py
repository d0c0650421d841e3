"""Hostile and malformed payloads: each is refused with its reason, and the collector carries on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import zstandard

from collector.outcomes import Outcome, outcome
from collector.service import running
from protocol import Ack, AckResult, Batch, Event, GatewayStatus, Series, Value, encode_frame
from tests.collector.conftest import (
    Databases,
    Fleet,
    GatewayClient,
    collector_settings,
    make_batch,
    now_us,
)
from tests.services import SYSTEM_MQTT

NIL = uuid.UUID(int=0)


@dataclass
class Case:
    """A hostile payload, the topic it is sent on, the reason it must be refused with, and how
    many readings it carries (each refused or quarantined with that reason)."""

    name: str
    reason: str
    payload: Callable[[Fleet, int], bytes]
    tenant: Callable[[Fleet], uuid.UUID] = lambda f: f.tenant
    gateway: Callable[[Fleet], uuid.UUID] = lambda f: f.gateway
    # A frame whose envelope cannot be read at all is refused whatever its reason's outcome,
    # and acked with the nil stream and seq 0 (docs/protocol.md).
    unaddressable: bool = False
    readings: int = 0
    # The stream the payload names for its seq (default: ``_with_series`` and ``_body``'s).
    stream: Callable[[int], uuid.UUID] = lambda seq: uuid.UUID(int=seq + 1)


def _good(f: Fleet, seq: int, **kw: object) -> Batch:
    return make_batch(f, seq, uuid.UUID(int=seq + 1), points=3, **kw)  # type: ignore[arg-type]


def _body(f: Fleet, seq: int) -> bytes:
    return encode_frame(_good(f, seq), compress=False)


def _zstd_bomb(_f: Fleet, _seq: int) -> bytes:
    return b"SM\x01\x01" + zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 << 20))


def _huge_array(_f: Fleet, _seq: int) -> bytes:
    # A map whose "series" claims 2^32-1 elements and holds none.
    return b"SM\x01\x00" + b"\x81\xa6series" + b"\xdd\xff\xff\xff\xff"


def _with_series(
    f: Fleet, seq: int, series: list[Series], gateway: uuid.UUID | None = None
) -> bytes:
    b = Batch(
        gateway_id=gateway or f.gateway,
        stream=uuid.UUID(int=seq + 1),
        seq=seq,
        created=now_us(),
        series=series,
    )
    return encode_frame(b)


def _one(device: uuid.UUID, metric: str, value: Value, t: int | None = None) -> list[Series]:
    return [
        Series(
            device_id=device, metric=metric, timestamps=[t or now_us() - 1_000_000], values=[value]
        )
    ]


def _far_event(f: Fleet, seq: int) -> bytes:
    b = Batch(
        gateway_id=f.gateway,
        stream=uuid.UUID(int=seq + 1),
        seq=seq,
        created=2**62,
        events=[Event(time=2**62, kind="clock", message="far future")],
    )
    return encode_frame(b)


CASES = [
    Case("wrong magic", "bad_magic", lambda f, s: b"XX" + _body(f, s)[2:], unaddressable=True),
    Case(
        "unknown version",
        "unsupported_version",
        lambda f, s: b"SM\x02\x00" + _body(f, s)[4:],
        unaddressable=True,
    ),
    Case(
        "unknown flag bits",
        "unknown_flags",
        lambda f, s: b"SM\x01\x80" + _body(f, s)[4:],
        unaddressable=True,
    ),
    Case("truncated frame", "malformed", lambda f, s: _body(f, s)[:-7], unaddressable=True),
    Case("one byte", "malformed", lambda f, s: b"S", unaddressable=True),
    Case("zstd bomb", "decompression_limit", _zstd_bomb, unaddressable=True),
    Case("huge array header", "malformed", _huge_array, unaddressable=True),
    Case(
        "oversized payload",
        "too_large",
        lambda f, s: b"SM\x01\x00" + b"\xc0" * (1 << 20),
        unaddressable=True,
    ),
    Case(
        "not msgpack map",
        "malformed",
        lambda f, s: b"SM\x01\x00" + msgpack.packb([1, 2, 3]),
        unaddressable=True,
    ),
    Case(
        "status frame on telemetry topic",
        "unexpected_kind",
        lambda f, s: encode_frame(
            GatewayStatus(gateway_id=f.gateway, state="online", time=now_us())
        ),
        unaddressable=True,
    ),
    Case(
        "topic tenant is not the gateway's",
        "tenant_mismatch",
        _body,
        tenant=lambda f: f.other_tenant,
        readings=3,
    ),
    Case(
        "frame gateway is not the topic's",
        "gateway_mismatch",
        lambda f, s: _with_series(
            f, s, _one(f.devices[0], "temperature", 1.0), gateway=f.other_gateway
        ),
        readings=1,
    ),
    Case(
        "unknown gateway",
        "unknown_gateway",
        lambda f, s: _with_series(
            f, s, _one(f.devices[0], "temperature", 1.0), gateway=uuid.UUID(int=99)
        ),
        gateway=lambda f: uuid.UUID(int=99),
        readings=1,
    ),
    Case(
        "frame of another gateway on an unknown gateway's topic",
        "gateway_mismatch",
        _body,
        gateway=lambda f: uuid.UUID(int=98),
        readings=3,
    ),
    Case(
        "unknown device",
        "unknown_device",
        lambda f, s: _with_series(f, s, _one(uuid.uuid4(), "temperature", 1.0)),
        readings=1,
    ),
    Case(
        "device of another tenant",
        "device_tenant_mismatch",
        lambda f, s: _with_series(f, s, _one(f.other_device, "temperature", 1.0)),
        readings=1,
    ),
    Case(
        "NaN",
        "non_finite",
        lambda f, s: _with_series(f, s, _one(f.devices[0], "temperature", float("nan"))),
        readings=1,
    ),
    Case(
        "infinity",
        "non_finite",
        lambda f, s: _with_series(f, s, _one(f.devices[0], "temperature", float("inf"))),
        readings=1,
    ),
    Case(
        "timestamp a year ahead",
        "timestamp_out_of_window",
        lambda f, s: _with_series(
            f, s, _one(f.devices[0], "temperature", 1.0, now_us() + 366 * 86_400_000_000)
        ),
        readings=1,
    ),
    Case(
        "string where the schema says number",
        "type_mismatch",
        lambda f, s: _with_series(f, s, _one(f.devices[0], "temperature", "hot")),
        readings=1,
    ),
    Case(
        "string with NUL",
        "type_mismatch",
        lambda f, s: _with_series(f, s, _one(f.devices[0], "mode", "au\x00to")),
        readings=1,
    ),
    Case(
        "unknown metric",
        "unknown_metric",
        lambda f, s: _with_series(f, s, _one(f.devices[0], "rpm", 1.0)),
        readings=1,
    ),
    Case("empty batch", "empty_batch", lambda f, s: _with_series(f, s, [])),
    Case("event time past year 9999", "timestamp_out_of_window", _far_event),
    Case(
        "out of range",
        "out_of_range",
        lambda f, s: _with_series(f, s, _one(f.devices[0], "temperature", 1e9)),
        readings=1,
    ),
    Case(
        "unknown field",
        "invalid_field",
        lambda f, s: (
            b"SM\x01\x00"
            + msgpack.packb(
                {
                    "k": "batch",
                    "gw": f.gateway.bytes,
                    "stream": b"x" * 16,
                    "seq": s,
                    "created": 1,
                    "series": [],
                    "evil": 1,
                }
            )
        ),
        stream=lambda seq: uuid.UUID(bytes=b"x" * 16),
    ),
]


def _expected(case: Case, seq: int) -> Ack:
    """The ack of ``case`` sent as ``seq``: every reading it carries refused or quarantined."""
    quarantined = not case.unaddressable and outcome(case.reason) is Outcome.QUARANTINED
    held, refused = (case.readings, 0) if quarantined else (0, case.readings)
    return Ack(
        stream=NIL if case.unaddressable else case.stream(seq),
        seq=0 if case.unaddressable else seq,
        result=AckResult.QUARANTINED if quarantined else AckResult.REJECTED,
        accepted=0,
        rejected=refused,
        reason=case.reason,
        quarantined=held,
        reasons={case.reason: (held, refused)},
    )


async def test_hostile_payloads_are_refused_with_their_reason_and_good_batches_still_stored(
    dbs: Databases,
) -> None:
    """Each hostile payload is acked, under its own stream and seq, with its reason code, its
    table outcome (quarantined or rejected) and the count of its readings, and writes no reading;
    a good batch after it is stored."""
    fleet = dbs.fleet
    assert fleet is not None
    assert len({c.reason for c in CASES}) >= 15
    p = f"h{uuid.uuid4().hex[:10]}"
    results: list[tuple[str, Ack, Ack]] = []
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            for i, case in enumerate(CASES):
                seq = 1000 + i
                gw.publish(
                    case.payload(fleet, seq), tenant=case.tenant(fleet), gateway=case.gateway(fleet)
                )
                gw.publish(_good(fleet, i))
                bad, good = await asyncio.to_thread(gw.wait_acks, 2)
                results.append((case.name, bad, good))
    assert [
        (
            c.name,
            _expected(c, 1000 + i),
            Ack(stream=uuid.UUID(int=i + 1), seq=i, result=AckResult.OK, accepted=3),
        )
        for i, c in enumerate(CASES)
    ] == results
    rows = await dbs.fetch("SELECT count(*) AS n FROM readings")
    assert rows[0]["n"] == 3 * len(CASES)
    rejects = await dbs.fetch("SELECT DISTINCT reason FROM ingest_rejects")
    refused = {c.reason for i, c in enumerate(CASES) if _expected(c, i).result == "rejected"}
    assert refused == {r["reason"] for r in rejects}
    held = await dbs.fetch("SELECT DISTINCT reason FROM quarantine")
    kept = {c.reason for i, c in enumerate(CASES) if _expected(c, i).result == "quarantined"}
    assert kept == {r["reason"] for r in held}
    assert AckResult.REJECTED.value == "rejected"
