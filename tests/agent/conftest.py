"""What the agent tests share: a test acknowledger on the real broker, config files, processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import (
    Ack,
    AckResult,
    Batch,
    TimeReply,
    TimeRequest,
    TopicKind,
    build_topic,
    decode_batch,
    decode_frame,
    encode_frame,
    parse_topic,
)

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agent"]

# Decides what to answer to a batch: (batch, how many times this key arrived) -> a result (the
# acknowledger fills in the counts), a whole ack frame, or None (no answer).
Policy = Callable[[Batch, int], AckResult | Ack | None]
Key = tuple[uuid.UUID, int]
"""A batch's key in the collector's ledger (besides the gateway): (stream, seq)."""


def ack_everything(batch: Batch, seen: int) -> AckResult | Ack | None:
    """Answer every batch with ``ok``."""
    return AckResult.OK


def content_digest(batch: Batch) -> str:
    """What a ledger keeps of a batch's content (everything but its key)."""
    content = (
        batch.created,
        [(s.device_id, s.metric, s.timestamps, s.values) for s in batch.series],
        [(e.time, e.device_id, e.kind, e.message) for e in batch.events],
        [(d.time, d.device_id, d.status, d.reason) for d in batch.status],
    )
    return hashlib.sha256(repr(content).encode()).hexdigest()


@dataclass
class Ledger:
    """A policy that plays the collector's ingest ledger: a digest of the content per key.

    A new key is committed (``ok``); the same key with the same content is a ``duplicate``; the
    same key with other content is a ``conflict`` (never a duplicate). ``conflict_keys`` are
    answered ``conflict`` however they look (as if a rolled-back buffer had reused them), and
    ``silent`` keys get no answer while they are in that set.
    """

    committed: dict[Key, str] = field(default_factory=dict)
    batches: dict[Key, Batch] = field(default_factory=dict)
    answers: list[tuple[Key, AckResult]] = field(default_factory=list)
    conflict_keys: set[Key] = field(default_factory=set)
    silent: set[Key] = field(default_factory=set)
    offered: dict[str, Batch] = field(default_factory=dict)

    def __call__(self, batch: Batch, seen: int) -> AckResult | None:
        """Answer as the ledger would."""
        key = (batch.stream, batch.seq)
        digest = content_digest(batch)
        self.offered[digest] = batch
        if key in self.silent:
            return None
        if key in self.conflict_keys:
            result = AckResult.CONFLICT
        elif key not in self.committed:
            self.committed[key] = digest
            self.batches[key] = batch
            result = AckResult.OK
        elif self.committed[key] == digest:
            result = AckResult.DUPLICATE
        else:
            result = AckResult.CONFLICT
        self.answers.append((key, result))
        return result

    def committed_readings(self) -> int:
        """Readings in committed batches."""
        return sum(b.point_count for b in self.batches.values())


