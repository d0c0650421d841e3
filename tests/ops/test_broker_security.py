"""The broker configuration generated from the registry, run by a real Mosquitto over TLS.

One module-wide broker: config/mosquitto/mosquitto.conf as shipped (its paths pointed at this
test's files) including what `sensormine-collector broker sync` wrote from a scratch registry,
with a CA, a broker certificate, gateway certificates and passwords all issued by the
collector's own commands. Each attack of issue 15 is made by a real client and must fail.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from collector import migrations
from collector.admin.identity import mosquitto_hash, mosquitto_verify
from protocol import decode_status
from tests.admin.conftest import Admin
from tests.conftest import create_database, drop_database
from tests.ops.units import REPO
from tests.services import SYSTEM_PG_DSN, free_port, wait_for_port

# The collectors' shared-subscription group is a deployment secret: Mosquitto 2.0 does not check
# subscriptions against the ACL (security_default.c), so a gateway that knew the group could
# join it and have the broker drop its share (docs/security.md).
GROUP = "sensormine-collectors-" + uuid.uuid4().hex
COLLECTOR_PASSWORD = "collector-" + uuid.uuid4().hex


@dataclass
class Gateway:
    """A provisioned gateway: its ids and its credential files."""

    name: str
    id: str
    tenant_id: str
    kind: str
    files: Path

    def topic(self, leaf: str) -> str:
        """One of its topics."""
        return f"sensormine/v1/{self.tenant_id}/{self.id}/{leaf}"


@dataclass
class SecureBroker:
    """The generated configuration running in a private Mosquitto, and the registry behind it."""

    admin: Admin
    workdir: Path
    ports: dict[str, int]
    ca: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    gateways: dict[str, Gateway] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment `broker sync` and `pki` read their paths from."""
        return {
            "SENSORMINE_PKI_DIR": str(self.workdir / "pki"),
            "SENSORMINE_BROKER_DIR": str(self.workdir / "broker"),
            "SENSORMINE_BROKER_CERT": str(self.workdir / "certs/broker.pem"),
            "SENSORMINE_BROKER_KEY": str(self.workdir / "certs/broker.key"),
            "SENSORMINE_BROKER_CERT_LISTEN": f"127.0.0.1:{self.ports['cert']}",
            "SENSORMINE_BROKER_PASSWORD_LISTEN": f"127.0.0.1:{self.ports['password']}",
            "SENSORMINE_BROKER_COLLECTOR_LISTEN": f"127.0.0.1:{self.ports['collector']}",
            "SENSORMINE_BROKER_COLLECTOR_PASSWORD_FILE": str(self.workdir / "collector-password"),
            "SENSORMINE_BROKER_PID_FILE": str(self.workdir / "mosquitto.pid"),
        }

    def cli(self, command: str, ok: bool = True) -> str:
        """Run a collector command with this broker's environment; return its output."""
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            output = self.admin.run(command, ok=ok).output
            self.outputs.append(output)
            return output
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def provision(self, name: str, tenant: str, kind: str) -> Gateway:
        """Create gateway NAME and provision it with a certificate or a password."""
        self.cli(f"gateways create {name} --tenant {tenant}")
        out = self.workdir / "gateways" / name
        self.cli(
            f"gateways provision {name} --tenant {tenant} --credential {kind} --simulated"
            f" --output {out}/agent.toml --credentials-dir {out}/credentials"
            f" --credentials-path {out}/credentials --broker-host 127.0.0.1"
        )
        row = self.admin.query(
            "SELECT id::text, tenant_id::text FROM gateways WHERE name = $1", name
        )[0]
        gateway = Gateway(name, row["id"], row["tenant_id"], kind, out / "credentials")
        self.gateways[name] = gateway
        return gateway

    def start(self) -> None:
        """Start Mosquitto with the shipped main configuration and the generated files."""
        text = (REPO / "config/mosquitto/mosquitto.conf").read_text()
        replacements = {
            "include_dir /etc/mosquitto/sensormine": f"include_dir {self.workdir / 'broker'}",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {self.workdir}/",
            "log_dest syslog": f"log_dest file {self.log}",
        }
        for old, new in replacements.items():
            assert 1 == text.count(old), f"config/mosquitto/mosquitto.conf no longer has {old!r}"
            text = text.replace(old, new)
        text += f"pid_file {self.workdir / 'mosquitto.pid'}\nlog_type information\n"
        if os.geteuid() == 0:
            # As root, Mosquitto would switch to the mosquitto user, who cannot read these files.
            text += "user root\n"
        config = self.workdir / "mosquitto.conf"
        config.write_text(text)
        self.process = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            for port in self.ports.values():
                wait_for_port("127.0.0.1", port, timeout=10)
        except TimeoutError:
            self.process.kill()
            output = self.process.communicate()[0].decode()
            pytest.fail(f"mosquitto did not start with the generated configuration:\n{output}")

    def sync(self) -> str:
        """`broker sync` (SIGHUP through the pid file); wait until the broker has reloaded."""
        before = self.log.read_text().count("Reloading config.")
        output = self.cli("broker sync")
        deadline = time.monotonic() + 10
        while self.log.read_text().count("Reloading config.") == before:
            assert time.monotonic() < deadline, "the broker did not reload"
            time.sleep(0.05)
        time.sleep(0.3)  # the reload is logged before the new files are applied
        return output

    def stop(self) -> None:
        """Stop the broker."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """A registry of two tenants and their gateways, the CA, and the broker running the
    configuration `broker sync` generated from them."""
    workdir = tmp_path_factory.mktemp("secure-broker")
    dsn = asyncio.run(create_database(SYSTEM_PG_DSN, "smsec", timescale=False))
    try:
        asyncio.run(migrations.apply(dsn, "metadata"))
        config = workdir / "collector.toml"
        config.write_text(
            f'[metadata]\ndsn = "{dsn}"\n\n[timeseries]\ndsn = "{dsn}"\n\n'
            '[mqtt]\nusername = "sensormine-collector"\n'
        )
        admin = Admin(dsn, config, workdir)
        ports = {"cert": free_port(), "password": free_port(), "collector": free_port()}
        system = SecureBroker(
            admin, workdir, ports, workdir / "pki/ca.pem", workdir / "mosquitto.log"
        )
        (workdir / "collector-password").write_text(COLLECTOR_PASSWORD + "\n")
        system.cli("pki init --name 'Sensormine test CA'")
        system.cli(f"pki server-cert 127.0.0.1 localhost --out {workdir / 'certs'}")
        for tenant in ("acme", "globex"):
            system.cli(f"tenants create {tenant}")
        for name, tenant, kind in (
            ("a", "acme", "certificate"),
            ("b", "acme", "certificate"),
            ("c", "acme", "password"),
            ("d", "acme", "password"),
            ("x", "globex", "certificate"),
            ("revoked", "acme", "certificate"),
            ("disabled", "acme", "certificate"),
            ("disabled-pw", "acme", "password"),
            ("deleted", "acme", "certificate"),
        ):
            system.provision(name, tenant, kind)
        system.cli("broker sync --no-reload")
        system.start()
        try:
            yield system
        finally:
            system.stop()
    finally:
        asyncio.run(drop_database(SYSTEM_PG_DSN, dsn))


class Client:
    """A paho MQTT v5 client over TLS that records the broker's answers and what it receives."""

    def __init__(
        self,
        broker: SecureBroker,
        gateway: Gateway | None = None,
        *,
        client_id: str | None = None,
        collector: bool = False,
        password: str | None = None,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.answered = threading.Event()
        self.connack: ReasonCode | None = None
        self.disconnects: list[str] = []
        self.error: str | None = None
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or (gateway.id if gateway else f"collector-{uuid.uuid4().hex[:8]}"),
            protocol=mqtt.MQTTv5,
        )
        if collector:
            port = broker.ports["collector"]
            self.client.username_pw_set("sensormine-collector", password or COLLECTOR_PASSWORD)
            self.client.tls_set(ca_certs=str(broker.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        else:
            assert gateway is not None
            if gateway.kind == "certificate":
                port = broker.ports["cert"]
                self.client.tls_set(
                    ca_certs=str(gateway.files / "ca.pem"),
                    certfile=str(gateway.files / "gateway.pem"),
                    keyfile=str(gateway.files / "gateway.key"),
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            else:
                port = broker.ports["password"]
                secret = (gateway.files / "mqtt-password").read_text().strip()
                self.client.username_pw_set(gateway.id, password or secret)
                self.client.tls_set(
                    ca_certs=str(gateway.files / "ca.pem"), tls_version=ssl.PROTOCOL_TLS_CLIENT
                )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(list(codes))
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        try:
            self.client.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.error = str(exc)
            self.answered.set()
            return
        self.client.loop_start()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        self.connack = reason
        self.answered.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        self.disconnects.append(str(reason))
        self.answered.set()

    def accepted(self, timeout: float = 10.0) -> bool:
        """Whether the broker accepted the connection (a successful CONNACK)."""
        self.answered.wait(timeout)
        return self.connack is not None and not self.connack.is_failure and self.error is None

    def subscribe(self, topic: str) -> list[int]:
        """Subscribe with QoS 1; the SUBACK's reason codes."""
        self.client.subscribe(topic, qos=1)
        return [code.value for code in self.subacks.get(timeout=10)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the PUBACK (Mosquitto acks a denied publish too)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=10)

    def received(self, timeout: float = 10.0) -> tuple[str, bytes]:
        """The next message received."""
        message = self.messages.get(timeout=timeout)
        return message.topic, bytes(message.payload)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients a test opens; closed afterwards."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def connect(opened: list[Client], broker: SecureBroker, *args: object, **kwargs: object) -> Client:
    """A client that the broker accepted."""
    client = Client(broker, *args, **kwargs)  # type: ignore[arg-type]
    opened.append(client)
    assert client.accepted(), f"refused: {client.connack} {client.error} {client.disconnects}"
    return client


def test_password_hash_is_mosquittos_own_format(tmp_path: Path) -> None:
    """A hash written by mosquitto_passwd verifies with ours, and ours has its shape (the broker
    accepting our hashes is what the tests below show)."""
    password = "pw-" + uuid.uuid4().hex
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), "someone", password],
        check=True,
        capture_output=True,
    )
    theirs = passwd.read_text().strip().partition(":")[2]
    assert theirs.startswith("$7$101$")
    assert mosquitto_verify(password, theirs)
    assert not mosquitto_verify(password + "x", theirs)
    ours = mosquitto_hash(password)
    assert [theirs.split("$")[i] for i in (1, 2)] == [ours.split("$")[i] for i in (1, 2)]
    assert [len(p) for p in theirs.split("$")[3:]] == [len(p) for p in ours.split("$")[3:]]
    assert mosquitto_verify(password, ours)


