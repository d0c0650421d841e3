"""The backlog meter: how fast the buffer drains, when it will be empty, and saying so.

The runtime samples the buffer's counters once a second: readings produced (committed to the
buffer), readings delivered (finally acked by the collector) and readings buffered. Over the last
``WINDOW`` seconds of an unbroken link that gives the ack rate and the production rate; a backlog shrinks at their
difference, so the drain estimate is ``buffered / (ack rate − production rate)``, and there is
none while production keeps up with the acks (the backlog does not shrink).

A *drain* starts when the link is up and the buffer holds more than ``BACKLOG_SECONDS`` of
production (at least ``MIN_BACKLOG`` readings): ``backlog.draining`` is logged, then
``backlog.progress`` at every further 10 % of the starting backlog or every ``PROGRESS_EVERY``
seconds, and ``backlog.drained`` once the buffer is back under ``DRAINED_SECONDS`` of production.
The same figures travel to the cloud as events of the gateway (kinds ``backlog.draining``,
``backlog.progress``, ``backlog.drained``) and are kept in the buffer file for ``status``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

WINDOW = 30.0
"""Seconds of samples the rates are measured over (never across a link that was down)."""
BACKLOG_SECONDS = 10.0
DRAINED_SECONDS = 3.0
MIN_BACKLOG = 100
PROGRESS_EVERY = 30.0
PROGRESS_STEP = 0.1


@dataclass(frozen=True, slots=True)
class DrainFigures:
    """What the meter knows at one moment (rates in readings per second)."""

    at_us: int
    buffered: int
    ack_rate: float
    production_rate: float
    estimate_s: float | None
    draining: bool

    def to_json(self) -> str:
        """The figures as the buffer file keeps them (``meta`` key ``backlog``)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> DrainFigures | None:
        """Figures kept by :meth:`to_json`; ``None`` when they cannot be read."""
        try:
            raw = json.loads(text)
            return DrainFigures(
                at_us=int(raw["at_us"]),
                buffered=int(raw["buffered"]),
                ack_rate=float(raw["ack_rate"]),
                production_rate=float(raw["production_rate"]),
                estimate_s=None if raw["estimate_s"] is None else float(raw["estimate_s"]),
                draining=bool(raw["draining"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class Report:
    """A line the meter wants said (and sent as an event)."""

    kind: str
    message: str
    attributes: dict[str, Any]


class BacklogMeter:
    """Measures ack and production rates from counter samples and follows drains."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque()
        self._drain_start: tuple[float, int] | None = None
        self._last_report: tuple[float, int] = (0.0, 0)
        self.figures: DrainFigures | None = None
        self._linked = False

    def _rates(self) -> tuple[float, float]:
        if len(self._samples) < 2:
            return 0.0, 0.0
        t0, produced0, delivered0 = self._samples[0]
        t1, produced1, delivered1 = self._samples[-1]
        span = t1 - t0
        if span <= 0:
            return 0.0, 0.0
        return (delivered1 - delivered0) / span, (produced1 - produced0) / span

    def sample(
        self, now: float, now_us: int, produced: int, delivered: int, buffered: int, linked: bool
    ) -> list[Report]:
        """Take one sample (``now`` monotonic seconds); return what is worth saying now."""
        if linked != self._linked:
            # Acks stop while the link is down: rates are measured over an unbroken link only.
            self._samples.clear()
            self._linked = linked
        self._samples.append((now, produced, delivered))
        while self._samples and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        ack_rate, production_rate = self._rates()
        net = ack_rate - production_rate
        estimate = buffered / net if net > 0 and buffered > 0 else None
        if buffered == 0:
            estimate = 0.0
        reports: list[Report] = []
        figures_now = {
            "buffered_readings": buffered,
            "ack_rate": round(ack_rate, 1),
            "production_rate": round(production_rate, 1),
            "estimate_s": None if estimate is None else round(estimate, 1),
        }
        backlog_floor = max(MIN_BACKLOG, production_rate * BACKLOG_SECONDS)
        drained_floor = max(MIN_BACKLOG, production_rate * DRAINED_SECONDS)
        if self._drain_start is None:
            if linked and buffered > backlog_floor and len(self._samples) >= 2:
                self._drain_start = (now, buffered)
                self._last_report = (now, buffered)
                reports.append(
                    Report(
                        "backlog.draining",
                        f"draining a backlog of {buffered} readings",
                        figures_now,
                    )
                )
        else:
            started_at, started_with = self._drain_start
            if buffered <= drained_floor:
                self._drain_start = None
                reports.append(
                    Report(
                        "backlog.drained",
                        f"backlog of {started_with} readings drained in {now - started_at:.0f} s",
                        {
                            **figures_now,
                            "backlog_readings": started_with,
                            "seconds": round(now - started_at, 1),
                        },
                    )
                )
            else:
                last_at, last_buffered = self._last_report
                step = max(1, int(started_with * PROGRESS_STEP))
                if linked and (last_buffered - buffered >= step or now - last_at >= PROGRESS_EVERY):
                    self._last_report = (now, buffered)
                    done = max(0.0, 1.0 - buffered / started_with) if started_with else 1.0
                    reports.append(
                        Report(
                            "backlog.progress",
                            f"{round(done * 100)} % of the backlog drained, {buffered} readings"
                            " to go",
                            {**figures_now, "done_percent": round(done * 100)},
                        )
                    )
        self.figures = DrainFigures(
            at_us=now_us,
            buffered=buffered,
            ack_rate=round(ack_rate, 2),
            production_rate=round(production_rate, 2),
            estimate_s=None if estimate is None else round(estimate, 1),
            draining=self._drain_start is not None,
        )
        return reports
