"""Pieces the built-in input kinds share: duration fields, device identity, status tracking, and
the poll cycle of an input that reads its devices on an interval (:class:`PolledInput`).

Kept beside ``base.py`` rather than in it because ``base.py`` is the runtime contract; these are
conveniences for writing an input and an input kind may ignore them.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from agent import clock
from agent.inputs.base import DeviceState, Emitter, ProbeResult
from service.config import parse_duration

log = structlog.get_logger(__name__)

# Seconds as a float, written "5s" in configuration files (service.config's parser, so that
# every duration in the file reads the same way). Bounds go on each field.
Duration = Annotated[float, BeforeValidator(parse_duration)]

# Names that end up as metric names on the wire and in the collector's schema.
MetricName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-/]+$")]


def _check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f'{name[:64]!r} is not an IANA time zone name (e.g. "Europe/Berlin", "UTC")'
        ) from None
    return name


# An IANA zone name ("Europe/Berlin"), checked against the system's zone database at load.
TimeZoneName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_check_zone)]


class DeviceConfig(BaseModel):
    """A device as the collector knows it: its id (registered in the cloud) and a local name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    name: str = Field(min_length=1, max_length=128)


def now_us() -> int:
    """Now, µs since the epoch as the gateway's clock says: the stamp of a reading taken now.

    The value is a :class:`~agent.clock.Stamp`: it also carries the boot-clock reading, which is
    what the agent stores, so a wrong or stepped wall clock never skews a reading.
    """
    return clock.stamp()


def finite_or_none(value: float) -> float | None:
    """``value`` if it is a finite number, else ``None`` (the collector rejects NaN and inf)."""
    return value if math.isfinite(value) else None


class StatusTracker:
    """Forward a device's status only when it changes, with an event and a log line for errors.

    The emitter already forwards only changes to the collector; tracking here as well keeps the
    log and the event stream to one line per transition instead of one per failed read.
    """

    def __init__(self, input_name: str) -> None:
        """Track statuses for the input called ``input_name``."""
        self._input = input_name
        self._last: dict[uuid.UUID, tuple[DeviceState, str]] = {}

    def current(self, device_id: uuid.UUID) -> DeviceState | None:
        """The last status reported for ``device_id``, or ``None`` before the first."""
        last = self._last.get(device_id)
        return last[0] if last else None

    def online(self, emit: Emitter, device_id: uuid.UUID) -> None:
        """Report that ``device_id`` answered."""
        self._set(emit, device_id, "online", "")

    def error(self, emit: Emitter, device_id: uuid.UUID, reason: str) -> None:
        """Report that ``device_id`` failed, saying why."""
        self._set(emit, device_id, "error", reason)

    def _set(self, emit: Emitter, device_id: uuid.UUID, status: DeviceState, reason: str) -> None:
        previous = self._last.get(device_id)
        if previous is not None and previous[0] == status and previous[1] == reason:
            return
        self._last[device_id] = (status, reason)
        emit.device_status(device_id, status, reason)
        if status == "error":
            log.warning(
                "input.device_error", input=self._input, device_id=str(device_id), reason=reason
            )
            # Same reason text changing (e.g. a different exception) is a status update but not a
            # new failure; only a transition into error becomes an event.
            if previous is None or previous[0] != "error":
                emit.event(
                    "device.error",
                    reason,
                    severity="warning",
                    device_id=device_id,
                    attributes={"input": self._input},
                )
        elif previous is not None and previous[0] == "error":
            log.info("input.device_recovered", input=self._input, device_id=str(device_id))
            emit.event(
                "device.recovered",
                "device answers again",
                device_id=device_id,
                attributes={"input": self._input},
            )


