"""Rollups into ``metrics``: exact values, late data changing exactly its bucket, crash safety."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from collector.lifecycle.rollups import bucket_ranges, bucket_start, rollup, rollup_pass, sources
from tests.lifecycle.conftest import write_readings

TENANT = uuid.UUID("11111111-1111-4111-8111-111111111111")
DEV_A = uuid.UUID("aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa")
DEV_B = uuid.UUID("bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb")
PERIODS = (60.0, 3600.0)
MINUTE, HOUR = timedelta(minutes=1), timedelta(hours=1)


def _base() -> datetime:
    """The start of the hour eight hours ago: old enough to be "six hours of backlog" later."""
    now = datetime.now(UTC) - timedelta(hours=8)
    return now.replace(minute=0, second=0, microsecond=0)


async def _metrics(
    conn: asyncpg.Connection,
) -> dict[tuple[float, str, str, datetime], tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT extract(epoch FROM period) AS period, device_id, metric, bucket, count, sum, min, max, last, "
        "m.xmin::text AS xmin FROM metrics m JOIN series s ON s.id = m.series_id"
    )
    return {
        (float(r["period"]), str(r["device_id"]), r["metric"], r["bucket"]): (
            r["count"],
            r["sum"],
            r["min"],
            r["max"],
            r["last"],
            r["xmin"],
        )
        for r in rows
    }


async def test_rollups_hold_exact_values_and_late_data_changes_only_its_bucket(
    ts: asyncpg.Connection,
) -> None:
    """Count, sum, min, max and last per bucket are exact; a late reading rewrites only its own buckets."""
    t0 = _base()
    await write_readings(
        ts,
        TENANT,
        DEV_A,
        "temp",
        [
            (t0 + timedelta(seconds=10), 1.0),
            (t0 + timedelta(seconds=20), 3.0),
            (t0 + timedelta(seconds=50), 2.0),
            (t0 + timedelta(minutes=1, seconds=5), 5.0),
            (t0 + timedelta(hours=1, minutes=30), 7.0),
        ],
    )
    await write_readings(ts, TENANT, DEV_A, "mode", [(t0 + timedelta(seconds=15), "auto")])
    await write_readings(
        ts,
        TENANT,
        DEV_B,
        "temp",
        [(t0 + timedelta(seconds=30), -4.5), (t0 + timedelta(seconds=31), 4.5)],
    )

    done = await rollup(ts, PERIODS, claim_rows=100)

    assert 3 == done["dirty_rows"]
    assert 0 == await ts.fetchval("SELECT count(*) FROM ingest_dirty")
    first = await _metrics(ts)
    values = {k: v[:5] for k, v in first.items()}
    a, b = str(DEV_A), str(DEV_B)
    expected = {
        (60.0, a, "temp", t0): (3, 6.0, 1.0, 3.0, 2.0),
        (60.0, a, "temp", t0 + MINUTE): (1, 5.0, 5.0, 5.0, 5.0),
        (60.0, a, "temp", t0 + HOUR + 30 * MINUTE): (1, 7.0, 7.0, 7.0, 7.0),
        (3600.0, a, "temp", t0): (4, 11.0, 1.0, 5.0, 5.0),
        (3600.0, a, "temp", t0 + HOUR): (1, 7.0, 7.0, 7.0, 7.0),
        (60.0, b, "temp", t0): (2, 0.0, -4.5, 4.5, 4.5),
        (3600.0, b, "temp", t0): (2, 0.0, -4.5, 4.5, 4.5),
    }
    assert expected == values

    # Six hours later the gateway's backlog arrives: one reading for the first minute.
    await write_readings(ts, TENANT, DEV_A, "temp", [(t0 + timedelta(seconds=55), 10.0)])
    done = await rollup(ts, PERIODS, claim_rows=100)

    assert 1 == done["dirty_rows"]
    assert 2 == done["buckets_written"]
    second = await _metrics(ts)
    changed = {k for k in second if second[k] != first[k]}
    assert {(60.0, a, "temp", t0), (3600.0, a, "temp", t0)} == changed
    assert (4, 16.0, 1.0, 10.0, 10.0) == second[(60.0, a, "temp", t0)][:5]
    # The hour's last reading is still the one at minute 1 (5.0), later than the late 10.0.
    assert (5, 21.0, 1.0, 10.0, 5.0) == second[(3600.0, a, "temp", t0)][:5]
    # Untouched rows were not even rewritten: same row version (xmin) as before.
    for key in set(first) - changed:
        assert first[key] == second[key]


async def test_redelivered_dirty_ranges_do_not_double_count(ts: asyncpg.Connection) -> None:
    """Overlapping dirty ranges of one series are merged, so each reading counts once."""
    t0 = _base()
    await write_readings(
        ts, TENANT, DEV_A, "temp", [(t0 + timedelta(seconds=s), 1.0) for s in range(0, 120, 10)]
    )
    # Three more dirty rows over the same minutes, as several flushes of one series leave behind.
    for lo, hi in ((5, 15), (40, 70), (0, 119)):
        await ts.execute(
            "INSERT INTO ingest_dirty (series_id, first_time, last_time) "
            "SELECT id, $3, $4 FROM series WHERE tenant_id = $1 AND device_id = $2 AND metric = 'temp'",
            TENANT,
            DEV_A,
            t0 + timedelta(seconds=lo),
            t0 + timedelta(seconds=hi),
        )

    await rollup(ts, PERIODS, claim_rows=2)

    rows = await ts.fetch(
        "SELECT extract(epoch FROM period) AS period, bucket, count, sum FROM metrics ORDER BY period, bucket"
    )
    assert [(60.0, t0, 6, 6.0), (60.0, t0 + MINUTE, 6, 6.0), (3600.0, t0, 12, 12.0)] == [
        (float(r["period"]), r["bucket"], r["count"], r["sum"]) for r in rows
    ]
    assert 0 == await ts.fetchval("SELECT count(*) FROM ingest_dirty")


async def test_a_crash_during_the_rollup_loses_no_dirty_range(
    ts: asyncpg.Connection, ts_dsn: str
) -> None:
    """A rollup whose connection dies before commit leaves its claimed dirty rows for the next run."""
    t0 = _base()
    await write_readings(ts, TENANT, DEV_A, "temp", [(t0, 1.0), (t0 + timedelta(seconds=1), 2.0)])
    victim = await asyncpg.connect(ts_dsn)
    blocker = await asyncpg.connect(ts_dsn)
    try:
        pid = victim.get_server_pid()
        # Hold metrics so that the rollup claims its rows and then waits at the upsert.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE metrics IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(rollup_pass(victim, PERIODS, 100))
        for _ in range(100):
            waiting = await ts.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting
        await ts.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await task
        await tx.rollback()
    finally:
        victim.terminate()
        await blocker.close()

    assert 1 == await ts.fetchval("SELECT count(*) FROM ingest_dirty")
    done = await rollup(ts, PERIODS, claim_rows=100)
    assert 1 == done["dirty_rows"]
    assert 2 == await ts.fetchval("SELECT count(*) FROM metrics WHERE count = 2 AND sum = 3")


@pytest.mark.parametrize("seconds", [1, 7, 60, 420, 3600, 5400, 86400, 7 * 86400])
async def test_bucket_start_agrees_with_time_bucket(ts: asyncpg.Connection, seconds: int) -> None:
    """The Python bucket bounds used to merge ranges are exactly time_bucket's."""
    width = timedelta(seconds=seconds)
    times = [
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        datetime(2026, 11, 25, 17, 3, 7, 123_456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ]
    expected = [
        await ts.fetchval("SELECT time_bucket($1::interval, $2::timestamptz)", width, t)
        for t in times
    ]
    assert expected == [bucket_start(t, width) for t in times]


def test_bucket_ranges_merge_touching_and_overlapping_ranges() -> None:
    """Ranges are widened to whole buckets, then merged per series."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    s = timedelta(seconds=1)
    ranges = bucket_ranges(
        [
            (1, t0 + 10 * s, t0 + 20 * s),
            (1, t0 + 40 * s, t0 + 70 * s),
            (1, t0 + 300 * s, t0 + 301 * s),
            (2, t0 + 59 * s, t0 + 59 * s),
        ],
        MINUTE,
    )
    assert {
        1: [(t0, t0 + 2 * MINUTE), (t0 + 5 * MINUTE, t0 + 6 * MINUTE)],
        2: [(t0, t0 + MINUTE)],
    } == ranges


def test_wider_widths_are_built_from_the_widest_dividing_narrower_one() -> None:
    """1 h comes from 5 min, 5 min and 7 min from 1 min, 1 min from the readings."""
    widths = [timedelta(minutes=m) for m in (1, 5, 7, 60)]
    assert [None, MINUTE, MINUTE, 5 * MINUTE] == sources(widths)


async def test_rollups_equal_a_direct_aggregate_whatever_the_arrival_order(
    ts: asyncpg.Connection,
) -> None:
    """Readings arriving in shuffled flushes, rolled up between flushes, give exactly the buckets a
    direct time_bucket aggregate of telemetry gives, for composed and raw widths alike."""
    rng = random.Random(7)
    periods = (60.0, 300.0, 3600.0, 5400.0)
    t0 = _base() - timedelta(hours=4)
    # Distinct times per series: with two readings at one instant, "last" is either of them.
    readings = [
        (device, metric, t0 + timedelta(seconds=second), rng.uniform(-50, 50))
        for device in (DEV_A, DEV_B)
        for metric in ("x", "y")
        for second in rng.sample(range(5 * 3600), 400)
    ]
    rng.shuffle(readings)
    for start in range(0, len(readings), 80):
        flush = readings[start : start + 80]
        for device in (DEV_A, DEV_B):
            for metric in ("x", "y"):
                points = [(t, v) for d, m, t, v in flush if d == device and m == metric]
                if points:
                    await write_readings(ts, TENANT, device, metric, points)
        if rng.random() < 0.5:
            await rollup(ts, periods, claim_rows=3)
    await rollup(ts, periods, claim_rows=3)

    for period in periods:
        width = timedelta(seconds=period)
        direct = await ts.fetch(
            "SELECT time_bucket($1::interval, time) AS bucket, device_id, metric, count(*) AS count, "
            "sum(value) AS sum, min(value) AS min, max(value) AS max, last(value, time) AS last "
            "FROM readings GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            width,
        )
        rolled = await ts.fetch(
            "SELECT bucket, device_id, metric, count, sum, min, max, last FROM rollups "
            "WHERE period = $1::interval ORDER BY 1, 2, 3",
            width,
        )
        assert [(r["bucket"], r["device_id"], r["metric"]) for r in direct] == [
            (r["bucket"], r["device_id"], r["metric"]) for r in rolled
        ]
        for d, r in zip(direct, rolled, strict=True):
            assert (d["count"], d["min"], d["max"], d["last"]) == (
                r["count"],
                r["min"],
                r["max"],
                r["last"],
            )
            assert d["sum"] == pytest.approx(r["sum"], abs=1e-9)
