"""Storage: COPY into the first layout and the series layout, the collector end to end, bytes/reading.

Set-up: fresh databases on the machine's PostgreSQL; a private Mosquitto; DEVICES devices with
four metrics each, a realistic mix: temperature and humidity (slowly varying floats with noise,
rounded as sensors report them), an energy counter (integers that only grow) and a door contact
(a boolean that rarely changes); BATCHES pre-encoded batch frames of SERIES series x POINTS
readings at 1 Hz.

One run, ROUNDS interleaved rounds, the best of each figure kept:

1. ``old_copy``: raw binary COPY (rows pre-encoded, streamed by asyncpg) of the readings into the
   first layout's ``telemetry (time, tenant_id, device_id, metric, value, value_text)``, a
   database migrated to version 0003 as the first release left it, in flush-sized transactions.
2. ``new_copy``: the same, into ``telemetry (time, series_id, value)`` with the series ids known.
3. ``collector``: ``sensormine-collector run`` as a child process, frames published by another
   process; from the first publish until the last batch's ledger row is committed.

Bytes per reading: ``hypertable_size`` over the rows, with the indexes, after each load (the
first layout; the series layout as the collector wrote it). Where the edition has compression
(community/TSL), the series layout's chunks are compressed as the collector's compression job
does (segment by ``series_id``, order by ``time``) and measured again; otherwise ``n/a``.

Then two read figures, each the median of REPEAT runs on data sized as named:

- ``latest_10k``: the latest value of each of 10,000 series (``latest_readings``).
- ``range_30d_1h``: one series over 30 days at 1-hour resolution from ``rollups``, among 1,000
  series with 30 days of hourly rollups each.

Last line, exactly: ``storage: old_copy=<n> new_copy=<n> collector=<n> rows/s;
bytes/reading old=<x> new=<y> compressed=<z|n/a>``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector import copy_format, migrations  # noqa: E402
from collector.lifecycle.compression import compress_all  # noqa: E402
from collector.series import Kind, SeriesCatalog, SeriesKey  # noqa: E402
from protocol import Batch, Series, Value, encode_frame  # noqa: E402
from tests.collector.conftest import make_fleet  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.services import SYSTEM_PG_DSN, MosquittoBroker  # noqa: E402

DEVICES = 50
METRICS = ("temperature", "humidity", "count", "door")
BATCHES = 400
SERIES = 10
POINTS = 200
FLUSH_ROWS = 20_000
ROUNDS = 2
REPEAT = 25
US = 1_000_000
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "temperature": {"type": "number", "minimum": -40, "maximum": 85},
        "humidity": {"type": "number", "minimum": 0, "maximum": 100},
        "count": {"type": "integer", "minimum": 0},
        "door": {"type": "boolean"},
    },
}

Reading = tuple[uuid.UUID, str, list[int], list[Value]]


class Signal:
    """One series' values over time: it keeps its state from one batch to the next."""

    def __init__(self, metric: str, rng: random.Random) -> None:
        self.metric = metric
        self.rng = rng
        self.level = rng.uniform(18, 26) if metric == "temperature" else rng.uniform(35, 65)
        self.counter = rng.randrange(10**6)
        self.door = False

    def values(self, n: int) -> list[Value]:
        """The next ``n`` readings, one second apart."""
        rng = self.rng
        out: list[Value] = []
        for _ in range(n):
            if self.metric == "temperature":
                self.level += rng.gauss(0, 0.002)
                out.append(round(self.level + rng.gauss(0, 0.05), 2))
            elif self.metric == "humidity":
                self.level = min(99.0, max(1.0, self.level + rng.gauss(0, 0.005)))
                out.append(round(self.level + rng.gauss(0, 0.2), 1))
            elif self.metric == "count":
                self.counter += rng.choice((0, 1, 1, 2))
                out.append(self.counter)
            else:
                if rng.random() < 0.002:
                    self.door = not self.door
                out.append(self.door)
        return out


