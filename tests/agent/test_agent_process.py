"""``sensormine-agent`` as a real process: broker restart, corrupt buffer, signals, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from protocol import decode_status
from tests.agent.conftest import (
    AGENT,
    ROOT,
    Acknowledger,
    agent_cli,
    named,
    start_agent,
    status_json,
    write_config,
)
from tests.services import MosquittoBroker
from tests.waiting import wait_for


def test_broker_restart_loses_nothing(
    tmp_path: Path,
    private_broker: MosquittoBroker,
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """The broker stops while the agent runs and comes back: every reading arrives, once."""
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=private_broker.port,
        prefix=prefix,
        devices=5,
        interval="50ms",
        extra_mqtt='ack_timeout = "2s"',
    )
    ack = acknowledger_factory(private_broker.host, private_broker.port, prefix)
    log = tmp_path / "agent.log"
    agent = start_agent(config, log)
    try:
        wait_for(lambda: len(ack.acked) >= 2)
        private_broker.stop()
        wait_for(lambda: bool(named(log, "link.lost")), what="the agent notices the outage")
        acked = len(ack.acked)
        private_broker.start()
        wait_for(
            lambda: len(named(log, "link.connected")) >= 2 and len(ack.acked) > acked,
            what="the agent reconnected and its batches are acked again",
        )
        assert agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        assert 0 == agent.wait(40)
    finally:
        if agent.poll() is None:
            agent.kill()
    status = status_json(config)
    assert 0 == status["dropped"]
    assert 0 == status["readings"], "the drain left readings behind"
    batches = ack.batches()
    # Counted exactly: what the buffer accepted is what arrived (distinct seqs, no gaps).
    assert status["produced"] == sum(b.point_count for b in batches.values())
    assert list(range(len(batches))) == sorted(batches)
    # Every series has a reading at every tick: nothing went missing across the outage.
    ticks: Counter[tuple[uuid.UUID, str]] = Counter()
    times: set[int] = set()
    for batch in batches.values():
        for series in batch.series:
            ticks[(series.device_id, series.metric)] += len(series.timestamps)
            times.update(series.timestamps)
    assert 20 == len(ticks)
    assert {len(times)} == set(ticks.values())


def test_corrupt_buffer_is_moved_aside_and_agent_runs(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """A corrupt buffer file at start is renamed, an event reports it, the agent ships data."""
    buffer = tmp_path / "buffer.db"
    buffer.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8000)
    config = write_config(
        tmp_path / "agent.toml", buffer=buffer, port=mqtt_address[1], prefix=prefix
    )
    ack = acknowledger_factory(*mqtt_address, prefix)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        wait_for(lambda: len(ack.acked) >= 2)
        agent.send_signal(signal.SIGINT)
        assert 0 == agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
    moved = list(tmp_path.glob("buffer.db.corrupt-*"))
    assert 1 == len([m for m in moved if not m.name.endswith(("-wal", "-shm"))])
    events = [e for b in ack.batches().values() for e in b.events]
    assert "buffer.corrupt" in [e.kind for e in events]
    # The gateway announced itself online (retained), with offline as its will.
    states = [decode_status(s).state for s in ack.statuses]
    assert "online" in states
    # A clean stop leaves the retained status at "offline".
    wait_for(lambda: decode_status(ack.statuses[-1]).state == "offline", timeout=5)


def test_bad_configuration_exits_1_naming_file_key_and_problem(tmp_path: Path) -> None:
    """Each kind of mistake names the file, the key and what is wrong; exit status 1."""
    good = write_config(tmp_path / "good.toml", buffer=tmp_path / "b.db", port=1, prefix="p")
    text = good.read_text()
    cases = {
        "unknown": (
            text.replace("[batch]\n", "[batch]\nmax_point = 5\n"),
            "batch.max_point",
            "unknown key (did you mean 'max_points'?)",
        ),
        "duration": (
            text.replace('reconnect_min = "100ms"', 'reconnect_min = "5 parsecs"'),
            "mqtt.reconnect_min",
            "not a duration",
        ),
        "size": (
            text.replace("[buffer]\n", '[buffer]\nmax_bytes = "lots"\n'),
            "buffer.max_bytes",
            "not a size",
        ),
        "input": (
            text.replace('type = "simulated"', 'type = "telepathy"'),
            'inputs["sim"].type',
            "unknown input type 'telepathy'",
        ),
        "input_key": (
            text.replace("seed = 7", "sede = 7"),
            'inputs["sim"].sede',
            "unknown key (did you mean 'seed'?)",
        ),
        "uuid": (text.replace('[gateway]\nid = "', '[gateway]\nid = "x'), "gateway.id", "UUID"),
    }
    for name, (content, key, problem) in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(content)
        for command in ("run", "check-config"):
            result = agent_cli(command, "--config", str(path))
            assert 1 == result.returncode, (name, command, result.stdout)
            assert str(path) in result.stderr, (name, result.stderr)
            assert key in result.stderr, (name, result.stderr)
            assert problem in result.stderr, (name, result.stderr)
    missing = agent_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert 1 == missing.returncode
    assert "nope.toml" in missing.stderr and "does not exist" in missing.stderr
    assert 0 == agent_cli("check-config", "--config", str(good)).returncode


def test_status_export_verify_and_inputs_commands(tmp_path: Path, prefix: str) -> None:
    """status, buffer export (NDJSON, CSV), buffer verify and inputs list/test on real files."""
    # Port 1 refuses connections: the agent buffers and never ships (and, without a collector's
    # time, seals with its own clock at once).
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=1,
        prefix=prefix,
        devices=3,
        extra_clock='max_wait = "0s"',
    )
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        wait_for(
            lambda: (tmp_path / "buffer.db").exists() and status_json(config)["readings"] >= 100
        )
        live = status_json(config)  # while the agent runs
        assert live["readings"] >= 100
        agent.send_signal(signal.SIGTERM)
        assert 0 == agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
    status = status_json(config)
    for key in (
        "readings",
        "batches",
        "bytes",
        "oldest_age_s",
        "dropped",
        "last_ack_at",
        "produced",
    ):
        assert key in status
    assert status["produced"] == status["readings"]
    assert status["last_ack_at"] is None
    ndjson = agent_cli("buffer", "export", "--config", str(config))
    assert 0 == ndjson.returncode, ndjson.stderr
    lines = [json.loads(line) for line in ndjson.stdout.splitlines()]
    assert status["readings"] == len(lines)
    assert {"seq", "device_id", "metric", "time_us", "value"} == set(lines[0])
    csv_out = agent_cli("buffer", "export", "--config", str(config), "--format", "csv")
    assert status["readings"] + 1 == len(csv_out.stdout.strip().splitlines())
    verify = agent_cli("buffer", "verify", "--config", str(config))
    assert 0 == verify.returncode, verify.stderr
    # A frame changed behind the agent's back is found.
    conn = sqlite3.connect(tmp_path / "buffer.db")
    conn.execute(
        "UPDATE batches SET frame = X'534d0100' WHERE seq = (SELECT MIN(seq) FROM batches)"
    )
    conn.commit()
    conn.close()
    broken = agent_cli("buffer", "verify", "--config", str(config))
    assert 1 == broken.returncode
    assert "does not decode" in broken.stderr

    listing = agent_cli("inputs", "list", "--config", str(config))
    assert 0 == listing.returncode, listing.stderr
    assert "simulated" in listing.stdout and "sim" in listing.stdout
    probe = agent_cli("inputs", "test", "sim", "--config", str(config))
    assert 0 == probe.returncode, probe.stderr
    assert "dev-0" in probe.stdout and "temperature =" in probe.stdout
    unknown = agent_cli("inputs", "test", "nope", "--config", str(config))
    assert 1 == unknown.returncode and "nope" in unknown.stderr


def test_systemd_notify_ready_watchdog_status(tmp_path: Path, prefix: str) -> None:
    """Under systemd the agent sends READY=1, WATCHDOG=1 and STATUS= to NOTIFY_SOCKET."""
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=1,
        prefix=prefix,
        extra_runtime='status_interval = "200ms"',
    )
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    agent = subprocess.Popen(
        [*AGENT, "run", "--config", str(config)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
            any("READY=1" in m for m in messages) and sum("WATCHDOG=1" in m for m in messages) >= 2
        ):
            messages.append(sock.recv(4096).decode())
        agent.send_signal(signal.SIGTERM)
        assert 0 == agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
        sock.close()
    assert any("READY=1" in m for m in messages)
    assert sum("WATCHDOG=1" in m for m in messages) >= 2
    assert any("STATUS=link" in m for m in messages)


def test_killed_agent_is_reported_offline_by_its_will(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """kill -9: the broker publishes the retained ``offline`` will after the keepalive lapses."""
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=mqtt_address[1],
        prefix=prefix,
        extra_mqtt='keepalive = "5s"',
    )
    ack = acknowledger_factory(*mqtt_address, prefix)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        wait_for(lambda: any(decode_status(s).state == "online" for s in ack.statuses))
    finally:
        agent.kill()
        agent.wait(10)
    wait_for(lambda: decode_status(ack.statuses[-1]).state == "offline", timeout=20)


def _queue_full(address: str) -> bool:
    """Whether the datagram queue of the socket bound at ``address`` refuses one more datagram."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.sendto(b"PROBE=1", socket.MSG_DONTWAIT, address)
        except BlockingIOError:
            return True
    return False


