"""Chaos: two agents and two collectors under a schedule of faults, and an exact tally at the end.

Everything is the test's own and runs as child processes: a Mosquitto on a free port, a
PostgreSQL cluster with TimescaleDB (both databases migrated by ``sensormine-collector
migrate``), two ``python -m collector run`` in one shared-subscription group and two
``sensormine-agent run``, each reading a counter program (``counter.py``) through its
``command`` input. The counter prints a strictly increasing tick number for every metric of
every device, so each reading is identified by (device, metric, tick): a duplicate is the same
triple twice, a missing reading a gap in one series.

The schedule (issue 11): SIGKILL of each agent and each collector, restarted; a PostgreSQL
immediate stop; a broker restart; one collector left dead for a minute; a minute of random
SIGKILLs; and, on a real small file system (a tmpfs) under one agent's buffer, a full disk
while PostgreSQL is down and after it is back, then room again.

At the end the counters stop printing, everything drains, and the tally must be exact:

- nothing twice in ``telemetry``;
- every reading an agent counts as produced and not as dropped (nor quarantined or refused,
  where its ``status`` has such counts) is in ``telemetry``;
- every gap in the counter series is either a kill of that agent (its staging, about one
  commit interval, and lines in the broken pipe: never counted as produced) or a counted drop,
  and the gaps that are not kills add up to the agent's ``dropped`` count exactly;
- after each fault, once the faulty part is back, each agent's delivery keeps pace with its
  production over a window (readings stored in the window against readings produced in it,
  printed as a ratio) and its backlog at the end of the window is back to what sealing and a
  flush take.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.chaos.conftest import SmallDisk
from tests.conftest import create_database
from tests.services import MosquittoBroker, PostgresCluster, free_port

REPO = Path(__file__).resolve().parents[2]
COUNTER = Path(__file__).with_name("counter.py")
AGENTS = ("a", "b")
COLLECTORS = ("a", "b")
DEVICES = 20
METRICS = 6
INTERVAL_S = 0.1
RATE = DEVICES * METRICS / INTERVAL_S  # readings/s per agent: 1,200, as in issue 11
GROUP = "chaos"
WARM_UP_S = 15.0
WINDOW_S = 15.0
DOWN_S = 60.0
RAPID_S = 60.0
FULL_S = 20.0
FULL_DB_DOWN_S = 30.0
SEED = 11
# Readings in transit in steady state, in seconds of production: a batch is sealed after up to
# batch.max_age (1 s), then published, flushed (writer.max_age 200 ms) and acknowledged.
IN_TRANSIT_S = 2.0
# A backlog of at most this much production at the end of a window counts as caught up.
CAUGHT_UP_S = 3.0
DRAIN_LIMIT_S = 120.0
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {f"c{m}": {"type": "integer", "minimum": 1} for m in range(METRICS)},
}


def now() -> float:
    """Wall-clock seconds, the clock the counters stamp their readings with."""
    return time.time()


@dataclass
class Site:
    """The registry of the run: a tenant, and per agent its gateway id and device ids."""

    tenant: uuid.UUID
    gateways: dict[str, uuid.UUID]
    devices: dict[str, list[uuid.UUID]]


async def register_site(metadata: str) -> Site:
    """A tenant, a gateway per agent, DEVICES devices each, of one device type."""
    conn = await asyncpg.connect(metadata)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('chaos') RETURNING id")
        schema = await conn.fetchval(
            "INSERT INTO schemas (tenant_id, name) VALUES ($1, 'counter') RETURNING id", tenant
        )
        await conn.execute(
            "INSERT INTO schema_versions (schema_id, version, json_schema) VALUES ($1, 1, $2::jsonb)",
            schema,
            json.dumps(SCHEMA),
        )
        dtype = await conn.fetchval(
            "INSERT INTO device_types (tenant_id, name, schema_id) VALUES ($1, 'counter', $2) RETURNING id",
            tenant,
            schema,
        )
        gateways: dict[str, uuid.UUID] = {}
        devices: dict[str, list[uuid.UUID]] = {}
        for name in AGENTS:
            gateways[name] = await conn.fetchval(
                "INSERT INTO gateways (tenant_id, name) VALUES ($1, $2) RETURNING id",
                tenant,
                f"chaos-{name}",
            )
            devices[name] = [
                await conn.fetchval(
                    "INSERT INTO devices (tenant_id, device_type_id, gateway_id, name) VALUES ($1, $2, $3, $4) RETURNING id",
                    tenant,
                    dtype,
                    gateways[name],
                    f"chaos-{name}-d{d:02d}",
                )
                for d in range(DEVICES)
            ]
    finally:
        await conn.close()
    return Site(tenant, gateways, devices)


@dataclass
class Component:
    """A child process the schedule kills and starts again; ``up`` while it should run.

    ``name`` is its key in the run (``a``), ``label`` what it is (``agent-a``).
    """

    name: str
    label: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    up: bool = False
    incarnation: int = 0
    kills: list[float] = field(default_factory=list)

    def argv(self) -> list[str]:
        """The command line of one incarnation."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The environment of one incarnation."""
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self) -> None:
        """Start a new incarnation, its output in its own log file."""
        self.incarnation += 1
        log = open(self.workdir / f"{self.label}.{self.incarnation}.log", "wb")  # noqa: SIM115 - the child writes it
        self.process = subprocess.Popen(
            self.argv(), cwd=REPO, env=self.environment(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.up = True

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would."""
        assert self.process is not None
        self.up = False
        self.kills.append(now())
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    async def terminate(self, limit: float) -> int:
        """SIGTERM and the exit status (the clean stop of a unit)."""
        assert self.process is not None
        self.up = False
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, limit)

    def logs(self) -> list[Path]:
        """Log files of every incarnation so far."""
        return [self.workdir / f"{self.label}.{i}.log" for i in range(1, self.incarnation + 1)]

    def log_tail(self, chars: int = 2500) -> str:
        """The end of the current incarnation's log."""
        logs = self.logs()
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""


@dataclass
class Agent(Component):
    """A ``sensormine-agent run`` whose command input reads a counter program."""

    config: Path = Path()
    state: Path = Path()

    def argv(self) -> list[str]:
        """``sensormine-agent run --config FILE``."""
        return [sys.executable, "-m", "agent", "run", "--config", str(self.config)]

    async def status(self) -> dict[str, Any]:
        """``sensormine-agent status --json`` (safe while the agent runs)."""
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent", "status", "--json", "--config", str(self.config)],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        )
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def stop_production(self) -> None:
        """Make the counter program fall silent (it keeps running, so nothing fails)."""
        self.state.with_name(self.state.name + ".stop").touch()

    def ticks(self) -> int:
        """Ticks the counter program has written to the agent so far."""
        return int(self.state.read_text().strip() or 0)


def write_agent_config(
    agent: Agent,
    site: Site,
    broker: MosquittoBroker,
    prefix: str,
    buffer: Path,
) -> None:
    """The agent's configuration: delivery defaults, a fast reconnect, one command input."""
    devices = site.devices[agent.name]
    command = [
        sys.executable,
        str(COUNTER),
        "--state",
        str(agent.state),
        "--devices",
        str(DEVICES),
        "--metrics",
        str(METRICS),
        "--interval",
        str(INTERVAL_S),
    ]
    agent.config.write_text(
        f'[gateway]\nid = "{site.gateways[agent.name]}"\ntenant_id = "{site.tenant}"\n'
        f'[buffer]\npath = "{buffer}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{prefix}"\n'
        'reconnect_min = "200ms"\nreconnect_max = "2s"\n'
        '[log]\nformat = "json"\n'
        '[[inputs]]\ntype = "command"\nname = "counter"\nmode = "stream"\n'
        f"command = {json.dumps(command)}\n"
        'timeout = "0s"\nrestart_delay = "1s"\nformat = "json"\ndevice_field = "device"\n'
        'time_field = "t"\n'
        + "".join(
            f'[[inputs.devices]]\nid = "{d}"\nname = "d{i:02d}"\n' for i, d in enumerate(devices)
        )
    )


@dataclass
class Collector(Component):
    """A ``python -m collector run`` of the group, with a notify socket and a metrics port."""

    config: Path = Path()
    metrics_port: int = 0
    notify: socket.socket | None = None
    ready_seen: bool = False

    def argv(self) -> list[str]:
        """``python -m collector run --config FILE``."""
        return [sys.executable, "-m", "collector", "run", "--config", str(self.config)]

    def environment(self) -> dict[str, str]:
        """A notify socket of its own per incarnation, to see READY=1."""
        if self.notify is not None:
            self.notify.close()
        self.ready_seen = False
        path = self.workdir / f"notify-{self.label}-{self.incarnation}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(path))
        return {**super().environment(), "NOTIFY_SOCKET": str(path)}

    def _wait_ready(self, timeout: float) -> None:
        assert self.notify is not None and self.process is not None
        if self.ready_seen:
            return
        deadline = time.monotonic() + timeout
        self.notify.settimeout(0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.label} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    self.ready_seen = True
                    return
            except TimeoutError:
                continue
        raise TimeoutError(f"{self.label} not ready after {timeout} s:\n{self.log_tail()}")

    async def ready(self, limit: float = 60.0) -> None:
        """Wait until it told its notify socket READY=1 (migrated, subscribed)."""
        await asyncio.to_thread(self._wait_ready, limit)

    def metric(self, name: str) -> float:
        """The sum of a counter's samples on its metrics endpoint (0 if absent)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            text = r.read().decode()
        return sum(
            float(m.group(1))
            for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        )


def write_collector_config(
    collector: Collector, metadata: str, timeseries: str, broker: MosquittoBroker, prefix: str
) -> None:
    """The collector's configuration: defaults, but its databases, broker, group and ports."""
    collector.config.write_text(
        f'[metadata]\ndsn = "{metadata}"\n[timeseries]\ndsn = "{timeseries}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "{prefix}"\n'
        f'client_id = "{prefix}-{collector.name}"\ngroup = "{GROUP}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{collector.metrics_port}"\n'
        '[log]\nlevel = "info"\nformat = "json"\n'
    )


@dataclass
class Sample:
    """Readings stored per agent (from the ledger, committed with them), counted at ``at``."""

    at: float
    stored: dict[str, int]


class Meter:
    """Samples stored readings once a second and watches that what should run does."""

    def __init__(self, dsn: str, site: Site, components: Sequence[Component]) -> None:
        self.dsn = dsn
        self.site = site
        self.components = components
        self.samples: list[Sample] = []
        self.failures: list[str] = []
        self._names = {str(g): name for name, g in site.gateways.items()}

    async def run(self) -> None:
        """Sample until cancelled; a database that is down only leaves a hole in the samples."""
        conn: asyncpg.Connection | None = None
        try:
            while True:
                self.watch()
                at = now()
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.dsn, timeout=2)
                    rows = await conn.fetch(
                        "SELECT gateway_id, sum(accepted)::bigint AS n FROM ingest_ledger"
                        " GROUP BY gateway_id",
                        timeout=5,
                    )
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                    if conn is not None:
                        conn.terminate()
                    conn = None
                else:
                    stored = dict.fromkeys(AGENTS, 0)
                    for r in rows:
                        name = self._names.get(str(r["gateway_id"]))
                        if name is not None:
                            stored[name] = int(r["n"])
                    self.samples.append(Sample(at, stored))
                await asyncio.sleep(max(0.0, at + 1.0 - now()))
        finally:
            if conn is not None:
                conn.terminate()

    def watch(self) -> None:
        """Record every process that died while it should be running."""
        for c in self.components:
            if c.up and c.process is not None and c.process.poll() is not None:
                c.up = False
                self.failures.append(
                    f"{c.label} exited by itself with {c.process.returncode}:\n{c.log_tail()}"
                )

    def check(self) -> None:
        """Fail the test now if a process died by itself."""
        self.watch()
        assert not self.failures, "\n".join(self.failures)

    def first_after(self, t: float) -> Sample:
        """The first sample taken at or after ``t``."""
        return next(s for s in self.samples if s.at >= t)

    def last_before(self, t: float) -> Sample:
        """The last sample taken at or before ``t``."""
        return next(s for s in reversed(self.samples) if s.at <= t)


@dataclass
class Window:
    """A span after a fault over which each agent's delivery is set against its production.

    ``asserted``: the agents whose delivery must keep pace in it (a window only observed, for
    example a full disk, names none).
    """

    fault: str
    start: float
    end: float
    asserted: tuple[str, ...] = AGENTS


@dataclass
class Production:
    """Readings produced per agent over time, read back from the stored readings' stamps."""

    stamps: dict[str, list[float]]
    cumulative: dict[str, list[int]]

    def by(self, agent: str, t: float) -> int:
        """Readings of ``agent`` stamped at or before ``t``."""
        i = bisect.bisect_right(self.stamps[agent], t)
        return self.cumulative[agent][i - 1] if i else 0


@dataclass
class Pace:
    """One agent over one window."""

    delivered: int
    produced: int
    backlog_end_s: float
    caught_up_s: float | None
    """Seconds from the window's start after which the backlog stayed within CAUGHT_UP_S."""

    @property
    def ratio(self) -> float:
        """Readings stored in the window per reading produced in it."""
        return self.delivered / max(1, self.produced)


def pace(meter: Meter, production: Production, window: Window, agent: str) -> Pace:
    """Delivery against production of ``agent`` between the samples that bound ``window``."""
    start, end = meter.first_after(window.start), meter.last_before(window.end)
    delivered = end.stored[agent] - start.stored[agent]
    produced = production.by(agent, end.at) - production.by(agent, start.at)
    backlog = production.by(agent, end.at) - end.stored[agent]
    since: float | None = None
    for s in meter.samples:
        if start.at <= s.at <= end.at:
            if production.by(agent, s.at) - s.stored[agent] <= CAUGHT_UP_S * RATE:
                since = s.at - start.at if since is None else since
            else:
                since = None
    return Pace(delivered, produced, backlog / RATE, since)


@dataclass
class Gap:
    """Readings missing from one series between two stored ticks."""

    missing: int
    after: float
    before: float


@dataclass
class AgentTally:
    """One agent at the end: its own counters against what the database holds."""

    status: dict[str, Any]
    ticks: int
    stored: int
    ledger: int
    duplicates: int
    gaps: list[Gap]

    @property
    def produced(self) -> int:
        """Readings the agent took from its input."""
        return int(self.status["produced"])

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped readings per reason, as the agent counted them."""
        return {k: int(v) for k, v in self.status["dropped_by_reason"].items()}

    @property
    def outcomes(self) -> dict[str, int]:
        """Readings the agent counts as quarantined or refused, whatever keys its status has."""
        keys = [k for k in self.status if "quarantin" in k or "refus" in k]
        found = {k: int(self.status[k]) for k in keys if isinstance(self.status[k], int)}
        for k in keys:
            # A split per reason counts only where the status has no total beside it.
            if isinstance(self.status[k], dict) and k.removesuffix("_by_reason") not in found:
                found[k] = sum(int(v) for v in self.status[k].values())
        return found

    @property
    def missing(self) -> int:
        """Readings counted as produced and not as dropped, quarantined or refused, not stored."""
        return (
            self.produced - sum(self.dropped.values()) - sum(self.outcomes.values()) - self.stored
        )

    def lost_in_kills(self, kills: list[float]) -> tuple[int, list[int]]:
        """Missing readings whose gap spans a kill of the agent: in total and per kill."""
        per_kill = [0] * len(kills)
        total = 0
        for gap in self.gaps:
            hits = [i for i, k in enumerate(kills) if gap.after <= k <= gap.before]
            if hits:
                total += gap.missing
                per_kill[hits[0]] += gap.missing
        return total, per_kill

    def lost_elsewhere(self, kills: list[float]) -> int:
        """Missing readings whose gap spans no kill: only counted drops may explain them."""
        return sum(g.missing for g in self.gaps) - self.lost_in_kills(kills)[0]


async def tally(dsn: str, agent: Agent, devices: list[uuid.UUID], gateway: uuid.UUID) -> AgentTally:
    """The stopped agent's status, and its readings in the database: count, twins and gaps."""
    status = await agent.status()
    ticks = agent.ticks()
    conn = await asyncpg.connect(dsn)
    try:
        stored, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (device_id, metric, value)) FROM readings"
            " WHERE device_id = ANY($1::uuid[])",
            devices,
        )
        ledger = await conn.fetchval(
            "SELECT coalesce(sum(accepted), 0) FROM ingest_ledger WHERE gateway_id = $1", gateway
        )
        # Every break in a series' consecutive ticks, with the stamps of the readings around it;
        # the first reading of a series also shows what is missing before it.
        rows = await conn.fetch(
            """
            SELECT n, prev_n, extract(epoch FROM time)::float8 AS t,
                   extract(epoch FROM prev_time)::float8 AS prev_t, last
            FROM (
                SELECT value::bigint AS n, time,
                       lag(value::bigint) OVER w AS prev_n, lag(time) OVER w AS prev_time,
                       lead(value) OVER w IS NULL AS last
                FROM readings WHERE device_id = ANY($1::uuid[])
                WINDOW w AS (PARTITION BY device_id, metric ORDER BY value)
            ) AS s
            WHERE prev_n IS NULL OR n - prev_n > 1 OR last
            """,
            devices,
        )
        series = await conn.fetchval(
            "SELECT count(*) FROM (SELECT DISTINCT device_id, metric FROM readings"
            " WHERE device_id = ANY($1::uuid[])) AS s",
            devices,
        )
    finally:
        await conn.close()
    gaps: list[Gap] = []
    for r in rows:
        if r["prev_n"] is None and r["n"] > 1:
            gaps.append(Gap(r["n"] - 1, float("-inf"), r["t"]))
        elif r["prev_n"] is not None and r["n"] - r["prev_n"] > 1:
            gaps.append(Gap(r["n"] - r["prev_n"] - 1, r["prev_t"], r["t"]))
        if r["last"] and r["n"] < ticks:
            gaps.append(Gap(ticks - r["n"], r["t"], float("inf")))
    # A series with no reading at all is missing whole.
    gaps.extend(Gap(ticks, float("-inf"), float("inf")) for _ in range(DEVICES * METRICS - series))
    return AgentTally(status, ticks, int(stored), int(ledger), int(stored) - int(distinct), gaps)


