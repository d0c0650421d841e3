"""Round trips and refusals of the protocol v1 frame codec."""

from __future__ import annotations

import math
import struct
import uuid

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Ack,
    AckResult,
    Batch,
    Limits,
    ProtocolError,
    Reason,
    Series,
    Value,
    decode_ack,
    decode_batch,
    decode_envelope,
    decode_frame,
    encode_frame,
)
from tests.protocol.strategies import batches, frames

GW = uuid.UUID("00000000-0000-4000-8000-000000000001")
STREAM = uuid.UUID("00000000-0000-4000-8000-000000000002")
DEV = uuid.UUID("00000000-0000-4000-8000-000000000003")


def _same_types(a: object, b: object) -> None:
    """Values keep their msgpack type: a bool stays bool, an int int, -0.0 keeps its sign."""
    if isinstance(a, Batch) and isinstance(b, Batch):
        for sa, sb in zip(a.series, b.series, strict=True):
            assert [type(v) for v in sa.values] == [type(v) for v in sb.values]
            for va, vb in zip(sa.values, sb.values, strict=True):
                if isinstance(va, float):
                    assert math.copysign(1.0, va) == math.copysign(1.0, vb)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(frames, st.sampled_from([None, True, False]))
def test_round_trip(frame: Batch, compress: bool | None) -> None:
    """decode_frame(encode_frame(x)) == x for every valid batch, status and ack."""
    decoded = decode_frame(encode_frame(frame, compress=compress))
    assert frame == decoded
    _same_types(frame, decoded)


@settings(max_examples=50, deadline=None)
@given(batches)
def test_encoding_is_deterministic(batch: Batch) -> None:
    """The same batch always encodes to the same bytes (sealed resends are byte-identical)."""
    assert encode_frame(batch) == encode_frame(batch)


def test_nan_survives_the_wire() -> None:
    """NaN is carried as a float so that the collector can refuse it with its own reason."""
    batch = Batch(
        gateway_id=GW,
        stream=STREAM,
        seq=1,
        created=1,
        series=[Series(device_id=DEV, metric="t", timestamps=[1, 2], values=[float("nan"), 1.5])],
    )
    decoded = decode_batch(encode_frame(batch))
    assert math.isnan(decoded.series[0].values[0])  # type: ignore[arg-type]
    assert 1.5 == decoded.series[0].values[1]


def test_decimal_values_use_the_compact_codec() -> None:
    """Readings with two decimals travel as small integer deltas, not 9-byte doubles."""
    decimals = [20.0 + i / 100 for i in range(100)]
    values: list[Value] = list(decimals)
    batch = Batch(
        gateway_id=GW,
        stream=STREAM,
        seq=1,
        created=1,
        series=[Series(device_id=DEV, metric="t", timestamps=list(range(100)), values=values)],
    )
    frame = encode_frame(batch, compress=False)
    noisy = batch.model_copy(
        update={
            "series": [
                Series(
                    device_id=DEV,
                    metric="t",
                    timestamps=list(range(100)),
                    values=[v + 1e-9 for v in decimals],
                )
            ]
        }
    )
    assert 2 * len(frame) < len(encode_frame(noisy, compress=False))
    assert values == decode_batch(frame).series[0].values


def _body(frame: bytes) -> dict[str, object]:
    return msgpack.unpackb(frame[4:], raw=False)  # type: ignore[no-any-return]


def _frame(body: object, flags: int = 0) -> bytes:
    return b"SM\x01" + bytes([flags]) + bytes(msgpack.packb(body, use_bin_type=True))


