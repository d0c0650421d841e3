"""Frame codec of wire protocol v1.

A frame is a 4-byte header — magic ``b"SM"``, version 1, flags (bit 0: body is zstd) — and a
msgpack map. Decoding checks the header before touching the body, caps every size and length,
and raises nothing but :class:`~protocol.errors.ProtocolError`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

import msgpack
import zstandard

from protocol.errors import ProtocolError, Reason
from protocol.models import (
    MAX_SEQ,
    MAX_TIME_US,
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
)

MAGIC = b"SM"
VERSION = 1
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD
HEADER_SIZE = 4

# Value codecs of a series (the optional fifth element of a series entry).
CODEC_PLAIN = 0
CODEC_INT_DELTA = 1
CODEC_DECIMAL_DELTA = 2  # 2 + d: delta-encoded integers, value = integer / 10**d, d in 0..9
MAX_DECIMALS = 9
_MAX_EXACT_INT = 2**53
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Below this size compression rarely pays for its 4+ bytes of zstd framing.
_COMPRESS_MIN_BODY = 128
_ZSTD_LEVEL = 3
_MAX_ZSTD_WINDOW = 1 << 23


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps applied while decoding; defaults are those of protocol v1 (``docs/protocol.md``)."""

    max_frame_bytes: int = 1 << 20
    max_body_bytes: int = 16 << 20
    max_points: int = 100_000
    max_series: int = 10_000
    max_events: int = 1_000
    max_status: int = 1_000
    max_str_len: int = 65_536
    max_bin_len: int = 64
    max_array_len: int = 100_000
    max_map_len: int = 256
    max_depth: int = 8


DEFAULT_LIMITS = Limits()


def _fail(reason: Reason, message: str) -> ProtocolError:
    return ProtocolError(reason, message)


# --- encoding --------------------------------------------------------------------------------


def _decimals(values: list[Any]) -> int | None:
    """Smallest d such that every value is exactly integer / 10**d, or None."""
    for v in values:
        if (
            type(v) is not float
            or not abs(v) <= _MAX_EXACT_INT
            or (v == 0.0 and math.copysign(1.0, v) < 0)
        ):
            return None
    for d in range(MAX_DECIMALS + 1):
        scale = 10**d
        ok = True
        for v in values:
            n = round(v * scale)
            if abs(n) > _MAX_EXACT_INT or n / scale != v:
                ok = False
                break
        if ok:
            return d
    return None


def _deltas(ints: list[int]) -> list[int]:
    return [ints[0], *(b - a for a, b in pairwise(ints))]


def _encode_series(s: Series) -> list[Any]:
    ts = _deltas(s.timestamps)
    values = s.values
    if all(type(v) is int for v in values) and all(_INT64_MIN <= v <= _INT64_MAX for v in values):  # type: ignore[operator]
        deltas = _deltas(values)  # type: ignore[arg-type]
        if all(_INT64_MIN <= v <= _INT64_MAX for v in deltas):
            return [s.device_id.bytes, s.metric, ts, deltas, CODEC_INT_DELTA]
    d = _decimals(values)
    if d is not None:
        scale = 10**d
        ints = [round(v * scale) for v in values]  # type: ignore[operator]
        return [s.device_id.bytes, s.metric, ts, _deltas(ints), CODEC_DECIMAL_DELTA + d]
    return [s.device_id.bytes, s.metric, ts, list(values)]


def _batch_body(b: Batch) -> dict[str, Any]:
    body: dict[str, Any] = {
        "k": "batch",
        "gw": b.gateway_id.bytes,
        "stream": b.stream.bytes,
        "seq": b.seq,
        "created": b.created,
        "series": [_encode_series(s) for s in b.series],
    }
    if b.events:
        body["events"] = [
            [
                e.time,
                e.device_id.bytes if e.device_id else None,
                e.severity,
                e.kind,
                e.message,
                e.attributes,
            ]
            for e in b.events
        ]
    if b.status:
        body["status"] = [[s.time, s.device_id.bytes, s.status, s.reason] for s in b.status]
    if b.clock is not None:
        body["clock"] = b.clock
    return body