async def read_production(dsn: str, site: Site) -> Production:
    """Per agent, the stamps of its ticks and the readings stored up to each."""
    conn = await asyncpg.connect(dsn)
    stamps: dict[str, list[float]] = {}
    cumulative: dict[str, list[int]] = {}
    try:
        for name in AGENTS:
            rows = await conn.fetch(
                "SELECT extract(epoch FROM time)::float8 AS t, count(*) AS n FROM readings"
                " WHERE device_id = ANY($1::uuid[]) GROUP BY time ORDER BY time",
                site.devices[name],
            )
            stamps[name] = [r["t"] for r in rows]
            total = 0
            cumulative[name] = []
            for r in rows:
                total += int(r["n"])
                cumulative[name].append(total)
    finally:
        await conn.close()
    return Production(stamps, cumulative)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last block with one file; return it."""
    path = directory / "fill"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        st = os.statvfs(directory)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
        os.lseek(fd, 0, os.SEEK_END)
        block = b"\xa5" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return path


def log_figures(agent: Agent) -> str:
    """What the agent's logs tell of its buffer: ``buffer.*`` events, and from its
    ``agent.status`` lines how often it reported a full disk and the most it held in memory."""
    seen: Counter[str] = Counter()
    full = held = pending = 0
    for log in agent.logs():
        for line in log.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            event = doc.get("event", "") if isinstance(doc, dict) else ""
            if not isinstance(event, str):
                continue
            if event.startswith("buffer."):
                seen[event] += 1
            elif event == "agent.status":
                full += bool(doc.get("disk_full"))
                held = max(held, int(doc.get("held") or 0))
                pending = max(pending, int(doc.get("pending_deletes") or 0))
    return (
        f"buffer events {dict(seen)}; agent.status lines with disk_full {full}, "
        f"most held {held}, most pending deletes {pending}"
    )


@dataclass
class Run:
    """The system under test and what the schedule did to it."""

    site: Site
    broker: MosquittoBroker
    cluster: PostgresCluster
    agents: dict[str, Agent]
    collectors: dict[str, Collector]
    meter: Meter
    started: float = field(default_factory=now)
    windows: list[Window] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def log(self, what: str) -> None:
        """Note a step of the schedule, with the seconds since the start."""
        line = f"{now() - self.started:7.1f} s  {what}"
        self.timeline.append(line)
        print(line, flush=True)

    async def hold(self, seconds: float) -> None:
        """Let the system run, failing early if a process dies by itself."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self.meter.check()
            await asyncio.sleep(min(0.5, left))
        self.meter.check()

    async def observe(self, fault: str, asserted: tuple[str, ...] = AGENTS) -> None:
        """A window of WINDOW_S from now, after ``fault`` recovered."""
        start = now()
        await self.hold(WINDOW_S)
        self.windows.append(Window(fault, start, now(), asserted))

    async def restart_agent(self, name: str, after: float) -> None:
        """SIGKILL agent ``name`` and start it again ``after`` seconds later."""
        self.agents[name].kill()
        self.log(f"agent {name} SIGKILLed")
        await asyncio.sleep(after)
        self.agents[name].start()
        self.log(f"agent {name} started")

    async def restart_collector(self, name: str, after: float, wait: bool = True) -> None:
        """SIGKILL collector ``name`` and start it again ``after`` seconds later."""
        self.collectors[name].kill()
        self.log(f"collector {name} SIGKILLed")
        await asyncio.sleep(after)
        self.collectors[name].start()
        if wait:
            await self.collectors[name].ready()
        self.log(f"collector {name} started")

    def duplicates_answered(self) -> float:
        """Batches the running collectors answered as duplicate since they started."""
        return sum(
            c.metric("sensormine_collector_duplicates_total")
            for c in self.collectors.values()
            if c.up
        )

    def log_tails(self) -> str:
        """The end of every process's current log, for a failure report."""
        parts = [
            f"--- {c.label}\n{c.log_tail()}"
            for c in [*self.agents.values(), *self.collectors.values()]
        ]
        return "\n".join(parts)