def test_gateways_with_certificates_and_passwords_reach_the_collectors(
    broker: SecureBroker, clients: list[Client]
) -> None:
    """The working path: each kind of gateway publishes its own telemetry to the collectors'
    shared subscription and reads its own acks."""
    collector = connect(clients, broker, collector=True)
    assert [1] == collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/telemetry")
    for name in ("a", "c"):
        gateway = broker.gateways[name]
        client = connect(clients, broker, gateway)
        assert [1] == client.subscribe(gateway.topic("ack"))
        client.publish(gateway.topic("telemetry"), name.encode())
        assert (gateway.topic("telemetry"), name.encode()) == collector.received()
        collector.publish(gateway.topic("ack"), b"ack " + name.encode())
        assert (gateway.topic("ack"), b"ack " + name.encode()) == client.received()


def test_a_cannot_publish_on_bs_telemetry_or_status(
    broker: SecureBroker, clients: list[Client]
) -> None:
    """A (certificate) and C (password) publish on B's telemetry and status and on another
    tenant's gateway's: none of it reaches the collectors; their own frame after it does."""
    a, b, c, x = (broker.gateways[n] for n in ("a", "b", "c", "x"))
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/telemetry")
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/status")
    for attacker in (a, c):
        client = connect(clients, broker, attacker)
        for victim in (b, x):
            client.publish(victim.topic("telemetry"), b"forged")
            client.publish(victim.topic("status"), b"forged", retain=True)
        # Its own tenant level is part of its rules: not even its own id under another tenant.
        client.publish(f"sensormine/v1/{x.tenant_id}/{attacker.id}/telemetry", b"forged")
        client.publish(attacker.topic("telemetry"), b"own")
        # One publisher, QoS 1, in order: a delivered forgery would have come first.
        assert (attacker.topic("telemetry"), b"own") == collector.received()
    assert collector.messages.empty()