def _body(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Batch):
        return _batch_body(frame)
    if isinstance(frame, GatewayStatus):
        body: dict[str, Any] = {
            "k": "status",
            "gw": frame.gateway_id.bytes,
            "state": frame.state,
            "time": frame.time,
        }
        if frame.version:
            body["version"] = frame.version
        if frame.clock is not None:
            body["clock"] = frame.clock
        if frame.backlog is not None:
            body["backlog"] = frame.backlog.model_dump()
        return body
    if isinstance(frame, Ack):
        ack: dict[str, Any] = {
            "k": "ack",
            "stream": frame.stream.bytes,
            "seq": frame.seq,
            "result": frame.result.value,
            "accepted": frame.accepted,
            "rejected": frame.rejected,
            "reason": frame.reason,
        }
        # Only when there is something to say: an ack of a fully stored batch keeps the first
        # release's shape, which agents of that release decode.
        if frame.quarantined:
            ack["quarantined"] = frame.quarantined
        if frame.reasons:
            ack["reasons"] = {k: [q, r] for k, (q, r) in frame.reasons.items()}
        if frame.time is not None:
            ack["time"] = frame.time
        return ack
    if isinstance(frame, TimeRequest):
        return {"k": "time_request", "gw": frame.gateway_id.bytes, "sent": frame.sent}
    if isinstance(frame, TimeReply):
        return {"k": "time", "sent": frame.sent, "time": frame.time}
    raise TypeError(f"cannot encode {type(frame).__name__} as a frame")


def encode_frame(frame: Frame, *, compress: bool | None = None) -> bytes:
    """Encode a batch, status or ack as a frame.

    ``compress=None`` compresses with zstd when that makes the frame smaller; ``True`` always
    compresses, ``False`` never does.
    """
    body = msgpack.packb(_body(frame), use_bin_type=True)
    flags = 0
    if compress or (compress is None and len(body) >= _COMPRESS_MIN_BODY):
        packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True).compress(body)
        if compress or len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    return MAGIC + bytes((VERSION, flags)) + bytes(body)


# --- decoding --------------------------------------------------------------------------------


