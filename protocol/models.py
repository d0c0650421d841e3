"""Wire models of protocol v1: the batch, the gateway status frame and the ack.

These are the decoded, in-memory shapes: timestamps are absolute microseconds since the epoch
and ids are UUIDs. The byte layout (delta-encoded timestamps, 16-byte ids, value codecs) is the
frame codec's business (:mod:`protocol.frame`) and is described in ``docs/protocol.md``.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

MAX_TIME_US = 2**63 - 1
MAX_SEQ = 2**63 - 1

Value = StrictBool | StrictInt | StrictFloat | StrictStr
"""A reading's value: int, float, bool or str (msgpack keeps the four apart)."""

TimeUs = Annotated[int, Field(ge=0, le=MAX_TIME_US, strict=True)]
Metric = Annotated[str, Field(min_length=1, max_length=128, strict=True)]
Severity = Literal["debug", "info", "warning", "error", "critical"]
DeviceState = Literal["online", "error", "offline"]
GatewayState = Literal["online", "offline"]
ClockSource = Literal["system", "collector", "untrusted"]
"""How a batch's times were taken (its ``clock`` key): the gateway's synchronised system clock,
the gateway's boot clock converted with the offset measured against the collector, or the
gateway's wall clock while no trusted time existed."""


class AckResult(StrEnum):
    """What the collector did with a batch.

    Every result but ``conflict`` is final: the batch's data is stored, quarantined in the cloud
    or refused, and the agent deletes it. ``conflict`` says the key ``(gateway, stream, seq)``
    was committed earlier with other content: nothing of this batch was kept, and the agent must
    send it again under a new stream.
    """

    OK = "ok"
    DUPLICATE = "duplicate"
    PARTIAL = "partial"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"
    CONFLICT = "conflict"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Series(_Wire):
    """Readings of one metric of one device: parallel lists of timestamps and values."""

    device_id: uuid.UUID
    metric: Metric
    timestamps: list[TimeUs]
    values: list[Value]

    @model_validator(mode="after")
    def _same_length(self) -> Series:
        if not self.timestamps:
            raise ValueError("a series holds at least one reading")
        if len(self.timestamps) != len(self.values):
            raise ValueError(f"{len(self.timestamps)} timestamps but {len(self.values)} values")
        return self


class Event(_Wire):
    """Something that happened on the gateway or a device (dropped readings, a corrupt buffer)."""

    time: TimeUs
    device_id: uuid.UUID | None = None
    severity: Severity = "info"
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    message: Annotated[str, Field(max_length=1024)] = ""
    attributes: dict[str, Any] = Field(default_factory=dict)


class DeviceStatus(_Wire):
    """A device's status change as seen by its input."""

    time: TimeUs
    device_id: uuid.UUID
    status: DeviceState
    reason: Annotated[str, Field(max_length=256)] = ""


class Batch(_Wire):
    """One sealed batch of a buffer's stream: the unit of delivery and of acknowledgement."""

    gateway_id: uuid.UUID
    stream: uuid.UUID
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ, strict=True)]
    created: TimeUs
    series: list[Series] = Field(default_factory=list)
    events: list[Event] = Field(default_factory=list)
    status: list[DeviceStatus] = Field(default_factory=list)
    clock: ClockSource | None = None

    @property
    def point_count(self) -> int:
        """Number of readings in the batch."""
        return sum(len(s.timestamps) for s in self.series)


class Backlog(_Wire):
    """What a gateway's buffer holds and how fast it drains, as its status frame reports it.

    Rates are readings per second over the agent's last 30 s of an unbroken link; ``drain_s``
    is ``None`` while the backlog does not shrink (production keeps up with the acks) or before
    anything was measured.
    """

    readings: Annotated[int, Field(ge=0, le=2**63 - 1)]
    batches: Annotated[int, Field(ge=0, le=2**63 - 1)]
    oldest_age_s: Annotated[float, Field(ge=0, le=1e12)] | None = None
    ack_rate: Annotated[float, Field(ge=0, le=1e12)] = 0.0
    production_rate: Annotated[float, Field(ge=0, le=1e12)] = 0.0
    drain_s: Annotated[float, Field(ge=0, le=1e12)] | None = None
    draining: bool = False


class GatewayStatus(_Wire):
    """The retained gateway status frame; ``offline`` is also the MQTT will."""

    gateway_id: uuid.UUID
    state: GatewayState
    time: TimeUs
    version: Annotated[str, Field(max_length=64)] = ""
    clock: ClockSource | None = None
    """How ``time`` was taken; ``untrusted`` tells the collector to use its receive time."""
    backlog: Backlog | None = None
    """The buffer's figures: at connect, and again (``online``) while a backlog drains."""


Count = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Ack(_Wire):
    """The collector's answer to one batch, sent only after the batch is committed.

    ``accepted`` readings were stored, ``quarantined`` are kept in the collector's quarantine
    (durable, replayable once the cause is fixed), ``rejected`` were refused for good.
    ``reasons`` maps each reason code to ``(quarantined, refused)`` readings; ``reason`` is the
    most frequent one.
    """

    stream: uuid.UUID
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ, strict=True)]
    result: AckResult
    accepted: Count = 0
    rejected: Count = 0
    reason: Annotated[str, Field(max_length=64)] = ""
    quarantined: Count = 0
    reasons: dict[Annotated[str, Field(min_length=1, max_length=64)], tuple[Count, Count]] = Field(
        default_factory=dict, max_length=64
    )
    time: TimeUs | None = None
    """The collector's clock when it sent the ack; only in answer to a batch that has ``clock``."""


class TimeRequest(_Wire):
    """An agent asks the collector for its clock (QoS 0, on the telemetry topic).

    ``sent`` is the agent's own reading of its clock when it sent the request, opaque to the
    collector, which echoes it in the :class:`TimeReply`.
    """

    gateway_id: uuid.UUID
    sent: Annotated[int, Field(ge=0, le=MAX_TIME_US, strict=True)]


class TimeReply(_Wire):
    """The collector's clock (``time``, µs since the epoch) in answer to a :class:`TimeRequest`."""

    sent: Annotated[int, Field(ge=0, le=MAX_TIME_US, strict=True)]
    time: TimeUs


Frame = Batch | GatewayStatus | Ack | TimeRequest | TimeReply
