"""Query API: latest values of 10,000 devices and a 30-day chart, through the API and directly.

Set-up: fresh databases on the machine's PostgreSQL; one tenant with 10,000 devices behind 20
gateways, each with a status row and two metrics (temperature, humidity), so 20,000 series with
their latest value; READING_SERIES of them with 30 days of readings at one a minute (at least 10
million readings, in daily chunks) and their 1-hour rollups, as the lifecycle job leaves them.
Then ``sensormine-collector api`` as a child process, and a token of the tenant.

Measured in one run, 100 requests each after warming up (a dashboard's steady state), one at a
time from one client:

- ``latest_10k``: ``GET /api/v1/latest`` (10,000 devices by name, the latest value of each of their
  metrics with its time and age), against the same query (``collector.api.reads.latest_document``, with the names read from the metadata database)
  run directly on an asyncpg connection;
- ``chart_30d``: ``GET /api/v1/devices/{id}/series`` over 30 days (720 hourly buckets, chosen by
  the API), against its reads (series lookup, rollup edge, rollup rows, the live tail) directly.

``overhead_vs_direct`` is the API's total time over the direct total for both (p50 and p99 of
each are printed too). Last line, exactly:
``api: latest_10k_p99=<ms> chart_30d_p99=<ms> overhead_vs_direct=<ratio>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector import migrations  # noqa: E402
from collector.api import reads, tokens  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.services import SYSTEM_PG_DSN, free_port, wait_for_port  # noqa: E402

DEVICES = 10_000
GATEWAYS = 20
DAYS = 30
READING_SERIES = 240  # x 43,200 readings = 10.4 million
REQUESTS = 100
WARMUP = 10


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def build(meta: str, ts: str) -> tuple[uuid.UUID, uuid.UUID, str]:
    """The registry and the readings; returns (tenant, chart device, token)."""
    await migrations.apply(meta, "metadata")
    await migrations.apply(ts, "timeseries")
    conn = await asyncpg.connect(meta)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('bench') RETURNING id")
        dtype = await conn.fetchval(
            "INSERT INTO device_types (tenant_id, name) VALUES ($1, 'sensor') RETURNING id", tenant
        )
        gateways = [
            await conn.fetchval(
                "INSERT INTO gateways (tenant_id, name) VALUES ($1, $2) RETURNING id",
                tenant,
                f"site-{g:02d}",
            )
            for g in range(GATEWAYS)
        ]
        devices = [uuid.uuid4() for _ in range(DEVICES)]
        await conn.copy_records_to_table(
            "devices",
            columns=["id", "tenant_id", "device_type_id", "gateway_id", "name"],
            records=[
                (d, tenant, dtype, gateways[i % GATEWAYS], f"sensor-{i:05d}")
                for i, d in enumerate(devices)
            ],
        )
        _, token = await tokens.create(conn, tenant, "bench")
    finally:
        await conn.close()
    conn = await asyncpg.connect(ts)
    try:
        await conn.copy_records_to_table(
            "series",
            columns=["tenant_id", "device_id", "metric", "kind"],
            records=[
                (tenant, d, m, "number") for d in devices for m in ("temperature", "humidity")
            ],
        )
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        start = now - timedelta(days=DAYS)
        # Readings: the first READING_SERIES series, one a minute for 30 days.
        t0 = time.perf_counter()
        await conn.execute(
            """
INSERT INTO telemetry (time, series_id, value)
SELECT t, s, 20 + 5 * sin(extract(epoch FROM t) / 3600 + s) + random()
FROM generate_series(1, $1::int) AS s,
     generate_series($2::timestamptz, $3::timestamptz - interval '1 minute', interval '1 minute') AS t
""",
            READING_SERIES,
            start,
            now,
        )
        readings = await conn.fetchval("SELECT count(*) FROM telemetry")
        print(
            f"bench: {readings:,} readings written in {time.perf_counter() - t0:.0f} s", flush=True
        )
        await conn.execute(
            """
INSERT INTO metrics (bucket, period, series_id, count, sum, min, max, last)
SELECT time_bucket('1 hour', time), interval '1 hour', series_id, count(*), sum(value),
       min(value), max(value), last(value, time)
FROM telemetry GROUP BY 1, 3
"""
        )
        await conn.execute(
            """
