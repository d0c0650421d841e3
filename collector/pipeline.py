"""What one MQTT message becomes: decode, authorize, validate, and stage it for the writer.

Every message, good or bad, turns into exactly one :class:`Staged` item, and items reach the
writer in arrival order; that is what lets the writer send the PUBACKs in arrival order after
the commit. Outcomes are values, not exceptions: what a reason code leads to (stored,
quarantined, refused, retry) is decided by the one table in :mod:`collector.outcomes`, and a
``Staged`` carries the rows for each. The only exception that leaves :meth:`Pipeline.process` is
:class:`~collector.errors.DatabaseUnavailable` (the metadata database could not answer), after
which the same message is processed again.

:meth:`Pipeline.evaluate` is the same check for a batch that is already decoded: the quarantine
replay runs quarantined data through it, so that what passes at replay is exactly what would
pass at ingest.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

from collector.outcomes import (
    Outcome,
    QuarantineRow,
    RejectRow,
    Tally,
    ack_result,
    digest,
    outcome,
)
from collector.registry import DeviceEntry, GatewayEntry, Registry
from collector.validation import MetricRule, PointRejects, Verdict, check_series
from protocol import (
    AckResult,
    Batch,
    DeviceStatus,
    Event,
    GatewayStatus,
    Limits,
    ProtocolError,
    Reason,
    TimeRequest,
    TopicAddress,
    TopicKind,
    build_topic,
    decode_envelope,
    decode_frame,
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


@dataclass(slots=True)
class Staged:
    """A processed message waiting for the writer's next flush.

    ``key`` is set for an addressed batch: its rows are written only if its ledger row is new,
    and ``digest`` tells a resend (same content) from a reused key (other content). ``ack_topic``
    and ``result`` say which ack frame to publish after the commit (``result`` ``None``: no ack
    frame, as for status frames). ``retry`` means: write nothing, publish no ack frame, send only
    the PUBACK; the agent sends the batch again.
    """

    incoming: Incoming
    key: Key | None = None
    digest: bytes | None = None
    tenant_id: uuid.UUID | None = None
    gateway_id: uuid.UUID | None = None
    stream: uuid.UUID | None = None
    seq: int = 0
    created: int | None = None
    ack_topic: str | None = None
    result: AckResult | None = None
    reason: str = ""
    accepted: int = 0
    tally: Tally = field(default_factory=Tally)
    series: list[SeriesRows] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    status: list[tuple[Any, ...]] = field(default_factory=list)
    gateway_status: tuple[Any, ...] | None = None
    gateway_backlog: tuple[Any, ...] | None = None
    rejects: list[RejectRow] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)
    # Binary COPY rows (telemetry, telemetry_text), built early when the series ids are cached.
    copy_data: tuple[bytes, bytes] | None = None
    retry: bool = False
    quota_refused: dict[tuple[str, uuid.UUID], int] = field(default_factory=dict)
    clock: str | None = None
    """The batch's ``clock`` key: its ack carries the collector's time when it is set."""
    time_request: int | None = None
    """A time request's ``sent``: answered with a ``time`` frame on ``ack_topic``, nothing stored."""

    @property
    def rejected(self) -> int:
        """Readings refused for good."""
        return self.tally.refused

    @property
    def quarantined(self) -> int:
        """Readings kept in quarantine."""
        return self.tally.quarantined

    @property
    def rows(self) -> int:
        """How many rows the flush will write for this item (at most)."""
        return (
            self.accepted
            + len(self.events)
            + len(self.status)
            + len(self.rejects)
            + len(self.quarantine)
            + 1
        )

    def settle(self) -> None:
        """Count readings per reason and set ``result`` and ``reason`` from the batch's parts."""
        tally = Tally()
        for q in self.quarantine:
            tally.add(q.reason, q.points, kept=True)
        for r in self.rejects:
            tally.add(r.reason, r.points, kept=False)
        self.tally = tally
        if self.ack_topic is None:
            return
        self.result = ack_result(
            stored_anything=bool(self.accepted or self.events or self.status),
            quarantined_anything=bool(self.quarantine),
            refused_anything=bool(self.rejects),
        )
        self.reason = ""
        if self.result is not AckResult.OK:
            self.reason = self.tally.main_reason()
            if not self.reason:
                first = self.quarantine[0].reason if self.quarantine else self.rejects[0].reason
                self.reason = first

    def drop_writes(self) -> None:
        """Forget every row this item would write (it becomes a retry or a whole-frame row)."""
        self.accepted = 0
        self.tally = Tally()
        self.series, self.events, self.status = [], [], []
        self.gateway_status = None
        self.rejects, self.quarantine = [], []
        self.copy_data = None


