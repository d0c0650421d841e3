"""The installed agent, started with its unit's own ExecStart= line (paths under the scratch
root) the way systemd would start it: notify socket, watchdog, credentials directory. It must
report READY, ping the watchdog, ship batches with the broker password from the credential,
and exit 0 on SIGTERM well within the unit's TimeoutStopSec."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from protocol import (
    Ack,
    AckResult,
    Batch,
    TimeReply,
    TimeRequest,
    TopicKind,
    decode_frame,
    encode_frame,
    parse_topic,
)
from tests.ops.test_install import install
from tests.ops.units import REPO, parse_unit, seconds
from tests.services import free_port, wait_for_port

UNIT = "sensormine-agent.service"
PASSWORD = "gateway-secret-" + uuid.uuid4().hex[:8]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer sets owners: run as root")


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A private Mosquitto that admits only the user ``gateway`` with ``PASSWORD``."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwords = workdir / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "gateway", PASSWORD],
        check=True,
        capture_output=True,
    )
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"log_dest file {workdir}/mosquitto.log\nuser root\n"
    )
    process = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield port, "gateway"
    finally:
        process.terminate()
        process.wait(timeout=15)


def site_config(root: Path, port: int, username: str, prefix: str) -> str:
    """The example configuration with this site's broker, a unique prefix and the scratch root's buffer."""
    text = (REPO / "config/agent.example.toml").read_text()
    replacements = {
        'path = "/var/lib/sensormine/buffer.db"': f'path = "{root}/var/lib/sensormine/buffer.db"',
        "port = 1883": f"port = {port}",
        'topic_prefix = "sensormine"': f'topic_prefix = "{prefix}"',
        '# username = "gateway-3b0f8d4e"': f'username = "{username}"',
        'interval = "1s"': 'interval = "200ms"',
        'max_age = "1s"': 'max_age = "300ms"',
    }
    for old, new in replacements.items():
        assert 1 == text.count(old), f"config/agent.example.toml no longer has {old!r}"
        text = text.replace(old, new)
    return text


def test_installed_agent_started_by_its_execstart_line_ships(
    tmp_path: Path, password_broker: tuple[int, str]
) -> None:
    """Started like systemd starts it, the installed agent notifies READY, pings the watchdog,
    authenticates with the password from $CREDENTIALS_DIRECTORY, ships batches that the
    collector's side decodes and acks, and drains and exits 0 on SIGTERM."""
    port, username = password_broker
    root = tmp_path / "root"
    prefix = f"smops{uuid.uuid4().hex[:8]}"
    config = tmp_path / "agent.toml"
    config.write_text(site_config(root, port, username, prefix))
    install("--root", str(root), "--config", str(config))
    (root / "etc/sensormine/credentials/mqtt-password").write_text(PASSWORD + "\n")

    service = parse_unit(root / "etc/systemd/system" / UNIT)["Service"]
    argv = [
        f"{root}{arg}" if arg.startswith("/") else arg
        for arg in shlex.split(service["ExecStart"][0])
    ]
    assert f"{root}/opt/sensormine/venv/bin/sensormine-agent" == argv[0]

    # What LoadCredential= does: a private copy of each credential in $CREDENTIALS_DIRECTORY.
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    for entry in service["LoadCredential"]:
        name, source = entry.split(":", 1)
        shutil.copy(f"{root}{source}", credentials / name)
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "1000000",
        "CREDENTIALS_DIRECTORY": str(credentials),
    }

    received: queue.Queue[Batch] = queue.Queue()
    collector = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"ops-{prefix}", protocol=mqtt.MQTTv5
    )
    collector.username_pw_set(username, PASSWORD)

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        frame = decode_frame(message.payload)
        if isinstance(frame, TimeRequest):
            # As a collector does: the agent takes the time from it (this host's clock may not be
            # synchronised, and then the agent waits for it before sealing).
            address = parse_topic(message.topic, prefix)
            reply = TimeReply(sent=frame.sent, time=time.time_ns() // 1000)
            client.publish(
                f"{prefix}/v1/{address.tenant_id}/{address.gateway_id}/{TopicKind.ACK.value}",
                encode_frame(reply),
                qos=0,
            )
        if isinstance(frame, Batch):
            address = parse_topic(message.topic, prefix)
            ack = Ack(
                stream=frame.stream,
                seq=frame.seq,
                result=AckResult.OK,
                accepted=sum(len(s.values) for s in frame.series),
            )
            client.publish(
                f"{prefix}/v1/{address.tenant_id}/{address.gateway_id}/{TopicKind.ACK.value}",
                encode_frame(ack),
                qos=1,
            )
            received.put(frame)

    collector.on_message = on_message
    collector.connect("127.0.0.1", port)
    collector.subscribe(f"{prefix}/v1/+/+/telemetry", qos=1)
    collector.loop_start()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        batches = [received.get(timeout=30) for _ in range(3)]
        notes: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {"READY=1", "WATCHDOG=1"} <= set(notes):
            with contextlib.suppress(TimeoutError):
                notes.extend(notify.recv(4096).decode().split("\n"))
        assert {"READY=1", "WATCHDOG=1"} <= set(notes)
        assert all(len(b.series) > 0 for b in batches)
        assert sorted(b.seq for b in batches) == [b.seq for b in batches]

        stop_timeout = seconds(service["TimeoutStopSec"][0])
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert 0 == process.wait(timeout=stop_timeout)
        assert time.monotonic() - started < stop_timeout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        collector.loop_stop()
        collector.disconnect()
        notify.close()
    # Under systemd the log goes to the journal as JSON lines: one object per line, no errors.
    output = process.stdout.read().decode() if process.stdout else ""
    events = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert events, "the agent logged nothing"
    assert [] == [e for e in events if e.get("level") in {"error", "critical"}]
