"""The end-to-end demo: a collector and two agents with simulated sensors, on this machine.

``make demo`` runs it. It makes fresh demo databases on the local PostgreSQL, migrates and
seeds them, creates a CA and issues each demo gateway a client certificate with its simulated
inputs (``gateways provision``), writes the broker's configuration from the registry (``broker
sync``) and starts a private Mosquitto with it (TLS only, each gateway confined to its topics,
not an open broker), then a collector and two agents as real processes. It lets them run for
``DEMO_SECONDS`` (default 30), stops them gracefully (SIGTERM: agents drain their buffers, the
collector commits and acks), and prints what TimescaleDB holds, then the alerts the demo seed's
rules raised and cleared (``alerts: raised=<n> cleared=<m>``). Its last line is
``demo: produced=<n> stored=<m> quarantined=<q> rejected=<k> duplicates=<d>``; it exits 0 only when every
produced reading is stored exactly once. While it runs it also serves the query API and status page
(``sensormine-collector api``) and prints its URL with a token of the demo tenant.

Environment: ``DEMO_SECONDS`` (run time), ``DEMO_DATABASE`` (name of the registry database; the
time-series one gets ``_ts`` appended; default ``sensormine_demo``), ``DEMO_STATE`` (directory of
logs and buffers, default ``demo-state/``), ``DEMO_API_PORT`` (the API's port, default a free one),
``DEMO_SCREENSHOT`` (a PNG path: screenshots of the fleet page there and of one device page beside
it, ``<name>-device.png``, taken at the end of the run). The orchestration (:class:`LocalSystem`) is also what
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
from urllib.parse import quote

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
    # True: a private Mosquitto with the configuration `broker sync` generates (TLS, gateway
    # certificates, per-gateway ACL); False: the broker at mqtt_host:mqtt_port as it is.
    secure: bool = False
    collectors: dict[str, Program] = field(default_factory=dict)
    agents: dict[str, Program] = field(default_factory=dict)
    api: Program | None = None
    api_url: str = ""
    broker: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        base = self.pg_server.rpartition("/")[0]
        self.metadata_dsn = f"{base}/{self.name}"
        self.timeseries_dsn = f"{base}/{self.name}_ts"
        self.ready = ReadyListener(self.state)
        self.env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.group = self.name
        if self.secure:
            self.mqtt_host = "127.0.0.1"
            self.ports = {"cert": free_port(), "password": free_port(), "collector": free_port()}
            self.mqtt_port = self.ports["collector"]
            # The collectors' group name is a secret (docs/security.md).
            self.group = f"{self.name}-{uuid.uuid4().hex}"
            self.env.update(
                {
                    "SENSORMINE_PKI_DIR": str(self.state / "pki"),
                    "SENSORMINE_BROKER_DIR": str(self.state / "broker"),
                    "SENSORMINE_BROKER_CERT": str(self.state / "certs" / "broker.pem"),
                    "SENSORMINE_BROKER_KEY": str(self.state / "certs" / "broker.key"),
                    "SENSORMINE_BROKER_CERT_LISTEN": f"127.0.0.1:{self.ports['cert']}",
                    "SENSORMINE_BROKER_PASSWORD_LISTEN": f"127.0.0.1:{self.ports['password']}",
                    "SENSORMINE_BROKER_COLLECTOR_LISTEN": f"127.0.0.1:{self.ports['collector']}",
                    "SENSORMINE_BROKER_COLLECTOR_PASSWORD_FILE": str(self.collector_password),
                    "SENSORMINE_BROKER_PID_FILE": str(self.state / "mosquitto.pid"),
                }
            )

    @property
    def collector_password(self) -> Path:
        """The collectors' MQTT password file (secure mode)."""
        return self.state / "credentials" / "mqtt-password"

    # --- set-up ------------------------------------------------------------------------------

    def collector_config(self, client_id: str = "demo-collector-1") -> Path:
        """Write a collector configuration for this system; return its path."""
        path = self.state / f"{client_id}.toml"
        login = (
            f'username = "sensormine-collector"\npassword_file = "{self.collector_password}"\n'
            f'tls = true\nca_file = "{self.state / "pki" / "ca.pem"}"\n'
            if self.secure
            else ""
        )
        path.write_text(
            f'drain_deadline = "20s"\n\n[metadata]\ndsn = "{self.metadata_dsn}"\n\n'
            f'[timeseries]\ndsn = "{self.timeseries_dsn}"\n\n'
            f'[mqtt]\nhost = "{self.mqtt_host}"\nport = {self.mqtt_port}\nclient_id = "{client_id}"\n'
            f'prefix = "{self.prefix}"\ngroup = "{self.group}"\n{login}\n'
            '[metrics]\nlisten = ""\n\n[log]\nformat = "json"\n'
        )
        return path

    def collector_cli(self, *args: str, registry: bool = True) -> str:
        """Run a ``sensormine-collector`` subcommand against this system (``registry``: one
        that reads the collector's configuration); return its output."""
        config = ["--config", str(self.collector_config())] if registry else []
        result = subprocess.run(
            [str(BIN / "sensormine-collector"), *args, *config],
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
        if self.secure:
            self.prepare_pki()
        for gateway in DEMO_GATEWAYS:
            directory = self.state / gateway
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir()
            config = directory / "agent.toml"
            credentials = directory / "credentials"
            login = (
                ["--credential", "certificate", "--credentials-dir", str(credentials),
                 "--credentials-path", str(credentials),
                 "--broker-port", str(self.ports["cert"])]
                if self.secure
                else ["--credential", "none", "--broker-port", str(self.mqtt_port)]
            )  # fmt: skip
            self.collector_cli(
                "gateways", "provision", gateway, "--simulated", "--interval", self.interval,
                "--output", str(config), "--buffer-path", str(directory / "buffer.db"),
                "--broker-host", self.mqtt_host, *login,
            )  # fmt: skip
            self.agents[gateway] = Program(
                gateway,
                [str(BIN / "sensormine-agent"), "run", "--config", str(config)],
                directory / "agent.log",
                self.env,
            )

    def prepare_pki(self) -> None:
        """A CA, the broker's certificate and the collectors' password, made afresh."""
        for name in ("pki", "certs", "broker", "credentials"):
            shutil.rmtree(self.state / name, ignore_errors=True)
        self.collector_cli("pki", "init", "--name", "Sensormine demo CA", registry=False)
        self.collector_cli(
            "pki",
            "server-cert",
            "127.0.0.1",
            "localhost",
            "--out",
            str(self.state / "certs"),
            registry=False,
        )
        self.collector_password.parent.mkdir(mode=0o700)
        fd = os.open(self.collector_password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(uuid.uuid4().hex + uuid.uuid4().hex + "\n")

    def start_broker(self) -> None:
        """`broker sync` and a private Mosquitto running config/mosquitto/mosquitto.conf with
        what it generated (secure mode)."""
        self.collector_cli("broker", "sync", "--no-reload")
        text = (ROOT / "config" / "mosquitto" / "mosquitto.conf").read_text()
        text = text.replace(
            "include_dir /etc/mosquitto/sensormine", f"include_dir {self.state / 'broker'}"
        )
        text = text.replace("persistence true", "persistence false")
        text = text.replace("log_dest syslog", f"log_dest file {self.state / 'mosquitto.log'}")
        text += f"pid_file {self.state / 'mosquitto.pid'}\n"
        if os.geteuid() == 0:
            text += (
                "user root\n"  # as root, Mosquitto would switch to a user who cannot read state/
            )
        config = self.state / "mosquitto.conf"
        config.write_text(text)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = subprocess.Popen(
            [exe, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        for port in self.ports.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if self.broker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"mosquitto did not start (see {self.state / 'mosquitto.log'})"
                        ) from None
                    time.sleep(0.05)

    def stop_broker(self) -> None:
        """Stop the private broker, if any."""
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            self.broker.wait(timeout=15)
        self.broker = None

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

    def start_api(self, port: int) -> str:
        """Start the query API and status page (``sensormine-collector api``); return its URL."""
        self.api_url = f"http://127.0.0.1:{port}"
        self.api = Program(
            "api",
            [
                str(BIN / "sensormine-collector"),
                *("api", "--config", str(self.collector_config())),
                *("--listen", f"127.0.0.1:{port}"),
            ],
            self.state / "api.log",
            self.env,
        )
        self.api.start(self.ready)
        return self.api_url

    def api_token(self, tenant: str = "demo") -> str:
        """A fresh API token of ``tenant`` (``sensormine-collector tokens create``)."""
        name = f"demo-{uuid.uuid4().hex[:8]}"
        return self.collector_cli("tokens", "create", "--tenant", tenant, "--name", name).strip()

    async def busiest_device(self) -> str | None:
        """The id of the device with the most series (the demo's device page to show)."""
        conn = await asyncpg.connect(self.timeseries_dsn)
        try:
            found = await conn.fetchval(
                "SELECT device_id FROM series GROUP BY device_id ORDER BY count(*) DESC,"
                " device_id LIMIT 1"
            )
        finally:
            await conn.close()
        return None if found is None else str(found)

    def screenshots(self, token: str, path: Path) -> list[Path]:
        """PNGs of the fleet page (``path``) and of one device's page (``<stem>-device.png``)."""
        chromium = _chromium()
        pages = [(f"{self.api_url}/ui/#token={quote(token)}", path)]
        device = asyncio.run(self.busiest_device())
        if device is not None:
            pages.append(
                (
                    f"{self.api_url}/ui/device.html?id={device}#token={quote(token)}",
                    path.with_name(f"{path.stem}-device{path.suffix or '.png'}"),
                )
            )
        for url, target in pages:
            target.parent.mkdir(parents=True, exist_ok=True)
            chromium.screenshot(url, target, size="1400,1600")
        return [target for _, target in pages]

    def start_agents(self) -> None:
        """Start every agent that is not running."""
        for agent in self.agents.values():
            if agent.process is None:
                agent.start(self.ready)

    def stop_all(self) -> dict[str, int]:
        """SIGTERM the agents (they drain), then the collectors; return exit statuses."""
        codes = {name: agent.stop() for name, agent in self.agents.items()}
        codes.update({name: c.stop() for name, c in self.collectors.items()})
        if self.api is not None:
            codes["api"] = self.api.stop()
        self.stop_broker()
        return codes

    def kill_everything(self) -> None:
        """SIGKILL whatever still runs (clean-up after a failure)."""
        api = [self.api] if self.api is not None else []
        for program in [*self.agents.values(), *self.collectors.values(), *api]:
            if program.process is not None and program.process.poll() is None:
                program.process.kill()
                program.process.wait()
            program.process = None
        if self.broker is not None and self.broker.poll() is None:
            self.broker.kill()
            self.broker.wait()
        self.broker = None
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
            stored = await conn.fetchval("SELECT count(*) FROM readings")
            distinct = await conn.fetchval(
                "SELECT count(*) FROM (SELECT DISTINCT device_id, metric, time FROM readings) AS d"
            )
            rejected = await conn.fetchval("SELECT coalesce(sum(points), 0) FROM ingest_rejects")
            raised = await conn.fetchval("SELECT count(*) FROM events WHERE kind = 'alert.raised'")
            cleared = await conn.fetchval(
                "SELECT count(*) FROM events WHERE kind = 'alert.cleared'"
            )
            quarantined = await conn.fetchval("SELECT coalesce(sum(points), 0) FROM quarantine")
        finally:
            await conn.close()
        return {
            "stored": int(stored),
            "quarantined": int(quarantined),
            "rejected": int(rejected),
            "duplicates": int(stored - distinct),
            "alerts_raised": int(raised),
            "alerts_cleared": int(cleared),
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
                    "SELECT device_id, count(*) AS n FROM readings GROUP BY device_id"
                )
            }
            latest = await ts.fetch(
                "SELECT device_id, metric, time, value FROM latest_readings ORDER BY device_id, metric"
            )
            span = await ts.fetchrow(
                "SELECT min(time) AS first, max(time) AS last, count(*) AS n FROM readings"
            )
            rejects = await ts.fetch(
                "SELECT reason, sum(points) AS points FROM ingest_rejects GROUP BY reason ORDER BY 2 DESC"
            )
            held = await ts.fetch(
                "SELECT reason, sum(points) AS points FROM quarantine GROUP BY reason ORDER BY 2 DESC"
            )
            alerts = await ts.fetch(
                "SELECT rule_name, count(*) AS raised, count(cleared_at) AS cleared,"
                " min(raised_at) AS first FROM alerts GROUP BY rule_name ORDER BY rule_name"
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
        lines += ["", "alerts per rule (sensormine-collector status; docs/alerts.md):"] + (
            [
                f"  {r['rule_name']:<24} raised {r['raised']}, cleared {r['cleared']},"
                f" first at {r['first'].time().isoformat(timespec='seconds')}"
                for r in alerts
            ]
            or ["  (none)"]
        )
        lines += ["", "More queries to try: docs/data-model.md (psql " + self.timeseries_dsn + ")"]
        return lines


def _chromium() -> Any:
    """scripts/chromium.py, loaded by path (the end-to-end tests load this file by path too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sensormine_chromium", ROOT / "scripts" / "chromium.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    system = LocalSystem(state, name=name, prefix=name.replace("_", "-"), secure=True)
    try:
        print(
            f"demo: preparing databases {system.metadata_dsn} and {system.timeseries_dsn}",
            flush=True,
        )
        system.prepare()
        system.start_broker()
        print(
            f"demo: private broker with the generated configuration (TLS, gateway certificates,"
            f" per-gateway ACL) on 127.0.0.1:{system.ports['cert']}",
            flush=True,
        )
        system.start_collector()
        print("demo: collector ready", flush=True)
        system.start_agents()
        print(f"demo: two agents ready; running for {seconds:.0f} s (logs in {state})", flush=True)
        api_port = int(os.environ.get("DEMO_API_PORT") or free_port())
        url = system.start_api(api_port)
        token = system.api_token()
        print(f"demo: status page {url}/ui/#token={quote(token)}", flush=True)
        print(f"demo: API token of tenant demo: {token} (curl -H 'Authorization: Bearer <token>'"
              f" {url}/api/v1/fleet)", flush=True)  # fmt: skip
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(5.0, seconds - elapsed))
            counts = asyncio.run(system.stored_counts())
            print(
                f"demo: {time.monotonic() - started:5.1f} s  stored={counts['stored']}", flush=True
            )
        run_seconds = time.monotonic() - started
        shots = os.environ.get("DEMO_SCREENSHOT")
        if shots:
            for saved in system.screenshots(token, Path(shots).resolve()):
                print(f"demo: screenshot {saved}", flush=True)
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
    print(f"alerts: raised={counts['alerts_raised']} cleared={counts['alerts_cleared']}")
    print(
        f"demo: produced={produced} stored={counts['stored']}"
        f" quarantined={counts['quarantined']} rejected={counts['rejected']}"
        f" duplicates={counts['duplicates']}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
