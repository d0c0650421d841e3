"""Real services that tests start for themselves: a Mosquitto broker and a PostgreSQL cluster.

Tests that only publish or query use the machine's running services (``make setup`` ensures
they are up); a test that stops, restarts or reconfigures a service starts its own here, on a
free port, so that nothing else is disturbed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SYSTEM_MQTT = ("127.0.0.1", 1883)
SYSTEM_PG_DSN = os.environ.get(
    "SENSORMINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Block until ``host:port`` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


class MosquittoBroker:
    """A private Mosquitto on a free port, with persistence, that a test may stop and start."""

    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else ""
        self.config_path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            + (f"user {user}\n" if user else "")
            + extra_config
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the broker and wait until it listens."""
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(
            [exe, "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.host, self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves its persistence file; SIGKILL does not)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)
        self.process = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pg_bindir() -> Path:
    out = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    ).stdout.split()
    version = out[0] if out else "15"
    return Path(f"/usr/lib/postgresql/{version}/bin")


class PostgresCluster:
    """A private PostgreSQL cluster (initdb/pg_ctl) on a free port with TimescaleDB preloaded."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.bindir = _pg_bindir()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: the cluster belongs to the postgres account.
            self._as_user = ["runuser", "-u", "postgres", "--"]
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def dsn(self) -> str:
        """Connection URL of the cluster's ``postgres`` database."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        """Connection URL of ``database`` on this cluster."""
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True)

    def init(self) -> None:
        """Create the cluster's data directory."""
        if self._as_user:
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.datadir}'\n"
                "shared_preload_libraries = 'timescaledb'\nfsync = off\n"
                "timescaledb.telemetry_level = off\nmax_connections = 50\n"
            )

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        if not self.datadir.exists():
            self.init()
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.workdir / "log"),
            "-w",
            "-t",
            "30",
            "start",
        )
        wait_for_port(self.host, self.port)

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (``fast`` rolls back open transactions; ``immediate`` is a crash)."""
        if (self.datadir / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"
            )

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
