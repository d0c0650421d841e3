"""config/mosquitto/ as shipped, run by a real Mosquitto with certificates made here: TLS only,
passwords required, each gateway confined to its own topics, collectors on a shared group."""

from __future__ import annotations

import queue
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.ops.units import REPO
from tests.services import free_port, wait_for_port

CONFIG_DIR = REPO / "config/mosquitto"
GROUP = "sensormine-collectors"


@dataclass
class Broker:
    """The running broker and what clients need to reach it."""

    port: int
    ca: Path
    passwords: dict[str, str]
    log: Path


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a broker certificate for 127.0.0.1/localhost signed by it, made with openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Sensormine test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "broker.pem",
    )
    return directory / "ca.pem", directory / "broker.pem", directory / "broker.key"


def shipped_config(port: int, paths: dict[str, Path], workdir: Path) -> str:
    """config/mosquitto/mosquitto.conf with this test's port and files; every other line as shipped."""
    replacements = {
        "listener 8883": f"listener {port} 127.0.0.1",
        "password_file /etc/mosquitto/sensormine.passwd": f"password_file {paths['passwords']}",
        "acl_file /etc/mosquitto/sensormine.acl": f"acl_file {CONFIG_DIR / 'acl'}",
        "cafile /etc/mosquitto/certs/ca.pem": f"cafile {paths['ca']}",
        "certfile /etc/mosquitto/certs/broker.pem": f"certfile {paths['cert']}",
        "keyfile /etc/mosquitto/certs/broker.key": f"keyfile {paths['key']}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {workdir}/",
        "log_dest syslog": f"log_dest file {workdir}/mosquitto.log",
    }
    lines = (CONFIG_DIR / "mosquitto.conf").read_text().splitlines()
    for old in replacements:
        assert 1 == lines.count(old), f"config/mosquitto/mosquitto.conf no longer has {old!r}"
    # Running as root, Mosquitto would switch to the mosquitto user, who cannot read a test's files.
    return "\n".join(replacements.get(line, line) for line in lines) + "\nuser root\n"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto running the shipped configuration and ACL, with two gateways and a collector."""
    ca, cert, key = make_certificates(tmp_path)
    passwords = {
        str(uuid.uuid4()): uuid.uuid4().hex,
        str(uuid.uuid4()): uuid.uuid4().hex,
        "sensormine-collector": uuid.uuid4().hex,
    }
    password_file = tmp_path / "passwd"
    for i, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", "-b", *create, str(password_file), user, password],
            check=True,
            capture_output=True,
        )
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    paths = {"ca": ca, "cert": cert, "key": key, "passwords": password_file}
    config.write_text(shipped_config(port, paths, tmp_path))
    process = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout=10)
        except TimeoutError:
            process.kill()
            output = process.communicate()[0].decode()
            pytest.fail(f"mosquitto did not start with the shipped configuration:\n{output}")
        yield Broker(port, ca, passwords, tmp_path / "mosquitto.log")
    finally:
        process.terminate()
        process.wait(timeout=15)


class Client:
    """A paho MQTT v5 client over TLS that records what it receives and the broker's answers."""

    def __init__(
        self, broker: Broker, user: str, password: str | None = None, tls: bool = True
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.connack: ReasonCode | None = None
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(
            user, broker.passwords.get(user) if password is None else password
        )
        if tls:
            self.client.tls_set(ca_certs=str(broker.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(list(codes))
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        self.connack = reason
        self.connected.set()

    def subscribe(self, topic: str) -> list[ReasonCode]:
        """Subscribe with QoS 1 and return the SUBACK's reason codes."""
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 and wait for the PUBACK."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def test_gateways_reach_collectors_over_tls_and_only_on_their_own_topics(broker: Broker) -> None:
    """A gateway's telemetry reaches the collectors' shared subscription; a telemetry frame it
    sends under another gateway's id is not delivered, and another gateway's acks never
    reach it."""
    gateway_a, gateway_b = [u for u in broker.passwords if u != "sensormine-collector"]
    tenant = uuid.uuid4()
    collector = Client(broker, "sensormine-collector")
    gateway = Client(broker, gateway_a)
    try:
        assert collector.connected.wait(10) and gateway.connected.wait(10)
        assert (False, False) == (collector.connack.is_failure, gateway.connack.is_failure)  # type: ignore[union-attr]
        granted = collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/telemetry")
        assert [1] == [code.value for code in granted]

        gateway.publish(f"sensormine/v1/{tenant}/{gateway_b}/telemetry", b"forged")
        gateway.publish(f"sensormine/v1/{tenant}/{gateway_a}/telemetry", b"own")
        first = collector.messages.get(timeout=10)
        # One publisher, one subscriber, QoS 1: a delivered forgery would have come first.
        assert (f"sensormine/v1/{tenant}/{gateway_a}/telemetry", b"own") == (
            first.topic,
            first.payload,
        )

        # Mosquitto grants the subscription and applies the read ACL to each message instead.
        gateway.subscribe(f"sensormine/v1/{tenant}/{gateway_b}/ack")
        gateway.subscribe(f"sensormine/v1/{tenant}/{gateway_a}/ack")
        collector.publish(f"sensormine/v1/{tenant}/{gateway_b}/ack", b"ack for b")
        collector.publish(f"sensormine/v1/{tenant}/{gateway_a}/ack", b"ack for a")
        ack = gateway.messages.get(timeout=10)
        assert (f"sensormine/v1/{tenant}/{gateway_a}/ack", b"ack for a") == (ack.topic, ack.payload)
        assert collector.messages.empty()
    finally:
        collector.close()
        gateway.close()


def test_broker_refuses_wrong_passwords_and_plain_connections(broker: Broker) -> None:
    """No anonymous access, no wrong password, and no MQTT without TLS."""
    gateway_a = next(u for u in broker.passwords if u != "sensormine-collector")
    wrong = Client(broker, gateway_a, password="not-the-password")
    try:
        assert wrong.connected.wait(10)
        assert wrong.connack is not None and wrong.connack.is_failure
    finally:
        wrong.close()

    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    plain.username_pw_set(gateway_a, broker.passwords[gateway_a])
    with pytest.raises((OSError, mqtt.WebsocketConnectionError)):
        plain.connect("127.0.0.1", broker.port)
        # Against a TLS listener the CONNECT is never answered: the read fails or times out.
        plain.socket().settimeout(5)  # type: ignore[union-attr]
        for _ in range(50):
            rc = plain.loop(timeout=0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise OSError(f"connection closed ({rc})")
        raise AssertionError("a plain MQTT connection to the TLS listener stayed open")
