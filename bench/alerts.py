"""Collector ingest throughput with no alert rules and with 1,000 rules, over the same data.

Set-up as ``bench/collector_ingest.py`` (fresh databases, a fleet of DEVICES devices, a private
Mosquitto, BATCHES pre-encoded frames of SERIES series x POINTS readings of temperature and
humidity, values around 15-30 °C and 30-70 %RH). The 1,000 rules are what a fleet's rule set
looks like from one gateway's data:

- per device and metric of the data, one high and one low rule (80 rules: every reading is
  evaluated by two of them), thresholds near the edges of the data's range, so that a few
  percent of the series' batches fire and clear (a few hundred transitions per run), with
  ``for``, clear thresholds and ``keep_firing_for``;
- two tenant-wide rules (every reading is evaluated by one more) and one rule per device type;
- the rest (917) on the tenant's other metrics and on another tenant's devices, which these
  readings never match.

Each round runs the collector (a child process, started afresh so that it loads the rule set
of the round) on empty tables with no rule, then with the 1,000; the clock runs from the
first publish until the last batch's ledger row is committed. The rounds alternate and the best
of each is compared, so that a burst of other load on the machine does not decide the ratio
(``BENCH_ALERTS_ROUNDS``, default 5). The collector's own CPU seconds over the same window are
printed too (less sensitive to other load; the database's share is not in them).
Last line: ``alerts: rules=1000 throughput_ratio=<x>``. ``BENCH_ALERTS_PROFILE=PREFIX`` runs each
collector under cProfile (stats in ``PREFIX.<topic prefix>``).
"""

from __future__ import annotations

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
from datetime import timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from collector_ingest import (  # noqa: E402
    FLUSH_ROWS,
    make_frames,
    publisher,
    wait_ledger,
)

from collector import migrations  # noqa: E402
from tests.collector.conftest import Fleet, make_fleet  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.services import SYSTEM_PG_DSN, MosquittoBroker  # noqa: E402

DEVICES = 20
RULES = 1000
ROUNDS = int(os.environ.get("BENCH_ALERTS_ROUNDS", "5"))


async def add_rules(meta: str, fleet: Fleet) -> None:
    """The 1,000 rules described in the module's docstring."""
    rng = random.Random(5)
    rows: list[tuple[object, ...]] = []

    def rule(tenant: uuid.UUID, metric: str, cond: str, thr: float, **kw: object) -> None:
        rows.append(
            (
                tenant,
                f"r{len(rows):04d}",
                metric,
                cond,
                thr,
                kw.get("clear"),
                timedelta(seconds=float(kw.get("for_s", 0))),  # type: ignore[arg-type]
                timedelta(seconds=float(kw.get("keep_s", 0))),  # type: ignore[arg-type]
                kw.get("device"),
                kw.get("device_type"),
            )
        )

    for device in fleet.devices:
        rule(fleet.tenant, "temperature", ">", 29.7, clear=29.5, for_s=5, device=device)
        rule(fleet.tenant, "temperature", "<", 15.3, clear=15.8, keep_s=3, device=device)
        rule(fleet.tenant, "humidity", ">", 69.5, clear=69.0, device=device)
        rule(fleet.tenant, "humidity", "<", 30.5, clear=31.0, for_s=2, keep_s=2, device=device)
    rule(fleet.tenant, "temperature", ">=", 29.9, clear=29.4)
    rule(fleet.tenant, "humidity", "<=", 30.2, clear=30.7)
    rule(fleet.tenant, "temperature", ">", 84.0, device_type=fleet.device_type)
    while len(rows) < RULES:
        if rng.random() < 0.5:
            rule(fleet.tenant, rng.choice(["count", "door", "mode"]), ">", rng.uniform(0, 100))
        else:
            rule(
                fleet.other_tenant,
                rng.choice(["temperature", "humidity", "pressure"]),
                ">",
                rng.uniform(0, 100),
                device=fleet.other_device,
            )
    conn = await asyncpg.connect(meta)
    try:
        await conn.executemany(
            "INSERT INTO alert_rules (tenant_id, name, metric, condition, threshold,"
            " clear_threshold, duration, keep_firing_for, device_id, device_type_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            rows,
        )
    finally:
        await conn.close()


async def clear_rules(meta: str) -> None:
    conn = await asyncpg.connect(meta)
    try:
        await conn.execute("DELETE FROM alert_rules")
    finally:
        await conn.close()