def _decompress(data: bytes, limits: Limits) -> bytes:
    """Inflate a zstd body, never producing (or allocating for) more than the limit."""
    # Streaming read: the frame's declared content size is not trusted for the allocation.
    dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
    cap = limits.max_body_bytes
    chunks: list[bytes] = []
    total = 0
    try:
        reader = dctx.stream_reader(data, read_across_frames=False, read_size=65536)
        while True:
            chunk = reader.read(min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise _fail(
                    Reason.DECOMPRESSION_LIMIT,
                    f"zstd body inflates beyond the {cap}-byte limit",
                )
    except zstandard.ZstdError as exc:
        raise _fail(Reason.MALFORMED, f"zstd body cannot be decompressed: {exc}") from None
    if total == 0:
        raise _fail(Reason.MALFORMED, "zstd body is empty")
    return b"".join(chunks)


def _uuid(value: Any, field: str) -> uuid.UUID:
    if type(value) is not bytes or len(value) != 16:
        raise _fail(
            Reason.INVALID_FIELD, f"{field} must be 16 bytes of bin, got {_describe(value)}"
        )
    return uuid.UUID(bytes=value)


def _describe(value: Any) -> str:
    if isinstance(value, bytes | str | list | dict):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise _fail(Reason.INVALID_FIELD, f"{field} must be an integer, got {_describe(value)}")
    if not lo <= value <= hi:
        raise _fail(Reason.INVALID_FIELD, f"{field} {value} is outside [{lo}, {hi}]")
    return value


def _str(
    value: Any, field: str, max_len: int, *, choices: tuple[str, ...] = (), min_len: int = 0
) -> str:
    if type(value) is not str:
        raise _fail(Reason.INVALID_FIELD, f"{field} must be a string, got {_describe(value)}")
    if not min_len <= len(value) <= max_len:
        raise _fail(
            Reason.INVALID_FIELD,
            f"{field} must be {min_len} to {max_len} characters long, got {len(value)}",
        )
    if choices and value not in choices:
        raise _fail(Reason.INVALID_FIELD, f"{field} {value!r} is not one of {', '.join(choices)}")
    return value


def _list(value: Any, field: str, max_len: int) -> list[Any]:
    if type(value) is not list:
        raise _fail(Reason.INVALID_FIELD, f"{field} must be an array, got {_describe(value)}")
    if len(value) > max_len:
        raise _fail(Reason.INVALID_FIELD, f"{field} has {len(value)} entries, more than {max_len}")
    return value


def _check_depth(value: Any, depth: int, limit: int, field: str) -> None:
    if depth > limit:
        raise _fail(Reason.INVALID_FIELD, f"{field} is nested deeper than {limit} levels")
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise _fail(Reason.INVALID_FIELD, f"{field} keys must be strings")
            _check_depth(v, depth + 1, limit, field)
    elif type(value) is list:
        for v in value:
            _check_depth(v, depth + 1, limit, field)
    elif type(value) is bytes:
        raise _fail(Reason.INVALID_FIELD, f"{field} must hold JSON values, not bin")


def _absolute(deltas: list[Any], field: str) -> list[int]:
    # The type check runs in C (map, set); the loop that names the culprit only on failure.
    if not set(map(type, deltas)) <= {int}:
        for d in deltas:
            if type(d) is not int:
                raise _fail(Reason.INVALID_FIELD, f"{field} must hold integers, got {_describe(d)}")
    return list(accumulate(deltas))


def _decode_series(entry: Any, i: int, limits: Limits) -> Series:
    field = f"series[{i}]"
    item = _list(entry, field, 5)
    if len(item) not in (4, 5):
        raise _fail(Reason.INVALID_FIELD, f"{field} must have 4 or 5 elements, got {len(item)}")
    device = _uuid(item[0], f"{field}.device")
    metric = _str(item[1], f"{field}.metric", 128, min_len=1)
    ts = _absolute(
        _list(item[2], f"{field}.timestamps", limits.max_array_len), f"{field}.timestamps"
    )
    raw = _list(item[3], f"{field}.values", limits.max_array_len)
    if not ts:
        raise _fail(Reason.INVALID_FIELD, f"{field} holds no readings")
    if len(ts) != len(raw):
        raise _fail(Reason.INVALID_FIELD, f"{field} has {len(ts)} timestamps but {len(raw)} values")
    if min(ts) < 0 or max(ts) > MAX_TIME_US:
        raise _fail(Reason.INVALID_FIELD, f"{field}.timestamps leave [0, 2^63)")
    codec = (
        _int(item[4], f"{field}.codec", 0, CODEC_DECIMAL_DELTA + MAX_DECIMALS)
        if len(item) == 5
        else 0
    )
    values: list[Any]
    if codec == CODEC_PLAIN:
        for v in raw:
            if type(v) not in (int, float, bool, str):
                raise _fail(
                    Reason.INVALID_FIELD,
                    f"{field}.values must be int, float, bool or str, got {_describe(v)}",
                )
        values = raw
    else:
        ints = _absolute(raw, f"{field}.values")
        if min(ints) < _INT64_MIN or max(ints) > _INT64_MAX:
            raise _fail(Reason.INVALID_FIELD, f"{field}.values leave the 64-bit integer range")
        if codec == CODEC_INT_DELTA:
            values = ints
        else:
            if max(abs(min(ints)), abs(max(ints))) > _MAX_EXACT_INT:
                raise _fail(Reason.INVALID_FIELD, f"{field}.values exceed 2^53 in a decimal codec")
            scale = 10 ** (codec - CODEC_DECIMAL_DELTA)
            values = [n / scale for n in ints]
    return Series.model_construct(device_id=device, metric=metric, timestamps=ts, values=values)


def _decode_event(entry: Any, i: int, limits: Limits) -> Event:
    field = f"events[{i}]"
    item = _list(entry, field, 6)
    if len(item) != 6:
        raise _fail(Reason.INVALID_FIELD, f"{field} must have 6 elements, got {len(item)}")
    attributes = item[5]
    if type(attributes) is not dict:
        raise _fail(
            Reason.INVALID_FIELD, f"{field}.attributes must be a map, got {_describe(attributes)}"
        )
    _check_depth(attributes, 1, limits.max_depth, f"{field}.attributes")
    return Event.model_construct(
        time=_int(item[0], f"{field}.time", 0, MAX_TIME_US),
        device_id=None if item[1] is None else _uuid(item[1], f"{field}.device"),
        severity=_str(
            item[2],
            f"{field}.severity",
            16,
            choices=("debug", "info", "warning", "error", "critical"),
        ),
        kind=_str(item[3], f"{field}.kind", 64, min_len=1),
        message=_str(item[4], f"{field}.message", 1024),
        attributes=attributes,
    )


def _decode_status(entry: Any, i: int) -> DeviceStatus:
    field = f"status[{i}]"
    item = _list(entry, field, 4)
    if len(item) != 4:
        raise _fail(Reason.INVALID_FIELD, f"{field} must have 4 elements, got {len(item)}")
    return DeviceStatus.model_construct(
        time=_int(item[0], f"{field}.time", 0, MAX_TIME_US),
        device_id=_uuid(item[1], f"{field}.device"),
        status=_str(item[2], f"{field}.status", 16, choices=("online", "error", "offline")),
        reason=_str(item[3], f"{field}.reason", 256),
    )


def _known_keys(
    body: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...], what: str
) -> None:
    missing = [k for k in required if k not in body]
    if missing:
        raise _fail(Reason.INVALID_FIELD, f"{what} frame lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in body if k not in required and k not in optional)
    if unknown:
        raise _fail(Reason.INVALID_FIELD, f"{what} frame has unknown field(s) {', '.join(unknown)}")


def _decode_batch(body: dict[str, Any], limits: Limits) -> Batch:
    _known_keys(
        body,
        ("k", "gw", "stream", "seq", "created", "series"),
        ("events", "status", "clock"),
        "batch",
    )
    series_raw = _list(body["series"], "series", limits.max_series)
    series = [_decode_series(e, i, limits) for i, e in enumerate(series_raw)]
    points = sum(len(s.timestamps) for s in series)
    if points > limits.max_points:
        raise _fail(
            Reason.TOO_MANY_POINTS, f"batch holds {points} readings, more than {limits.max_points}"
        )
    events_raw = _list(body.get("events", []), "events", limits.max_events)
    status_raw = _list(body.get("status", []), "status", limits.max_status)
    return Batch.model_construct(
        gateway_id=_uuid(body["gw"], "gw"),
        stream=_uuid(body["stream"], "stream"),
        seq=_int(body["seq"], "seq", 0, MAX_SEQ),
        created=_int(body["created"], "created", 0, MAX_TIME_US),
        series=series,
        events=[_decode_event(e, i, limits) for i, e in enumerate(events_raw)],
        status=[_decode_status(e, i) for i, e in enumerate(status_raw)],
        clock=(
            _str(body["clock"], "clock", 16, choices=("system", "collector", "untrusted"))
            if "clock" in body
            else None
        ),
    )


def _decode_gateway_status(body: dict[str, Any]) -> GatewayStatus:
    _known_keys(body, ("k", "gw", "state", "time"), ("version", "clock", "backlog"), "status")
    return GatewayStatus.model_construct(
        gateway_id=_uuid(body["gw"], "gw"),
        state=_str(body["state"], "state", 16, choices=("online", "offline")),
        time=_int(body["time"], "time", 0, MAX_TIME_US),
        version=_str(body.get("version", ""), "version", 64),
        clock=(
            _str(body["clock"], "clock", 16, choices=("system", "collector", "untrusted"))
            if "clock" in body
            else None
        ),
        backlog=_backlog(body["backlog"]) if "backlog" in body else None,
    )


_BACKLOG_COUNTS = ("readings", "batches")
_BACKLOG_FIGURES = ("oldest_age_s", "ack_rate", "production_rate", "drain_s")


def _figure(value: Any, field: str, nullable: bool) -> float | None:
    if value is None and nullable:
        return None
    if type(value) not in (int, float) or not 0 <= value <= 1e12:
        raise _fail(
            Reason.INVALID_FIELD, f"{field} must be a number in [0, 1e12], got {_describe(value)}"
        )
    return float(value)


def _backlog(value: Any) -> Backlog:
    if type(value) is not dict:
        raise _fail(Reason.INVALID_FIELD, f"backlog must be a map, got {_describe(value)}")
    _known_keys(value, _BACKLOG_COUNTS, (*_BACKLOG_FIGURES, "draining"), "status backlog")
    draining = value.get("draining", False)
    if type(draining) is not bool:
        raise _fail(
            Reason.INVALID_FIELD, f"backlog.draining must be a boolean, got {_describe(draining)}"
        )
    return Backlog.model_construct(
        readings=_int(value["readings"], "backlog.readings", 0, 2**63 - 1),
        batches=_int(value["batches"], "backlog.batches", 0, 2**63 - 1),
        oldest_age_s=_figure(value.get("oldest_age_s"), "backlog.oldest_age_s", True),
        ack_rate=_figure(value.get("ack_rate", 0.0), "backlog.ack_rate", False) or 0.0,
        production_rate=_figure(value.get("production_rate", 0.0), "backlog.production_rate", False)
        or 0.0,
        drain_s=_figure(value.get("drain_s"), "backlog.drain_s", True),
        draining=draining,
    )


MAX_ACK_REASONS = 64


def _ack_reasons(value: Any) -> dict[str, tuple[int, int]]:
    if type(value) is not dict:
        raise _fail(Reason.INVALID_FIELD, f"reasons must be a map, got {_describe(value)}")
    if len(value) > MAX_ACK_REASONS:
        raise _fail(Reason.INVALID_FIELD, f"reasons has more than {MAX_ACK_REASONS} entries")
    out: dict[str, tuple[int, int]] = {}
    for key, pair in value.items():
        name = _str(key, "reasons key", 64, min_len=1)
        items = _list(pair, f"reasons[{name}]", 2)
        if len(items) != 2:
            raise _fail(Reason.INVALID_FIELD, f"reasons[{name}] must be [quarantined, refused]")
        out[name] = (
            _int(items[0], f"reasons[{name}][0]", 0, _INT64_MAX),
            _int(items[1], f"reasons[{name}][1]", 0, _INT64_MAX),
        )
    return out


def _decode_ack(body: dict[str, Any]) -> Ack:
    _known_keys(
        body,
        ("k", "stream", "seq", "result", "accepted", "rejected", "reason"),
        ("quarantined", "reasons", "time"),
        "ack",
    )
    return Ack.model_construct(
        stream=_uuid(body["stream"], "stream"),
        seq=_int(body["seq"], "seq", 0, MAX_SEQ),
        result=AckResult(
            _str(body["result"], "result", 16, choices=tuple(r.value for r in AckResult))
        ),
        accepted=_int(body["accepted"], "accepted", 0, _INT64_MAX),
        rejected=_int(body["rejected"], "rejected", 0, _INT64_MAX),
        reason=_str(body["reason"], "reason", 64),
        quarantined=_int(body.get("quarantined", 0), "quarantined", 0, _INT64_MAX),
        reasons=_ack_reasons(body.get("reasons", {})),
        time=_int(body["time"], "time", 0, MAX_TIME_US) if "time" in body else None,
    )


def _decode_time_request(body: dict[str, Any]) -> TimeRequest:
    _known_keys(body, ("k", "gw", "sent"), (), "time_request")
    return TimeRequest.model_construct(
        gateway_id=_uuid(body["gw"], "gw"), sent=_int(body["sent"], "sent", 0, MAX_TIME_US)
    )


def _decode_time_reply(body: dict[str, Any]) -> TimeReply:
    _known_keys(body, ("k", "sent", "time"), (), "time")
    return TimeReply.model_construct(
        sent=_int(body["sent"], "sent", 0, MAX_TIME_US),
        time=_int(body["time"], "time", 0, MAX_TIME_US),
    )


@dataclass(frozen=True, slots=True)
class Envelope:
    """The address of a batch frame: enough to acknowledge it and to keep it, nothing more."""

    gateway_id: uuid.UUID
    stream: uuid.UUID
    seq: int
    created: int | None


def decode_envelope(data: bytes | bytearray | memoryview) -> Envelope | None:
    """The envelope of a batch frame that a receiver refused, or ``None`` if it cannot be read.

    Uses the protocol's default limits, not a receiver's stricter ones, so that a frame refused
    for its size or content (more series or readings than the receiver takes) can still be
    acknowledged under its own stream and seq and kept whole. Compressed frames are inflated
    within the same caps as :func:`decode_frame`. Never raises.
    """
    try:
        raw = bytes(data)
        flags = decode_header(raw, DEFAULT_LIMITS)
        body_bytes = raw[HEADER_SIZE:]
        if flags & FLAG_ZSTD:
            body_bytes = _decompress(body_bytes, DEFAULT_LIMITS)
        body = msgpack.unpackb(
            body_bytes,
            raw=False,
            strict_map_key=True,
            max_str_len=DEFAULT_LIMITS.max_str_len,
            max_bin_len=DEFAULT_LIMITS.max_bin_len,
            max_array_len=DEFAULT_LIMITS.max_array_len,
            max_map_len=DEFAULT_LIMITS.max_map_len,
            max_ext_len=0,
        )
        if type(body) is not dict or body.get("k") != "batch":
            return None
        created = body.get("created")
        return Envelope(
            gateway_id=_uuid(body.get("gw"), "gw"),
            stream=_uuid(body.get("stream"), "stream"),
            seq=_int(body.get("seq"), "seq", 0, MAX_SEQ),
            created=created if type(created) is int and 0 <= created <= MAX_TIME_US else None,
        )
    except Exception:  # anything at all: this is the salvage of a frame already refused
        return None


def decode_header(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> int:
    """Check a frame's size and header; return its flags."""
    if len(data) > limits.max_frame_bytes:
        raise _fail(
            Reason.TOO_LARGE,
            f"frame of {len(data)} bytes exceeds the {limits.max_frame_bytes}-byte limit",
        )
    if len(data) < HEADER_SIZE:
        raise _fail(
            Reason.MALFORMED, f"frame of {len(data)} bytes is shorter than its 4-byte header"
        )
    if data[:2] != MAGIC:
        raise _fail(Reason.BAD_MAGIC, f"frame starts with {bytes(data[:2])!r}, not {MAGIC!r}")
    if data[2] != VERSION:
        raise _fail(
            Reason.UNSUPPORTED_VERSION,
            f"frame is protocol version {data[2]}, this side speaks {VERSION}",
        )
    flags = data[3]
    if flags & ~KNOWN_FLAGS:
        raise _fail(
            Reason.UNKNOWN_FLAGS, f"frame has unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}"
        )
    return flags


def decode_frame(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode a frame into a :class:`Batch`, :class:`GatewayStatus`, :class:`Ack`,
    :class:`TimeRequest` or :class:`TimeReply`.

    Raises only :class:`ProtocolError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail(Reason.MALFORMED, f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    flags = decode_header(data, limits)
    body_bytes = data[HEADER_SIZE:]
    if flags & FLAG_ZSTD:
        body_bytes = _decompress(body_bytes, limits)
    elif len(body_bytes) > limits.max_body_bytes:
        raise _fail(
            Reason.TOO_LARGE,
            f"body of {len(body_bytes)} bytes exceeds the {limits.max_body_bytes}-byte limit",
        )
    try:
        # A fresh unpackb per frame: an Unpacker is never reused after an error.
        body = msgpack.unpackb(
            body_bytes,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError subclasses, UnicodeDecodeError, TypeError
        raise _fail(
            Reason.MALFORMED, f"body is not valid msgpack within the limits: {exc}"
        ) from None
    if type(body) is not dict:
        raise _fail(Reason.MALFORMED, f"body must be a msgpack map, got {_describe(body)}")
    kind = body.get("k")
    if kind == "batch":
        return _decode_batch(body, limits)
    if kind == "status":
        return _decode_gateway_status(body)
    if kind == "ack":
        return _decode_ack(body)
    if kind == "time_request":
        return _decode_time_request(body)
    if kind == "time":
        return _decode_time_reply(body)
    raise _fail(
        Reason.INVALID_FIELD,
        f"frame kind {kind!r} is not batch, status, ack, time_request or time",
    )


def decode_batch(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Batch:
    """Decode a frame that must be a batch."""
    frame = decode_frame(data, limits)
    if not isinstance(frame, Batch):
        raise _fail(Reason.UNEXPECTED_KIND, f"expected a batch frame, got {type(frame).__name__}")
    return frame


def decode_ack(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Ack:
    """Decode a frame that must be an ack."""
    frame = decode_frame(data, limits)
    if not isinstance(frame, Ack):
        raise _fail(Reason.UNEXPECTED_KIND, f"expected an ack frame, got {type(frame).__name__}")
    return frame


def decode_status(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> GatewayStatus:
    """Decode a frame that must be a gateway status."""
    frame = decode_frame(data, limits)
    if not isinstance(frame, GatewayStatus):
        raise _fail(Reason.UNEXPECTED_KIND, f"expected a status frame, got {type(frame).__name__}")
    return frame
