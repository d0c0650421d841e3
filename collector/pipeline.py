"""What one MQTT message becomes: decode, authorize, validate, and stage it for the writer.

Every message, good or bad, turns into exactly one :class:`Staged` item, and items reach the
writer in arrival order; that is what lets the writer send the PUBACKs in arrival order after
the commit. Outcomes are values, not exceptions: a refused batch is a ``Staged`` with result
``rejected`` and its reject rows. The only exception that leaves :meth:`Pipeline.process` is
:class:`~collector.errors.DatabaseUnavailable` (the metadata database could not answer), after
which the same message is processed again.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

from collector.registry import DeviceEntry, Registry
from collector.validation import MetricRule, Verdict, check_series
from protocol import (
    AckResult,
    Batch,
    DeviceStatus,
    Event,
    GatewayStatus,
    Limits,
    ProtocolError,
    Reason,
    TopicAddress,
    TopicKind,
    build_topic,
    decode_batch,
    decode_status,
    parse_topic,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NIL_UUID = uuid.UUID(int=0)
Key = tuple[uuid.UUID, uuid.UUID, int]


def to_datetime(us: int) -> datetime:
    """An aware datetime from microseconds since the epoch."""
    return EPOCH + timedelta(microseconds=us)


def to_datetime_or_none(us: int | None) -> datetime | None:
    """Like :func:`to_datetime`, ``None`` for a time that no datetime can hold."""
    if us is None:
        return None
    try:
        return to_datetime(us)
    except OverflowError:
        return None


@dataclass(frozen=True, slots=True)
class Incoming:
    """One MQTT message as received, with what is needed to acknowledge it later."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class SeriesRows:
    """Accepted readings of one device's metric, ready for COPY."""

    tenant_id: uuid.UUID
    device_id: uuid.UUID
    metric: str
    timestamps: list[int]
    values: list[Any]


@dataclass(frozen=True, slots=True)
class RejectRow:
    """One row of ``ingest_rejects``."""

    reason: str
    message: str
    topic: str
    tenant_id: uuid.UUID | None = None
    gateway_id: uuid.UUID | None = None
    stream: uuid.UUID | None = None
    seq: int | None = None
    device_id: uuid.UUID | None = None
    metric: str | None = None
    points: int = 0
    sample: str = "[]"

    def record(self) -> tuple[Any, ...]:
        """The row in ``ingest_rejects`` column order (see ``REJECT_COLUMNS``)."""
        return (
            self.reason,
            self.message,
            self.topic,
            self.tenant_id,
            self.gateway_id,
            self.stream,
            self.seq,
            self.device_id,
            self.metric,
            self.points,
            self.sample,
        )


REJECT_COLUMNS = (
    "reason",
    "message",
    "topic",
    "tenant_id",
    "gateway_id",
    "stream",
    "seq",
    "device_id",
    "metric",
    "points",
    "sample",
)


@dataclass(slots=True)
class Staged:
    """A processed message waiting for the writer's next flush.

    ``key`` is set for a decoded, addressed batch: its rows are written only if its ledger row
    is new. ``ack_topic`` and ``result`` say which ack frame to publish after the commit
    (``result`` ``None``: no ack frame, as for status frames).
    """

    incoming: Incoming
    key: Key | None = None
    tenant_id: uuid.UUID | None = None
    gateway_id: uuid.UUID | None = None
    stream: uuid.UUID | None = None
    seq: int = 0
    created: int | None = None
    ack_topic: str | None = None
    result: AckResult | None = None
    reason: str = ""
    accepted: int = 0
    rejected: int = 0
    series: list[SeriesRows] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    status: list[tuple[Any, ...]] = field(default_factory=list)
    gateway_status: tuple[Any, ...] | None = None
    rejects: list[RejectRow] = field(default_factory=list)
    copy_data: bytes | None = None

    @property
    def rows(self) -> int:
        """How many rows the flush will write for this item (at most)."""
        return self.accepted + len(self.events) + len(self.status) + len(self.rejects) + 1


class Refused(Exception):
    """A whole message is refused for ``reason`` (internal to the pipeline)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; keep the rest of what the gateway sent.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """JSON that ``jsonb`` accepts: no NaN or infinities, no NUL characters."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = ""
    if not text or "\\u0000" in text:
        text = json.dumps(_json_safe(value), separators=(",", ":"))
    return text