async def schedule(run: Run, disk: SmallDisk) -> None:
    """The faults, one after another, each followed by a window that measures the recovery."""
    await run.hold(WARM_UP_S)
    run.windows.append(Window("warm-up (no fault), from 5 s", run.started + 5.0, now()))

    for name in AGENTS:
        await run.restart_agent(name, after=1.0)
        await run.observe(f"agent {name} SIGKILLed, restarted after 1 s")
    for name in COLLECTORS:
        await run.restart_collector(name, after=1.0)
        await run.observe(f"collector {name} SIGKILLed, restarted after 1 s")

    await asyncio.to_thread(run.cluster.stop, "immediate")
    run.log("PostgreSQL stopped (immediate)")
    await run.hold(10.0)
    await asyncio.to_thread(run.cluster.start)
    run.log("PostgreSQL started")
    await run.observe("PostgreSQL immediate stop, 10 s down")

    await asyncio.to_thread(run.broker.stop)
    run.log("broker stopped")
    await run.hold(5.0)
    await asyncio.to_thread(run.broker.start)
    run.log("broker started")
    await run.observe("broker restart, 5 s down")

    dead = run.collectors["b"]
    dead.kill()
    killed = now()
    run.log("collector b SIGKILLed, left down")
    await run.hold(DOWN_S / 2)
    await run.hold(DOWN_S / 2)
    run.windows.append(
        Window(
            f"collector b dead, {DOWN_S / 2:.0f}-{DOWN_S:.0f} s after the kill",
            killed + DOWN_S / 2,
            now(),
        )
    )
    dead.start()
    await dead.ready()
    run.log("collector b started")
    await run.observe(f"collector b back after {DOWN_S:.0f} s")

    rng = random.Random(SEED)
    kills = 0
    until = time.monotonic() + RAPID_S
    while time.monotonic() < until:
        target = rng.choice([f"agent {n}" for n in AGENTS] + [f"collector {n}" for n in COLLECTORS])
        kind, name = target.split()
        if kind == "agent":
            await run.restart_agent(name, after=rng.uniform(0.3, 2.0))
        else:
            await run.restart_collector(name, after=rng.uniform(0.3, 2.0), wait=False)
        kills += 1
        await run.hold(rng.uniform(1.0, 4.0))
    for c in run.collectors.values():
        await c.ready()
    await run.observe(f"{kills} random SIGKILLs in {RAPID_S:.0f} s")

    if disk.path is None:
        run.notes.append(f"full-disk phase left out: {disk.reason}")
        warnings.warn(f"chaos: full-disk phase left out: {disk.reason}", stacklevel=1)
        return
    before = run.duplicates_answered()
    filler = fill(disk.path)
    full_at = now()
    free = os.statvfs(disk.path)
    run.log(f"agent b's file system full ({free.f_bavail * free.f_frsize} bytes free)")
    # With the link and the collectors fine a steady buffer reuses its pages and never needs a
    # new block: a database outage makes the buffer grow into the full disk, and the acks after
    # it make the agent delete batches on a full disk (issue 11, defect 7).
    await asyncio.to_thread(run.cluster.stop, "immediate")
    run.log("PostgreSQL stopped (immediate)")
    await run.hold(FULL_DB_DOWN_S)
    await asyncio.to_thread(run.cluster.start)
    run.log("PostgreSQL started, agent b's disk still full")
    start = now()
    await run.hold(FULL_S)
    run.windows.append(Window("PostgreSQL back, agent b's disk still full", start, now(), ("a",)))
    duplicates = run.duplicates_answered() - before
    filler.unlink()
    run.log("agent b's file system has room again")
    run.notes.append(
        f"duplicate answers while agent b's disk was full: {duplicates:.0f} in "
        f"{now() - full_at:.0f} s ({duplicates / (now() - full_at):.1f}/s, both agents)"
    )
    await run.observe(
        f"agent b's disk full (PostgreSQL down {FULL_DB_DOWN_S:.0f} s meanwhile), then room again"
    )