INSERT INTO series_latest (series_id, time, value)
SELECT id, $1::timestamptz - (id % 60) * interval '1 second', 20 + (id % 10)
FROM series
""",
            now,
        )
        await conn.copy_records_to_table(
            "device_status_history",
            columns=["time", "tenant_id", "gateway_id", "device_id", "status", "reason"],
            records=[
                (start, tenant, gateways[i % GATEWAYS], d, "online", "")
                for i, d in enumerate(devices)
            ],
        )
        await conn.execute("ANALYZE")
        chart_device = await conn.fetchval("SELECT device_id FROM series WHERE id = 1")
    finally:
        await conn.close()
    return tenant, chart_device, token


async def timed(n: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    for _ in range(WARMUP):
        await call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def measure(
    meta_dsn: str, ts: str, url: str, token: str, tenant: uuid.UUID, device: uuid.UUID, n: int
) -> dict[str, list[float]]:
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    out: dict[str, list[float]] = {}
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        first = await client.get("/api/v1/latest")
        first.raise_for_status()
        assert DEVICES == len(first.json()["devices"])

        async def latest_api() -> None:
            # The answer as a client receives it (the direct read does not parse it either).
            r = await client.get("/api/v1/latest")
            r.raise_for_status()

        async def chart_api() -> None:
            r = await client.get(
                f"/api/v1/devices/{device}/series",
                params={
                    "metric": "temperature",
                    "start": start.isoformat(),
                    "end": now.isoformat(),
                },
            )
            r.raise_for_status()
            body = r.json()
            assert "1h" == body["resolution"] and len(body["points"]["time"]) >= 719, body

        out["latest_api"] = await timed(n, latest_api)
        out["chart_api"] = await timed(n, chart_api)
    conn = await asyncpg.connect(ts)
    try:
        # The names as the API has them from the metadata database.
        meta = await asyncpg.connect(meta_dsn)
        try:
            named = await meta.fetch(
                "SELECT id, name FROM devices WHERE tenant_id = $1 ORDER BY name, id", tenant
            )
        finally:
            await meta.close()
        ids = [r["id"] for r in named]
        names = [r["name"] for r in named]

        async def latest_direct() -> None:
            text = await reads.latest_document(conn, tenant, None, ids, names)
            assert text.startswith("[{")

        async def chart_direct() -> None:
            info = await reads.find_series(conn, tenant, device, "temperature")
            assert info is not None
            buckets = await reads.rollup_points(conn, info, timedelta(hours=1), start, now)
            assert len(buckets) >= 719

        out["latest_direct"] = await timed(n, latest_direct)
        out["chart_direct"] = await timed(n, chart_direct)
    finally:
        await conn.close()
    return out


async def main(n: int, reading_series: int) -> None:
    global READING_SERIES
    READING_SERIES = reading_series
    meta = await create_database(SYSTEM_PG_DSN, "smbenchapi", timescale=False)
    ts = await create_database(SYSTEM_PG_DSN, "smbenchapi_ts", timescale=True)
    process: subprocess.Popen[bytes] | None = None
    try:
        tenant, device, token = await build(meta, ts)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "collector.toml"
            config.write_text(
                f'[metadata]\ndsn = "{meta}"\n[timeseries]\ndsn = "{ts}"\n'
                '[log]\nformat = "json"\nlevel = "warning"\n'
            )
            port = free_port()
            process = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
                [
                    *(sys.executable, "-m", "collector", "api", "--config", str(config)),
                    *("--listen", f"127.0.0.1:{port}"),
                ],
                stdout=subprocess.DEVNULL,
            )
            wait_for_port("127.0.0.1", port, 30)
            got = await measure(meta, ts, f"http://127.0.0.1:{port}", token, tenant, device, n)
    finally:
        if process is not None:
            process.terminate()
            process.wait(15)
        await drop_database(SYSTEM_PG_DSN, meta)
        await drop_database(SYSTEM_PG_DSN, ts)
    for key, values in got.items():
        print(
            f"bench: {key:<14} p50={statistics.median(values):7.2f} ms"
            f" p99={pct(values, 0.99):7.2f} ms ({len(values)} requests)"
        )
    for what in ("latest", "chart"):
        ratio = statistics.median(got[f"{what}_api"]) / statistics.median(got[f"{what}_direct"])
        print(f"bench: {what} API p50 / direct p50 = {ratio:.2f}")
    overhead = (sum(got["latest_api"]) + sum(got["chart_api"])) / (
        sum(got["latest_direct"]) + sum(got["chart_direct"])
    )
    print(
        f"api: latest_10k_p99={pct(got['latest_api'], 0.99):.1f}"
        f" chart_30d_p99={pct(got['chart_api'], 0.99):.1f} overhead_vs_direct={overhead:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests per figure")
    parser.add_argument(
        "--reading-series",
        type=int,
        default=READING_SERIES,
        help="series with 30 days of readings (fewer for a quick look; the figures need 240)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.reading_series))