def _sample(timestamps: list[int], values: list[Any], indexes: list[int], size: int) -> str:
    return to_json([[timestamps[i], values[i]] for i in indexes[:size]])


def _salvage_key(payload: bytes) -> tuple[uuid.UUID, int]:
    """Best-effort stream and seq of a frame that failed to decode, for its ack frame."""
    try:
        body = msgpack.unpackb(
            payload[4:],
            raw=False,
            max_str_len=1024,
            max_bin_len=64,
            max_array_len=100_000,
            max_map_len=64,
            max_ext_len=0,
        )
        stream, seq = body["stream"], body["seq"]
        if type(stream) is bytes and len(stream) == 16 and type(seq) is int and 0 <= seq < 2**63:
            return uuid.UUID(bytes=stream), seq
    except Exception:
        pass
    return NIL_UUID, 0


class Pipeline:
    """Decode, authorize and validate messages against the registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        prefix: str,
        limits: Limits,
        max_age: float,
        max_skew: float,
        allow_non_finite: bool = False,
        reject_sample: int = 5,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.limits = limits
        self.max_age_us = int(max_age * 1e6)
        self.max_skew_us = int(max_skew * 1e6)
        self.allow_non_finite = allow_non_finite
        self.reject_sample = reject_sample
        self._unconstrained = MetricRule(allow_non_finite=allow_non_finite)

    async def process(self, msg: Incoming) -> Staged:
        """Turn one message into a staged item; never raises except ``DatabaseUnavailable``."""
        try:
            address = parse_topic(msg.topic, self.prefix)
        except ProtocolError as exc:
            return self._refused(msg, None, exc.reason, str(exc))
        if address.kind is TopicKind.STATUS:
            return await self._status(msg, address)
        if address.kind is not TopicKind.TELEMETRY:
            return self._refused(
                msg, address, Reason.BAD_TOPIC, f"collector does not consume {address.kind} topics"
            )
        try:
            batch = decode_batch(msg.payload, self.limits)
        except ProtocolError as exc:
            return self._refused(msg, address, exc.reason, str(exc))
        try:
            return await self._batch(msg, address, batch)
        except Refused as exc:
            staged = self._refused(msg, address, exc.reason, str(exc), batch)
            return staged

    def failed(self, msg: Incoming, exc: BaseException) -> Staged:
        """A refusal for a message whose processing raised unexpectedly."""
        try:
            address: TopicAddress | None = parse_topic(msg.topic, self.prefix)
        except ProtocolError:
            address = None
        return self._refused(
            msg, address, Reason.MALFORMED, f"collector could not process the frame: {exc!r}"
        )

    # --- refusals -----------------------------------------------------------------------------

    def _refused(
        self,
        msg: Incoming,
        address: TopicAddress | None,
        reason: Reason,
        message: str,
        batch: Batch | None = None,
    ) -> Staged:
        staged = Staged(incoming=msg, result=AckResult.REJECTED, reason=reason.value)
        if address is not None:
            staged.tenant_id = address.tenant_id
            staged.gateway_id = address.gateway_id
            if address.kind is TopicKind.TELEMETRY:
                staged.ack_topic = build_topic(
                    self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK
                )
            else:
                staged.result = None
        if batch is not None:
            staged.stream, staged.seq = batch.stream, batch.seq
            staged.rejected = batch.point_count
            staged.created = batch.created
            # The ledger only holds batches whose topic, tenant and gateway agree: anything else
            # could fill the key space of a gateway that is not the sender's.
            if reason not in (
                Reason.UNKNOWN_GATEWAY,
                Reason.GATEWAY_DISABLED,
                Reason.TENANT_MISMATCH,
                Reason.GATEWAY_MISMATCH,
            ):
                staged.key = (batch.gateway_id, batch.stream, batch.seq)
        elif staged.ack_topic is not None:
            staged.stream, staged.seq = _salvage_key(msg.payload)
        staged.rejects.append(
            RejectRow(
                reason=reason.value,
                message=message[:1000],
                topic=msg.topic[:512],
                tenant_id=staged.tenant_id,
                gateway_id=staged.gateway_id,
                stream=staged.stream,
                seq=staged.seq if staged.stream is not None else None,
                points=staged.rejected,
            )
        )
        return staged

    # --- gateway status frames ----------------------------------------------------------------

    async def _status(self, msg: Incoming, address: TopicAddress) -> Staged:
        try:
            frame = decode_status(msg.payload, self.limits)
        except ProtocolError as exc:
            return self._refused(msg, address, exc.reason, str(exc))
        try:
            await self._authorize_gateway(address, frame.gateway_id)
        except Refused as exc:
            return self._refused(msg, address, exc.reason, str(exc))
        now = time.time_ns() // 1000
        at = max(frame.time, now) if frame.state == "offline" else frame.time
        if not now - self.max_age_us <= at <= now + self.max_skew_us:
            return self._refused(
                msg,
                address,
                Reason.TIMESTAMP_OUT_OF_WINDOW,
                f"status frame time {frame.time} is outside the accepted window",
            )
        return Staged(
            incoming=msg,
            tenant_id=address.tenant_id,
            gateway_id=address.gateway_id,
            gateway_status=self._gateway_status_row(address, frame),
        )

    @staticmethod
    def _gateway_status_row(address: TopicAddress, frame: GatewayStatus) -> tuple[Any, ...]:
        reason = f"version {_clean(frame.version)}" if frame.version else ""
        if frame.state == "offline":
            reason = "will" if not reason else f"will, {reason}"
        at = frame.time
        if frame.state == "offline":
            # An agent composes its will when it connects, so the will's own time is the connect
            # time; the broker publishes it when the connection is lost, which is about now.
            at = max(at, time.time_ns() // 1000)
        return (
            to_datetime(at),
            address.tenant_id,
            address.gateway_id,
            None,
            frame.state,
            reason,
        )

    # --- batches ------------------------------------------------------------------------------

    async def _authorize_gateway(self, address: TopicAddress, frame_gateway: uuid.UUID) -> None:
        gateway = await self.registry.gateway(address.gateway_id)
        if gateway is None:
            raise Refused(Reason.UNKNOWN_GATEWAY, f"gateway {address.gateway_id} is not registered")
        if not gateway.enabled:
            raise Refused(Reason.GATEWAY_DISABLED, f"gateway {gateway.id} is disabled")
        if gateway.tenant_id != address.tenant_id:
            raise Refused(
                Reason.TENANT_MISMATCH,
                f"topic names tenant {address.tenant_id}, gateway {gateway.id} belongs to {gateway.tenant_id}",
            )
        if frame_gateway != address.gateway_id:
            raise Refused(
                Reason.GATEWAY_MISMATCH,
                f"frame names gateway {frame_gateway}, topic names {address.gateway_id}",
            )

    async def _authorize_devices(
        self, address: TopicAddress, batch: Batch
    ) -> tuple[dict[uuid.UUID, DeviceEntry], dict[uuid.UUID, tuple[Reason, str]]]:
        """The batch's devices that may send, and the refused ones with their reason.

        A refused device costs only its own readings (rejected with the reason), never the
        rest of the batch: a device added on site before it is registered must not take the
        gateway's other devices down with it.
        """
        ids = {s.device_id for s in batch.series}
        ids.update(e.device_id for e in batch.events if e.device_id is not None)
        ids.update(s.device_id for s in batch.status)
        found = await self.registry.devices(ids)
        allowed: dict[uuid.UUID, DeviceEntry] = {}
        refused: dict[uuid.UUID, tuple[Reason, str]] = {}
        for ident in sorted(ids):
            device = found.get(ident)
            if device is None:
                refused[ident] = (Reason.UNKNOWN_DEVICE, f"device {ident} is not registered")
            elif not device.enabled:
                refused[ident] = (Reason.DEVICE_DISABLED, f"device {ident} is disabled")
            elif device.tenant_id != address.tenant_id:
                refused[ident] = (
                    Reason.DEVICE_TENANT_MISMATCH,
                    f"device {ident} belongs to tenant {device.tenant_id}, not {address.tenant_id}",
                )
            elif device.gateway_id is not None and device.gateway_id != address.gateway_id:
                refused[ident] = (
                    Reason.DEVICE_GATEWAY_MISMATCH,
                    f"device {ident} is assigned to gateway {device.gateway_id}, not {address.gateway_id}",
                )
            else:
                dtype = await self.registry.device_type(device.device_type_id)
                if dtype is not None and not dtype.enabled:
                    refused[ident] = (
                        Reason.DEVICE_DISABLED,
                        f"device {ident} is of device type {dtype.id}, which is disabled",
                    )
                else:
                    allowed[ident] = device
        return allowed, refused

    async def _rule(
        self, device: DeviceEntry, metric: str, cache: dict[uuid.UUID, Any]
    ) -> tuple[MetricRule | None, Reason, str]:
        """The rule for a device's metric, or ``None`` with the reason to refuse it."""
        if "\x00" in metric:
            return None, Reason.UNKNOWN_METRIC, "metric name contains NUL"
        schema = cache.get(device.device_type_id, ...)
        if schema is ...:
            dtype = await self.registry.device_type(device.device_type_id)
            if dtype is None:
                schema = (Reason.NO_SCHEMA, f"device type {device.device_type_id} not found")
            elif dtype.schema_id is None:
                schema = None
            else:
                entry = await self.registry.schema(dtype.schema_id)
                if entry is None:
                    schema = (Reason.NO_SCHEMA, f"schema {dtype.schema_id} has no version")
                elif entry.compiled is None:
                    schema = (
                        Reason.NO_SCHEMA,
                        f"schema {dtype.schema_id} v{entry.version}: {entry.problem}",
                    )
                else:
                    schema = entry.compiled
            cache[device.device_type_id] = schema
        if schema is None:
            return self._unconstrained, Reason.NO_SCHEMA, ""
        if isinstance(schema, tuple):
            return None, schema[0], schema[1]
        rule = schema.rule(metric)
        if rule is None:
            return (
                None,
                Reason.UNKNOWN_METRIC,
                f"metric {metric!r} is not in schema v{schema.version}",
            )
        return rule, Reason.NO_SCHEMA, ""

    async def _batch(self, msg: Incoming, address: TopicAddress, batch: Batch) -> Staged:
        await self._authorize_gateway(address, batch.gateway_id)
        if not batch.series and not batch.events and not batch.status:
            raise Refused(Reason.EMPTY_BATCH, "batch holds no readings, events or status changes")
        devices, refused_devices = await self._authorize_devices(address, batch)
        tenant = address.tenant_id
        staged = Staged(
            incoming=msg,
            key=(batch.gateway_id, batch.stream, batch.seq),
            tenant_id=tenant,
            gateway_id=batch.gateway_id,
            stream=batch.stream,
            seq=batch.seq,
            created=batch.created,
            ack_topic=build_topic(self.prefix, tenant, batch.gateway_id, TopicKind.ACK),
        )
        now = time.time_ns() // 1000
        earliest, latest = now - self.max_age_us, now + self.max_skew_us
        schemas: dict[uuid.UUID, Any] = {}
        refused_points: Counter[str] = Counter()
        for s in batch.series:
            if s.device_id in refused_devices:
                rule, (reason, why) = None, refused_devices[s.device_id]
            else:
                rule, reason, why = await self._rule(devices[s.device_id], s.metric, schemas)
            ts, values = s.timestamps, s.values
            if rule is None:
                verdict = Verdict([], [_all(reason, len(ts))])
            else:
                verdict = check_series(rule, ts, values, earliest, latest)
            if verdict.accepted is None:
                staged.series.append(SeriesRows(tenant, s.device_id, s.metric, ts, values))
                staged.accepted += len(ts)
                continue
            if verdict.accepted:
                keep = verdict.accepted
                staged.series.append(
                    SeriesRows(
                        tenant,
                        s.device_id,
                        s.metric,
                        [ts[i] for i in keep],
                        [values[i] for i in keep],
                    )
                )
                staged.accepted += len(keep)
            for rejects in verdict.rejects:
                count = len(rejects.indexes)
                staged.rejected += count
                refused_points[rejects.reason.value] += count
                staged.rejects.append(
                    RejectRow(
                        reason=rejects.reason.value,
                        message=why or _explain(rejects.reason, rule, earliest, latest),
                        topic=msg.topic[:512],
                        tenant_id=tenant,
                        gateway_id=batch.gateway_id,
                        stream=batch.stream,
                        seq=batch.seq,
                        device_id=s.device_id,
                        metric=_clean(s.metric),
                        points=count,
                        sample=_sample(ts, values, rejects.indexes, self.reject_sample),
                    )
                )
        gw = batch.gateway_id
        # Events and status changes are kept to the readings' window too: a time far outside
        # it is a gateway clock fault (and past year 9999 not even a datetime).
        events: list[Event] = []
        changes: list[DeviceStatus] = []
        dropped = 0
        refused_extras: Counter[uuid.UUID] = Counter()
        items: list[Event | DeviceStatus] = [*batch.events, *batch.status]
        for item in items:
            if item.device_id is not None and item.device_id in refused_devices:
                refused_extras[item.device_id] += 1
            elif not earliest <= item.time <= latest:
                dropped += 1
            elif isinstance(item, DeviceStatus):
                changes.append(item)
            else:
                events.append(item)
        for ident, n in refused_extras.items():
            # An event or status change of a refused device is refused with it.
            reason, why = refused_devices[ident]
            staged.rejects.append(
                RejectRow(
                    reason=reason.value,
                    message=f"{n} event(s) or status change(s): {why}",
                    topic=msg.topic[:512],
                    tenant_id=tenant,
                    gateway_id=gw,
                    stream=batch.stream,
                    seq=batch.seq,
                    device_id=ident,
                )
            )
        if dropped:
            staged.rejects.append(
                RejectRow(
                    reason=Reason.TIMESTAMP_OUT_OF_WINDOW.value,
                    message=f"{dropped} event(s) or status change(s) outside the accepted window",
                    topic=msg.topic[:512],
                    tenant_id=tenant,
                    gateway_id=gw,
                    stream=batch.stream,
                    seq=batch.seq,
                )
            )
        staged.events = [
            (
                to_datetime(e.time),
                tenant,
                gw,
                e.device_id,
                e.severity,
                _clean(e.kind),
                _clean(e.message),
                to_json(e.attributes),
            )
            for e in events
        ]
        staged.status = [
            (to_datetime(d.time), tenant, gw, d.device_id, d.status, _clean(d.reason))
            for d in changes
        ]
        if staged.rejected == 0 and not dropped and not refused_extras:
            staged.result = AckResult.OK
        else:
            staged.reason = (
                refused_points.most_common(1)[0][0]
                if refused_points
                else refused_devices[next(iter(refused_extras))][0].value
                if refused_extras
                else Reason.TIMESTAMP_OUT_OF_WINDOW.value
            )
            nothing_kept = staged.accepted == 0 and not staged.events and not staged.status
            staged.result = AckResult.REJECTED if nothing_kept else AckResult.PARTIAL
        return staged