async def run_once(
    meta: str, ts: str, broker: MosquittoBroker, workdir: Path, fleet: Fleet, frames: list[bytes]
) -> tuple[float, int, float]:
    """Readings/s of one collector run on empty tables, the alert transitions it wrote and the
    collector's CPU seconds while it ingested."""
    conn = await asyncpg.connect(ts)
    await conn.execute(
        "TRUNCATE telemetry, ingest_ledger, ingest_dirty, series_latest, events, alerts,"
        " alert_state, alert_outbox"
    )
    await conn.close()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    config = workdir / f"{prefix}.toml"
    config.write_text(
        f'[metadata]\ndsn = "{meta}"\n[timeseries]\ndsn = "{ts}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "{prefix}"\n'
        f'client_id = "bench-{prefix}"\n[writer]\nmax_rows = {FLUSH_ROWS}\n'
        '[metrics]\nlisten = ""\n[log]\nlevel = "warning"\nformat = "json"\n'
        "[lifecycle]\nenabled = false\n"
    )
    profile = os.environ.get("BENCH_ALERTS_PROFILE")
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", f"{profile}.{prefix}"]
    proc = subprocess.Popen(  # noqa: ASYNC220 - started before the clock
        [*cmd, "-m", "collector", "run", "--config", str(config)], cwd=ROOT
    )
    try:
        topic = f"{prefix}/v1/{fleet.tenant}/{fleet.gateway}/telemetry"
        ctx = multiprocessing.get_context("spawn")
        # Warm-up: the collector's session exists and its rules are loaded once a frame
        # commits; published again until then (a frame before the subscription is lost).
        deadline = time.monotonic() + 120
        while True:
            go = ctx.Event()
            go.set()
            warm = ctx.Process(
                target=publisher, args=(broker.host, broker.port, topic, frames[:1], go)
            )
            warm.start()
            try:
                await wait_ledger(ts, 1, 3)
                break
            except TimeoutError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
            finally:
                warm.join()
        conn = await asyncpg.connect(ts)
        await conn.execute(
            "TRUNCATE telemetry, ingest_ledger, ingest_dirty, series_latest, events, alerts,"
            " alert_state, alert_outbox"
        )
        await conn.close()
        go = ctx.Event()
        pub = ctx.Process(target=publisher, args=(broker.host, broker.port, topic, frames, go))
        pub.start()
        await asyncio.sleep(1.0)
        cpu_before = cpu_seconds(proc.pid)
        started = time.perf_counter()
        go.set()
        finished = await wait_ledger(ts, len(frames), 600)
        cpu = cpu_seconds(proc.pid) - cpu_before
        pub.join()
        conn = await asyncpg.connect(ts)
        transitions = await conn.fetchval("SELECT count(*) FROM events WHERE kind LIKE 'alert.%'")
        stored = await conn.fetchval("SELECT count(*) FROM telemetry")
        await conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    readings = int(stored)
    return readings / (finished - started), int(transitions), cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    meta = await create_database(SYSTEM_PG_DSN, "smbenchalmeta", timescale=False)
    ts = await create_database(SYSTEM_PG_DSN, "smbenchalts", timescale=True)
    workdir = Path(tempfile.mkdtemp(prefix="sensormine-bench-alerts-"))
    broker = MosquittoBroker(
        workdir / "mosquitto",
        extra_config="max_inflight_messages 1000\nmax_queued_messages 100000\n",
    )
    try:
        await migrations.apply(meta, "metadata")
        await migrations.apply(ts, "timeseries")
        fleet = await make_fleet(meta, devices=DEVICES)
        frames, _rows, readings = make_frames(fleet.devices, fleet.gateway)
        print(f"frames: {len(frames)} batches, {readings} readings; {RULES} rules in the rule runs")
        broker.start()
        best = {0: 0.0, RULES: 0.0}
        cpu: dict[int, float] = {0: float("inf"), RULES: float("inf")}
        for round_ in range(1, ROUNDS + 1):
            for rules in (0, RULES):
                await clear_rules(meta)
                if rules:
                    await add_rules(meta, fleet)
                rate, transitions, used = await run_once(meta, ts, broker, workdir, fleet, frames)
                print(
                    f"round {round_}: {rules:>4} rules: {rate:.0f} readings/s,"
                    f" collector CPU {used:.2f} s, {transitions} alert transitions"
                )
                best[rules] = max(best[rules], rate)
                cpu[rules] = min(cpu[rules], used)
        print(
            f"best: 0 rules {best[0]:.0f} readings/s ({cpu[0]:.2f} CPU s),"
            f" {RULES} rules {best[RULES]:.0f} readings/s ({cpu[RULES]:.2f} CPU s);"
            f" collector CPU ratio {cpu[0] / cpu[RULES]:.2f}"
        )
        print(f"alerts: rules={RULES} throughput_ratio={best[RULES] / best[0]:.2f}")
    finally:
        broker.stop()
        await drop_database(SYSTEM_PG_DSN, meta)
        await drop_database(SYSTEM_PG_DSN, ts)


if __name__ == "__main__":
    asyncio.run(main())
