"""Collector ingest throughput against raw asyncpg COPY of the same rows into the same hypertable.

Set-up: fresh metadata and time-series databases on the machine's PostgreSQL (migrated, a fleet
of DEVICES devices with a schema), a private Mosquitto, and BATCHES pre-encoded batch frames of
SERIES series x POINTS readings (realistic values, 1 Hz timestamps within the last hours).

1. Baseline: the same rows as ready-made ``(time, series_id, value)`` records (series ids looked
   up beforehand), ``copy_records_to_table`` into ``telemetry`` in chunks of the writer's flush
   size, one transaction each, into the emptied table.
2. Collector: ``sensormine-collector run`` as a child process; a separate publisher process
   publishes the frames (QoS 1) as fast as the broker takes them; the clock runs from the first
   publish until the last batch's ledger row is committed.

The two alternate for ROUNDS rounds and the best of each is compared, so that a burst of other
load on the machine does not decide the ratio. Options: ``--profile FILE`` runs the collector under cProfile and writes the stats to FILE.
Last line: ``collector ingest: <r> readings/s, raw COPY <c> rows/s, ratio <q>``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector import migrations  # noqa: E402
from collector.series import Kind, SeriesCatalog, SeriesKey  # noqa: E402
from protocol import Batch, Series, Value, encode_frame  # noqa: E402
from tests.collector.conftest import make_fleet  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.services import SYSTEM_PG_DSN, MosquittoBroker  # noqa: E402

DEVICES = 20
BATCHES = 300
SERIES = 10
POINTS = 100
FLUSH_ROWS = 20_000
ROUNDS = 2  # interleaved raw/collector rounds; the best of each is compared
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def make_frames(
    fleet_devices: list[uuid.UUID], gateway: uuid.UUID
) -> tuple[list[bytes], list[tuple[object, ...]], int]:
    """Pre-encoded frames, and the same readings as COPY records (tenant filled in later)."""
    rng = random.Random(11)
    stream = uuid.uuid4()
    start = time.time_ns() // 1000 - 10 * 3_600_000_000
    frames: list[bytes] = []
    rows: list[tuple[object, ...]] = []
    metrics = ("temperature", "humidity")
    for seq in range(BATCHES):
        series = []
        for k in range(SERIES):
            device = fleet_devices[(seq * SERIES + k) % len(fleet_devices)]
            metric = metrics[k % 2]
            t0 = start + seq * POINTS * 1_000_000 + k * 1000
            ts = [t0 + i * 1_000_000 + rng.randrange(2000) for i in range(POINTS)]
            base = rng.uniform(15, 30) if metric == "temperature" else rng.uniform(30, 70)
            vals: list[Value] = [round(base + rng.gauss(0, 0.2), 2) for _ in range(POINTS)]
            series.append(Series(device_id=device, metric=metric, timestamps=ts, values=vals))
            rows.extend(
                (EPOCH + timedelta(microseconds=t), device, metric, v)
                for t, v in zip(ts, vals, strict=True)
            )
        batch = Batch(gateway_id=gateway, stream=stream, seq=seq, created=start, series=series)
        frames.append(encode_frame(batch))
    return frames, rows, BATCHES * SERIES * POINTS


async def raw_copy(dsn: str, tenant: uuid.UUID, rows: list[tuple[object, ...]]) -> float:
    """Rows/s of copy_records_to_table in flush-sized transactions, into an empty table."""
    conn = await asyncpg.connect(dsn)
    try:
        keys: dict[SeriesKey, Kind] = {
            (tenant, d, m): "number"
            for (_, d, m, _) in rows
            if isinstance(d, uuid.UUID) and isinstance(m, str)
        }
        async with conn.transaction():
            ids = await SeriesCatalog().resolve(conn, keys)
        records = [(t, ids[(tenant, d, m)], v) for (t, d, m, v) in rows]  # type: ignore[index]
        await conn.execute("TRUNCATE telemetry")
        started = time.perf_counter()
        for i in range(0, len(records), FLUSH_ROWS):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "telemetry",
                    records=records[i : i + FLUSH_ROWS],
                    columns=("time", "series_id", "value"),
                )
        rate = len(records) / (time.perf_counter() - started)
        await conn.execute("TRUNCATE telemetry")
    finally:
        await conn.close()
    return rate


def publisher(host: str, port: int, topic: str, frames: list[bytes], go: object) -> None:
    """Separate process: publish every frame at QoS 1 as fast as the broker accepts them."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{os.getpid()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    go.wait()  # type: ignore[attr-defined]
    infos = [client.publish(topic, f, qos=1) for f in frames]
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
    ts: str, broker: MosquittoBroker, topic: str, frames: list[bytes], readings: int
) -> float:
    """Readings/s from the first publish until the last batch is committed (empty tables)."""
    conn = await asyncpg.connect(ts)
    await conn.execute(
        "TRUNCATE telemetry; TRUNCATE ingest_ledger; TRUNCATE ingest_dirty; TRUNCATE series_latest"
    )
    await conn.close()
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    pub = ctx.Process(target=publisher, args=(broker.host, broker.port, topic, frames, go))
    pub.start()
    await asyncio.sleep(1.0)  # the publisher connects before the clock starts
    started = time.perf_counter()
    go.set()
    finished = await wait_ledger(ts, len(frames), 300)
    pub.join()
    conn = await asyncpg.connect(ts)
    stored = await conn.fetchval("SELECT count(*) FROM readings")
    await conn.close()
    if stored != readings:
        raise SystemExit(f"stored {stored} readings, expected {readings}")
    return readings / (finished - started)


