"""What happens to a batch: the one outcome table, and the values that carry the decision.

Every reason code maps to exactly one outcome (``docs/protocol.md`` lists them with their meaning
for an agent):

- *stored*: rows committed (``ok``; ``duplicate`` for a key committed earlier with the same
  content);
- *quarantined*: the readings, events or status changes (or, for a frame that cannot be
  attributed to devices, the whole raw frame) are kept in the ``quarantine`` table, in the same
  transaction as the ledger row, with their reason; ``sensormine-collector quarantine replay``
  (or the collector itself, when the registry changes) stores what passes later. The agent
  deletes the batch: its data is durable in the cloud;
- *refused*: final, only for frames that must never be kept in bulk (unattributable, or a
  gateway writing as another gateway or tenant); a bounded sample goes to ``ingest_rejects`` and
  the event is counted as a security signal;
- *retry*: no ack frame (the database is down or slow, or an internal error); the agent sends
  the batch again. After ``quarantine.max_attempts`` failed attempts of the same key the raw frame
  is quarantined with reason ``internal_error``, so a poison batch cannot stall a gateway.

A frame whose envelope (gateway, stream, seq) cannot be read at all is refused whatever the
reason: there is nothing to attribute it to. Quarantine is bounded per tenant and per unknown
gateway; what exceeds the quota is refused with ``quota_exceeded`` and counted.

The pipeline and the writer build :class:`QuarantineRow` and :class:`RejectRow` values and ask
this module what a batch's ack says (:func:`ack_result`); :class:`Attempts` bounds retries.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol import AckResult, Reason


class Outcome(StrEnum):
    """Where the readings of a batch end."""

    STORED = "stored"
    QUARANTINED = "quarantined"
    REFUSED = "refused"
    RETRY = "retry"


OUTCOMES: dict[Reason, Outcome] = {
    # Frames that cannot be read or addressed: nothing to keep them under.
    Reason.BAD_MAGIC: Outcome.REFUSED,
    Reason.UNSUPPORTED_VERSION: Outcome.REFUSED,
    Reason.UNKNOWN_FLAGS: Outcome.REFUSED,
    Reason.MALFORMED: Outcome.REFUSED,
    Reason.DECOMPRESSION_LIMIT: Outcome.REFUSED,
    Reason.UNEXPECTED_KIND: Outcome.REFUSED,
    Reason.BAD_TOPIC: Outcome.REFUSED,
    Reason.EMPTY_BATCH: Outcome.REFUSED,
    # Frames that are addressed but beyond this collector's limits: kept whole, replayable after
    # the limit is raised.
    Reason.TOO_LARGE: Outcome.QUARANTINED,
    Reason.INVALID_FIELD: Outcome.QUARANTINED,
    Reason.TOO_MANY_POINTS: Outcome.QUARANTINED,
    # A gateway writing as another gateway or tenant: a security signal, never kept in bulk.
    Reason.TENANT_MISMATCH: Outcome.REFUSED,
    Reason.GATEWAY_MISMATCH: Outcome.REFUSED,
    Reason.DEVICE_TENANT_MISMATCH: Outcome.REFUSED,
    # The registry does not (yet) know or allow it: healable by registering or enabling.
    Reason.UNKNOWN_GATEWAY: Outcome.QUARANTINED,
    Reason.GATEWAY_DISABLED: Outcome.QUARANTINED,
    Reason.UNKNOWN_DEVICE: Outcome.QUARANTINED,
    Reason.DEVICE_DISABLED: Outcome.QUARANTINED,
    Reason.DEVICE_GATEWAY_MISMATCH: Outcome.QUARANTINED,
    # The schema refuses it: healable by a corrected schema version.
    Reason.NO_SCHEMA: Outcome.QUARANTINED,
    Reason.UNKNOWN_METRIC: Outcome.QUARANTINED,
    Reason.TYPE_MISMATCH: Outcome.QUARANTINED,
    Reason.OUT_OF_RANGE: Outcome.QUARANTINED,
    Reason.NOT_IN_ENUM: Outcome.QUARANTINED,
    Reason.NON_FINITE: Outcome.QUARANTINED,
    # The gateway's clock is wrong: healable once its time is known.
    Reason.TIMESTAMP_OUT_OF_WINDOW: Outcome.QUARANTINED,
    # Delivery.
    Reason.CONFLICT: Outcome.RETRY,
    Reason.INTERNAL_ERROR: Outcome.QUARANTINED,
    Reason.QUOTA_EXCEEDED: Outcome.REFUSED,
}

SECURITY_REASONS = frozenset(
    {Reason.TENANT_MISMATCH, Reason.GATEWAY_MISMATCH, Reason.DEVICE_TENANT_MISMATCH}
)
"""Refusals that say a gateway tried to write as someone else."""

REGISTRY_REASONS = frozenset(
    {
        Reason.UNKNOWN_GATEWAY,
        Reason.GATEWAY_DISABLED,
        Reason.UNKNOWN_DEVICE,
        Reason.DEVICE_DISABLED,
        Reason.DEVICE_GATEWAY_MISMATCH,
    }
)
"""Quarantine reasons that a change of a gateway or device can heal."""

SCHEMA_REASONS = frozenset(
    {
        Reason.NO_SCHEMA,
        Reason.UNKNOWN_METRIC,
        Reason.TYPE_MISMATCH,
        Reason.OUT_OF_RANGE,
        Reason.NOT_IN_ENUM,
        Reason.NON_FINITE,
    }
)
"""Quarantine reasons that a new schema version or device type change can heal."""


def outcome(reason: Reason | str) -> Outcome:
    """The outcome of ``reason`` (every :class:`~protocol.Reason` has exactly one)."""
    return OUTCOMES[Reason(reason)]


def digest(payload: bytes) -> bytes:
    """What the ledger keeps of a frame's content: the same key with another digest conflicts."""
    return hashlib.blake2b(payload, digest_size=16).digest()