def _valid_body() -> dict[str, object]:
    batch = Batch(
        gateway_id=GW,
        stream=STREAM,
        seq=7,
        created=1,
        series=[Series(device_id=DEV, metric="t", timestamps=[1, 2], values=[1.5, 2.5])],
    )
    return _body(encode_frame(batch, compress=False))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.MALFORMED),
        (b"S", Reason.MALFORMED),
        (b"XX\x01\x00\x80", Reason.BAD_MAGIC),
        (b"SM\x02\x00\x80", Reason.UNSUPPORTED_VERSION),
        (b"SM\x01\x02\x80", Reason.UNKNOWN_FLAGS),
        (b"SM\x01\x00", Reason.MALFORMED),
        (b"SM\x01\x00\xc1", Reason.MALFORMED),
        (b"SM\x01\x00\x93\x01\x02\x03", Reason.MALFORMED),
        (b"SM\x01\x01not zstd", Reason.MALFORMED),
        (b"SM\x01\x00\xdd\xff\xff\xff\xff", Reason.MALFORMED),
        (b"SM\x01\x00\xdf\xff\xff\xff\xff", Reason.MALFORMED),
        (b"SM\x01\x00\xc6\xff\xff\xff\xff", Reason.MALFORMED),
        (b"SM\x01\x00" + msgpack.packb({"k": "nope"}), Reason.INVALID_FIELD),
        (b"SM\x01\x00" + msgpack.packb({"k": "batch"}), Reason.INVALID_FIELD),
    ],
)
def test_refusals_carry_their_reason(data: bytes, reason: Reason) -> None:
    """Each kind of bad frame is refused with its stable reason code."""
    with pytest.raises(ProtocolError) as caught:
        decode_frame(data)
    assert reason == caught.value.reason
    assert str(caught.value)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda b: b.update(gw=b"short"), "gw must be 16 bytes"),
        (lambda b: b.update(seq=-1), "seq -1 is outside"),
        (lambda b: b.update(seq="1"), "seq must be an integer"),
        (lambda b: b.update(extra=1), "unknown field(s) extra"),
        (lambda b: b["series"][0].__setitem__(3, [1.0]), "2 timestamps but 1 values"),
        (lambda b: b["series"][0].__setitem__(1, ""), "series[0].metric must be 1 to 128"),
        (
            lambda b: b["series"][0].__setitem__(slice(3, None), [[1.0, [1]]]),
            "series[0].values must be int, float, bool or str",
        ),
        (lambda b: b["series"][0].__setitem__(2, [-5, 1]), "series[0].timestamps leave"),
        (lambda b: b["series"][0].__setitem__(4, 99), "series[0].codec 99 is outside"),
        (lambda b: b.update(events=[[1, None, "loud", "k", "", {}]]), "events[0].severity 'loud'"),
        (
            lambda b: b.update(events=[[1, None, "info", "k", "", {"a": [[[[[[[[[1]]]]]]]]]}]]),
            "nested deeper",
        ),
        (lambda b: b.update(status=[[1, b"x" * 16, "sleepy", ""]]), "status[0].status 'sleepy'"),
    ],
)
def test_invalid_fields_are_named(change: object, needle: str) -> None:
    """An invalid field is refused as invalid_field with a message naming the field."""
    body = _valid_body()
    change(body)  # type: ignore[operator]
    with pytest.raises(ProtocolError) as caught:
        decode_frame(_frame(body))
    assert Reason.INVALID_FIELD == caught.value.reason
    assert needle in str(caught.value)


def test_too_many_points() -> None:
    """A batch over the point limit is refused as too_many_points."""
    body = _valid_body()
    with pytest.raises(ProtocolError) as caught:
        decode_frame(_frame(body), Limits(max_points=1))
    assert Reason.TOO_MANY_POINTS == caught.value.reason


def test_oversized_frame() -> None:
    """A frame above the compressed-size limit is refused before any decoding."""
    with pytest.raises(ProtocolError) as caught:
        decode_frame(b"SM\x01\x00" + b"\x00" * (1 << 20))
    assert Reason.TOO_LARGE == caught.value.reason


@pytest.mark.parametrize("declare_size", [True, False])
def test_zstd_bomb_is_refused(declare_size: bool) -> None:
    """A tiny zstd body inflating to 1 GiB is refused without inflating it."""
    cctx = zstandard.ZstdCompressor(level=19, write_content_size=declare_size)
    if declare_size:
        bomb = cctx.compress(b"\x00" * (64 << 20))
    else:
        chunks = cctx.compressobj()
        bomb = b"".join(chunks.compress(b"\x00" * (1 << 20)) for _ in range(64)) + chunks.flush()
    assert len(bomb) < 1 << 20
    with pytest.raises(ProtocolError) as caught:
        decode_frame(b"SM\x01\x01" + bomb)
    assert Reason.DECOMPRESSION_LIMIT == caught.value.reason