@dataclass
class Acknowledger:
    """Plays the collector on the real broker: receives batch frames and publishes ack frames.

    Records every frame it receives (seq -> list of the exact bytes), so tests can check that a
    resend is byte-identical, and acknowledges according to ``policy``. Like the collector, it
    answers time requests with its clock and puts its clock in the acks of batches that say how
    their times were taken.
    """

    host: str
    port: int
    prefix: str
    policy: Policy = ack_everything
    frames: dict[int, list[bytes]] = field(default_factory=dict)
    acked: dict[int, AckResult] = field(default_factory=dict)
    by_key: dict[Key, list[bytes]] = field(default_factory=dict)
    received: list[tuple[float, Key]] = field(default_factory=list)
    answered: list[tuple[float, Key, AckResult]] = field(default_factory=list)
    statuses: list[bytes] = field(default_factory=list)
    time_requests: int = 0
    hold: list[tuple[str, Ack]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: mqtt.Client | None = None

    def start(self) -> Acknowledger:
        """Connect (persistent session, so nothing is lost while the broker restarts)."""
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"ack-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.reconnect_delay_set(0.2, 1.0)  # type: ignore[arg-type]  # paho takes floats; its hint says int
        self._client = client
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        client.connect(self.host, self.port, keepalive=10, clean_start=False, properties=props)
        client.loop_start()
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Disconnect."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(f"{self.prefix}/v1/+/+/telemetry", qos=1)
        client.subscribe(f"{self.prefix}/v1/+/+/status", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        address = parse_topic(message.topic, self.prefix)
        payload = bytes(message.payload)
        if address.kind == TopicKind.STATUS:
            with self._lock:
                self.statuses.append(payload)
            return
        frame = decode_frame(payload)
        if isinstance(frame, TimeRequest):
            reply = TimeReply(sent=frame.sent, time=time.time_ns() // 1000)
            topic = build_topic(self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK)
            with self._lock:
                self.time_requests += 1
            client.publish(topic, encode_frame(reply), qos=0)
            return
        assert isinstance(frame, Batch)
        batch = frame
        key = (batch.stream, batch.seq)
        with self._lock:
            self.frames.setdefault(batch.seq, []).append(payload)
            self.by_key.setdefault(key, []).append(payload)
            self.received.append((time.monotonic(), key))
            seen = len(self.by_key[key])
            answer = self.policy(batch, seen)
        if answer is None:
            return
        if isinstance(answer, Ack):
            ack = answer
        else:
            refused = answer == AckResult.REJECTED
            stored = answer in (AckResult.OK, AckResult.DUPLICATE)
            ack = Ack(
                stream=batch.stream,
                seq=batch.seq,
                result=answer,
                accepted=batch.point_count if stored else 0,
                rejected=batch.point_count if refused else 0,
                reason="unknown_gateway" if refused else "",
            )
        if batch.clock is not None and ack.time is None:
            ack = ack.model_copy(update={"time": time.time_ns() // 1000})
        topic = build_topic(self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK)
        with self._lock:
            self.acked[batch.seq] = ack.result
            self.answered.append((time.monotonic(), key, ack.result))
        client.publish(topic, encode_frame(ack), qos=1)

    def send_ack(self, tenant: uuid.UUID, gateway: uuid.UUID, ack: Ack) -> None:
        """Publish an ack frame now (for out-of-order answers)."""
        assert self._client is not None
        topic = build_topic(self.prefix, tenant, gateway, TopicKind.ACK)
        self._client.publish(topic, encode_frame(ack), qos=1).wait_for_publish(5)

    def batches(self) -> dict[int, Batch]:
        """The first frame received for every seq, decoded."""
        with self._lock:
            return {seq: decode_batch(frames[0]) for seq, frames in self.frames.items()}

    def readings(self) -> int:
        """Readings in distinct batches received."""
        return sum(b.point_count for b in self.batches().values())


@pytest.fixture
def prefix() -> str:
    """A topic prefix of the test's own."""
    return f"smtest{uuid.uuid4().hex[:10]}"


def device_ids(n: int, seed: int = 0) -> list[uuid.UUID]:
    """``n`` stable device ids."""
    return [uuid.uuid5(uuid.NAMESPACE_URL, f"sensormine-test-{seed}-{i}") for i in range(n)]


def write_config(
    path: Path,
    *,
    buffer: Path,
    port: int,
    prefix: str,
    gateway: uuid.UUID | None = None,
    tenant: uuid.UUID | None = None,
    devices: int = 2,
    interval: str = "100ms",
    extra_buffer: str = "",
    extra_mqtt: str = "",
    extra_batch: str = "",
    extra_runtime: str = "",
    extra_clock: str = "",
) -> Path:
    """Write an agent configuration with one simulated input; return its path."""
    gateway = gateway or uuid.uuid4()
    tenant = tenant or uuid.uuid4()
    devs = "".join(
        f'\n[[inputs.devices]]\nid = "{d}"\nname = "dev-{i}"\n'
        for i, d in enumerate(device_ids(devices))
    )
    path.write_text(
        f"""
[gateway]
id = "{gateway}"
tenant_id = "{tenant}"

[buffer]
path = "{buffer}"
{extra_buffer}

[batch]
{extra_batch}

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{prefix}"
reconnect_min = "100ms"
reconnect_max = "1s"
{extra_mqtt}

[runtime]
{extra_runtime}

[clock]
{extra_clock}

[log]
format = "json"

[[inputs]]
type = "simulated"
name = "sim"
interval = "{interval}"
seed = 7
{devs}
"""
    )
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``sensormine-agent run`` as a child process, its log in ``log``."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(
        [*AGENT, "run", "--config", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )


def log_events(path: Path) -> list[dict[str, Any]]:
    """The agent's JSON log lines, parsed (lines that are not JSON are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def named(path: Path, event: str) -> list[dict[str, Any]]:
    """The agent's log lines of ``event``."""
    return [e for e in log_events(path) if e.get("event") == event]


def agent_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a ``sensormine-agent`` command to completion."""
    return subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, cwd=ROOT, check=check, timeout=60
    )


def status_json(config: Path) -> dict[str, Any]:
    """``sensormine-agent status --json``, parsed."""
    result = agent_cli("status", "--config", str(config), "--json")
    assert 0 == result.returncode, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def acknowledger_factory() -> Iterator[Callable[..., Acknowledger]]:
    """Start acknowledgers that are stopped at the end of the test."""
    started: list[Acknowledger] = []

    def make(host: str, port: int, prefix: str, policy: Policy = ack_everything) -> Acknowledger:
        ack = Acknowledger(host, port, prefix, policy).start()
        started.append(ack)
        return ack

    yield make
    for a in started:
        a.stop()