QuarantineKind = str
"""``readings``, ``events``, ``status`` or ``frame``."""


@dataclass(slots=True)
class QuarantineRow:
    """One row of ``quarantine``: data kept, with its reason, until a replay stores it.

    ``payload`` is msgpack: ``[timestamps, values]`` for ``readings``, the list of wire entries
    for ``events`` and ``status``, and the raw frame as received for ``frame``.
    """

    kind: QuarantineKind
    reason: str
    message: str
    tenant_id: uuid.UUID
    gateway_id: uuid.UUID
    payload: bytes
    known_gateway: bool = True
    stream: uuid.UUID | None = None
    seq: int | None = None
    device_id: uuid.UUID | None = None
    metric: str | None = None
    points: int = 0
    first_us: int | None = None
    last_us: int | None = None
    attempts: int = 0

    @property
    def bytes(self) -> int:
        """What the row costs against the quota: its payload and a fixed row overhead."""
        return len(self.payload) + 160

    @property
    def quota_scope(self) -> tuple[str, uuid.UUID]:
        """The quota this row counts against: its tenant, or its gateway when that is unknown."""
        if self.known_gateway:
            return ("tenant", self.tenant_id)
        return ("unknown_gateway", self.gateway_id)


@dataclass(frozen=True, slots=True)
class RejectRow:
    """One row of ``ingest_rejects``: a bounded sample of what was refused for good."""

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
class Tally:
    """Readings of one batch per reason: how many were quarantined and how many refused."""

    quarantined: int = 0
    refused: int = 0
    by_reason: dict[str, list[int]] | None = None

    def add(self, reason: str, points: int, kept: bool) -> None:
        """Count ``points`` readings quarantined (``kept``) or refused for ``reason``."""
        if self.by_reason is None:
            self.by_reason = {}
        pair = self.by_reason.setdefault(reason, [0, 0])
        if kept:
            pair[0] += points
            self.quarantined += points
        else:
            pair[1] += points
            self.refused += points

    def reasons(self) -> dict[str, tuple[int, int]]:
        """The ack's ``reasons`` map."""
        return {k: (q, r) for k, (q, r) in (self.by_reason or {}).items()}

    def main_reason(self) -> str:
        """The reason that cost the most readings (or the first one, for events alone)."""
        if not self.by_reason:
            return ""
        return max(self.by_reason.items(), key=lambda kv: kv[1][0] + kv[1][1])[0]


def ack_result(
    *, stored_anything: bool, quarantined_anything: bool, refused_anything: bool
) -> AckResult:
    """The ack result of a batch from what became of its parts."""
    if not quarantined_anything and not refused_anything:
        return AckResult.OK
    if stored_anything:
        return AckResult.PARTIAL
    if quarantined_anything:
        return AckResult.QUARANTINED
    return AckResult.REJECTED


class Attempts:
    """Failed attempts per batch key, bounded in memory (oldest keys forgotten first)."""

    def __init__(self, max_attempts: int, capacity: int = 10_000) -> None:
        self.max_attempts = max_attempts
        self._capacity = capacity
        self._counts: OrderedDict[Any, int] = OrderedDict()

    def failed(self, key: Any) -> bool:
        """Record a failed attempt; ``True`` once the key has used up its attempts."""
        n = self._counts.pop(key, 0) + 1
        self._counts[key] = n
        while len(self._counts) > self._capacity:
            self._counts.popitem(last=False)
        return n >= self.max_attempts

    def forget(self, keys: Iterable[Any]) -> None:
        """Drop the count of keys that went through."""
        for key in keys:
            self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)
