"""Gateways whose batches come from two streams at once: one gateway id, two agents.

An agent's buffer file has one current stream; a conflict ack starts a new one, and the old
stream's remaining batches may still go out beside the new stream's for a while, but every batch
of the old stream was *sealed* (``created``) before the first batch of the new one. Two agents
with the same gateway id (a cloned SD card or configuration) seal batches under two streams over
the same stretch of time. So a gateway is flagged when two of its streams have overlapping
``created`` ranges among the batches received in the last ``WINDOW``.

:class:`StreamWatch` follows what this collector commits (the Prometheus gauge
``sensormine_gateways_concurrent_streams``); :func:`concurrent_streams` asks the ingest ledger,
which holds what every collector committed (``status`` and ``doctor``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

WINDOW = 600.0
"""Seconds of received batches that are compared."""


@dataclass(slots=True)
class _Range:
    first: int
    last: int
    seen: float


def _overlap(a: _Range, b: _Range) -> bool:
    return a.first < b.last and b.first < a.last


class StreamWatch:
    """The streams of each gateway's recently committed batches, in this collector's memory."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._streams: dict[uuid.UUID, dict[uuid.UUID, _Range]] = {}

    def observe(self, gateway: uuid.UUID, stream: uuid.UUID, created: int, now: float) -> None:
        """A batch of ``gateway`` sealed at ``created`` (µs) under ``stream`` was committed."""
        streams = self._streams.setdefault(gateway, {})
        r = streams.get(stream)
        if r is None:
            streams[stream] = _Range(created, created, now)
        else:
            r.first, r.last, r.seen = min(r.first, created), max(r.last, created), now

    def flagged(self, now: float | None = None) -> set[uuid.UUID]:
        """Gateways with two streams whose sealing times overlap within the window."""
        now = time.monotonic() if now is None else now
        out: set[uuid.UUID] = set()
        for gateway in list(self._streams):
            streams = self._streams[gateway]
            for stream in [s for s, r in streams.items() if now - r.seen > self.window]:
                del streams[stream]
            if not streams:
                del self._streams[gateway]
                continue
            ranges = list(streams.values())
            if any(_overlap(a, b) for i, a in enumerate(ranges) for b in ranges[i + 1 :]):
                out.add(gateway)
        return out


CONCURRENT_STREAMS_SQL = """
WITH recent AS (
    SELECT gateway_id, stream, min(created) AS first_created, max(created) AS last_created,
           count(*) AS batches, max(received_at) AS last_received
    FROM ingest_ledger
    WHERE received_at > now() - make_interval(secs => $1) AND created IS NOT NULL
    GROUP BY gateway_id, stream
)
SELECT a.gateway_id, a.stream AS stream_a, a.batches AS batches_a,
       b.stream AS stream_b, b.batches AS batches_b,
       greatest(a.last_received, b.last_received) AS last_received
FROM recent a JOIN recent b ON a.gateway_id = b.gateway_id AND a.stream < b.stream
WHERE a.first_created < b.last_created AND b.first_created < a.last_created
ORDER BY a.gateway_id
"""


async def concurrent_streams(conn: Any, window: float = WINDOW) -> list[dict[str, Any]]:
    """Gateways whose batches of the last ``window`` seconds came from overlapping streams,
    from the ingest ledger (``conn``: the time-series database)."""
    rows = await conn.fetch(CONCURRENT_STREAMS_SQL, float(window))
    seen: dict[uuid.UUID, dict[str, Any]] = {}
    for r in rows:
        entry = seen.setdefault(
            r["gateway_id"],
            {
                "gateway_id": str(r["gateway_id"]),
                "streams": {},
                "last_received": r["last_received"].isoformat(),
            },
        )
        entry["streams"][str(r["stream_a"])] = int(r["batches_a"])
        entry["streams"][str(r["stream_b"])] = int(r["batches_b"])
    return list(seen.values())
