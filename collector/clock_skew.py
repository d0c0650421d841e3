"""Per-gateway clock skew: how far a gateway's batch creation times are from the collector's.

A batch's ``created`` is its sealing time as the gateway converted it; the collector receives a
live batch a moment later, so ``created − received`` is about zero (slightly negative) when the
gateway's times are right. A backlog batch, sealed hours before it arrives, says nothing about
the clock: the largest value of the last minute is kept, because the live batches a gateway
sends beside its backlog bring it back near zero, while a clock that is wrong moves every batch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Gauge

WINDOW_S = 60.0


@dataclass(slots=True)
class _Window:
    started: float
    current: float
    previous: float | None = None


class SkewTracker:
    """Keeps the gauge ``sensormine_gateway_clock_skew_seconds{gateway_id}`` per gateway."""

    def __init__(
        self, gauge: Gauge, window: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.gauge = gauge
        self.window = window
        self.clock = clock
        self._windows: dict[uuid.UUID, _Window] = {}

    def record(self, gateway_id: uuid.UUID, created_us: int, received_us: int) -> float:
        """Take one batch; return the gateway's skew (seconds) as the gauge now shows it."""
        skew = (created_us - received_us) / 1e6
        now = self.clock()
        w = self._windows.get(gateway_id)
        if w is None:
            w = self._windows[gateway_id] = _Window(now, skew)
        elif now - w.started >= self.window:
            w.previous = w.current if now - w.started < 2 * self.window else None
            w.started, w.current = now, skew
        else:
            w.current = max(w.current, skew)
        value = w.current if w.previous is None else max(w.current, w.previous)
        self.gauge.labels(gateway_id=str(gateway_id)).set(round(value, 6))
        return value

    def skew(self, gateway_id: uuid.UUID) -> float | None:
        """The skew the gauge shows for ``gateway_id`` (``None`` if no batch was seen)."""
        w = self._windows.get(gateway_id)
        if w is None:
            return None
        return w.current if w.previous is None else max(w.current, w.previous)