def test_a_cannot_read_bs_acks_or_telemetry(broker: SecureBroker, clients: list[Client]) -> None:
    """A subscribes to B's ack and telemetry topics and to wildcards; it receives only its own
    ack, while B gets its ack and the collectors its telemetry."""
    a, b = broker.gateways["a"], broker.gateways["b"]
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/telemetry")
    attacker = connect(clients, broker, a)
    for topic in (b.topic("ack"), b.topic("telemetry"), "sensormine/v1/#", "#", a.topic("ack")):
        attacker.subscribe(topic)
    victim = connect(clients, broker, b)
    victim.subscribe(b.topic("ack"))
    victim.publish(b.topic("telemetry"), b"b's batch")
    assert (b.topic("telemetry"), b"b's batch") == collector.received()
    collector.publish(b.topic("ack"), b"ack for b")
    assert (b.topic("ack"), b"ack for b") == victim.received()
    collector.publish(a.topic("ack"), b"ack for a")
    # Everything above was published before this ack: had A been given any of it, it came first.
    assert (a.topic("ack"), b"ack for a") == attacker.received()
    time.sleep(0.3)
    # Its own ack matches three of its subscriptions (MQTT 5 delivers one copy per match).
    others = []
    while not attacker.messages.empty():
        others.append(attacker.received())
    assert [] == [m for m in others if m != (a.topic("ack"), b"ack for a")]


