"""Per-gateway clock skew: how far a gateway's batch creation times are from the collector's.

A batch's ``created`` is its sealing time as the gateway converted it; the collector receives a
live batch a moment later, so ``created − received`` is about zero (slightly negative) when the
gateway's times are right. A backlog batch, sealed hours before it arrives, says nothing about
the clock: the largest value of the last minute is kept, because the live batches a gateway
sends beside its backlog bring it back near zero, while a clock that is wrong moves every batch.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
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

    def settled(self, gateway_id: uuid.UUID) -> bool:
        """Whether the gateway's figure covers long enough (half a window) that a gateway
        behind is not just a backlog arriving before its live batches."""
        w = self._windows.get(gateway_id)
        return w is not None and (
            w.previous is not None or self.clock() - w.started >= self.window / 2
        )

    def skew(self, gateway_id: uuid.UUID) -> float | None:
        """The skew the gauge shows for ``gateway_id`` (``None`` if no batch was seen)."""
        w = self._windows.get(gateway_id)
        if w is None:
            return None
        return w.current if w.previous is None else max(w.current, w.previous)


_SKEW_SQL = """
SELECT gateway_id, max(extract(epoch FROM created - received_at)) AS skew, count(*) AS batches,
       max(received_at) AS last_batch_at
FROM ingest_ledger
WHERE received_at > now() - $1::interval AND created IS NOT NULL
GROUP BY gateway_id
ORDER BY gateway_id
"""


async def gateway_skews(
    timeseries: asyncpg.Connection,
    metadata_kwargs: dict[str, Any] | None,
    *,
    tolerance: float,
    since: float = 900.0,
) -> list[dict[str, Any]]:
    """Gateways whose batches of the last ``since`` seconds were created more than
    ``tolerance`` seconds away from their receive time, worst first, with their names.

    The ledger's ``created − received_at`` per batch, the largest per gateway (as the gauge: a
    backlog says nothing, the live batches beside it do). Names come from the metadata database
    when ``metadata_kwargs`` is given and it answers (else the id stands alone).
    """
    rows = await timeseries.fetch(_SKEW_SQL, timedelta(seconds=since))
    skewed = [r for r in rows if r["skew"] is not None and abs(float(r["skew"])) > tolerance]
    names: dict[uuid.UUID, str] = {}
    if skewed and metadata_kwargs is not None:
        with contextlib.suppress(
            OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError
        ):
            meta = await asyncpg.connect(**metadata_kwargs)
            try:
                found = await meta.fetch(
                    "SELECT id, name FROM gateways WHERE id = ANY($1::uuid[])",
                    [r["gateway_id"] for r in skewed],
                )
                names = {r["id"]: r["name"] for r in found}
            finally:
                await meta.close()
    out = [
        {
            "gateway_id": str(r["gateway_id"]),
            "name": names.get(r["gateway_id"]),
            "skew_s": round(float(r["skew"]), 3),
            "batches": int(r["batches"]),
            "last_batch_at": r["last_batch_at"].isoformat(),
        }
        for r in skewed
    ]
    out.sort(key=lambda g: -abs(g["skew_s"]))
    return out


def describe(gateway: dict[str, Any]) -> str:
    """One line for a gateway beyond the tolerance: its name, its id and how far off it is."""
    who = (
        f"{gateway['name']} ({gateway['gateway_id']})" if gateway["name"] else gateway["gateway_id"]
    )
    direction = "ahead" if gateway["skew_s"] > 0 else "behind"
    return (
        f"{who}: batches created {abs(gateway['skew_s']):.3f} s {direction} of the collector's"
        f" clock ({gateway['batches']} batches, last at {gateway['last_batch_at']})"
    )