async def drain(run: Run) -> None:
    """Stop production, wait until both buffers are empty, then stop every process cleanly."""
    for agent in run.agents.values():
        agent.stop_production()
    run.log("producers stopped")
    deadline = time.monotonic() + DRAIN_LIMIT_S
    while True:
        run.meter.check()
        left = {n: await a.status() for n, a in run.agents.items()}
        waiting = {
            n: (s["readings"], s["batches"])
            for n, s in left.items()
            if s["readings"] or s["batches"]
        }
        if not waiting:
            break
        assert time.monotonic() < deadline, (
            f"not drained after {DRAIN_LIMIT_S:.0f} s (readings, batches): {waiting}\n{run.log_tails()}"
        )
        await asyncio.sleep(2.0)
    run.log("buffers empty")
    for name, agent in run.agents.items():
        assert 0 == await agent.terminate(60), f"agent {name}:\n{agent.log_tail()}"
    for name, collector in run.collectors.items():
        assert 0 == await collector.terminate(40), f"collector {name}:\n{collector.log_tail()}"
    run.log("agents and collectors stopped (exit 0)")


def report(
    run: Run, tallies: dict[str, AgentTally], paces: list[tuple[Window, dict[str, Pace]]]
) -> str:
    """The summary table of the run."""
    lines = [
        f"chaos: {len(AGENTS)} agents x {RATE:,.0f} readings/s, {len(COLLECTORS)} collectors in one group; "
        f"{now() - run.started:.0f} s from the agents' start to the end of the tally",
        "",
        f"{'':34}" + "".join(f"{'agent ' + n:>16}" for n in AGENTS),
    ]

    def row(label: str, values: Sequence[object]) -> None:
        lines.append(f"{label:34}" + "".join(f"{v!s:>16}" for v in values))

    t = [tallies[n] for n in AGENTS]
    kills = [run.agents[n].kills for n in AGENTS]
    row("ticks written by the counter", [x.ticks for x in t])
    row("readings written (ticks x series)", [x.ticks * DEVICES * METRICS for x in t])
    row("produced (agent)", [x.produced for x in t])
    row("delivered (agent)", [int(x.status["delivered"]) for x in t])
    if all("stored" in x.status for x in t):
        row("stored (agent)", [int(x.status["stored"]) for x in t])
    row("stored (telemetry)", [x.stored for x in t])
    row("stored (ledger, accepted)", [x.ledger for x in t])
    row("duplicates", [x.duplicates for x in t])
    row("missing (produced, not dropped)", [x.missing for x in t])
    for reason in sorted({r for x in t for r in x.dropped}):
        row(f"dropped: {reason}", [x.dropped.get(reason, 0) for x in t])
    for key in sorted({k for x in t for k in x.outcomes}):
        row(key, [x.outcomes.get(key, 0) for x in t])
    row("rejected batches (agent)", [x.status.get("rejected_batches", 0) for x in t])
    row("streams (agent)", [len(x.status.get("streams", [x.status["stream"]])) for x in t])
    row("re-encoded batches (agent)", [x.status.get("reencoded_batches", 0) for x in t])
    row("SIGKILLs", [len(k) for k in kills])
    row(
        "lost in kills (never produced)",
        [x.lost_in_kills(k)[0] for x, k in zip(t, kills, strict=True)],
    )
    row(
        "  largest per kill, ms of prod.",
        [
            f"{max(x.lost_in_kills(k)[1], default=0) / RATE * 1000:.0f}"
            for x, k in zip(t, kills, strict=True)
        ],
    )
    row("missing outside kills", [x.lost_elsewhere(k) for x, k in zip(t, kills, strict=True)])
    lines += [
        "",
        "delivery after each fault: readings stored / produced over the window, the backlog at",
        f"its end (s of production), and when the backlog was back within {CAUGHT_UP_S:.0f} s "
        "for good",
    ]
    for window, by_agent in paces:
        lines.append(f"  {window.fault} ({window.end - window.start:.0f} s window)")
        for n, p in by_agent.items():
            caught = "never" if p.caught_up_s is None else f"after {p.caught_up_s:.0f} s"
            lines.append(
                f"    agent {n}  ratio {p.ratio:5.2f}  backlog at end {p.backlog_end_s:5.1f} s"
                f"  caught up {caught}"
                + ("" if n in window.asserted else "  (observed, not asserted)")
            )
    lines += [
        "",
        "collector SIGKILLs: "
        + ", ".join(f"{n} {len(c.kills)}" for n, c in run.collectors.items()),
        *run.notes,
        *(f"agent {n}: {log_figures(a)}" for n, a in run.agents.items()),
        "",
        "timeline:",
        *run.timeline,
    ]
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_every_committed_reading_stored_exactly_once(
    tmp_path: Path,
    private_broker: MosquittoBroker,
    private_postgres: PostgresCluster,
    small_disk: SmallDisk,
) -> None:
    """Under SIGKILLs of every agent and collector, a PostgreSQL crash, a broker restart, a
    collector dead for a minute and a full disk under one agent's buffer: nothing is stored
    twice, every reading an agent counts as produced and not dropped is stored, the only other
    readings missing are those a kill took before they were produced, drops match the counted
    drops exactly, and after each fault delivery keeps pace with production again."""
    metadata = await create_database(private_postgres.dsn, "chaosmeta", timescale=False)
    timeseries = await create_database(private_postgres.dsn, "chaosts", timescale=True)
    prefix = f"chaos{uuid.uuid4().hex[:8]}"
    collectors = {
        n: Collector(
            n,
            f"collector-{n}",
            tmp_path,
            config=tmp_path / f"collector-{n}.toml",
            metrics_port=free_port(),
        )
        for n in COLLECTORS
    }
    for c in collectors.values():
        write_collector_config(c, metadata, timeseries, private_broker, prefix)
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "collector", "migrate", "--config", str(collectors["a"].config)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    site = await register_site(metadata)
    agents: dict[str, Agent] = {}
    for n in AGENTS:
        agent = Agent(
            n,
            f"agent-{n}",
            tmp_path,
            config=tmp_path / f"agent-{n}.toml",
            state=tmp_path / f"counter-{n}",
        )
        # Agent b's buffer lives on the small file system that its full-disk phase fills.
        home = small_disk.path if n == "b" and small_disk.path is not None else tmp_path
        write_agent_config(agent, site, private_broker, prefix, home / f"buffer-{n}.db")
        agents[n] = agent
    everyone: list[Component] = [*agents.values(), *collectors.values()]
    meter = Meter(timeseries, site, everyone)
    run = Run(site, private_broker, private_postgres, agents, collectors, meter)
    sampler = asyncio.create_task(meter.run())
    try:
        for c in collectors.values():
            c.start()
        for c in collectors.values():
            await c.ready()
        for a in agents.values():
            a.start()
        run.started = now()
        run.log("collectors ready, agents started")
        await schedule(run, small_disk)
        await drain(run)
    except BaseException:
        print(run.log_tails())
        raise
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for child in everyone:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        for c in collectors.values():
            if c.notify is not None:
                c.notify.close()

    tallies = {
        n: await tally(timeseries, agents[n], site.devices[n], site.gateways[n]) for n in AGENTS
    }
    production = await read_production(timeseries, site)
    paces = [(w, {n: pace(meter, production, w, n) for n in AGENTS}) for w in run.windows]
    conn = await asyncpg.connect(timeseries)
    try:
        rejects = int(await conn.fetchval("SELECT count(*) FROM ingest_rejects"))
        quarantined = int(await conn.fetchval("SELECT count(*) FROM quarantine"))
    finally:
        await conn.close()
    run.notes.append(f"ingest_rejects rows: {rejects}, quarantine rows: {quarantined}")
    summary = report(run, tallies, paces)
    print(summary)

    # Every check is made and every failure named at once: one run shows all that is wrong.
    problems: list[str] = []

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    for n, t in tallies.items():
        kills = agents[n].kills
        check(
            (0, 0) == (t.status["readings"], t.status["batches"]),
            f"agent {n}: not drained: {t.status['readings']} readings, "
            f"{t.status['batches']} batches left",
        )
        check(0 == t.duplicates, f"agent {n}: {t.duplicates} readings stored twice")
        check(0 == t.missing, f"agent {n}: {t.missing} readings produced, not dropped, not stored")
        check(t.stored == t.ledger, f"agent {n}: telemetry {t.stored}, ledger {t.ledger}")
        if "stored" in t.status:
            check(
                t.stored == int(t.status["stored"]),
                f"agent {n}: telemetry {t.stored}, the agent says {t.status['stored']} stored",
            )
        check(
            sum(t.dropped.values()) == t.lost_elsewhere(kills),
            f"agent {n}: {t.lost_elsewhere(kills)} readings missing outside kills, "
            f"{sum(t.dropped.values())} counted as dropped",
        )
    check((0, 0) == (rejects, quarantined), f"{rejects} rejects, {quarantined} quarantined")
    for window, by_agent in paces:
        for n in window.asserted:
            p = by_agent[n]
            check(
                p.delivered + IN_TRANSIT_S * RATE >= p.produced,
                f"agent {n}: delivery behind production after '{window.fault}': "
                f"{p.delivered} stored against {p.produced} produced",
            )
            check(
                p.backlog_end_s <= CAUGHT_UP_S,
                f"agent {n}: not caught up at the end of '{window.fault}': "
                f"{p.backlog_end_s:.1f} s of production waiting",
            )
    assert not problems, "\n".join(problems) + "\n\n" + summary