class Refused(Exception):
    """A whole message is refused for ``reason`` (internal to the pipeline)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def clean(text: str) -> str:
    """Text that PostgreSQL can hold: NUL replaced, the rest as the gateway sent it."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): _json_safe(v) for k, v in value.items()}
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


def pack(value: Any) -> bytes:
    """msgpack bytes of a quarantine payload."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def event_entry(e: Event) -> list[Any]:
    """An event as the wire (and a quarantine payload) carries it."""
    return [
        e.time,
        e.device_id.bytes if e.device_id else None,
        e.severity,
        e.kind,
        e.message,
        e.attributes,
    ]


def status_entry(d: DeviceStatus) -> list[Any]:
    """A device status change as the wire (and a quarantine payload) carries it."""
    return [d.time, d.device_id.bytes, d.status, d.reason]


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
            frame = decode_frame(msg.payload, self.limits)
            if isinstance(frame, TimeRequest):
                return self._time_request(msg, address, frame)
            if not isinstance(frame, Batch):
                raise ProtocolError(
                    Reason.UNEXPECTED_KIND,
                    f"expected a batch frame, got {type(frame).__name__}",
                )
        except ProtocolError as exc:
            return await self._undecodable(msg, address, exc)
        batch = frame
        gateway = await self.registry.gateway(address.gateway_id)
        staged = self._addressed(msg, address, batch.gateway_id, batch.stream, batch.seq)
        staged.created = batch.created
        staged.clock = batch.clock
        try:
            self._authorize_gateway(address, gateway, batch.gateway_id)
        except Refused as exc:
            if outcome(exc.reason) is Outcome.QUARANTINED:
                known = gateway is not None
                return self.whole_frame(staged, exc.reason, str(exc), batch.point_count, known)
            return self._refused(msg, address, exc.reason, str(exc), staged, batch.point_count)
        if not batch.series and not batch.events and not batch.status:
            return self._refused(
                msg,
                address,
                Reason.EMPTY_BATCH,
                "batch holds no readings, events or status changes",
                staged,
            )
        await self.evaluate(staged, address, batch)
        return staged

    def _time_request(self, msg: Incoming, address: TopicAddress, frame: TimeRequest) -> Staged:
        """A gateway asks for the collector's time: answered on its ack topic, nothing stored.

        Only the topic's own gateway is answered (the broker's ACL lets a gateway write only
        its own topics); the reply tells nothing but the time.
        """
        if frame.gateway_id != address.gateway_id:
            return self._refused(
                msg,
                address,
                Reason.GATEWAY_MISMATCH,
                f"time request of gateway {frame.gateway_id} on the topic of {address.gateway_id}",
            )
        return Staged(
            incoming=msg,
            tenant_id=address.tenant_id,
            gateway_id=address.gateway_id,
            ack_topic=build_topic(
                self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK
            ),
            time_request=frame.sent,
        )

    def internal_error(self, msg: Incoming, exc: BaseException) -> Staged:
        """The item of a message whose processing raised: its raw frame, quarantined.

        Called only once the message has used up its attempts (:class:`~collector.outcomes.Attempts`);
        a frame without a readable envelope is refused instead.
        """
        message = f"collector could not process the frame: {exc!r}"
        try:
            address = parse_topic(msg.topic, self.prefix)
        except ProtocolError:
            return self._refused(msg, None, Reason.BAD_TOPIC, message)
        envelope = decode_envelope(msg.payload)
        if envelope is None or envelope.gateway_id != address.gateway_id:
            return self._refused(msg, address, Reason.MALFORMED, message)
        staged = self._addressed(msg, address, envelope.gateway_id, envelope.stream, envelope.seq)
        staged.created = envelope.created
        return self.whole_frame(staged, Reason.INTERNAL_ERROR, message, 0, True)

    def retry_key(self, msg: Incoming) -> Any:
        """What identifies a message across its resends: its batch key, else its content."""
        envelope = decode_envelope(msg.payload)
        if envelope is not None:
            return (envelope.gateway_id, envelope.stream, envelope.seq)
        return digest(msg.payload)

    # --- whole messages -----------------------------------------------------------------------

    def _addressed(
        self,
        msg: Incoming,
        address: TopicAddress,
        gateway_id: uuid.UUID,
        stream: uuid.UUID,
        seq: int,
    ) -> Staged:
        return Staged(
            incoming=msg,
            key=(gateway_id, stream, seq),
            digest=digest(msg.payload),
            tenant_id=address.tenant_id,
            gateway_id=address.gateway_id,
            stream=stream,
            seq=seq,
            ack_topic=build_topic(
                self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK
            ),
        )

    def whole_frame(
        self, staged: Staged, reason: Reason, message: str, points: int, known_gateway: bool
    ) -> Staged:
        """Quarantine the raw frame of ``staged`` for ``reason`` (it cannot be split by device)."""
        assert staged.tenant_id is not None and staged.gateway_id is not None
        staged.drop_writes()
        staged.quarantine.append(
            QuarantineRow(
                kind="frame",
                reason=reason.value,
                message=message[:1000],
                tenant_id=staged.tenant_id,
                gateway_id=staged.gateway_id,
                payload=staged.incoming.payload,
                known_gateway=known_gateway,
                stream=staged.stream,
                seq=staged.seq,
                points=points,
            )
        )
        staged.settle()
        return staged

    async def _undecodable(
        self, msg: Incoming, address: TopicAddress, exc: ProtocolError
    ) -> Staged:
        envelope = decode_envelope(msg.payload)
        if envelope is None:
            return self._refused(msg, address, exc.reason, str(exc))
        staged = self._addressed(msg, address, envelope.gateway_id, envelope.stream, envelope.seq)
        staged.created = envelope.created
        gateway = await self.registry.gateway(address.gateway_id)
        try:
            self._authorize_gateway(address, gateway, envelope.gateway_id)
        except Refused as refusal:
            if outcome(refusal.reason) is not Outcome.QUARANTINED:
                return self._refused(msg, address, refusal.reason, str(refusal), staged)
        if outcome(exc.reason) is Outcome.QUARANTINED:
            known = gateway is not None
            return self.whole_frame(staged, exc.reason, str(exc), 0, known)
        return self._refused(msg, address, exc.reason, str(exc), staged)

    def _refused(
        self,
        msg: Incoming,
        address: TopicAddress | None,
        reason: Reason,
        message: str,
        staged: Staged | None = None,
        points: int = 0,
    ) -> Staged:
        """A message refused for good: a bounded sample in ``ingest_rejects``, an ack if addressed."""
        if staged is None:
            staged = Staged(incoming=msg)
            if address is not None:
                staged.tenant_id, staged.gateway_id = address.tenant_id, address.gateway_id
                if address.kind is TopicKind.TELEMETRY:
                    staged.ack_topic = build_topic(
                        self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK
                    )
                    # Unaddressable: the agent cannot match this ack, but sees it on its topic.
                    staged.stream, staged.seq = NIL_UUID, 0
        else:
            staged.drop_writes()
        if reason in (Reason.TENANT_MISMATCH, Reason.GATEWAY_MISMATCH):
            # The ledger only holds batches whose topic, tenant and gateway agree: anything else
            # could fill the key space of a gateway that is not the sender's.
            staged.key = None
        staged.rejects.append(
            RejectRow(
                reason=reason.value,
                message=message[:1000],
                topic=msg.topic[:512],
                tenant_id=staged.tenant_id,
                gateway_id=staged.gateway_id,
                stream=staged.stream,
                seq=staged.seq if staged.stream is not None else None,
                points=points,
            )
        )
        staged.settle()
        return staged

    # --- gateway status frames ----------------------------------------------------------------

    async def _status(self, msg: Incoming, address: TopicAddress) -> Staged:
        try:
            frame = decode_status(msg.payload, self.limits)
        except ProtocolError as exc:
            return self._refused(msg, address, exc.reason, str(exc))
        try:
            gateway = await self.registry.gateway(address.gateway_id)
            self._authorize_gateway(address, gateway, frame.gateway_id)
        except Refused as exc:
            return self._refused(msg, address, exc.reason, str(exc))
        now = time.time_ns() // 1000
        at = max(frame.time, now) if frame.state == "offline" else frame.time
        if frame.clock == "untrusted":
            # The gateway knows its clock is wrong (no NTP, no collector's time yet); the frame
            # speaks of now, so the receive time is the best there is.
            frame = frame.model_copy(update={"time": now})
            at = now
        if not now - self.max_age_us <= at <= now + self.max_skew_us:
            return self._refused(
                msg,
                address,
                Reason.TIMESTAMP_OUT_OF_WINDOW,
                f"status frame time {frame.time} is outside the accepted window",
            )
        b = frame.backlog
        return Staged(
            incoming=msg,
            tenant_id=address.tenant_id,
            gateway_id=address.gateway_id,
            gateway_status=self._gateway_status_row(address, frame),
            gateway_backlog=None
            if b is None
            else (
                address.gateway_id,
                address.tenant_id,
                to_datetime(at),
                b.readings,
                b.batches,
                b.oldest_age_s,
                b.ack_rate,
                b.production_rate,
                b.drain_s,
                b.draining,
            ),
        )

    @staticmethod
    def _gateway_status_row(address: TopicAddress, frame: GatewayStatus) -> tuple[Any, ...]:
        reason = f"version {clean(frame.version)}" if frame.version else ""
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

    @staticmethod
    def _authorize_gateway(
        address: TopicAddress, gateway: GatewayEntry | None, frame_gateway: uuid.UUID
    ) -> None:
        if frame_gateway != address.gateway_id:
            raise Refused(
                Reason.GATEWAY_MISMATCH,
                f"frame names gateway {frame_gateway}, topic names {address.gateway_id}",
            )
        if gateway is None:
            raise Refused(Reason.UNKNOWN_GATEWAY, f"gateway {address.gateway_id} is not registered")
        if gateway.tenant_id != address.tenant_id:
            raise Refused(
                Reason.TENANT_MISMATCH,
                f"topic names tenant {address.tenant_id}, gateway {gateway.label()} belongs to"
                f" {gateway.tenant_id}",
            )
        if not gateway.enabled:
            raise Refused(Reason.GATEWAY_DISABLED, f"gateway {gateway.label()} is disabled")

    async def gateway_refusal(self, address: TopicAddress) -> Refused | None:
        """Why the registry refuses ``address``'s gateway as a whole, or ``None``."""
        gateway = await self.registry.gateway(address.gateway_id)
        try:
            self._authorize_gateway(address, gateway, address.gateway_id)
        except Refused as exc:
            return exc
        return None

    async def _authorize_devices(
        self, address: TopicAddress, batch: Batch
    ) -> tuple[dict[uuid.UUID, DeviceEntry], dict[uuid.UUID, tuple[Reason, str]]]:
        """The batch's devices that may send, and the refused ones with their reason.

        A refused device costs only its own readings, never the rest of the batch: a device
        added on site before it is registered must not take the gateway's other devices down
        with it.
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
            elif device.tenant_id != address.tenant_id:
                refused[ident] = (
                    Reason.DEVICE_TENANT_MISMATCH,
                    f"device {device.label()} belongs to tenant {device.tenant_id}, not"
                    f" {address.tenant_id}",
                )
            elif not device.enabled:
                refused[ident] = (Reason.DEVICE_DISABLED, f"device {device.label()} is disabled")
            elif device.gateway_id is not None and device.gateway_id != address.gateway_id:
                assigned = await self.registry.gateway(device.gateway_id)
                here = await self.registry.gateway(address.gateway_id)
                refused[ident] = (
                    Reason.DEVICE_GATEWAY_MISMATCH,
                    f"device {device.label()} is assigned to gateway"
                    f" {assigned.label() if assigned else device.gateway_id}, not"
                    f" {here.label() if here else address.gateway_id}",
                )
            else:
                dtype = await self.registry.device_type(device.device_type_id)
                if dtype is not None and not dtype.enabled:
                    refused[ident] = (
                        Reason.DEVICE_DISABLED,
                        f"device {device.label()} is of device type {dtype.label()}, which is"
                        " disabled",
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

    def _keep(
        self,
        staged: Staged,
        reason: Reason,
        message: str,
        *,
        device_id: uuid.UUID | None,
        metric: str | None = None,
        kind: str = "readings",
        payload: Any,
        points: int = 0,
        first_us: int | None = None,
        last_us: int | None = None,
        sample: str = "[]",
    ) -> None:
        """Quarantine or refuse one part of a batch, as the outcome table says for ``reason``."""
        assert staged.tenant_id is not None and staged.gateway_id is not None
        if outcome(reason) is Outcome.QUARANTINED:
            staged.quarantine.append(
                QuarantineRow(
                    kind=kind,
                    reason=reason.value,
                    message=message[:1000],
                    tenant_id=staged.tenant_id,
                    gateway_id=staged.gateway_id,
                    payload=pack(payload),
                    stream=staged.stream,
                    seq=staged.seq,
                    device_id=device_id,
                    metric=metric,
                    points=points,
                    first_us=first_us,
                    last_us=last_us,
                )
            )
        else:
            staged.rejects.append(
                RejectRow(
                    reason=reason.value,
                    message=message[:1000],
                    topic=staged.incoming.topic[:512],
                    tenant_id=staged.tenant_id,
                    gateway_id=staged.gateway_id,
                    stream=staged.stream,
                    seq=staged.seq,
                    device_id=device_id,
                    metric=clean(metric) if metric is not None else None,
                    points=points,
                    sample=sample,
                )
            )

    async def evaluate(
        self, staged: Staged, address: TopicAddress, batch: Batch, *, check_time: bool = True
    ) -> None:
        """Split an authorized gateway's batch into stored, quarantined and refused parts.

        ``check_time`` false accepts readings outside the time window (an operator's replay of
        readings whose gateway clock was wrong, once their times are known to be right).
        """
        devices, refused_devices = await self._authorize_devices(address, batch)
        tenant = address.tenant_id
        now = time.time_ns() // 1000
        if check_time:
            earliest, latest = now - self.max_age_us, now + self.max_skew_us
        else:
            earliest, latest = 0, 2**63 - 1
        schemas: dict[uuid.UUID, Any] = {}
        for s in batch.series:
            if s.device_id in refused_devices:
                rule, (reason, why) = None, refused_devices[s.device_id]
            else:
                rule, reason, why = await self._rule(devices[s.device_id], s.metric, schemas)
            ts, values = s.timestamps, s.values
            if rule is None:
                verdict = Verdict([], [PointRejects(reason, list(range(len(ts))))])
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
                idx = rejects.indexes
                part_ts = [ts[i] for i in idx]
                self._keep(
                    staged,
                    rejects.reason,
                    why or _explain(rejects.reason, rule, earliest, latest, batch.clock),
                    device_id=s.device_id,
                    metric=s.metric,
                    payload=[part_ts, [values[i] for i in idx]],
                    points=len(idx),
                    first_us=min(part_ts),
                    last_us=max(part_ts),
                    sample=_sample(ts, values, idx, self.reject_sample),
                )
        gw = batch.gateway_id
        # Events and status changes are kept to the readings' window too: a time far outside
        # it is a gateway clock fault (and past year 9999 not even a datetime).
        events: list[Event] = []
        changes: list[DeviceStatus] = []
        held: dict[tuple[Reason, uuid.UUID | None, str], list[Any]] = {}
        items: list[Event | DeviceStatus] = [*batch.events, *batch.status]
        for item in items:
            kind = "status" if isinstance(item, DeviceStatus) else "events"
            if item.device_id is not None and item.device_id in refused_devices:
                reason = refused_devices[item.device_id][0]
            elif not earliest <= item.time <= latest:
                reason = Reason.TIMESTAMP_OUT_OF_WINDOW
            elif isinstance(item, DeviceStatus):
                changes.append(item)
                continue
            else:
                events.append(item)
                continue
            entry = status_entry(item) if isinstance(item, DeviceStatus) else event_entry(item)
            held.setdefault((reason, item.device_id, kind), []).append(entry)
        for (reason, device, kind), entries in held.items():
            why = (
                refused_devices[device][1]
                if device is not None and device in refused_devices
                else "outside the accepted time window" + _UNTRUSTED.get(batch.clock or "", "")
            )
            self._keep(
                staged,
                reason,
                f"{len(entries)} {'status change(s)' if kind == 'status' else 'event(s)'}: {why}",
                device_id=device,
                kind=kind,
                payload=entries,
                first_us=min(e[0] for e in entries),
                last_us=max(e[0] for e in entries),
            )
        staged.events = [
            (
                to_datetime(e.time),
                tenant,
                gw,
                e.device_id,
                e.severity,
                clean(e.kind),
                clean(e.message),
                to_json(e.attributes),
            )
            for e in events
        ]
        staged.status = [
            (to_datetime(d.time), tenant, gw, d.device_id, d.status, clean(d.reason))
            for d in changes
        ]
        staged.settle()


_UNTRUSTED = {
    "untrusted": "; the gateway sealed them with a clock it did not trust (no NTP, no answer from a"
    " collector in time): replay with --any-time once the right times are known"
}


def _explain(
    reason: Reason, rule: MetricRule | None, earliest: int, latest: int, clock: str | None = None
) -> str:
    if reason is Reason.TIMESTAMP_OUT_OF_WINDOW:
        return (
            f"timestamps outside [{to_datetime(earliest).isoformat()},"
            f" {to_datetime(latest).isoformat()}]" + _UNTRUSTED.get(clock or "", "")
        )
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
