"""Cost of the rollup job against the cost of writing the readings it rolls up.

Set-up: a fresh time-series database on the machine's PostgreSQL, migrated. SERIES series (one
metric each) at 1 Hz.

1. Backlog: HOURS hours of readings per series, written like the writer does (COPY into
   ``telemetry`` plus one ``ingest_dirty`` row per series and hour, per flush of FLUSH seconds of
   data), then one rollup run over all of it. Baseline: the writes themselves, in the same run.
2. Live: LIVE_FLUSHES flushes of 30 s of new readings each (the default lag), each followed by a
   rollup run, as a running collector does; the ratio is rollup time over write time.

Last lines: ``backlog: ... ratio <q>`` and ``live: ... ratio <q>``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector import migrations  # noqa: E402
from collector.lifecycle.rollups import rollup  # noqa: E402
from collector.series import SeriesCatalog  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.services import SYSTEM_PG_DSN  # noqa: E402

TENANT = uuid.UUID("11111111-1111-4111-8111-111111111111")


async def _write(
    conn: asyncpg.Connection, series: list[int], start: datetime, seconds: int
) -> None:
    """One flush: ``seconds`` 1 Hz readings per series, and their dirty ranges per hour."""
    records = []
    dirty: dict[tuple[int, datetime], list[datetime]] = {}
    for sid in series:
        for s in range(seconds):
            t = start + timedelta(seconds=s)
            records.append((t, sid, float(s % 97)))
            hour = t.replace(minute=0, second=0, microsecond=0)
            span = dirty.setdefault((sid, hour), [t, t])
            span[1] = t
    async with conn.transaction():
        await conn.copy_records_to_table(
            "telemetry", records=records, columns=("time", "series_id", "value")
        )
        await conn.copy_records_to_table(
            "ingest_dirty",
            records=[(sid, a, b) for (sid, _), (a, b) in dirty.items()],
            columns=("series_id", "first_time", "last_time"),
        )


async def main(series_count: int, hours: int, flush: int, live_flushes: int) -> None:
    """Run both measurements on a scratch database and print the figures."""
    dsn = await create_database(SYSTEM_PG_DSN, "smbench")
    try:
        await migrations.apply(dsn, "timeseries")
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                ids = await SeriesCatalog().resolve(
                    conn, {(TENANT, uuid.uuid4(), "m"): "number" for _ in range(series_count)}
                )
            series = sorted(ids.values())
            start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(
                hours=hours + 1
            )
            readings = series_count * hours * 3600
            t0 = time.perf_counter()
            for k in range(hours * 3600 // flush):
                await _write(conn, series, start + timedelta(seconds=k * flush), flush)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = await rollup(conn, (60.0, 3600.0), 5000)
            rollup_s = time.perf_counter() - t0
            print(
                f"backlog: {series_count} series x {hours} h at 1 Hz = {readings} readings; "
                f"write {write_s:.2f} s ({readings / write_s:,.0f} rows/s), rollup {rollup_s:.2f} s "
                f"({done['dirty_rows']} dirty rows, {done['buckets_written']} buckets); "
                f"ratio {rollup_s / write_s:.3f}"
            )
            live_start = start + timedelta(hours=hours)
            write_s = rollup_s = 0.0
            for k in range(live_flushes):
                t0 = time.perf_counter()
                await _write(conn, series, live_start + timedelta(seconds=30 * k), 30)
                write_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                await rollup(conn, (60.0, 3600.0), 5000)
                rollup_s += time.perf_counter() - t0
            print(
                f"live: {live_flushes} x 30 s of {series_count} series, each followed by a rollup "
                f"run; write {write_s:.2f} s, rollup {rollup_s:.2f} s; ratio {rollup_s / write_s:.3f}"
            )
        finally:
            await conn.close()
    finally:
        await drop_database(SYSTEM_PG_DSN, dsn)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=200)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--flush", type=int, default=60, help="seconds of data per flush")
    parser.add_argument("--live-flushes", type=int, default=60)
    args = parser.parse_args()
    asyncio.run(main(args.series, args.hours, args.flush, args.live_flushes))
