"""Exactly once through failures: the database stops mid-stream, the collector is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from collector import migrations
from collector.service import running
from tests.collector.conftest import (
    Databases,
    GatewayClient,
    collector_settings,
    deliver_all,
    make_batch,
    make_fleet,
)
from tests.conftest import create_database
from tests.services import SYSTEM_MQTT, MosquittoBroker, PostgresCluster


async def _databases_on(cluster: PostgresCluster) -> Databases:
    meta = await create_database(cluster.dsn, "smmeta", timescale=False)
    ts = await create_database(cluster.dsn, "smts", timescale=True)
    await migrations.apply(meta, "metadata")
    await migrations.apply(ts, "timeseries")
    dbs = Databases(meta, ts, cluster.dsn)
    dbs.fleet = await make_fleet(meta)
    return dbs


async def test_database_outage_mid_stream_loses_and_duplicates_nothing(
    private_postgres: PostgresCluster,
) -> None:
    """PostgreSQL stops while batches flow and comes back: every batch is stored exactly once."""
    dbs = await _databases_on(private_postgres)
    fleet = dbs.fleet
    assert fleet is not None
    p = f"o{uuid.uuid4().hex[:10]}"
    stream = uuid.uuid4()
    batches = [make_batch(fleet, seq, stream, points=20) for seq in range(60)]
    async with running(collector_settings(dbs, *SYSTEM_MQTT, p)) as collector:
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            first = await asyncio.to_thread(deliver_all, gw, batches[:20])
            assert set(first) == set(range(20))
            private_postgres.stop("fast")
            publishing = asyncio.create_task(
                asyncio.to_thread(deliver_all, gw, batches[20:], 90.0, 10.0, 0.05)
            )
            await asyncio.sleep(3)
            assert collector.writer is not None and collector.writer.last_error
            private_postgres.start()
            rest = await publishing
    assert set(rest) == set(range(20, 60))
    rows = await dbs.fetch("SELECT count(*) AS n, count(DISTINCT time) AS t FROM readings")
    assert (rows[0]["n"], rows[0]["t"]) == (1200, 1200)
    ledger = await dbs.fetch("SELECT count(*) AS n FROM ingest_ledger")
    assert ledger[0]["n"] == 60


def _cluster_pids(cluster: PostgresCluster) -> list[int]:
    """The postmaster of ``cluster`` and every process it started."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True
    ).stdout.split()
    return [postmaster, *map(int, children)]


async def test_a_hung_database_times_out_and_catches_up_when_it_wakes(
    private_postgres: PostgresCluster,
) -> None:
    """A database that stops answering (SIGSTOP, not dead) fails the flush after
    command_timeout instead of stalling the collector forever; nothing is acknowledged while it
    hangs, and after SIGCONT every batch is stored exactly once."""
    dbs = await _databases_on(private_postgres)
    fleet = dbs.fleet
    assert fleet is not None
    p = f"o{uuid.uuid4().hex[:10]}"
    stream = uuid.uuid4()
    batches = [make_batch(fleet, seq, stream, points=20) for seq in range(30)]
    quick = {"connect_timeout": "1s", "command_timeout": "1s", "statement_timeout": "1s"}
    settings = collector_settings(
        dbs,
        *SYSTEM_MQTT,
        p,
        timeseries={"dsn": dbs.timeseries, **quick},
        writer={"retry_min": "200ms", "retry_max": "500ms"},
        lifecycle={"enabled": False},
    )
    async with running(settings) as collector:
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            first = await asyncio.to_thread(deliver_all, gw, batches[:10])
            assert set(first) == set(range(10))
            frozen = _cluster_pids(private_postgres)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                for b in batches[10:]:
                    gw.publish(b)
                assert collector.writer is not None
                for _ in range(100):
                    if collector.writer.last_error:
                        break
                    await asyncio.sleep(0.1)
                assert "TimeoutError" in collector.writer.last_error or "timeout" in (
                    collector.writer.last_error.lower()
                )
                assert gw.acks.empty()
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            rest = await asyncio.to_thread(deliver_all, gw, batches[10:], 60.0, 5.0)
    assert set(rest) == set(range(10, 30))
    rows = await dbs.fetch("SELECT count(*) AS n, count(DISTINCT time) AS t FROM readings")
    assert (600, 600) == (rows[0]["n"], rows[0]["t"])