def test_unread_notify_socket_never_stalls_the_agent(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """A notify socket nobody reads (its queue full) costs datagrams, not the event loop.

    A blocking ``sendto`` to a full AF_UNIX datagram queue waits forever: the agent kept
    running its inputs' threads but stopped shipping and ignored SIGTERM.
    """
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=mqtt_address[1],
        prefix=prefix,
        extra_runtime='status_interval = "50ms"\ndrain_timeout = "5s"',
    )
    ack = acknowledger_factory(*mqtt_address, prefix)
    address = str(tmp_path / "notify.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(address)  # and never read: its queue fills after net.unix.max_dgram_qlen datagrams
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="100000")
    log_path = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [*AGENT, "run", "--config", str(config)],
        env=env,
        cwd=ROOT,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _queue_full(address), timeout=30)
        # The agent still ships after its notifications started bouncing off the full queue.
        shipped = len(ack.frames)
        wait_for(lambda: len(ack.frames) >= shipped + 3, timeout=30)
        assert "systemd.notify_dropped" in log_path.read_text()
        agent.send_signal(signal.SIGTERM)
        # Drain deadline 5 s, plus the shipper's 5 s to say offline, plus start-up slack.
        code = agent.wait(20)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        peer.close()
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert 0 == code, log_path.read_text()[-2000:]
    assert "agent.stopping" in events and "agent.stopped" in events
