"""Benchmark: the mqtt input's cost against the simulated input at the same load, and overload.

Two ``sensormine-agent run`` processes at once, both shipping to a private Mosquitto where a
small acknowledger in this process answers every batch (so each agent does all its real work:
commit, seal, publish, ack, delete):

- the *mqtt* agent reads 50 devices x 4 metrics at 1 Hz that a publisher process sends to the
  same broker as JSON messages (one message per device per second, QoS 0, the way Tasmota and
  Zigbee2MQTT publish telemetry);
- the *simulated* agent produces the same 50 x 4 readings per second by itself (the baseline).

After a warm-up, each agent's CPU time is measured over ``--seconds``. Then the mqtt agent alone
is offered rising rates (doubling from 1,000 readings/s, then two bisections) to find its
capacity: the most it delivered (readings acknowledged per second) at a rate it took whole
(nothing dropped, at least 90 % acknowledged within the window). Offered
1.5 x that capacity, delivery must stay at or above 0.8 x capacity, and what the input cannot
take is dropped at the input and counted (``mqtt_input.overload``).

Targets: mqtt_cpu <= 1.0 % of one core at the reference load; at 1.5 x capacity, delivery
>= 0.8 x capacity with every drop counted. The last line is
``inputs: mqtt_cpu=<pct> simulated_cpu=<pct> ratio=<x>``.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.sharedctypes
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import click
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import (  # noqa: E402
    Ack,
    AckResult,
    TopicKind,
    build_topic,
    decode_batch,
    encode_frame,
    parse_topic,
)
from tests.services import MosquittoBroker  # noqa: E402

DEVICES = 50
METRICS = ("temperature", "humidity", "pressure", "co2")
# A rate is taken whole when nothing is dropped and this share is acknowledged in the window
# (batches are acknowledged whole, about one a second at low rates: a window of ten seconds
# can miss one).
TAKEN = 0.9


class Acknowledger:
    """Answers every batch with ``ok`` and counts the readings of each agent by gateway."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.readings: dict[uuid.UUID, int] = {}
        self.dropped: dict[uuid.UUID, int] = {}  # from the agents' mqtt_input.overload events
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-ack-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"{prefix}/v1/+/+/telemetry", qos=1)
        # What the broker received, so "offered" is what reached it, not what was queued.
        self.broker_received = (0, time.monotonic())  # (count, when it arrived)
        self.client.subscribe("$SYS/broker/publish/messages/received", qos=0)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic.startswith("$SYS/"):
            self.broker_received = (int(message.payload), time.monotonic())
            return
        batch = decode_batch(bytes(message.payload))
        dropped = sum(
            int(e.attributes.get("dropped", 0))
            for e in batch.events
            if e.kind == "mqtt_input.overload"
        )
        with self._lock:
            self.readings[batch.gateway_id] = (
                self.readings.get(batch.gateway_id, 0) + batch.point_count
            )
            self.dropped[batch.gateway_id] = self.dropped.get(batch.gateway_id, 0) + dropped
        address = parse_topic(message.topic, self.prefix)
        ack = Ack(
            stream=batch.stream, seq=batch.seq, result=AckResult.OK, accepted=batch.point_count
        )
        topic = build_topic(self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK)
        client.publish(topic, encode_frame(ack), qos=1)

    def count(self, gateway: uuid.UUID) -> int:
        """Readings acknowledged so far for ``gateway``."""
        with self._lock:
            return self.readings.get(gateway, 0)

    def drops(self, gateway: uuid.UUID) -> int:
        """Messages ``gateway``'s mqtt input reported dropped so far."""
        with self._lock:
            return self.dropped.get(gateway, 0)

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def publish(
    port: int,
    prefix: str,
    messages_per_s: float,
    stop: multiprocessing.synchronize.Event,
    sent: multiprocessing.sharedctypes.Synchronized[int],
) -> None:
    """Publish one JSON message of 4 metrics per device in turn at ``messages_per_s`` (QoS 0)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-devices-{uuid.uuid4().hex[:8]}",
    )
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = [
        json.dumps({m: round(20 + i * 0.1 + j, 2) for j, m in enumerate(METRICS)}).encode()
        for i in range(DEVICES)
    ]
    topics = [f"{prefix}/dev/d{i:02d}/state" for i in range(DEVICES)]
    started = time.monotonic()
    count = 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * messages_per_s)
        while count < due and not stop.is_set():
            device = count % DEVICES
            client.publish(topics[device], payloads[device], qos=0)
            count += 1
            if count % 500 == 0:
                sent.value = count
        sent.value = count
        time.sleep(0.005)
    client.disconnect()
    client.loop_stop()


class Publisher:
    """The devices: a process of their own, so their CPU is not counted against an agent."""

    def __init__(self, port: int, prefix: str, messages_per_s: float) -> None:
        self._stop = multiprocessing.Event()
        self.sent = multiprocessing.Value("q", 0)
        self.process = multiprocessing.Process(
            target=publish, args=(port, prefix, messages_per_s, self._stop, self.sent)
        )
        self.process.start()

    def stop(self) -> int:
        """Stop publishing; how many messages were sent."""
        self._stop.set()
        self.process.join(30)
        return int(self.sent.value)


def agent_config(path: Path, port: int, prefix: str, inputs: str) -> uuid.UUID:
    """Write an agent configuration shipping to the private broker; its gateway id."""
    gateway = uuid.uuid4()
    path.write_text(
        f"""