def _spawn(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "collector", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(config.with_suffix(".log"), "ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _write_config(
    path: Path, dbs: Databases, broker: MosquittoBroker, prefix: str, client_id: str
) -> None:
    path.write_text(
        f"""
[metadata]
dsn = "{dbs.metadata}"
[timeseries]
dsn = "{dbs.timeseries}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
prefix = "{prefix}"
client_id = "{client_id}"
group = "kill"
reconnect_min = "1s"
reconnect_max = "2s"
[writer]
max_age = "50ms"
[metrics]
listen = ""
[log]
level = "info"
format = "json"
"""
    )


async def test_collector_killed_mid_stream_and_restarted_stores_every_batch_once(
    dbs: Databases, private_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """SIGKILL mid-stream, restart with the same persistent session: every batch stored exactly once."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"k{uuid.uuid4().hex[:10]}"
    config = tmp_path / "collector.toml"
    _write_config(config, dbs, private_broker, p, f"kill-{uuid.uuid4().hex[:6]}")
    stream = uuid.uuid4()
    batches = [make_batch(fleet, seq, stream, points=50) for seq in range(150)]
    proc = _spawn(config)
    try:
        with GatewayClient(
            private_broker.host, private_broker.port, p, fleet.tenant, fleet.gateway
        ) as gw:
            first = await asyncio.to_thread(deliver_all, gw, batches[:10], 30.0)
            assert set(first) == set(range(10))
            sender = asyncio.create_task(
                asyncio.to_thread(deliver_all, gw, batches[10:], 90.0, 8.0, 0.01)
            )
            # Kill while batches are in flight, some committed and not acked.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                n = (await dbs.fetch("SELECT count(*) AS n FROM ingest_ledger"))[0]["n"]
                if n >= 40:
                    break
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed_at = (await dbs.fetch("SELECT count(*) AS n FROM ingest_ledger"))[0]["n"]
            assert killed_at < 150, "the stream ended before the kill; nothing was tested"
            proc = _spawn(config)
            results = await sender
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    assert set(results) == set(range(10, 150))
    rows = await dbs.fetch("SELECT count(*) AS n, count(DISTINCT time) AS t FROM readings")
    assert (rows[0]["n"], rows[0]["t"]) == (7500, 7500)
    assert (await dbs.fetch("SELECT count(*) AS n FROM ingest_ledger"))[0]["n"] == 150


async def test_sigterm_drains_acks_and_exits_zero(dbs: Databases, tmp_path: Path) -> None:
    """SIGTERM while batches arrive: the collector commits and acks what it took, and exits 0."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"s{uuid.uuid4().hex[:10]}"
    config = tmp_path / "collector.toml"
    broker = MosquittoBroker(tmp_path / "unused")
    broker.host, broker.port = SYSTEM_MQTT
    _write_config(config, dbs, broker, p, f"term-{uuid.uuid4().hex[:6]}")
    proc = _spawn(config)
    stream = uuid.uuid4()
    with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
        await asyncio.to_thread(deliver_all, gw, [make_batch(fleet, 0, stream)], 30.0)
        for seq in range(1, 30):
            gw.publish(make_batch(fleet, seq, stream))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        await asyncio.sleep(0.5)
        acked = set()
        while not gw.acks.empty():
            acked.add(gw.acks.get().seq)
    ledger = {r["seq"] for r in await dbs.fetch("SELECT seq FROM ingest_ledger")}
    # Nothing acknowledged that is not committed, and what was taken before SIGTERM was drained.
    assert acked <= ledger
    assert 0 in ledger and len(ledger) == len(acked) + 1


async def test_broker_restart_mid_stream_stores_every_batch_once(
    dbs: Databases, private_broker: MosquittoBroker
) -> None:
    """The broker restarts while batches flow: the collector reconnects and nothing is lost or doubled."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"b{uuid.uuid4().hex[:10]}"
    stream = uuid.uuid4()
    batches = [make_batch(fleet, seq, stream, points=20) for seq in range(80)]
    settings = collector_settings(dbs, private_broker.host, private_broker.port, p)
    async with running(settings):
        with GatewayClient(
            private_broker.host, private_broker.port, p, fleet.tenant, fleet.gateway
        ) as gw:
            sender = asyncio.create_task(
                asyncio.to_thread(deliver_all, gw, batches, 60.0, 5.0, 0.02)
            )
            await asyncio.sleep(0.5)
            await asyncio.to_thread(private_broker.stop)
            await asyncio.to_thread(private_broker.start)
            results = await sender
    assert set(range(80)) == set(results)
    rows = await dbs.fetch("SELECT count(*) AS n, count(DISTINCT time) AS t FROM readings")
    assert (1600, 1600) == (rows[0]["n"], rows[0]["t"])