def _all(reason: Reason, n: int) -> Any:
    from collector.validation import PointRejects

    return PointRejects(reason, list(range(n)))


def _explain(reason: Reason, rule: MetricRule | None, earliest: int, latest: int) -> str:
    if reason is Reason.TIMESTAMP_OUT_OF_WINDOW:
        return f"timestamps outside [{to_datetime(earliest).isoformat()}, {to_datetime(latest).isoformat()}]"
    if rule is None:
        return reason.value
    if reason is Reason.OUT_OF_RANGE:
        bounds = []
        if rule.minimum is not None:
            bounds.append(f">= {rule.minimum:g}")
        if rule.exclusive_minimum is not None:
            bounds.append(f"> {rule.exclusive_minimum:g}")
        if rule.maximum is not None:
            bounds.append(f"<= {rule.maximum:g}")
        if rule.exclusive_maximum is not None:
            bounds.append(f"< {rule.exclusive_maximum:g}")
        return "values must be " + " and ".join(bounds)
    if reason is Reason.TYPE_MISMATCH:
        names = sorted(t.__name__ for t in rule.types)
        return f"values must be of type {'/'.join(names)}"
    if reason is Reason.NOT_IN_ENUM:
        return f"values must be one of {sorted(map(repr, rule.enum or ()))}"
    if reason is Reason.NON_FINITE:
        return "NaN and infinities are not allowed for this metric"
    return reason.value