[gateway]
id = "{gateway}"
tenant_id = "{uuid.uuid4()}"
[buffer]
path = "{path.with_suffix(".db")}"
[mqtt]
port = {port}
topic_prefix = "{prefix}"
[log]
format = "json"
level = "warning"
{inputs}
"""
    )
    return gateway


def device_id(i: int) -> uuid.UUID:
    """The id of bench device ``i`` (the same for both agents)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"bench-inputs-{i}")


def mqtt_inputs(port: int, prefix: str) -> str:
    """The mqtt input: the 50 devices publishing 4 metrics as one JSON object each."""
    fields = ", ".join(f'{m} = "{m}"' for m in METRICS)
    devices = "".join(
        f'[[inputs.devices]]\nid = "{device_id(i)}"\nname = "d{i:02d}"\n' for i in range(DEVICES)
    )
    return (
        f'[[inputs]]\ntype = "mqtt"\nname = "site"\nport = {port}\n'
        f'[[inputs.subscriptions]]\ntopic = "{prefix}/dev/+/state"\ndevice_level = 2\n'
        f"fields = {{ {fields} }}\n{devices}"
    )


def simulated_inputs() -> str:
    """The simulated input: the same 50 devices x 4 metrics at 1 Hz."""
    devices = "".join(
        f'[[inputs.devices]]\nid = "{device_id(i)}"\nname = "d{i:02d}"\n' for i in range(DEVICES)
    )
    return f'[[inputs]]\ntype = "simulated"\nname = "sim"\ninterval = "1s"\n{devices}'


class Agent:
    """A ``sensormine-agent run`` child process whose log is kept for the drop counts."""

    def __init__(self, config: Path) -> None:
        self.log_path = config.with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.process.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far (all threads)."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self._log.close()
        return code


def offer(
    ack: Acknowledger,
    gateway: uuid.UUID,
    port: int,
    prefix: str,
    readings_per_s: float,
    seconds: float,
) -> tuple[float, float, int]:
    """Offer ``readings_per_s`` for ``seconds`` after 3 s of settling: the rate actually offered,
    the readings acknowledged per second, and the messages the input dropped (counted)."""
    publisher = Publisher(port, prefix, readings_per_s / len(METRICS))
    try:
        time.sleep(3)
        dropped0 = ack.drops(gateway)
        received0 = ack.broker_received
        acked0 = ack.count(gateway)
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        # The broker's counter ($SYS, every second, so between its own arrival times) also
        # counts the batches and acks: a few a second.
        received1 = ack.broker_received
        offered = (
            (received1[0] - received0[0]) * len(METRICS) / max(received1[1] - received0[1], 1.0)
        )
        delivered = (ack.count(gateway) - acked0) / elapsed
    finally:
        publisher.stop()
    # Until the backlog has drained (nothing acknowledged for 2 s), so that it is not counted
    # in the next step; the drop counts of the step arrive meanwhile.
    last, still_since = ack.count(gateway), time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() - still_since < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        if ack.count(gateway) != last:
            last, still_since = ack.count(gateway), time.monotonic()
    return offered, delivered, ack.drops(gateway) - dropped0


