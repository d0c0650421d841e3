"""The end-to-end demo: a collector and two agents with simulated sensors, on this machine.

``make demo`` runs it. It makes fresh demo databases on the local PostgreSQL, migrates and
seeds them, provisions both demo gateways with simulated inputs, starts a collector and two
agents as real processes on the local broker, lets them run for ``DEMO_SECONDS`` (default 30),
stops them gracefully (SIGTERM: agents drain their buffers, the collector commits and acks),
and prints what TimescaleDB holds. Its last line is
``demo: produced=<n> stored=<m> quarantined=<q> rejected=<k> duplicates=<d>``; it exits 0 only when every
produced reading is stored exactly once.

Environment: ``DEMO_SECONDS`` (run time), ``DEMO_DATABASE`` (name of the registry database; the
time-series one gets ``_ts`` appended; default ``sensormine_demo``), ``DEMO_STATE`` (directory of
logs and buffers, default ``demo-state/``). The orchestration (:class:`LocalSystem`) is also what
the end-to-end tests drive.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEED = ROOT / "config" / "seed" / "demo.toml"
DEMO_GATEWAYS = ("demo-gateway-north", "demo-gateway-south")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReadyListener:
    """A notify socket like systemd's: children started with it report READY=1 on it.

    Like systemd it reads every datagram for as long as it exists (a thread drains it), and it
    tells senders apart by their credentials (SO_PASSCRED). A peer that stops reading after
    READY=1 would fill the socket's small queue (net.unix.max_dgram_qlen) with the children's
    WATCHDOG=1/STATUS= datagrams, which no real service manager does.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.ready: set[int] = set()
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        ucred = struct.Struct("3i")  # pid, uid, gid
        while not self._closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred.size))
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            pid = next(
                (
                    ucred.unpack(cdata[: ucred.size])[0]
                    for level, kind, cdata in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            if pid is not None and b"READY=1" in data.split(b"\n"):
                with self._changed:
                    self.ready.add(pid)
                    self._changed.notify_all()

    def wait_ready(
        self, process: subprocess.Popen[bytes], what: str, timeout: float = 60.0
    ) -> None:
        """Block until ``process`` sent READY=1; fail if it exits first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while process.pid not in self.ready:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{what} exited with status {process.returncode} before it was ready"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not report READY=1 within {timeout:.0f} s")
                self._changed.wait(0.2)

    def close(self) -> None:
        """Stop reading and remove the socket."""
        self._closed = True
        self._reader.join(5)
        self.sock.close()
        self.path.unlink(missing_ok=True)


@dataclass
class Program:
    """A running agent or collector process and its log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    def start(self, ready: ReadyListener) -> None:
        """Start the process and wait for its READY=1."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor
        self.process = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, "NOTIFY_SOCKET": str(ready.path)},
            cwd=ROOT,
        )
        log.close()
        ready.wait_ready(self.process, self.name)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the process and wait for it to exit; return its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
            raise RuntimeError(
                f"{self.name} did not stop within {timeout:.0f} s of {signal.Signals(sig).name}"
            ) from None
        finally:
            self.process = None
        return code


@dataclass
class LocalSystem:
    """Databases, one collector and the demo gateways' agents on the local broker and server."""

    state: Path
    pg_server: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    name: str = "sensormine_demo"
    prefix: str = "sensormine-demo"
    interval: str = "1s"
    collectors: dict[str, Program] = field(default_factory=dict)
    agents: dict[str, Program] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        base = self.pg_server.rpartition("/")[0]
        self.metadata_dsn = f"{base}/{self.name}"
        self.timeseries_dsn = f"{base}/{self.name}_ts"
        self.ready = ReadyListener(self.state)
        self.env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    # --- set-up ------------------------------------------------------------------------------

    def collector_config(self, client_id: str = "demo-collector-1") -> Path:
        """Write a collector configuration for this system; return its path."""
        path = self.state / f"{client_id}.toml"
        path.write_text(
            f'drain_deadline = "20s"\n\n[metadata]\ndsn = "{self.metadata_dsn}"\n\n'
            f'[timeseries]\ndsn = "{self.timeseries_dsn}"\n\n'
            f'[mqtt]\nhost = "{self.mqtt_host}"\nport = {self.mqtt_port}\nclient_id = "{client_id}"\n'
            f'prefix = "{self.prefix}"\ngroup = "{self.name}"\n\n'
            '[metrics]\nlisten = ""\n\n[log]\nformat = "json"\n'
        )
        return path

    def collector_cli(self, *args: str) -> str:
        """Run a ``sensormine-collector`` subcommand against this system; return its output."""
        result = subprocess.run(
            [str(BIN / "sensormine-collector"), *args, "--config", str(self.collector_config())],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"sensormine-collector {' '.join(args)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    async def recreate_databases(self) -> None:
        """Drop and create the demo's two databases (the time-series one with TimescaleDB)."""
        conn = await asyncpg.connect(self.pg_server)
        try:
            for dsn in (self.metadata_dsn, self.timeseries_dsn):
                db = dsn.rpartition("/")[2]
                await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                await conn.execute(f'CREATE DATABASE "{db}"')
        finally:
            await conn.close()

    def prepare(self) -> None:
        """Fresh databases, migrations, the demo seed and one agent configuration per gateway."""
        asyncio.run(self.recreate_databases())
        self.collector_cli("migrate")
        self.collector_cli("seed", "--demo")
        for gateway in DEMO_GATEWAYS:
            directory = self.state / gateway
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir()
            config = directory / "agent.toml"
            self.collector_cli(
                "gateways", "provision", gateway, "--simulated", "--interval", self.interval,
                "--output", str(config), "--buffer-path", str(directory / "buffer.db"),
                "--broker-host", self.mqtt_host, "--broker-port", str(self.mqtt_port),
            )  # fmt: skip
            self.agents[gateway] = Program(
                gateway,
                [str(BIN / "sensormine-agent"), "run", "--config", str(config)],
                directory / "agent.log",
                self.env,
            )

    # --- processes -------------------------------------------------------------------------

    def start_collector(self, client_id: str = "demo-collector-1") -> Program:
        """Start (or restart) a collector with a persistent session under ``client_id``."""
        program = self.collectors.get(client_id)
        if program is None:
            config = self.collector_config(client_id)
            program = Program(
                client_id,
                [str(BIN / "sensormine-collector"), "run", "--config", str(config)],
                self.state / f"{client_id}.log",
                self.env,
            )
            self.collectors[client_id] = program
        program.start(self.ready)
        return program

    def start_agents(self) -> None:
        """Start every agent that is not running."""
        for agent in self.agents.values():
            if agent.process is None:
                agent.start(self.ready)

    def stop_all(self) -> dict[str, int]:
        """SIGTERM the agents (they drain), then the collectors; return exit statuses."""
        codes = {name: agent.stop() for name, agent in self.agents.items()}
        codes.update({name: c.stop() for name, c in self.collectors.items()})
        return codes

    def kill_everything(self) -> None:
        """SIGKILL whatever still runs (clean-up after a failure)."""
        for program in [*self.agents.values(), *self.collectors.values()]:
            if program.process is not None and program.process.poll() is None:
                program.process.kill()
                program.process.wait()
            program.process = None
        self.ready.close()

    # --- results ---------------------------------------------------------------------------

    def agent_status(self, gateway: str) -> dict[str, Any]:
        """``sensormine-agent status --json`` of one gateway's buffer."""
        config = self.state / gateway / "agent.toml"
        out = subprocess.run(
            [str(BIN / "sensormine-agent"), "status", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def produced(self) -> int:
        """Readings the agents accepted from their inputs, all runs included."""
        return sum(int(self.agent_status(g)["produced"]) for g in self.agents)

    def buffered(self) -> int:
        """Readings still waiting in the agents' buffers."""
        return sum(int(self.agent_status(g)["readings"]) for g in self.agents)

    async def stored_counts(self) -> dict[str, int]:
        """Readings stored, quarantined, refused, and stored more than once."""
        conn = await asyncpg.connect(self.timeseries_dsn)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM telemetry")
            distinct = await conn.fetchval(
                "SELECT count(*) FROM (SELECT DISTINCT device_id, metric, time FROM telemetry) AS d"
            )
            rejected = await conn.fetchval("SELECT coalesce(sum(points), 0) FROM ingest_rejects")
            quarantined = await conn.fetchval("SELECT coalesce(sum(points), 0) FROM quarantine")
        finally:
            await conn.close()
        return {
            "stored": int(stored),
            "quarantined": int(quarantined),
            "rejected": int(rejected),
            "duplicates": int(stored - distinct),
        }

    async def summary(self, seconds: float) -> list[str]:
        """Human summary read back from TimescaleDB."""
        meta = await asyncpg.connect(self.metadata_dsn)
        try:
            devices = await meta.fetch(
                "SELECT d.id, d.name, t.name AS type FROM devices d JOIN device_types t ON t.id = d.device_type_id ORDER BY t.name, d.name"
            )
        finally:
            await meta.close()
        type_of = {r["id"]: r["type"] for r in devices}
        ts = await asyncpg.connect(self.timeseries_dsn)
        try:
            per_device = {
                r["device_id"]: r["n"]
                for r in await ts.fetch(
                    "SELECT device_id, count(*) AS n FROM telemetry GROUP BY device_id"
                )
            }
            latest = await ts.fetch(
                "SELECT DISTINCT ON (device_id, metric) device_id, metric, time, value FROM telemetry ORDER BY device_id, metric, time DESC"
            )
            span = await ts.fetchrow(
                "SELECT min(time) AS first, max(time) AS last, count(*) AS n FROM telemetry"
            )
            rejects = await ts.fetch(
                "SELECT reason, sum(points) AS points FROM ingest_rejects GROUP BY reason ORDER BY 2 DESC"
            )
            held = await ts.fetch(
                "SELECT reason, sum(points) AS points FROM quarantine GROUP BY reason ORDER BY 2 DESC"
            )
        finally:
            await ts.close()
        lines = ["", "rows per device type:"]
        per_type: dict[str, int] = {}
        for device_id, n in per_device.items():
            per_type[type_of.get(device_id, "(unknown)")] = (
                per_type.get(type_of.get(device_id, "(unknown)"), 0) + n
            )
        lines += [f"  {name:<16} {n:>8}" for name, n in sorted(per_type.items())]
        lines += ["", "latest value per device:"]
        latest_by_device: dict[uuid.UUID, list[str]] = {}
        for r in latest:
            latest_by_device.setdefault(r["device_id"], []).append(f"{r['metric']}={r['value']:g}")
        for r in devices:
            values = ", ".join(latest_by_device.get(r["id"], ["(no readings)"]))
            lines.append(f"  {r['name']:<24} {r['type']:<14} {values}")
        rate = span["n"] / seconds if seconds > 0 else 0.0
        lines += ["", f"readings/s achieved: {rate:.1f} ({span['n']} readings in {seconds:.0f} s)"]
        lines += ["", "quarantined by reason (sensormine-collector quarantine list):"] + (
            [f"  {r['reason']:<24} {r['points']}" for r in held] or ["  (none)"]
        )
        lines += ["", "refused by reason:"] + (
            [f"  {r['reason']:<24} {r['points']}" for r in rejects] or ["  (none)"]
        )
        lines += ["", "More queries to try: docs/data-model.md (psql " + self.timeseries_dsn + ")"]
        return lines


def main() -> int:
    """Run the demo; exit 0 only when produced == stored and nothing was stored twice."""
    try:
        seconds = float(os.environ.get("DEMO_SECONDS", "30"))
    except ValueError:
        print(
            f"demo: DEMO_SECONDS must be a number of seconds, got {os.environ['DEMO_SECONDS']!r}",
            file=sys.stderr,
        )
        return 2
    state = Path(os.environ.get("DEMO_STATE", ROOT / "demo-state"))
    name = os.environ.get("DEMO_DATABASE", "sensormine_demo")
    system = LocalSystem(state, name=name, prefix=name.replace("_", "-"))
    try:
        print(
            f"demo: preparing databases {system.metadata_dsn} and {system.timeseries_dsn}",
            flush=True,
        )
        system.prepare()
        system.start_collector()
        print("demo: collector ready", flush=True)
        system.start_agents()
        print(f"demo: two agents ready; running for {seconds:.0f} s (logs in {state})", flush=True)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(5.0, seconds - elapsed))
            counts = asyncio.run(system.stored_counts())
            print(
                f"demo: {time.monotonic() - started:5.1f} s  stored={counts['stored']}", flush=True
            )
        run_seconds = time.monotonic() - started
        codes = system.stop_all()
        print(f"demo: stopped (exit statuses {codes})", flush=True)
        produced = system.produced()
        counts = asyncio.run(system.stored_counts())
        for line in asyncio.run(system.summary(run_seconds)):
            print(line)
    except Exception as exc:
        print(f"demo: failed: {exc}", file=sys.stderr)
        print(f"demo: logs are in {state}", file=sys.stderr)
        system.kill_everything()
        return 1
    system.kill_everything()
    ok = (
        produced == counts["stored"]
        and counts["duplicates"] == 0
        and produced > 0
        and not any(codes.values())
    )
    print(
        f"demo: produced={produced} stored={counts['stored']}"
        f" quarantined={counts['quarantined']} rejected={counts['rejected']}"
        f" duplicates={counts['duplicates']}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