@dataclass
class DeviceRead:
    """What one read of one device produced: readings, problems (none: it answered), and when
    (``stamp`` 0: the time the round of reads ended)."""

    readings: dict[str, bool | int | float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    stamp: int = 0


class PolledInput(ABC):
    """An input that reads all its devices every ``interval``: the poll cycle and ``probe``.

    A subclass sets ``interval`` and ``devices`` (id and name of each device, in the order they
    are reported), reads them all once (:meth:`_read_round`) and releases what a round holds
    (:meth:`_close`). Each round emits
    every reading, puts a device with problems in ``error`` with them (its readings still count)
    and the others ``online``, and reports how long the round took.
    """

    name: str
    interval: float
    devices: list[tuple[uuid.UUID, str]]
    _status: StatusTracker

    @abstractmethod
    async def _read_round(self, probing: bool) -> dict[uuid.UUID, DeviceRead]:
        """Read every device once (``probing``: for ``inputs test``, not the running agent)."""

    @abstractmethod
    def _close(self) -> None:
        """Release connections or threads; the next round opens them again."""

    async def run(self, emit: Emitter) -> None:
        """Read every device each ``interval`` until cancelled."""

        async def cycle() -> None:
            started = time.perf_counter()
            results = await self._read_round(probing=False)
            stamp = now_us()
            for device_id, _name in self.devices:
                result = results[device_id]
                for metric, value in result.readings.items():
                    emit.reading(device_id, metric, value, result.stamp or stamp)
                if result.problems:
                    self._status.error(emit, device_id, "; ".join(result.problems))
                else:
                    self._status.online(emit, device_id)
            emit.read_duration(time.perf_counter() - started)

        try:
            await run_every(self.interval, cycle)
        finally:
            self._close()

    async def probe(self) -> list[ProbeResult]:
        """Read every device once."""
        try:
            results = await self._read_round(probing=True)
        finally:
            self._close()
        return [
            ProbeResult(
                device_id,
                name,
                readings=dict(results[device_id].readings),
                error="; ".join(results[device_id].problems) or None,
            )
            for device_id, name in self.devices
        ]


async def run_every(interval: float, cycle: Callable[[], Awaitable[None]]) -> None:
    """Call ``cycle`` every ``interval`` seconds on a fixed cadence until cancelled.

    A cycle that overruns its slot skips the missed ticks instead of bursting to catch up, so a
    slow device shows up as gaps in the data rather than as a flood of back-to-back reads.
    """
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        await cycle()
        next_at += interval
        now = loop.time()
        if next_at < now:
            next_at = now + interval - ((now - next_at) % interval)
        await asyncio.sleep(next_at - now)


def zone(name: str | None) -> tzinfo | None:
    """The zone called ``name`` (validated at configuration load), or ``None``."""
    return ZoneInfo(name) if name is not None else None


def timestamp_us(value: Any, local_zone: tzinfo | None = None) -> int:
    """Microseconds since the epoch from epoch seconds/ms/µs (by magnitude) or ISO 8601 text.

    Devices disagree on the unit of an epoch number; the magnitude tells them apart for any
    date between 1973 and 5138, which is every date a live sensor can report. An ISO time
    without a zone offset is read in ``local_zone``; without one it is refused, because
    guessing UTC stamps every device east of Greenwich hours in the future.
    """
    if isinstance(value, bool):
        raise ValueError("a timestamp is a number or an ISO 8601 string, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"timestamp {value!r} is not a positive finite number")
        magnitude = abs(value)
        if magnitude >= 1e14:
            return int(value)
        if magnitude >= 1e11:
            return int(value * 1000)
        return int(value * 1_000_000)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {value[:40]!r} is not ISO 8601") from None
        if parsed.tzinfo is None:
            if local_zone is None:
                raise ValueError(
                    f"time {value[:40]!r} has no zone offset; set the input's timezone "
                    f'(e.g. timezone = "Europe/Berlin") to the zone the device\'s clock runs on'
                )
            # fold=0: in the hour a DST change repeats, the first occurrence.
            parsed = parsed.replace(tzinfo=local_zone)
        seconds = parsed.timestamp()
        if seconds <= 0:
            raise ValueError(f"time {value[:40]!r} is not after 1970")
        return int(seconds * 1_000_000)
    raise ValueError(f"a timestamp is a number or an ISO 8601 string, not {type(value).__name__}")


# Problems of one kind are logged in full LOG_FIRST times, then at most once per LOG_INTERVAL
# seconds with the count since the last line: a device or program producing garbage at
# thousands of messages a second must not flood the journal, nor hide that it goes on.
LOG_FIRST = 5
LOG_INTERVAL = 60.0


class ProblemLog:
    """Counts an input's problems by kind and logs them rate-limited (one rule for every input).

    ``counts`` holds every problem; the log shows the first ``LOG_FIRST`` of each kind in
    full, then one line per ``LOG_INTERVAL`` seconds carrying ``total`` and ``suppressed``.
    """

    def __init__(
        self,
        prefix: str,
        input_name: str,
        *,
        first: int = LOG_FIRST,
        interval: float = LOG_INTERVAL,
        counts: Counter[str] | None = None,
    ) -> None:
        """Log as ``<prefix>.<kind>`` for the input called ``input_name``."""
        self._prefix = prefix
        self._input = input_name
        self._first = first
        self._interval = interval
        self.counts: Counter[str] = counts if counts is not None else Counter()
        self._suppressed: Counter[str] = Counter()
        self._next_at: dict[str, float] = {}

    def __call__(self, kind: str, problem: str, **fields: Any) -> None:
        """Count one problem of ``kind`` and log it if the rate limit allows."""
        self.counts[kind] += 1
        total = self.counts[kind]
        if total > self._first:
            now = time.monotonic()
            if now < self._next_at.get(kind, 0.0):
                self._suppressed[kind] += 1
                return
            self._next_at[kind] = now + self._interval
        elif total == self._first:
            self._next_at[kind] = time.monotonic() + self._interval
        suppressed = self._suppressed.pop(kind, 0)
        log.warning(
            f"{self._prefix}.{kind}",
            input=self._input,
            problem=problem,
            total=total,
            suppressed=suppressed,
            **fields,
        )