def test_a_cannot_publish_on_any_ack_topic(broker: SecureBroker, clients: list[Client]) -> None:
    """A forges acks for B and for itself: B receives only the collector's."""
    a, b, c = (broker.gateways[n] for n in ("a", "b", "c"))
    victim = connect(clients, broker, b)
    victim.subscribe(b.topic("ack"))
    own = connect(clients, broker, a)
    own.subscribe(a.topic("ack"))
    for attacker in (own, connect(clients, broker, c)):
        attacker.publish(b.topic("ack"), b"forged ack")
        attacker.publish(a.topic("ack"), b"forged ack")
    collector = connect(clients, broker, collector=True)
    collector.publish(b.topic("ack"), b"real ack")
    collector.publish(a.topic("ack"), b"real ack")
    assert (b.topic("ack"), b"real ack") == victim.received()
    assert (a.topic("ack"), b"real ack") == own.received()


def test_a_cannot_join_the_collectors_shared_subscription(
    broker: SecureBroker, clients: list[Client]
) -> None:
    """A subscribes to shared subscriptions of the default group name and of guesses at the
    deployment's: all ten of B's batches still go to the collector, none to A."""
    a, b = broker.gateways["a"], broker.gateways["b"]
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/telemetry")
    attackers = [connect(clients, broker, a), connect(clients, broker, broker.gateways["c"])]
    for attacker in attackers:
        for group in ("sensormine-collectors", "sensormine", "collectors"):
            attacker.subscribe(f"$share/{group}/sensormine/v1/+/+/telemetry")
            attacker.subscribe(f"$share/{group}/sensormine/v1/{b.tenant_id}/{b.id}/telemetry")
    victim = connect(clients, broker, b)
    for i in range(10):
        victim.publish(b.topic("telemetry"), b"batch %d" % i)
    assert [b"batch %d" % i for i in range(10)] == [collector.received()[1] for _ in range(10)]
    time.sleep(0.5)
    assert [True, True] == [attacker.messages.empty() for attacker in attackers]


def test_a_cannot_take_over_bs_client_id(broker: SecureBroker, clients: list[Client]) -> None:
    """A and C connect with client id = B's gateway id, again and again: the broker binds each
    to its own identity, so B stays connected and keeps receiving its acks."""
    a, b, c = (broker.gateways[n] for n in ("a", "b", "c"))
    victim = connect(clients, broker, b)
    victim.subscribe(b.topic("ack"))
    for _ in range(3):
        for attacker in (a, c):
            connect(clients, broker, attacker, client_id=b.id)
    collector = connect(clients, broker, collector=True)
    collector.publish(b.topic("ack"), b"still here")
    assert (b.topic("ack"), b"still here") == victim.received()
    assert [] == victim.disconnects
    log = broker.log.read_text()
    assert f"as {a.id} (" in log and f"as {c.id} (" in log


