"""The mqtt input keeps what devices publish with QoS 1 across agent crashes and restarts.

A real ``sensormine-agent run`` against a private Mosquitto: a device publishes QoS 1
readings at 200/s while the agent is SIGKILLed and restarted, then stopped with SIGTERM and
restarted. The persistent session keeps what is published meanwhile, and messages are
acknowledged only after their readings are committed to the buffer, so every reading ends
up in the buffer file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer import open_store_readonly
from protocol import decode_batch
from tests.services import MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]
DEVICE = uuid.uuid4()
RATE = 200  # messages (one reading each) per second


def write_config(tmp_path: Path, broker: MosquittoBroker, prefix: str, **input_keys: str) -> Path:
    """An agent with no uplink (batches stay in the buffer) and one mqtt input."""
    extra = "".join(f"{key} = {value}\n" for key, value in input_keys.items())
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[gateway]
id = "{uuid.uuid4()}"
tenant_id = "{uuid.uuid4()}"

[buffer]
path = "{tmp_path / "buffer.db"}"

[mqtt]
host = "127.0.0.1"
port = 1

[clock]
# No collector gives the time here: seal with the gateway's clock at once.
max_wait = "0s"

[log]
format = "json"

[[inputs]]
type = "mqtt"
name = "site"
host = "127.0.0.1"
port = {broker.port}
client_id = "agent-{prefix}"
reconnect_min = "1s"
reconnect_max = "1s"
{extra}
[[inputs.subscriptions]]
topic = "{prefix}/+/data"
device_level = 1
fields = {{ n = "n" }}
time_path = "t"

[[inputs.devices]]
id = "{DEVICE}"
name = "meter"
"""
    )
    return path


class Agent:
    """One ``sensormine-agent run`` process; ``connected`` waits for its site-broker session."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = log_path

    def wait_connected(self, count: int, within: float = 30.0) -> None:
        """Wait until the log shows ``count`` connections of the mqtt input in total."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            lines = self.log_path.read_text().splitlines()
            if sum('"mqtt_input.connected"' in line for line in lines) >= count:
                time.sleep(0.5)  # the SUBACK follows the CONNACK
                return
            time.sleep(0.05)
        raise AssertionError(f"the agent did not connect to the site broker within {within}s")

    def stop(self, sig: int) -> None:
        """Send ``sig`` and wait for the process to end."""
        self.process.send_signal(sig)
        self.process.wait(60)
        self._log.close()


class Device:
    """Publishes {"n": i, "t": <µs>} with QoS 1 at RATE per second from its own thread."""

    def __init__(self, broker: MosquittoBroker, prefix: str) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"device-{prefix}",
        )
        self.client.max_queued_messages_set(0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.topic = f"{prefix}/meter/data"
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, daemon=True)

    def _publish(self) -> None:
        started = time.monotonic()
        infos = []
        while not self._stop.is_set():
            due = started + self.sent / RATE
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            payload = json.dumps({"n": self.sent, "t": 1_700_000_000_000_000 + self.sent})
            infos.append(self.client.publish(self.topic, payload, qos=1))
            self.sent += 1
        for info in infos:
            info.wait_for_publish(10)

    def start(self) -> None:
        """Begin publishing."""
        self._thread.start()

    def finish(self) -> int:
        """Stop publishing, wait for the broker's acks; how many readings were published."""
        self._stop.set()
        self._thread.join(30)
        self.client.disconnect()
        self.client.loop_stop()
        return self.sent


def buffered_values(buffer: Path) -> list[int]:
    """Every value of metric ``n`` in the buffer's sealed batches."""
    store = open_store_readonly(buffer)
    frames = [bytes(f) for (f,) in store.conn.execute("SELECT frame FROM batches ORDER BY seq")]
    unsealed = store.conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    store.conn.close()
    assert 0 == unsealed  # SIGTERM seals everything
    return [
        int(v)  # type: ignore[arg-type]
        for frame in frames
        for series in decode_batch(frame).series
        if series.metric == "n"
        for v in series.values
    ]


@pytest.mark.slow
def test_qos1_readings_survive_a_crash_and_a_restart(
    tmp_path: Path, private_broker: MosquittoBroker
) -> None:
    """SIGKILL (4 s down) and SIGTERM (3 s down) at 200 readings/s: every reading is buffered.

    A graceful stop acknowledges exactly what it committed, so it duplicates nothing; a
    SIGKILL can only duplicate what was committed in the instant before the acknowledgement.
    """
    prefix = f"session-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, private_broker, prefix)
    log_path = tmp_path / "agent.log"
    agent = Agent(config, log_path)
    agent.wait_connected(1)
    device = Device(private_broker, prefix)
    device.start()
    try:
        time.sleep(3)
        agent.stop(signal.SIGKILL)
        time.sleep(4)
        agent = Agent(config, log_path)
        agent.wait_connected(2)
        time.sleep(3)
        agent.stop(signal.SIGTERM)
        time.sleep(3)
        agent = Agent(config, log_path)
        agent.wait_connected(3)
        time.sleep(2)
    finally:
        sent = device.finish()
    time.sleep(2)
    agent.stop(signal.SIGTERM)
    values = buffered_values(tmp_path / "buffer.db")
    assert set(range(sent)) == set(values)
    duplicated = sum(count - 1 for count in Counter(values).values())
    # At most what one read interval and two commit intervals (0.5 s + 2 x 100 ms) hold at
    # 200/s, from the SIGKILL alone.
    assert duplicated <= RATE * 7 // 10 + 10, duplicated


@pytest.mark.slow
def test_a_clean_session_loses_what_is_published_while_the_agent_is_away(
    tmp_path: Path, private_broker: MosquittoBroker
) -> None:
    """With session_expiry = "0s" the broker keeps nothing: the counter-proof of the above."""
    prefix = f"session-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, private_broker, prefix, session_expiry='"0s"')
    log_path = tmp_path / "agent.log"
    agent = Agent(config, log_path)
    agent.wait_connected(1)
    device = Device(private_broker, prefix)
    device.start()
    try:
        time.sleep(2)
        agent.stop(signal.SIGKILL)
        time.sleep(3)
        agent = Agent(config, log_path)
        agent.wait_connected(2)
        time.sleep(2)
    finally:
        sent = device.finish()
    time.sleep(2)
    agent.stop(signal.SIGTERM)
    values = set(buffered_values(tmp_path / "buffer.db"))
    assert len(set(range(sent)) - values) >= RATE * 2  # about 3 s of readings missing