@click.command()
@click.option("--seconds", default=60.0, show_default=True, help="Reference-load window.")
@click.option("--warmup", default=10.0, show_default=True, help="Seconds before measuring.")
@click.option("--step-seconds", default=10.0, show_default=True, help="Each capacity step.")
@click.option("--overload-seconds", default=15.0, show_default=True, help="The 1.5 x step.")
def main(seconds: float, warmup: float, step_seconds: float, overload_seconds: float) -> None:
    """Measure the mqtt input's CPU against the simulated input's, then its overload behaviour."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        MosquittoBroker(Path(tmp) / "broker", extra_config="sys_interval 1\n") as broker,
    ):
        port = broker.port
        ack = Acknowledger("127.0.0.1", port, prefix)
        mqtt_config = Path(tmp) / "mqtt-agent.toml"
        sim_config = Path(tmp) / "sim-agent.toml"
        mqtt_gateway = agent_config(mqtt_config, port, prefix, mqtt_inputs(port, prefix))
        sim_gateway = agent_config(sim_config, port, prefix, simulated_inputs())
        mqtt_agent, sim_agent = Agent(mqtt_config), Agent(sim_config)
        publisher: Publisher | None = None
        try:
            time.sleep(3)  # both agents subscribed before the devices start
            publisher = Publisher(port, prefix, DEVICES)
            time.sleep(warmup)
            cpu0 = (mqtt_agent.cpu_seconds(), sim_agent.cpu_seconds())
            acked0 = (ack.count(mqtt_gateway), ack.count(sim_gateway))
            t0 = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            cpu1 = (mqtt_agent.cpu_seconds(), sim_agent.cpu_seconds())
            acked1 = (ack.count(mqtt_gateway), ack.count(sim_gateway))
            publisher.stop()
            publisher = None
            sim_agent.stop()

            # Capacity: the most delivered at an offered rate taken whole.
            capacity = 0.0
            steps: list[tuple[float, float, int]] = []
            good, bad = 0.0, 1000.0
            while True:  # doubling until a rate is not taken whole
                offered, delivered, dropped = offer(
                    ack, mqtt_gateway, port, prefix, bad, step_seconds
                )
                steps.append((offered, delivered, dropped))
                if dropped or delivered < TAKEN * offered:
                    break
                capacity = max(capacity, delivered)
                good, bad = bad, bad * 2
            for _ in range(2):  # then halving the interval between the last good and bad rates
                rate = (good + bad) / 2
                offered, delivered, dropped = offer(
                    ack, mqtt_gateway, port, prefix, rate, step_seconds
                )
                steps.append((offered, delivered, dropped))
                if dropped or delivered < TAKEN * offered:
                    bad = rate
                else:
                    capacity = max(capacity, delivered)
                    good = rate
            # 1.5 x capacity.
            over_offered, over_delivered, over_dropped = offer(
                ack, mqtt_gateway, port, prefix, 1.5 * capacity, overload_seconds
            )
        finally:
            if publisher is not None:
                publisher.stop()
            for agent in (mqtt_agent, sim_agent):
                if agent.process.poll() is None:
                    agent.stop()
            ack.stop()
    mqtt_cpu = 100.0 * (cpu1[0] - cpu0[0]) / elapsed
    sim_cpu = 100.0 * (cpu1[1] - cpu0[1]) / elapsed
    print(f"reference load: {DEVICES} devices x {len(METRICS)} metrics at 1 Hz, {elapsed:.0f} s")
    print(
        f"readings acknowledged: mqtt {(acked1[0] - acked0[0]) / elapsed:.0f}/s, "
        f"simulated {(acked1[1] - acked0[1]) / elapsed:.0f}/s"
    )
    for offered, delivered, dropped in steps:
        print(
            f"  offered {offered:.0f} readings/s: delivered {delivered:.0f}/s, "
            f"dropped at the input {dropped * len(METRICS)} readings"
        )
    print(f"capacity: {capacity:.0f} readings/s delivered with nothing dropped")
    print(
        f"offered {over_offered:.0f} readings/s ({over_offered / capacity:.2f} x capacity): "
        f"delivered {over_delivered:.0f}/s ({over_delivered / capacity:.2f} x capacity), "
        f"dropped at the input {over_dropped * len(METRICS)} readings, every one counted"
    )
    print("targets: mqtt_cpu <= 1.0 %; at 1.5 x capacity delivery >= 0.8 x capacity")
    print(
        f"inputs: mqtt_cpu={mqtt_cpu:.2f} simulated_cpu={sim_cpu:.2f} "
        f"ratio={mqtt_cpu / sim_cpu if sim_cpu else float('inf'):.2f}"
    )


if __name__ == "__main__":
    main()