def make_readings(devices: list[uuid.UUID]) -> list[list[Reading]]:
    """The readings of every batch: each series gets consecutive windows of POINTS seconds."""
    rng = random.Random(20)
    keys = [(d, m) for d in devices for m in METRICS]
    signals = {k: Signal(k[1], rng) for k in keys}
    start = time.time_ns() // 1000 - 6 * 3600 * US
    batches: list[list[Reading]] = []
    for seq in range(BATCHES):
        batch: list[Reading] = []
        for k in range(SERIES):
            n = seq * SERIES + k
            device, metric = keys[n % len(keys)]
            t0 = start + (n // len(keys)) * POINTS * US + rng.randrange(1000)
            times = [t0 + i * US + rng.randrange(2000) for i in range(POINTS)]
            batch.append((device, metric, times, signals[(device, metric)].values(POINTS)))
        batches.append(batch)
    return batches


def frames(batches: list[list[Reading]], gateway: uuid.UUID) -> list[bytes]:
    """The batches as the agent sends them."""
    stream = uuid.uuid4()
    return [
        encode_frame(
            Batch(
                gateway_id=gateway,
                stream=stream,
                seq=seq,
                created=time.time_ns() // 1000,
                series=[Series(device_id=d, metric=m, timestamps=t, values=v) for d, m, t, v in b],
            )
        )
        for seq, b in enumerate(batches)
    ]


_V1_HEAD = struct.Struct("!hiq")


def v1_rows(
    tenant: uuid.UUID, device: uuid.UUID, metric: str, times: list[int], values: list[Value]
) -> bytes:
    """Binary COPY rows of the first layout (what the first release's writer sent)."""
    m = metric.encode()
    ids = struct.pack("!i", 16) + tenant.bytes + struct.pack("!i", 16) + device.bytes
    ids += struct.pack("!i", len(m)) + m
    null = struct.pack("!i", -1)
    return b"".join(
        _V1_HEAD.pack(6, 8, t - copy_format.PG_EPOCH_US)
        + ids
        + struct.pack("!id", 8, float(v))
        + null  # type: ignore[arg-type]
        for t, v in zip(times, values, strict=True)
    )


def flush_parts(parts: list[tuple[int, bytes]]) -> list[bytes]:
    """Pre-encoded rows grouped into flush-sized COPY payloads."""
    out: list[bytes] = []
    group: list[bytes] = []
    rows = 0
    for n, data in parts:
        group.append(data)
        rows += n
        if rows >= FLUSH_ROWS:
            out.append(b"".join(group))
            group, rows = [], 0
    if group:
        out.append(b"".join(group))
    return out


async def _stream(data: bytes) -> AsyncIterator[bytes]:
    yield copy_format.HEADER
    yield data
    yield copy_format.TRAILER


async def raw_copy(
    dsn: str, table: str, columns: tuple[str, ...], payloads: list[bytes], rows: int
) -> float:
    """Rows/s of binary COPY of ``payloads``, one transaction each, into the emptied ``table``."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {table}")
        started = time.perf_counter()
        for data in payloads:
            async with conn.transaction():
                await conn.copy_to_table(
                    table, source=_stream(data), columns=columns, format="binary"
                )
        return rows / (time.perf_counter() - started)
    finally:
        await conn.close()


async def bytes_per_reading(dsn: str, tables: tuple[str, ...]) -> float:
    """Hypertable bytes (heap, indexes, TOAST) over the rows they hold."""
    conn = await asyncpg.connect(dsn)
    try:
        size = rows = 0
        for table in tables:
            size += int(await conn.fetchval("SELECT hypertable_size($1::regclass)", table) or 0)
            rows += int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        return size / rows
    finally:
        await conn.close()


def publisher(host: str, port: int, topic: str, payloads: list[bytes], go: object) -> None:
    """Separate process: publish every frame at QoS 1 as fast as the broker accepts them."""
    import os

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-storage-{os.getpid()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    go.wait()  # type: ignore[attr-defined]
    infos = [client.publish(topic, f, qos=1) for f in payloads]
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


async def wait_ledger(dsn: str, n: int, limit: float) -> float:
    """Block until ``n`` batches are in the ledger; return the time (perf_counter) it happened."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline:
            if await conn.fetchval("SELECT count(*) FROM ingest_ledger") >= n:
                return time.perf_counter()
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise TimeoutError(f"fewer than {n} batches committed after {limit} s")


async def collector_run(
    dsn: str, host: str, port: int, topic: str, payloads: list[bytes], readings: int
) -> float:
    """Readings/s from the first publish until the last batch is committed (empty tables)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "TRUNCATE telemetry, telemetry_text, ingest_ledger, ingest_dirty, series_latest"
    )
    await conn.close()
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    pub = ctx.Process(target=publisher, args=(host, port, topic, payloads, go))
    pub.start()
    await asyncio.sleep(1.0)
    started = time.perf_counter()
    go.set()
    finished = await wait_ledger(dsn, len(payloads), 600)
    pub.join()
    conn = await asyncpg.connect(dsn)
    stored = await conn.fetchval("SELECT count(*) FROM readings")
    await conn.close()
    if stored != readings:
        raise SystemExit(f"stored {stored} readings, expected {readings}")
    return readings / (finished - started)


async def _median_ms(conn: asyncpg.Connection, sql: str, *args: object) -> tuple[float, int]:
    rows = await conn.fetch(sql, *args)  # warm: plan and pages cached, as for a dashboard
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        rows = await conn.fetch(sql, *args)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), len(rows)


async def read_figures(dsn: str) -> tuple[float, float]:
    """Latest value of 10,000 series; one series over 30 days at 1 h among 1,000 such series."""
    conn = await asyncpg.connect(dsn)
    try:
        tenant = uuid.uuid4()
        now = datetime.now(UTC).replace(microsecond=0)
        wanted: dict[SeriesKey, Kind] = {
            (tenant, uuid.UUID(int=i // 4 + 1), METRICS[i % 4]): "number" for i in range(10_000)
        }
        async with conn.transaction():
            ids = await SeriesCatalog().resolve(conn, wanted)
        sids = sorted(ids.values())
        # Some history behind the latest values (a minute per series), as a real table has.
        await conn.copy_records_to_table(
            "telemetry",
            records=[
                (now - timedelta(seconds=s), sid, float(s)) for sid in sids for s in range(60)
            ],
            columns=("time", "series_id", "value"),
        )
        await conn.copy_records_to_table(
            "series_latest",
            records=[(sid, now, float(sid), None) for sid in sids],
            columns=("series_id", "time", "value", "value_text"),
        )
        await conn.execute("ANALYZE series; ANALYZE series_latest")
        latest_ms, n = await _median_ms(
            conn,
            "SELECT device_id, metric, time, value, value_text FROM latest_readings WHERE tenant_id = $1",
            tenant,
        )
        assert n == 10_000, n
        hourly = sids[:1000]
        start = now.replace(minute=0, second=0) - timedelta(days=30)
        await conn.copy_records_to_table(
            "metrics",
            records=[
                (
                    start + timedelta(hours=h),
                    timedelta(hours=1),
                    sid,
                    3600,
                    3600.0 * h,
                    0.0,
                    1.0,
                    0.5,
                )
                for sid in hourly
                for h in range(30 * 24)
            ],
            columns=("bucket", "period", "series_id", "count", "sum", "min", "max", "last"),
        )
        await conn.execute("ANALYZE metrics")
        device, metric = next((k[1], k[2]) for k, v in ids.items() if v == hourly[500])
        range_ms, n = await _median_ms(
            conn,
            "SELECT bucket, sum / count AS average, min, max, last FROM rollups "
            "WHERE device_id = $1 AND metric = $2 AND period = interval '1 hour' "
            "AND bucket > now() - interval '30 days' ORDER BY bucket",
            device,
            metric,
        )
        assert n >= 700, n
        return latest_ms, range_ms
    finally:
        await conn.close()


async def main(rounds: int, profile: str | None = None) -> None:
    """Every figure in one run; the last line is the summary the issue asks for."""
    meta = await create_database(SYSTEM_PG_DSN, "smbenchmeta", timescale=False)
    old = await create_database(SYSTEM_PG_DSN, "smbenchold", timescale=True)
    new = await create_database(SYSTEM_PG_DSN, "smbenchnew", timescale=True)
    reads = await create_database(SYSTEM_PG_DSN, "smbenchread", timescale=True)
    workdir = Path(tempfile.mkdtemp(prefix="sensormine-bench-"))
    broker = MosquittoBroker(
        workdir / "mosquitto",
        extra_config="max_inflight_messages 1000\nmax_queued_messages 100000\n",
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        await migrations.apply(meta, "metadata")
        await migrations.apply(old, "timeseries", target=3)
        await migrations.apply(new, "timeseries")
        await migrations.apply(reads, "timeseries")
        fleet = await make_fleet(meta, devices=DEVICES, schema=SCHEMA)
        batches = make_readings(fleet.devices)
        readings = BATCHES * SERIES * POINTS
        payloads = frames(batches, fleet.gateway)
        conn = await asyncpg.connect(new)
        try:
            wanted: dict[SeriesKey, Kind] = {
                (fleet.tenant, d, m): "boolean" if m == "door" else "number"
                for b in batches
                for d, m, _, _ in b
            }
            async with conn.transaction():
                ids = await SeriesCatalog().resolve(conn, wanted)
        finally:
            await conn.close()
        old_payloads = flush_parts(
            [(len(t), v1_rows(fleet.tenant, d, m, t, v)) for b in batches for d, m, t, v in b]
        )
        new_payloads = flush_parts(
            [
                (len(t), copy_format.numeric_rows(ids[(fleet.tenant, d, m)], t, v))
                for b in batches
                for d, m, t, v in b
            ]
        )
        print(
            f"data: {DEVICES} devices x {len(METRICS)} metrics ({', '.join(METRICS)}), "
            f"{readings} readings in {BATCHES} batches, {sum(map(len, payloads)) / readings:.2f} wire bytes/reading"
        )

        broker.start()
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        config = workdir / "collector.toml"
        config.write_text(
            f'[metadata]\ndsn = "{meta}"\n[timeseries]\ndsn = "{new}"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "{prefix}"\nclient_id = "bench-storage"\n'
            f'[writer]\nmax_rows = {FLUSH_ROWS}\n[lifecycle]\nenabled = false\n[metrics]\nlisten = ""\n'
            '[log]\nlevel = "warning"\nformat = "json"\n'
        )
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        cmd += ["-m", "collector", "run", "--config", str(config)]
        proc = subprocess.Popen(cmd, cwd=ROOT)  # noqa: ASYNC220 - started once, before any clock
        topic = f"{prefix}/v1/{fleet.tenant}/{fleet.gateway}/telemetry"
        ctx = multiprocessing.get_context("spawn")
        probe = ctx.Event()
        probe.set()
        warm = ctx.Process(
            target=publisher, args=(broker.host, broker.port, topic, payloads[:1], probe)
        )
        await asyncio.sleep(1.0)
        warm.start()
        try:
            # A loaded machine can take a while to start the collector and subscribe.
            await wait_ledger(new, 1, 120)
        except TimeoutError:
            raise SystemExit(
                f"the collector did not store the warm-up batch (exit code {proc.poll()})"
            ) from None
        warm.join()

        old_copy = new_copy = collector = 0.0
        old_bytes = new_bytes = 0.0
        for round_ in range(1, rounds + 1):
            o = await raw_copy(old, "telemetry", copy_format_v1_columns(), old_payloads, readings)
            old_bytes = await bytes_per_reading(old, ("telemetry",))
            n = await raw_copy(new, "telemetry", copy_format.COLUMNS, new_payloads, readings)
            c = await collector_run(new, broker.host, broker.port, topic, payloads, readings)
            new_bytes = await bytes_per_reading(new, ("telemetry",))
            print(
                f"round {round_}: old_copy {o:.0f} rows/s, new_copy {n:.0f} rows/s, "
                f"collector {c:.0f} readings/s"
            )
            old_copy, new_copy, collector = max(old_copy, o), max(new_copy, n), max(collector, c)
        compressed = await compress_for_bench(new)
        latest_ms, range_ms = await read_figures(reads)
        print(
            f"reads: latest_10k={latest_ms:.1f} ms range_30d_1h={range_ms:.1f} ms (median of {REPEAT})"
        )
        print(
            f"ratios: collector/old_copy={collector / old_copy:.2f} (>= 1.8 wanted), "
            f"collector/new_copy={collector / new_copy:.2f} (>= 0.8 wanted)"
        )
        print(
            f"storage: old_copy={old_copy:.0f} new_copy={new_copy:.0f} collector={collector:.0f} rows/s; "
            f"bytes/reading old={old_bytes:.1f} new={new_bytes:.1f} "
            f"compressed={'n/a' if compressed is None else f'{compressed:.2f}'}"
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        broker.stop()
        for dsn in (meta, old, new, reads):
            await drop_database(SYSTEM_PG_DSN, dsn)


def copy_format_v1_columns() -> tuple[str, ...]:
    """The first layout's COPY columns."""
    return ("time", "tenant_id", "device_id", "metric", "value", "value_text")


async def compress_for_bench(dsn: str) -> float | None:
    """Bytes/reading of the collector-written series layout once compressed (None: no compression)."""
    conn = await asyncpg.connect(dsn)
    try:
        if (
            await conn.fetchval("SELECT current_setting('timescaledb.license', true)")
            != "timescale"
        ):
            return None
        await compress_all(conn)
        rows = int(await conn.fetchval("SELECT count(*) FROM telemetry"))
        size = int(await conn.fetchval("SELECT hypertable_size('telemetry')"))
        # Where the bytes go: the compressed time and value columns, per metric.
        chunks = await conn.fetch(
            "SELECT format('%I.%I', c2.schema_name, c2.table_name) AS t "
            "FROM _timescaledb_catalog.chunk c JOIN _timescaledb_catalog.chunk c2 "
            "ON c2.id = c.compressed_chunk_id JOIN _timescaledb_catalog.hypertable h "
            "ON h.id = c.hypertable_id WHERE h.table_name = 'telemetry'"
        )
        parts: dict[str, list[float]] = {}
        for chunk in chunks:
            for r in await conn.fetch(
                f"SELECT s.metric, sum(pg_column_size(x.time)) AS t, "
                f"sum(pg_column_size(x.value)) AS v, sum(x._ts_meta_count) AS n "
                f"FROM {chunk['t']} x JOIN series s ON s.id = x.series_id GROUP BY 1"
            ):
                acc = parts.setdefault(r["metric"], [0.0, 0.0, 0.0])
                acc[0] += float(r["t"])
                acc[1] += float(r["v"])
                acc[2] += float(r["n"])
        print(
            "compressed bytes/reading by metric (time + value): "
            + ", ".join(f"{m} {t / n:.2f} + {v / n:.2f}" for m, (t, v, n) in sorted(parts.items()))
        )
        return size / rows
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--profile", help="run the collector under cProfile, stats to this file")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.profile))