def test_header_declaring_a_huge_content_size() -> None:
    """A zstd header lying about a 1 TiB content size does not make the decoder allocate it."""
    honest = zstandard.ZstdCompressor(write_content_size=True).compress(
        msgpack.packb(_valid_body(), use_bin_type=True)
    )
    # Frame header (RFC 8878 3.1.1.1): magic, descriptor, [window byte], [dictionary id], [content size].
    fhd = honest[4]
    single_segment = bool(fhd & 0x20)
    window_len = 0 if single_segment else 1
    size_len = [1 if single_segment else 0, 2, 4, 8][fhd >> 6]
    assert 0 == fhd & 0x03, "the test frame has no dictionary id"
    header_end = 5 + window_len + size_len
    forged = (
        honest[:4]
        + bytes([fhd | 0xC0])
        + honest[5 : 5 + window_len]
        + struct.pack("<Q", 1 << 40)
        + honest[header_end:]
    )
    with pytest.raises(ProtocolError):
        decode_frame(b"SM\x01\x01" + forged)


def test_kind_specific_decoders() -> None:
    """decode_ack refuses a batch frame with unexpected_kind."""
    ack = Ack(
        stream=STREAM,
        seq=3,
        result=AckResult.PARTIAL,
        accepted=5,
        rejected=1,
        reason="out_of_range",
    )
    assert ack == decode_ack(encode_frame(ack))
    with pytest.raises(ProtocolError) as caught:
        decode_ack(_frame(_valid_body()))
    assert Reason.UNEXPECTED_KIND == caught.value.reason


def test_envelope_of_a_compressed_frame_refused_at_field_checks() -> None:
    """A zstd frame refused for its content (too many series) still yields its stream and seq."""
    series = [
        Series(device_id=DEV, metric=f"m{i}", timestamps=[1], values=[i]) for i in range(10_001)
    ]
    frame = encode_frame(
        Batch(gateway_id=GW, stream=STREAM, seq=77, created=5, series=series), compress=True
    )
    assert frame[3] & 0x01
    with pytest.raises(ProtocolError) as refused:
        decode_batch(frame)
    assert Reason.INVALID_FIELD == refused.value.reason
    envelope = decode_envelope(frame)
    assert envelope is not None
    assert (GW, STREAM, 77, 5) == (
        envelope.gateway_id,
        envelope.stream,
        envelope.seq,
        envelope.created,
    )


def test_envelope_under_a_receivers_smaller_limits() -> None:
    """A frame above a receiver's own frame and point limits is still addressable."""
    series = [
        Series(device_id=DEV, metric="m", timestamps=list(range(1, 2001)), values=[0.5] * 2000)
    ]
    frame = encode_frame(Batch(gateway_id=GW, stream=STREAM, seq=3, created=9, series=series))
    with pytest.raises(ProtocolError):
        decode_batch(frame, Limits(max_frame_bytes=64, max_points=10))
    envelope = decode_envelope(frame)
    assert envelope is not None and (STREAM, 3) == (envelope.stream, envelope.seq)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"XX\x01\x00",
        b"SM\x01\x00\xc1",
        b"SM\x01\x01garbage",
        encode_frame(Ack(stream=STREAM, seq=1, result=AckResult.OK)),
    ],
)
def test_envelope_of_unreadable_frames_is_none(payload: bytes) -> None:
    """Frames without a readable batch envelope give None, never an exception."""
    assert decode_envelope(payload) is None


def test_ack_with_quarantine_counts_round_trips() -> None:
    """Per-reason counts travel in the ack and come back as they were sent."""
    ack = Ack(
        stream=STREAM,
        seq=5,
        result=AckResult.QUARANTINED,
        quarantined=7,
        rejected=1,
        reason="unknown_device",
        reasons={"unknown_device": (7, 0), "device_tenant_mismatch": (0, 1)},
    )
    assert ack == decode_ack(encode_frame(ack))


def test_ack_reasons_are_bounded() -> None:
    """An ack with more reason entries than the limit is refused as invalid_field."""
    body = {
        "k": "ack",
        "stream": STREAM.bytes,
        "seq": 1,
        "result": "ok",
        "accepted": 0,
        "rejected": 0,
        "reason": "",
        "reasons": {f"r{i}": [1, 0] for i in range(65)},
    }
    with pytest.raises(ProtocolError) as refused:
        decode_ack(b"SM\x01\x00" + msgpack.packb(body, use_bin_type=True))
    assert Reason.INVALID_FIELD == refused.value.reason
