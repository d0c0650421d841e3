"""Notes: events and device status changes waiting in the ``notes`` table for the next batch.

A note is stored as its kind (``"event"`` or ``"status"``) and a msgpack body; sealing turns the
bodies into the protocol's :class:`~protocol.Event` and :class:`~protocol.DeviceStatus`. The
``readings.dropped`` event that reports unreported drop counts is made here too.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgpack

from agent.buffer.schema import DROP_REASONS, now_us
from protocol import DeviceStatus, Event

Note = tuple[str, bytes]
"""A note as the ``notes`` table stores it: kind and msgpack body."""


def event_note(
    kind: str,
    message: str,
    *,
    severity: str = "info",
    device_id: uuid.UUID | None = None,
    attributes: dict[str, Any] | None = None,
    time_us: int | None = None,
) -> Note:
    """An event as the ``notes`` table stores it."""
    body = {
        "time": time_us if time_us is not None else now_us(),
        "device": device_id.bytes if device_id else None,
        "severity": severity,
        "kind": kind,
        "message": message[:1024],
        "attributes": attributes or {},
    }
    return ("event", msgpack.packb(body, use_bin_type=True))


def status_note(
    device_id: uuid.UUID, status: str, reason: str = "", time_us: int | None = None
) -> Note:
    """A device status change as the ``notes`` table stores it."""
    body = {
        "time": time_us if time_us is not None else now_us(),
        "device": device_id.bytes,
        "status": status,
        "reason": reason[:256],
    }
    return ("status", msgpack.packb(body, use_bin_type=True))


def decode_notes(notes: list[tuple[Any, str, bytes]]) -> tuple[list[Event], list[DeviceStatus]]:
    """The events and status changes of ``(id, kind, body)`` rows of the ``notes`` table."""
    events: list[Event] = []
    status: list[DeviceStatus] = []
    for _, note_kind, body in notes:
        data = msgpack.unpackb(body, raw=False)
        if note_kind == "status":
            status.append(
                DeviceStatus.model_construct(
                    time=data["time"],
                    device_id=uuid.UUID(bytes=data["device"]),
                    status=data["status"],
                    reason=data["reason"],
                )
            )
        else:
            device = data.get("device")
            events.append(
                Event.model_construct(
                    time=data["time"],
                    device_id=uuid.UUID(bytes=device) if device else None,
                    severity=data["severity"],
                    kind=data["kind"],
                    message=data["message"],
                    attributes=data["attributes"],
                )
            )
    return events, status


def drop_event(counters: dict[str, int], time_us: int) -> Event | None:
    """A ``readings.dropped`` event for the unreported drops in ``counters`` (which it resets)."""
    unreported = {r: counters[f"unreported_{r}"] for r in DROP_REASONS}
    total = sum(unreported.values())
    if not total:
        return None
    for r in DROP_REASONS:
        counters[f"unreported_{r}"] = 0
    return Event.model_construct(
        time=time_us,
        device_id=None,
        severity="warning",
        kind="readings.dropped",
        message=f"{total} readings were dropped by the agent's buffer",
        attributes={
            "count": total,
            **{r: n for r, n in unreported.items() if n},
            "dropped_total": sum(counters[f"dropped_{r}"] for r in DROP_REASONS),
        },
    )