async def main(profile: str | None) -> None:
    meta = await create_database(SYSTEM_PG_DSN, "smbenchmeta", timescale=False)
    ts = await create_database(SYSTEM_PG_DSN, "smbenchts", timescale=True)
    workdir = Path(tempfile.mkdtemp(prefix="sensormine-bench-"))
    broker = MosquittoBroker(
        workdir / "mosquitto",
        extra_config="max_inflight_messages 1000\nmax_queued_messages 100000\n",
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        await migrations.apply(meta, "metadata")
        await migrations.apply(ts, "timeseries")
        fleet = await make_fleet(meta, devices=DEVICES)
        frames, rows, readings = make_frames(fleet.devices, fleet.gateway)
        size = sum(map(len, frames))
        print(
            f"frames: {len(frames)} batches, {readings} readings, {size / readings:.2f} bytes/reading"
        )

        broker.start()
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        config = workdir / "collector.toml"
        config.write_text(
            f'[metadata]\ndsn = "{meta}"\n[timeseries]\ndsn = "{ts}"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "{prefix}"\nclient_id = "bench-collector"\n'
            f'[writer]\nmax_rows = {FLUSH_ROWS}\n[metrics]\nlisten = ""\n[log]\nlevel = "warning"\nformat = "json"\n'
        )
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        cmd += ["-m", "collector", "run", "--config", str(config)]
        proc = subprocess.Popen(cmd, cwd=ROOT)  # noqa: ASYNC220 - started once, before the clock
        # Ready when the collector's session exists on the broker: publish a probe batch and wait for it.
        topic = f"{prefix}/v1/{fleet.tenant}/{fleet.gateway}/telemetry"
        ctx = multiprocessing.get_context("spawn")
        probe_go = ctx.Event()
        probe_go.set()
        warm = ctx.Process(
            target=publisher, args=(broker.host, broker.port, topic, frames[:1], probe_go)
        )
        await asyncio.sleep(1.0)
        warm.start()
        await wait_ledger(ts, 1, 30)
        warm.join()

        best_rate = best_copy = 0.0
        for round_ in range(1, ROUNDS + 1):
            copy_rate = await raw_copy(ts, fleet.tenant, rows)
            rate = await collector_run(ts, broker, topic, frames, readings)
            print(
                f"round {round_}: raw COPY {copy_rate:.0f} rows/s, collector {rate:.0f} readings/s"
            )
            best_copy, best_rate = max(best_copy, copy_rate), max(best_rate, rate)
        print(
            f"collector ingest: {best_rate:.0f} readings/s, raw COPY {best_copy:.0f} rows/s, "
            f"ratio {best_rate / best_copy:.2f}"
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        broker.stop()
        await drop_database(SYSTEM_PG_DSN, meta)
        await drop_database(SYSTEM_PG_DSN, ts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="run the collector under cProfile, stats to this file")
    args = parser.parse_args()
    asyncio.run(main(args.profile))
