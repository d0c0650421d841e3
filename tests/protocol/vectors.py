"""Golden vectors of wire protocol v1: frames as bytes beside their decoded form.

``python -m tests.protocol.vectors`` rewrites ``tests/vectors/`` — do it only for a deliberate
change of the wire format, and say so in review: agents in the field speak the old bytes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from protocol import (
    Ack,
    AckResult,
    Backlog,
    Batch,
    DeviceStatus,
    Event,
    Frame,
    GatewayStatus,
    Series,
    TimeReply,
    TimeRequest,
    encode_frame,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
GW = uuid.UUID("6f1c2b9e-3d4a-4c5b-8e7f-0a1b2c3d4e5f")
STREAM = uuid.UUID("0b7e4c2a-91d3-4f6e-a5b8-c9d0e1f2a3b4")
DEV1 = uuid.UUID("a1a1a1a1-b2b2-4c3c-8d4d-e5e5e5e5e5e5")
DEV2 = uuid.UUID("f0f0f0f0-1111-4222-9333-444444444444")
T0 = 1_764_000_000_000_000

_batch = Batch(
    gateway_id=GW,
    stream=STREAM,
    seq=42,
    created=T0 + 3_000_000,
    series=[
        Series(
            device_id=DEV1,
            metric="temperature",
            timestamps=[T0, T0 + 1_000_000, T0 + 2_000_150],
            values=[21.37, 21.38, 21.36],
        ),
        Series(
            device_id=DEV1,
            metric="door_open",
            timestamps=[T0, T0 + 2_000_000],
            values=[False, True],
        ),
        Series(
            device_id=DEV2,
            metric="energy_wh",
            timestamps=[T0, T0 + 1_000_000],
            values=[123456, 123470],
        ),
        Series(device_id=DEV2, metric="mode", timestamps=[T0], values=["auto"]),
        Series(device_id=DEV2, metric="ratio", timestamps=[T0], values=[0.3333333333333333]),
    ],
    events=[
        Event(
            time=T0 + 1,
            device_id=None,
            severity="warning",
            kind="buffer.dropped",
            message="3 readings dropped",
            attributes={"count": 3, "policy": "drop_oldest"},
        )
    ],
    status=[
        DeviceStatus(time=T0 + 2, device_id=DEV2, status="error", reason="timeout after 1.0 s")
    ],
)

CASES: dict[str, tuple[Frame, bool]] = {
    "batch_plain": (_batch, False),
    "batch_zstd": (_batch, True),
    "status_online_backlog": (
        GatewayStatus(
            gateway_id=GW,
            state="online",
            time=T0,
            version="0.1.0",
            clock="collector",
            backlog=Backlog(
                readings=48_200,
                batches=193,
                oldest_age_s=5412.5,
                ack_rate=620.0,
                production_rate=68.0,
                drain_s=87.3,
                draining=True,
            ),
        ),
        False,
    ),
    "status_offline": (
        GatewayStatus(gateway_id=GW, state="offline", time=T0, version="0.1.0"),
        False,
    ),
    "ack_partial": (
        Ack(
            stream=STREAM,
            seq=42,
            result=AckResult.PARTIAL,
            accepted=9,
            rejected=1,
            reason="out_of_range",
        ),
        False,
    ),
    "ack_quarantined": (
        Ack(
            stream=STREAM,
            seq=43,
            result=AckResult.PARTIAL,
            accepted=6,
            rejected=1,
            reason="unknown_device",
            quarantined=3,
            reasons={"unknown_device": (3, 0), "device_tenant_mismatch": (0, 1)},
        ),
        False,
    ),
    "ack_conflict": (
        Ack(stream=STREAM, seq=44, result=AckResult.CONFLICT, reason="conflict"),
        False,
    ),
    "batch_clock": (
        _batch.model_copy(update={"seq": 45, "series": _batch.series[:1], "clock": "collector"}),
        False,
    ),
    "ack_time": (
        Ack(stream=STREAM, seq=45, result=AckResult.OK, accepted=3, time=T0 + 3_250_000),
        False,
    ),
    "status_online_untrusted": (
        GatewayStatus(gateway_id=GW, state="online", time=86_400_000_000, clock="untrusted"),
        False,
    ),
    "time_request": (TimeRequest(gateway_id=GW, sent=86_400_123_456), False),
    "time_reply": (TimeReply(sent=86_400_123_456, time=T0 + 3_300_000), False),
}


def expected_form(frame: Frame) -> dict[str, object]:
    """The decoded form stored beside the bytes."""
    return {"type": type(frame).__name__, "value": frame.model_dump(mode="json")}


def write() -> None:
    """Rewrite every vector file."""
    VECTORS.mkdir(exist_ok=True)
    for name, (frame, compress) in CASES.items():
        (VECTORS / f"{name}.bin").write_bytes(encode_frame(frame, compress=compress))
        (VECTORS / f"{name}.json").write_text(
            json.dumps(expected_form(frame), indent=2, sort_keys=True) + "\n"
        )


if __name__ == "__main__":
    write()
