"""The decoder under 100,000 random and mutated inputs: only ProtocolError, bounded memory."""

from __future__ import annotations

import random
import struct
import tracemalloc
import uuid

from protocol import (
    Ack,
    AckResult,
    Batch,
    Event,
    GatewayStatus,
    ProtocolError,
    Series,
    decode_frame,
    encode_frame,
)

CASES = 100_000


def _seed_frames(rng: random.Random) -> list[bytes]:
    gw, stream, dev = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)
    series = [
        Series(
            device_id=dev,
            metric="temperature",
            timestamps=[10**15 + i * 1_000_000 for i in range(20)],
            values=[round(20 + rng.random(), 2) for _ in range(20)],
        ),
        Series(device_id=dev, metric="state", timestamps=[10**15, 10**15 + 1], values=[True, "on"]),
        Series(device_id=dev, metric="count", timestamps=[10**15, 10**15 + 5], values=[1, 2**40]),
        Series(device_id=dev, metric="noise", timestamps=[10**15], values=[rng.random()]),
    ]
    batch = Batch(
        gateway_id=gw,
        stream=stream,
        seq=9,
        created=10**15,
        series=series,
        events=[Event(time=1, kind="buffer.dropped", attributes={"n": 3, "l": [1, {"a": None}]})],
    )
    return [
        encode_frame(batch, compress=False),
        encode_frame(batch, compress=True),
        encode_frame(GatewayStatus(gateway_id=gw, state="online", time=5, version="1.0")),
        encode_frame(
            Ack(
                stream=stream,
                seq=9,
                result=AckResult.PARTIAL,
                accepted=3,
                rejected=1,
                reason="out_of_range",
            )
        ),
    ]


_HUGE = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\xcf" + b"\xff" * 8,
    b"\xd3\x80" + b"\x00" * 7,
]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    op = rng.randrange(7)
    if op == 0:
        return bytes(data[: rng.randrange(len(data) + 1)])
    if op == 1:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if op == 2:  # a length field set huge
        i = rng.randrange(4, len(data))
        huge = rng.choice(_HUGE)
        return bytes(data[:i] + huge + data[i + len(huge) :])
    if op == 3:
        i = rng.randrange(len(data))
        return bytes(
            data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[i:]
        )
    if op == 4:
        i = rng.randrange(len(data))
        return bytes(data[:i] + data[i + rng.randint(1, 16) :])
    if op == 5:  # keep a valid header, random body
        return bytes(data[:4]) + rng.randbytes(rng.randrange(64))
    return struct.pack("B", rng.randrange(256)) * rng.randrange(8) + rng.randbytes(
        rng.randrange(48)
    )


def test_only_protocol_errors_escape_and_memory_stays_bounded() -> None:
    """100,000 mutated or random frames: every one decodes or raises ProtocolError; peak memory stays small."""
    rng = random.Random(20261125)
    seeds = _seed_frames(rng)
    escapes: list[tuple[bytes, BaseException]] = []
    decoded = refused = 0
    tracemalloc.start()
    try:
        for i in range(CASES):
            data = (
                rng.randbytes(rng.randrange(64)) if i % 10 == 0 else _mutate(rng, rng.choice(seeds))
            )
            try:
                decode_frame(data)
                decoded += 1
            except ProtocolError as exc:
                assert exc.reason and str(exc)
                refused += 1
            except Exception as exc:
                escapes.append((data, exc))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [] == escapes[:5]
    assert CASES == decoded + refused
    assert refused > CASES // 2
    assert peak < 32 << 20, f"decoding peaked at {peak} bytes"
