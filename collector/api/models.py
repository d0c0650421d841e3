"""Response models of the API: the OpenAPI document's schemas (answers are built to match)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class Ref(BaseModel):
    """A thing of the registry: its id and its name (``null`` when the registry lost it)."""

    id: str
    name: str | None


class SourceInfo(BaseModel):
    """Which server answered: ``primary`` or ``replica``, and how far the replica's replay lags."""

    server: Literal["primary", "replica"]
    replica_lag_s: float


class Status(BaseModel):
    status: str = Field(description="online, error or offline")
    since: datetime
    reason: str


class Backlog(BaseModel):
    """The gateway buffer's backlog, from the agent's latest ``backlog.*`` event."""

    state: Literal["draining", "drained"]
    at: datetime
    buffered_readings: int | None
    ack_rate: float | None
    production_rate: float | None
    estimate_s: float | None = Field(description="Seconds until drained at the current rates")
    done_percent: float | None


class LastBatch(BaseModel):
    received_at: datetime
    created: datetime | None
    result: str
    stream: str
    seq: int


class Gateway(BaseModel):
    id: str
    name: str
    description: str
    enabled: bool
    status: Status | None
    last_batch: LastBatch | None
    ingest_lag_s: float | None = Field(
        description="Seconds from sealing to storing of the last batch (the gateway's clock)"
    )
    clock_skew_s: float | None = Field(
        description="Gateway clock minus collector clock, if recorded"
    )
    backlog: Backlog | None
    devices: int


class Fleet(BaseModel):
    tenant: Ref
    generated_at: datetime
    source: SourceInfo
    devices: dict[str, int] = Field(
        description="Devices by current status (unknown: none recorded)"
    )
    gateways: list[Gateway]


class LatestValue(BaseModel):
    value: float | str | None
    time: datetime
    kind: Literal["number", "boolean", "text"]
    age_s: float


class Device(BaseModel):
    id: str
    name: str
    enabled: bool
    type: Ref
    gateway: Ref | None
    status: Status | None
    last_seen: datetime | None
    latest: dict[str, LatestValue]


class Devices(BaseModel):
    tenant: Ref
    generated_at: datetime
    source: SourceInfo
    total: int
    offset: int
    devices: list[Device]


class LatestDevice(BaseModel):
    id: str
    name: str | None
    last_seen: datetime
    latest: dict[str, LatestValue]


class Latest(BaseModel):
    tenant: Ref
    generated_at: datetime
    source: SourceInfo
    devices: list[LatestDevice]


class SeriesPoints(BaseModel):
    """Columns of equal length; a ``null`` value (with a time between its neighbours) is a gap."""

    time: list[datetime]
    value: list[float | str | None]
    min: list[float | None] | None = None
    max: list[float | None] | None = None
    count: list[int | None] | None = None


class SeriesAnswer(BaseModel):
    device: Ref
    metric: str
    kind: Literal["number", "boolean", "text"]
    start: datetime
    end: datetime
    resolution: Literal["raw", "1m", "1h"]
    chosen: Literal["auto", "requested"]
    max_points: int
    gaps: int
    source: SourceInfo
    points: SeriesPoints


class Event(BaseModel):
    time: datetime
    gateway: Ref
    device: Ref | None
    severity: str
    kind: str
    message: str
    attributes: dict[str, Any]


class Events(BaseModel):
    start: datetime
    end: datetime
    source: SourceInfo
    events: list[Event]


class StatusChange(BaseModel):
    time: datetime
    status: str
    reason: str


class StatusHistory(BaseModel):
    subject: Ref
    start: datetime
    end: datetime
    source: SourceInfo
    changes: list[StatusChange]


class BacklogPoint(BaseModel):
    time: datetime
    kind: str
    buffered_readings: float | None
    estimate_s: float | None
    ack_rate: float | None
    production_rate: float | None


class BacklogHistory(BaseModel):
    gateway: Ref
    start: datetime
    end: datetime
    source: SourceInfo
    points: list[BacklogPoint]


class LagPoint(BaseModel):
    time: datetime
    batches: int
    lag_avg_s: float | None
    lag_max_s: float | None


class LagHistory(BaseModel):
    gateway: Ref
    start: datetime
    end: datetime
    bucket_s: float
    source: SourceInfo
    points: list[LagPoint]


class QuarantineGroup(BaseModel):
    gateway: Ref
    reason: str
    rows: int
    readings: int
    bytes: int
    first: datetime
    last: datetime


class Quarantine(BaseModel):
    source: SourceInfo
    by_reason: dict[str, int] = Field(description="Readings held, by reason")
    groups: list[QuarantineGroup]


class RejectReason(BaseModel):
    reason: str
    messages: int
    readings: int
    first: datetime
    last: datetime


class Reject(BaseModel):
    received_at: datetime
    reason: str
    message: str
    gateway: Ref | None
    device: Ref | None
    metric: str | None
    points: int
    sample: Any


class Rejects(BaseModel):
    start: datetime
    end: datetime
    source: SourceInfo
    by_reason: list[RejectReason]
    recent: list[Reject]


class Health(BaseModel):
    status: Literal["ok"]


class Alert(BaseModel):
    id: int
    rule: Ref
    gateway: Ref
    device: Ref
    metric: str
    severity: str
    condition: str
    threshold: float | None
    raised_at: datetime
    raised_value: float | None
    cleared_at: datetime | None = Field(description="null while the alert is open")
    cleared_value: float | None
    clear_reason: str | None


class Alerts(BaseModel):
    start: datetime
    end: datetime
    open_only: bool
    source: SourceInfo
    alerts: list[Alert]
