"""Rollups of numeric telemetry into ``metrics``, recomputed exactly where new rows landed.

The writer adds one ``ingest_dirty`` row per series, hour and flush, in the flush's own
transaction, naming the time range it wrote. A rollup pass claims a slice of those rows
(``DELETE ... RETURNING`` over ``FOR UPDATE SKIP LOCKED``), widens each range to whole buckets of
every configured period, merges the ranges per series so that no reading is counted twice,
recomputes those buckets from ``telemetry`` with ``time_bucket`` and upserts them, all in
one transaction: a crash before the commit leaves the dirty rows in place, a crash after it leaves
nothing to do. Readings that arrive hours late mark their own old buckets dirty like any others.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

# time_bucket's default origin for intervals shorter than a month (a Monday).
ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)

_CLAIM = """
DELETE FROM ingest_dirty
WHERE id IN (SELECT id FROM ingest_dirty ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING series_id, first_time, last_time
"""

_UPSERT = """
WITH ranges AS (
    SELECT * FROM unnest($1::int[], $2::timestamptz[], $3::timestamptz[]) AS r(series_id, lo, hi)
)
INSERT INTO metrics (bucket, period, series_id, count, sum, min, max, last)
SELECT time_bucket($4::interval, t.time), $4::interval, t.series_id,
       count(*), sum(t.value), min(t.value), max(t.value), last(t.value, t.time)
FROM ranges r
JOIN telemetry t ON t.series_id = r.series_id AND t.time >= r.lo AND t.time < r.hi
GROUP BY 1, t.series_id
ON CONFLICT (series_id, period, bucket) DO UPDATE
SET count = EXCLUDED.count, sum = EXCLUDED.sum,
    min = EXCLUDED.min, max = EXCLUDED.max, last = EXCLUDED.last
WHERE (metrics.count, metrics.sum, metrics.min, metrics.max, metrics.last)
      IS DISTINCT FROM (EXCLUDED.count, EXCLUDED.sum, EXCLUDED.min, EXCLUDED.max, EXCLUDED.last)
"""

# A wider bucket that is a whole number of narrower ones is built from those (just recomputed in
# the same transaction): at most 60 rows per hour instead of up to 3,600 readings at 1 Hz. Both
# widths share time_bucket's origin, so the narrow buckets tile the wide one exactly.
_UPSERT_FROM_NARROWER = """
WITH ranges AS (
    SELECT * FROM unnest($1::int[], $2::timestamptz[], $3::timestamptz[]) AS r(series_id, lo, hi)
)
INSERT INTO metrics (bucket, period, series_id, count, sum, min, max, last)
SELECT time_bucket($4::interval, m.bucket), $4::interval, m.series_id,
       sum(m.count), sum(m.sum), min(m.min), max(m.max), last(m.last, m.bucket)
FROM ranges r
JOIN metrics m
  ON m.series_id = r.series_id AND m.period = $5::interval
 AND m.bucket >= r.lo AND m.bucket < r.hi
GROUP BY 1, m.series_id
ON CONFLICT (series_id, period, bucket) DO UPDATE
SET count = EXCLUDED.count, sum = EXCLUDED.sum,
    min = EXCLUDED.min, max = EXCLUDED.max, last = EXCLUDED.last
WHERE (metrics.count, metrics.sum, metrics.min, metrics.max, metrics.last)
      IS DISTINCT FROM (EXCLUDED.count, EXCLUDED.sum, EXCLUDED.min, EXCLUDED.max, EXCLUDED.last)
"""

Series = int
Range = tuple[datetime, datetime]


def bucket_start(time: datetime, period: timedelta) -> datetime:
    """The start of the bucket of width ``period`` holding ``time``, as ``time_bucket`` computes it."""
    step = int(period.total_seconds() * 1_000_000)
    offset = (time - ORIGIN) // timedelta(microseconds=1)
    return ORIGIN + timedelta(microseconds=(offset // step) * step)


def sources(widths: list[timedelta]) -> list[timedelta | None]:
    """For each width (ascending), the widest narrower width that divides it (None: from raw rows)."""
    out: list[timedelta | None] = []
    for i, width in enumerate(widths):
        divisors = [w for w in widths[:i] if width % w == timedelta(0)]
        out.append(max(divisors) if divisors else None)
    return out


def bucket_ranges(
    dirty: Iterable[tuple[Series, datetime, datetime]], period: timedelta
) -> dict[Series, list[Range]]:
    """Whole-bucket, non-overlapping ``[lo, hi)`` ranges per series covering every dirty range."""
    widened: dict[Series, list[Range]] = defaultdict(list)
    for series_id, first, last in dirty:
        lo = bucket_start(min(first, last), period)
        hi = bucket_start(max(first, last), period) + period
        widened[series_id].append((lo, hi))
    merged: dict[Series, list[Range]] = {}
    for series, ranges in widened.items():
        ranges.sort()
        out: list[Range] = [ranges[0]]
        for lo, hi in ranges[1:]:
            # Touching ranges are joined too: one index scan instead of two.
            if lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        merged[series] = out
    return merged


async def rollup_pass(
    conn: asyncpg.Connection, periods: Iterable[float], claim_rows: int
) -> dict[str, int]:
    """Claim up to ``claim_rows`` dirty rows and recompute their buckets, in one transaction."""
    widths = sorted(timedelta(seconds=p) for p in periods)
    async with conn.transaction():
        claimed = await conn.fetch(_CLAIM, claim_rows)
        if not claimed:
            return {"dirty_rows": 0, "ranges": 0, "buckets_written": 0}
        dirty = [(int(r["series_id"]), r["first_time"], r["last_time"]) for r in claimed]
        ranges = written = 0
        for width, source in zip(widths, sources(widths), strict=True):
            per_series = bucket_ranges(dirty, width)
            ids: list[int] = []
            los: list[datetime] = []
            his: list[datetime] = []
            # In series order: the upsert's row locks are taken in one order by every collector.
            for series_id in sorted(per_series):
                for lo, hi in per_series[series_id]:
                    ids.append(series_id)
                    los.append(lo)
                    his.append(hi)
            ranges += len(ids)
            if source is None:
                status = await conn.execute(_UPSERT, ids, los, his, width)
            else:
                status = await conn.execute(_UPSERT_FROM_NARROWER, ids, los, his, width, source)
            written += int(status.rsplit(" ", 1)[-1])
    return {"dirty_rows": len(claimed), "ranges": ranges, "buckets_written": written}


async def rollup(
    conn: asyncpg.Connection,
    periods: Iterable[float],
    claim_rows: int,
    *,
    max_passes: int = 1000,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Recompute every bucket that is dirty now, a slice per transaction; return the totals.

    Stops early, between slices, when ``stop`` is set: the rest stays dirty for the next run.
    """
    periods = tuple(periods)
    total = {"dirty_rows": 0, "ranges": 0, "buckets_written": 0, "passes": 0}
    for _ in range(max_passes):
        if stop is not None and stop.is_set():
            break
        done = await rollup_pass(conn, periods, claim_rows)
        if not done["dirty_rows"]:
            break
        total["passes"] += 1
        for key, value in done.items():
            total[key] += value
        if done["dirty_rows"] < claim_rows:
            break
    return total
