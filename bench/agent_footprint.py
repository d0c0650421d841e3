"""Benchmark: RSS and CPU of ``sensormine-agent run`` with 50 simulated devices x 4 metrics at 1 Hz.

The agent ships to the local broker (127.0.0.1:1883, a topic prefix of its own) and a small
acknowledger in this process answers every batch, so the agent does all of its real work:
commit, seal, publish, ack, delete. After a warm-up, CPU time and peak RSS are measured over
``--seconds`` (60 by default). Baseline for the ratio: a bare Python interpreter's RSS.
Targets: RSS <= 60 MiB, CPU <= 3 % of one core.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import click
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from protocol import Ack, AckResult, TopicKind, build_topic, decode_batch, encode_frame, parse_topic

DEVICES = 50


class Acknowledger:
    """Answers every batch with ``ok``, as the collector would after committing it."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.batches = 0
        self.readings = 0
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-ack-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"{prefix}/v1/+/+/telemetry", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        batch = decode_batch(bytes(message.payload))
        self.batches += 1
        self.readings += batch.point_count
        address = parse_topic(message.topic, self.prefix)
        ack = Ack(
            stream=batch.stream, seq=batch.seq, result=AckResult.OK, accepted=batch.point_count
        )
        topic = build_topic(self.prefix, address.tenant_id, address.gateway_id, TopicKind.ACK)
        client.publish(topic, encode_frame(ack), qos=1)

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def write_config(path: Path, buffer: Path, port: int, prefix: str) -> None:
    """A configuration with 50 simulated devices of 4 metrics each, read every second."""
    devices = "".join(
        f'\n[[inputs.devices]]\nid = "{uuid.uuid5(uuid.NAMESPACE_URL, f"footprint-{i}")}"\n'
        f'name = "device-{i}"\n'
        for i in range(DEVICES)
    )
    path.write_text(
        f"""
[gateway]
id = "{uuid.uuid4()}"
tenant_id = "{uuid.uuid4()}"
[buffer]
path = "{buffer}"
[mqtt]
port = {port}
topic_prefix = "{prefix}"
[log]
format = "json"
level = "warning"
[[inputs]]
type = "simulated"
name = "sim"
interval = "1s"
{devices}
"""
    )


def baseline_rss() -> int:
    """RSS of a bare Python interpreter (the floor any Python agent starts from)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    time.sleep(1.0)
    rss = psutil.Process(proc.pid).memory_info().rss
    proc.wait()
    return int(rss)


@click.command()
@click.option("--seconds", default=60.0, show_default=True, help="Measurement window.")
@click.option("--warmup", default=10.0, show_default=True, help="Seconds before measuring.")
@click.option("--port", default=1883, show_default=True, help="Local broker port.")
def main(seconds: float, warmup: float, port: int) -> None:
    """Measure the agent's RSS and CPU while it ships 200 readings/s."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    ack = Acknowledger("127.0.0.1", port, prefix)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.toml"
        write_config(config, Path(tmp) / "buffer.db", port, prefix)
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
        )
        try:
            proc = psutil.Process(agent.pid)
            time.sleep(warmup)
            cpu0 = proc.cpu_times()
            t0 = time.monotonic()
            readings0 = ack.readings
            peak = 0
            while time.monotonic() - t0 < seconds:
                peak = max(peak, proc.memory_info().rss)
                time.sleep(1.0)
            cpu1 = proc.cpu_times()
            elapsed = time.monotonic() - t0
            delivered = ack.readings - readings0
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(60)
            ack.stop()
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    cpu_pct = 100.0 * cpu_s / elapsed
    base = baseline_rss()
    print(
        f"devices x metrics: {DEVICES} x 4 at 1 Hz; measured over {elapsed:.0f} s after {warmup:.0f} s"
    )
    print(f"readings acknowledged in the window: {delivered} ({delivered / elapsed:.0f}/s)")
    print(f"exit status after SIGTERM: {code}")
    print(f"baseline: bare python rss {base / 2**20:.1f} MiB; agent/baseline {peak / base:.2f}")
    print("targets: rss <= 60 MiB, cpu <= 3 % of one core")
    print(f"agent footprint: rss {peak / 2**20:.1f} MiB, cpu {cpu_pct:.2f} % of one core")


if __name__ == "__main__":
    main()
