"""Scale-out: three collector processes in one shared-subscription group on one broker take
1,000,000 readings from 20 gateways; the stored count is exact, each collector takes a share,
and one collector killed with SIGKILL in the middle of the run changes nothing in the result.

The 20 gateways are a load generator in the test process that follows the agent's delivery
contract (a batch is sealed once and resent byte-identical until its ack arrives, a window of
batches in flight): twenty agent processes with inputs fast enough to produce a million readings
would measure this machine's two cores rather than the collectors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol import (
    AckResult,
    Batch,
    Series,
    TopicKind,
    Value,
    build_topic,
    decode_ack,
    encode_frame,
)
from tests.ops.conftest import Databases, register_site
from tests.ops.units import REPO
from tests.services import MosquittoBroker, free_port

GATEWAYS = 20
DEVICES_PER_GATEWAY = 5
BATCHES_PER_GATEWAY = 50
POINTS_PER_SERIES = 100
METRICS = ("temperature", "humidity")
READINGS = GATEWAYS * BATCHES_PER_GATEWAY * DEVICES_PER_GATEWAY * len(METRICS) * POINTS_PER_SERIES
COLLECTORS = 3
GROUP = "scale-out"
WINDOW = 8
ACK_TIMEOUT_S = 5.0
# Within pytest's 300 s timeout, with time left for set-up and the collectors' drain.
RUN_LIMIT_S = 150
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "temperature": {"type": "number", "minimum": -40, "maximum": 85},
        "humidity": {"type": "number", "minimum": 0, "maximum": 100},
    },
}


@dataclass
class Gateway:
    """One simulated gateway: sealed frames, resent until acknowledged, WINDOW in flight."""

    gateway_id: uuid.UUID
    tenant_id: uuid.UUID
    prefix: str
    host: str
    port: int
    frames: list[bytes]
    stream: uuid.UUID
    acked: dict[int, str] = field(default_factory=dict)
    sent_at: dict[int, float] = field(default_factory=dict)
    sends: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Connect and subscribe to this gateway's own ack topic."""
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=str(self.gateway_id),
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        subscribed = threading.Event()
        self.client.on_message = self._on_ack
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        self.client.subscribe(
            build_topic(self.prefix, self.tenant_id, self.gateway_id, TopicKind.ACK), qos=1
        )
        assert subscribed.wait(10), f"gateway {self.gateway_id} could not subscribe to its acks"

    def _on_ack(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        ack = decode_ack(message.payload)
        if ack.stream == self.stream:
            with self.lock:
                self.acked.setdefault(ack.seq, ack.result.value)

    def pump(self) -> None:
        """Send what the window allows: new batches, and batches whose ack is overdue."""
        now = time.monotonic()
        topic = build_topic(self.prefix, self.tenant_id, self.gateway_id, TopicKind.TELEMETRY)
        with self.lock:
            waiting = [s for s in range(len(self.frames)) if s not in self.acked][:WINDOW]
        for seq in waiting:
            sent = self.sent_at.get(seq)
            if sent is None or now - sent > ACK_TIMEOUT_S:
                self.client.publish(topic, self.frames[seq], qos=1)
                self.sent_at[seq] = now
                self.sends += 1

    @property
    def done(self) -> bool:
        """Every batch acknowledged."""
        with self.lock:
            return len(self.acked) == len(self.frames)

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def make_frames(gateway: uuid.UUID, devices: list[uuid.UUID], stream: uuid.UUID) -> list[bytes]:
    """BATCHES_PER_GATEWAY sealed batches; every (device, metric, time) occurs once."""
    base = time.time_ns() // 1000 - 3_600_000_000
    frames = []
    for seq in range(BATCHES_PER_GATEWAY):
        series = []
        for d, device in enumerate(devices):
            for m, metric in enumerate(METRICS):
                start = base + (seq * POINTS_PER_SERIES) * 1000
                stamps = [start + i * 1000 for i in range(POINTS_PER_SERIES)]
                values: list[Value] = [
                    20.0 + ((seq + i + d + m) % 50) / 10 for i in range(POINTS_PER_SERIES)
                ]
                series.append(
                    Series(device_id=device, metric=metric, timestamps=stamps, values=values)
                )
        batch = Batch(gateway_id=gateway, stream=stream, seq=seq, created=base, series=series)
        frames.append(encode_frame(batch))
    return frames


@dataclass
class CollectorProcess:
    """One ``sensormine-collector run`` child with its own client id and metrics port."""

    name: str
    process: subprocess.Popen[bytes]
    metrics_port: int
    notify: socket.socket

    def accepted(self) -> float:
        """``sensormine_collector_points_accepted_total`` from its metrics endpoint."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            text = r.read().decode()
        match = re.search(r"^sensormine_collector_points_accepted_total (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the collector has told systemd's notify socket READY=1."""
        deadline = time.monotonic() + timeout
        self.notify.settimeout(0.5)
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (
                f"collector {self.name} exited with {self.process.returncode}"
            )
            try:
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                continue
        raise TimeoutError(f"collector {self.name} not ready after {timeout} s")


def start_collector(
    name: str, dbs: Databases, broker: MosquittoBroker, prefix: str, workdir: Path
) -> CollectorProcess:
    """Start a collector of the shared group, the way its unit would (notify socket, config)."""
    port = free_port()
    config = workdir / f"collector-{name}.toml"
    config.write_text(
        f'[metadata]\ndsn = "{dbs.metadata}"\n[timeseries]\ndsn = "{dbs.timeseries}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "{prefix}"\n'
        f'client_id = "{prefix}-{name}"\ngroup = "{GROUP}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n[log]\nlevel = "info"\nformat = "json"\n'
    )
    notify_path = workdir / f"notify-{name}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    log = open(workdir / f"collector-{name}.log", "wb")  # noqa: SIM115 - the child writes it
    process = subprocess.Popen(
        [sys.executable, "-m", "collector", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return CollectorProcess(name, process, port, notify)


async def stall_report(
    dbs: Databases, gateways: list[Gateway], collectors: list[CollectorProcess], workdir: Path
) -> str:
    """What a stalled run looks like: unacked batches, ledger, collectors and their logs."""
    conn = await asyncpg.connect(dbs.timeseries)
    try:
        ledger = await conn.fetchval("SELECT count(*) FROM ingest_ledger")
    finally:
        await conn.close()
    lines = [f"not every batch was acknowledged in {RUN_LIMIT_S} s; ledger has {ledger} batches"]
    for g in gateways:
        missing = [s for s in range(len(g.frames)) if s not in g.acked]
        if missing:
            lines.append(f"gateway {g.gateway_id}: {len(missing)} unacked, first {missing[:5]}")
    for c in collectors:
        state = "running" if c.process.poll() is None else f"exited {c.process.returncode}"
        log = (workdir / f"collector-{c.name}.log").read_text()[-2000:]
        lines.append(f"collector {c.name} {state}; log tail:\n{log}")
    return "\n".join(lines)


async def test_three_collectors_store_a_million_readings_exactly_despite_a_sigkill(
    databases: Databases, tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """20 gateways, 1,000,000 readings, 3 collectors in one group, one killed mid-run: every
    reading stored exactly once, every batch acked, every collector took a share."""
    site = await register_site(
        databases.metadata,
        name="scale",
        schema=SCHEMA,
        gateways=GATEWAYS,
        devices=DEVICES_PER_GATEWAY,
    )
    broker = MosquittoBroker(tmp_path / "broker", extra_config="max_inflight_messages 100\n")
    broker.start()
    assert broker.process is not None
    children.append(broker.process)
    prefix = f"scale{uuid.uuid4().hex[:6]}"
    collectors = [start_collector(n, databases, broker, prefix, tmp_path) for n in "abc"]
    children.extend(c.process for c in collectors)
    gateways = []
    try:
        for c in collectors:
            c.wait_ready()
        for gateway_id, devices in site.devices.items():
            stream = uuid.uuid4()
            gw = Gateway(
                gateway_id,
                site.tenant,
                prefix,
                broker.host,
                broker.port,
                make_frames(gateway_id, devices, stream),
                stream,
            )
            gw.start()
            gateways.append(gw)

        victim = collectors[1]
        victim_share = 0.0
        killed_at = None
        started = time.monotonic()
        total_batches = GATEWAYS * BATCHES_PER_GATEWAY
        while not all(g.done for g in gateways):
            if time.monotonic() - started > RUN_LIMIT_S:
                raise AssertionError(await stall_report(databases, gateways, collectors, tmp_path))
            for g in gateways:
                g.pump()
            acked = sum(len(g.acked) for g in gateways)
            if killed_at is None and acked >= total_batches * 0.35:
                victim_share = victim.accepted()
                if victim_share > 0:
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)
                    killed_at = acked
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        shares = {c.name: (victim_share if c is victim else c.accepted()) for c in collectors}

        conn = await asyncpg.connect(databases.timeseries)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM readings")
            distinct = await conn.fetchval(
                "SELECT count(*) FROM (SELECT DISTINCT device_id, metric, time FROM readings) AS d"
            )
            ledger = await conn.fetchval("SELECT count(*) FROM ingest_ledger")
            rejects = await conn.fetchval("SELECT count(*) FROM ingest_rejects")
        finally:
            await conn.close()
        results = [r for g in gateways for r in g.acked.values()]
        sends = sum(g.sends for g in gateways)
        print(
            f"scale-out: {READINGS} readings from {GATEWAYS} gateways in {elapsed:.1f} s "
            f"({READINGS / elapsed:,.0f} readings/s), {total_batches} batches, {sends} sends, "
            f"collector b killed after {killed_at} acked batches; accepted per collector {shares}; "
            f"acks {dict((r, results.count(r)) for r in set(results))}"
        )
        assert killed_at is not None, "the victim never took a share before the end of the run"
        assert (READINGS, READINGS, total_batches, 0) == (stored, distinct, ledger, rejects)
        assert set(results) <= {AckResult.OK.value, AckResult.DUPLICATE.value}
        assert all(share > 0 for share in shares.values()), shares
        # The survivors drain and exit 0 within the units' TimeoutStopSec (40 s).
        for c in collectors:
            if c is not victim:
                c.process.send_signal(signal.SIGTERM)
                assert 0 == c.process.wait(40)
    finally:
        for g in gateways:
            g.stop()
        for c in collectors:
            if c.process.poll() is None:
                c.process.send_signal(signal.SIGTERM)
                try:
                    c.process.wait(20)
                except subprocess.TimeoutExpired:
                    c.process.kill()
                    c.process.wait()
            c.notify.close()
        broker.stop()
