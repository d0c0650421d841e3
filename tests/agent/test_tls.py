"""TLS, mutual TLS and MQTT 3.1.1 against real Mosquitto brokers."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.buffer import Buffer
from agent.settings import GatewaySettings, MqttSettings
from agent.shipper import Shipper
from tests.agent.conftest import Acknowledger
from tests.services import MosquittoBroker, free_port

DEVICE = uuid.UUID(int=7)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "gateway")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        extra = ["-extfile", "san.cnf"] if name == "server" else []
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra)  # fmt: skip
    return {
        n: directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


async def ship_one_batch(
    tmp_path: Path, settings: MqttSettings, seconds: float
) -> tuple[bool, int]:
    """Seal one batch and run the shipper; return (anything published, batches left)."""
    gateway = GatewaySettings(id=uuid.uuid4(), tenant_id=uuid.uuid4())
    async with Buffer(tmp_path / f"{uuid.uuid4().hex}.db", gateway_id=gateway.id) as buffer:
        await buffer.append([(DEVICE.bytes, "m", 1_700_000_000_000_000, 1.5)])
        await buffer.seal(force=True)
        shipper = Shipper(settings, gateway, buffer)
        task = asyncio.create_task(shipper.run())
        deadline = time.monotonic() + seconds
        while buffer.batch_count:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        shipper.stop()
        await task
        # Something was published only if the broker accepted the connection.
        return shipper.sent > 0, buffer.batch_count


async def test_mutual_tls(
    tmp_path: Path, prefix: str, acknowledger_factory: Callable[..., Acknowledger]
) -> None:
    """With a client certificate the agent delivers over TLS; without one the broker refuses."""
    certs = make_certificates(tmp_path)
    tls_port = free_port()
    broker = MosquittoBroker(
        tmp_path / "broker",
        extra_config=(
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {certs['ca.pem']}\ncertfile {certs['server.pem']}\n"
            f"keyfile {certs['server.key']}\nrequire_certificate true\n"
        ),
    )
    broker.start()
    try:
        acknowledger_factory(broker.host, broker.port, prefix)
        base = {
            "port": tls_port,
            "topic_prefix": prefix,
            "ack_timeout": "2s",
            "reconnect_min": "100ms",
            "reconnect_max": "500ms",
        }
        mutual = MqttSettings.model_validate(
            {
                **base,
                "tls": {
                    "enabled": True,
                    "ca_file": str(certs["ca.pem"]),
                    "cert_file": str(certs["client.pem"]),
                    "key_file": str(certs["client.key"]),
                },
            }
        )
        assert (True, 0) == await ship_one_batch(tmp_path, mutual, 15)
        server_only = MqttSettings.model_validate(
            {**base, "tls": {"enabled": True, "ca_file": str(certs["ca.pem"])}}
        )
        assert (False, 1) == await ship_one_batch(tmp_path, server_only, 2)
    finally:
        broker.stop()


async def test_mqtt_311(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """protocol = "3.1.1" delivers and deletes on ack just like v5."""
    acknowledger_factory(*mqtt_address, prefix)
    settings = MqttSettings.model_validate(
        {"port": mqtt_address[1], "topic_prefix": prefix, "protocol": "3.1.1"}
    )
    assert (True, 0) == await ship_one_batch(tmp_path, settings, 15)