def test_a_gateway_cannot_use_the_collectors_listener(
    broker: SecureBroker, clients: list[Client]
) -> None:
    """The collectors' listener admits only the collectors' password, not a gateway's, and
    not the collectors' user with a wrong password; gateway listeners refuse wrong passwords."""
    c = broker.gateways["c"]
    secret = (c.files / "mqtt-password").read_text().strip()
    on_collector_port = Client(broker, collector=True, password="wrong")
    clients.append(on_collector_port)
    assert not on_collector_port.accepted()
    impostor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=c.id, protocol=mqtt.MQTTv5)
    impostor.username_pw_set(c.id, secret)
    impostor.tls_set(ca_certs=str(broker.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    answers: list[ReasonCode] = []
    impostor.on_connect = lambda cl, u, f, reason, p: answers.append(reason)
    impostor.connect("127.0.0.1", broker.ports["collector"])
    impostor.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answers and answers[0].is_failure
    finally:
        impostor.disconnect()
        impostor.loop_stop()
    wrong = Client(broker, c, password="not-the-password")
    clients.append(wrong)
    assert not wrong.accepted()


def test_forged_identities_are_refused(
    broker: SecureBroker, clients: list[Client], tmp_path: Path
) -> None:
    """A certificate with CN = B's id from a CA of the attacker's own, and C logging in as D
    with C's password, are refused at connect."""
    b, c, d = (broker.gateways[n] for n in ("b", "c", "d"))
    own_ca = tmp_path / "own-ca"
    broker.cli(f"pki init --pki-dir {own_ca}")
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", f"/CN={b.id}", "-keyout", str(tmp_path / "forged.key"),
         "-out", str(tmp_path / "forged.csr")],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(tmp_path / "forged.csr"), "-CA",
         str(own_ca / "ca.pem"), "-CAkey", str(own_ca / "ca.key"), "-CAcreateserial",
         "-days", "2", "-out", str(tmp_path / "forged.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    forged_files = tmp_path / "forged"
    forged_files.mkdir()
    shutil.copy(b.files / "ca.pem", forged_files / "ca.pem")
    shutil.copy(tmp_path / "forged.pem", forged_files / "gateway.pem")
    shutil.copy(tmp_path / "forged.key", forged_files / "gateway.key")
    forged = Client(broker, Gateway("forged", b.id, b.tenant_id, "certificate", forged_files))
    clients.append(forged)
    assert not forged.accepted()
    password_of_c = (c.files / "mqtt-password").read_text().strip()
    impostor = Client(broker, d, password=password_of_c)
    clients.append(impostor)
    assert not impostor.accepted()


def test_a_cannot_forge_bs_status_through_its_will(
    broker: SecureBroker, clients: list[Client]
) -> None:
    """A sets its MQTT will on B's status topic and drops its connection: the will is not
    delivered (the ACL applies to wills too), while its own will is."""
    a, b = broker.gateways["a"], broker.gateways["b"]
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/status")
    for will_topic in (b.topic("status"), a.topic("status")):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=a.id, protocol=mqtt.MQTTv5)
        client.tls_set(
            ca_certs=str(a.files / "ca.pem"),
            certfile=str(a.files / "gateway.pem"),
            keyfile=str(a.files / "gateway.key"),
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.will_set(will_topic, b"will " + will_topic.encode(), qos=1)
        connected = threading.Event()
        client.on_connect = lambda cl, u, f, reason, p, done=connected: done.set()
        client.connect("127.0.0.1", broker.ports["cert"])
        client.loop_start()
        connected.wait(10)
        client.loop_stop()
        sock = client.socket()
        assert sock is not None
        sock.close()  # an unclean end: the broker publishes the will
    deadline = time.monotonic() + 15
    while True:
        topic, payload = collector.received(timeout=max(0.1, deadline - time.monotonic()))
        assert topic != b.topic("status"), payload
        if topic == a.topic("status") and payload.startswith(b"will"):
            break


def test_revoked_disabled_and_deleted_gateways_are_refused(
    broker: SecureBroker, clients: list[Client]
) -> None:
    """After `pki revoke`, `gateways disable` and `gateways delete` and the next `broker sync`,
    each is refused at connect; one still connected loses its topics (a password one is
    disconnected); enabling again and syncing lets it back in."""
    names = ("revoked", "disabled", "disabled-pw", "deleted")
    gws = {n: broker.gateways[n] for n in names}
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/telemetry")
    before = {n: connect(clients, broker, g) for n, g in gws.items()}

    broker.cli("pki revoke revoked --tenant acme --reason key-compromise")
    broker.cli("gateways disable disabled --tenant acme")
    broker.cli("gateways disable disabled-pw --tenant acme")
    broker.cli("gateways delete deleted --tenant acme")
    output = broker.sync()
    assert "3 certificate(s) in the CRL" in output

    for name, gateway in gws.items():
        again = Client(broker, gateway)
        clients.append(again)
        assert not again.accepted(), f"{name} was let in again"
    # The still-connected password gateway was disconnected by the reload ...
    deadline = time.monotonic() + 5
    while not before["disabled-pw"].disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert before["disabled-pw"].disconnects
    # ... and a still-connected certificate gateway may send nothing anymore.
    for name in ("revoked", "disabled", "deleted"):
        before[name].publish(gws[name].topic("telemetry"), b"after revocation")
    marker = broker.gateways["a"]
    connect(clients, broker, marker).publish(marker.topic("telemetry"), b"marker")
    assert (marker.topic("telemetry"), b"marker") == collector.received()

    broker.cli("gateways enable disabled --tenant acme")
    broker.cli("gateways enable disabled-pw --tenant acme")
    broker.sync()
    connect(clients, broker, gws["disabled"])
    connect(clients, broker, gws["disabled-pw"])


def _doc_commands(heading: str) -> list[str]:
    """The `$ sensormine-collector ...` lines of the console block after ``heading`` in
    docs/registry.md."""
    text = (REPO / "docs/registry.md").read_text()
    section = text[text.index(heading) :]
    block = section[
        section.index("```console") : section.index("```", section.index("```console") + 3)
    ]
    return [line.removeprefix("$ ") for line in block.splitlines() if line.startswith("$ ")]


def _install(broker: SecureBroker, config: Path, credentials: Path, workdir: Path) -> Path:
    """What the operator does on the gateway: agent.toml and the credential files in place
    (here the gateway's /etc/sensormine is ``workdir``, and mqtt.acme.example is 127.0.0.1)."""
    text = config.read_text()
    target = workdir / "credentials"
    shutil.copytree(credentials, target)
    text = text.replace('host = "mqtt.acme.example"', 'host = "127.0.0.1"')
    text = text.replace(f"port = {8883}", f"port = {broker.ports['cert']}")
    text = text.replace(f"port = {8884}", f"port = {broker.ports['password']}")
    text = text.replace("/etc/sensormine/credentials", str(target))
    text = text.replace(str(credentials), str(target))
    text = text.replace("/var/lib/sensormine/buffer.db", str(workdir / "buffer.db"))
    installed = workdir / "agent.toml"
    installed.write_text(text)
    return installed


def _start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "SENSORMINE_"))
    }
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "sensormine-agent"), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )


def _online(collector: Client, gateway: Gateway) -> None:
    """Wait for the gateway's `online` status (others' retained statuses may come first)."""
    deadline = time.monotonic() + 30
    while True:
        topic, payload = collector.received(timeout=max(0.1, deadline - time.monotonic()))
        # Decoded, not searched: a status frame with its backlog figures may be compressed.
        if topic == gateway.topic("status") and decode_status(payload).state == "online":
            return


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_three_documented_commands_give_a_connected_authenticated_agent(
    broker: SecureBroker, clients: list[Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/registry.md's three commands, as written, then the agent installed with what they
    produced: it connects with its certificate and its `online` status reaches the collectors."""
    monkeypatch.chdir(tmp_path)
    commands = _doc_commands("So a new gateway takes three commands")
    assert 3 == len(commands)
    for command in commands:
        assert command.startswith("sensormine-collector "), command
        broker.cli(
            command.removeprefix("sensormine-collector ")
        ) if "broker sync" not in command else broker.sync()
    row = broker.admin.query(
        "SELECT id::text, tenant_id::text FROM gateways WHERE name = 'plant-2'"
    )[0]
    gateway = Gateway("plant-2", row["id"], row["tenant_id"], "certificate", tmp_path)
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/status")
    site = tmp_path / "gateway-etc"
    site.mkdir()
    config = _install(
        broker, tmp_path / "plant-2/agent.toml", tmp_path / "plant-2/agent-credentials", site
    )
    agent = _start_agent(config, tmp_path / "agent.log")
    try:
        _online(collector, gateway)
        assert (
            f"as {gateway.id} (p5, c1" in broker.log.read_text()
            or f"u'{gateway.id}'" in broker.log.read_text()
        )
    finally:
        _stop(agent)
    assert 0 == agent.returncode


def test_no_secret_in_logs_or_status_and_exposed_credentials_warned(
    broker: SecureBroker, clients: list[Client], tmp_path: Path
) -> None:
    """An agent with a password gateway's files: its log, `status` and `check-config` never
    show the password; a password file readable by others is warned about at start. No output
    of the collector's commands in this module showed a password or a private key either."""
    c = broker.gateways["c"]
    site = tmp_path / "gateway-etc"
    site.mkdir()
    config = _install(broker, broker.workdir / "gateways/c/agent.toml", c.files, site)
    password_file = site / "credentials/mqtt-password"
    password = password_file.read_text().strip()
    password_file.chmod(0o644)
    collector = connect(clients, broker, collector=True)
    collector.subscribe(f"$share/{GROUP}/sensormine/v1/+/+/status")
    log = tmp_path / "agent.log"
    agent = _start_agent(config, log)
    try:
        _online(collector, c)  # logged in with its password
    finally:
        _stop(agent)
    agent_bin = str(Path(sys.executable).parent / "sensormine-agent")
    shown = [
        subprocess.run([agent_bin, *args, "--config", str(config)], capture_output=True, text=True)
        for args in (["status"], ["status", "--json"], ["check-config"])
    ]
    lines = log.read_text().splitlines()
    warnings = [line for line in lines if "credentials.exposed" in line]
    assert 1 == len(warnings) and "mqtt.password_file" in warnings[0] and "0644" in warnings[0]
    secrets = {password, COLLECTOR_PASSWORD}
    for gateway in broker.gateways.values():
        if gateway.kind == "password":
            secrets.add((gateway.files / "mqtt-password").read_text().strip())
        else:
            key = (gateway.files / "gateway.key").read_text()
            secrets.add(key.splitlines()[1])
    ca_key = (broker.workdir / "pki/ca.key").read_text()
    secrets.add(ca_key.splitlines()[1])
    texts = [log.read_text(), *(r.stdout + r.stderr for r in shown), *broker.outputs]
    assert [] == [s for s in secrets for text in texts if s in text]
    assert "********" in shown[2].stdout
    assert "mqtt.password_file" in shown[2].stderr and "0644" in shown[2].stderr


def test_collector_logs_and_status_show_no_secret(broker: SecureBroker, tmp_path: Path) -> None:
    """A collector logging in on the collectors' listener with its password file, with a
    database password in its DSNs: neither password appears in its log, `status`,
    `check-config` or `migrate --status`."""
    ts = asyncio.run(create_database(SYSTEM_PG_DSN, "smsects", timescale=True))
    db_password = "dbpw-" + uuid.uuid4().hex  # the server trusts local connections: unused
    try:
        password_file = tmp_path / "mqtt-password"
        password_file.write_text(COLLECTOR_PASSWORD + "\n")
        password_file.chmod(0o600)
        with_password = ts.replace(
            "postgresql://postgres@", f"postgresql://postgres:{db_password}@"
        )
        meta = broker.admin.dsn.replace(
            "postgresql://postgres@", f"postgresql://postgres:{db_password}@"
        )
        config = tmp_path / "collector.toml"
        config.write_text(
            f'[metadata]\ndsn = "{meta}"\n\n[timeseries]\ndsn = "{with_password}"\n\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.ports["collector"]}\ntls = true\n'
            f'ca_file = "{broker.ca}"\nusername = "sensormine-collector"\n'
            f'password_file = "{password_file}"\nclient_id = "sec-collector"\ngroup = "{GROUP}"\n\n'
            '[metrics]\nlisten = ""\n\n[log]\nformat = "json"\n'
        )
        binary = str(Path(sys.executable).parent / "sensormine-collector")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_SOCKET", "SENSORMINE_"))
        }
        log = tmp_path / "collector.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [binary, "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            deadline = time.monotonic() + 60
            while "collector.started" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            _stop(process)
        assert "mqtt.connect_refused" not in log.read_text()
        assert "as sec-collector (" in broker.log.read_text()  # logged in over TLS
        shown = [
            subprocess.run(
                [binary, *args, "--config", str(config)], capture_output=True, text=True, env=env
            )
            for args in (
                ["status"],
                ["status", "--json"],
                ["check-config"],
                ["migrate", "--status"],
            )
        ]
        assert [0, 0, 0, 0] == [r.returncode for r in shown], [r.stderr for r in shown]
        texts = [log.read_text(), *(r.stdout + r.stderr for r in shown)]
        assert [] == [s for s in (COLLECTOR_PASSWORD, db_password) for t in texts if s in t]
        # The group name, the collectors' shared secret, is logged as a digest only.
        assert GROUP not in log.read_text() and "group_digest" in log.read_text()
    finally:
        asyncio.run(drop_database(SYSTEM_PG_DSN, ts))
