"""Notes: events and device status changes waiting in the ``notes`` table for the next batch.

A note is stored as its kind (``"event"`` or ``"status"``) and a msgpack body; sealing turns the
bodies into the protocol's :class:`~protocol.Event` and :class:`~protocol.DeviceStatus`. The
``readings.dropped`` event that reports unreported drop counts is made here too.

A note stamped now is on the boot clock: its body's ``time`` is then a ``CLOCK_BOOTTIME`` reading
and ``boot`` the kernel's boot id, converted to wall time at sealing like a reading's. A note
given an explicit time carries wall time and no ``boot``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import msgpack

from agent import clock
from agent.buffer.schema import DROP_REASONS
from protocol import DeviceStatus, Event

Note = tuple[str, bytes]
"""A note as the ``notes`` table stores it: kind and msgpack body."""

WallTime = Callable[[int, str | None], int]
"""Turns a note's ``(time, boot id or None)`` into wall time (µs since the epoch)."""


def _stamped(body: dict[str, Any], time_us: int | None) -> dict[str, Any]:
    if time_us is not None:
        body["time"] = int(time_us)
    else:
        timebase = clock.current()
        body["time"] = timebase.boot_now()
        body["boot"] = timebase.boot_id
    return body


def wall_time_as_is(time_us: int, boot: str | None) -> int:
    """A converter for callers that only need the stored figure (inspection)."""
    return time_us


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
        "device": device_id.bytes if device_id else None,
        "severity": severity,
        "kind": kind,
        "message": message[:1024],
        "attributes": attributes or {},
    }
    return ("event", msgpack.packb(_stamped(body, time_us), use_bin_type=True))


def status_note(
    device_id: uuid.UUID, status: str, reason: str = "", time_us: int | None = None
) -> Note:
    """A device status change as the ``notes`` table stores it."""
    body = {
        "device": device_id.bytes,
        "status": status,
        "reason": reason[:256],
    }
    return ("status", msgpack.packb(_stamped(body, time_us), use_bin_type=True))


def decode_notes(
    notes: list[tuple[Any, str, bytes]], wall_time: WallTime = wall_time_as_is
) -> tuple[list[Event], list[DeviceStatus]]:
    """The events and status changes of ``(id, kind, body)`` rows of the ``notes`` table."""
    events: list[Event] = []
    status: list[DeviceStatus] = []
    for _, note_kind, body in notes:
        data = msgpack.unpackb(body, raw=False)
        at = max(0, wall_time(int(data["time"]), data.get("boot")))
        if note_kind == "status":
            status.append(
                DeviceStatus.model_construct(
                    time=at,
                    device_id=uuid.UUID(bytes=data["device"]),
                    status=data["status"],
                    reason=data["reason"],
                )
            )
        else:
            device = data.get("device")
            events.append(
                Event.model_construct(
                    time=at,
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
