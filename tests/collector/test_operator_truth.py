"""What the collector tells its operator: an unreachable broker, a gateway id used by two agents,
its version and environment, names instead of ids. Real collector processes and databases."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from collector.cli import read_status
from collector.service import running
from protocol import Ack, AckResult, Batch, GatewayStatus, Series, TopicKind, encode_frame
from tests.collector.conftest import (
    Databases,
    GatewayClient,
    collector_settings,
    make_batch,
    now_us,
)
from tests.services import SYSTEM_MQTT, free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_version_and_help_name_the_environment() -> None:
    """``--version`` prints the version, ``-h`` is help, and help lists the environment variables."""
    version = _cli("--version")
    assert 0 == version.returncode and version.stdout.startswith("sensormine-collector, version ")
    short = _cli("-h")
    assert 0 == short.returncode
    for var in (
        "SENSORMINE_COLLECTOR_CONFIG",
        "SENSORMINE_COLLECTOR__<SECTION>__<KEY>",
        "SENSORMINE_MQTT_PASSWORD",
        "CREDENTIALS_DIRECTORY",
    ):
        assert var in short.stdout


async def test_an_unreachable_broker_is_logged_on_every_attempt(
    dbs: Databases, tmp_path: Path
) -> None:
    """With nothing listening on the broker's port the collector says so, with the address and
    the reason, on every failed attempt (it was silent for 70 s, even at debug level)."""
    port = free_port()
    config = tmp_path / "collector.toml"
    config.write_text(
        f'[metadata]\ndsn = "{dbs.metadata}"\n[timeseries]\ndsn = "{dbs.timeseries}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min = "1s"\nreconnect_max = "2s"\n'
        '[metrics]\nlisten = ""\n[log]\nformat = "json"\n'
    )
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collector",
            "run",
            "--config",
            str(config),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def attempts() -> list[dict[str, Any]]:
        found = []
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == "mqtt.unreachable":
                found.append(entry)
        return found

    try:
        deadline = time.monotonic() + 60
        while len(attempts()) < 3:
            assert proc.returncode is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    first = attempts()[0]
    assert ("127.0.0.1", port, "warning") == (first["host"], first["port"], first["level"])
    assert "refused" in first["error"].lower()
    assert [1, 2, 3] == [a["attempt"] for a in attempts()[:3]]


async def test_a_gateway_whose_batches_come_from_two_streams_at_once_is_flagged(
    dbs: Databases,
) -> None:
    """Two agents with one gateway id seal batches under two streams over the same time: the
    running collector counts the gateway in its gauge and ``status`` names it. A stream renewed
    after a conflict (the old stream's batches all sealed before the new one's) is not flagged."""
    fleet = dbs.fleet
    assert fleet is not None
    host, port = SYSTEM_MQTT
    p = f"s{uuid.uuid4().hex[:10]}"
    settings = collector_settings(dbs, host, port, p)
    clone_a, clone_b, renewed = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with running(settings) as collector:
        with GatewayClient(host, port, p, fleet.tenant, fleet.gateway) as gw:
            # A renewal: clone_a's batches, then the renewed stream's, in sealing order.
            for seq in (1, 2):
                gw.publish(make_batch(fleet, seq, clone_a))
            await asyncio.to_thread(gw.wait_acks, 2)
            for seq in (1, 2):
                gw.publish(make_batch(fleet, seq, renewed))
            await asyncio.to_thread(gw.wait_acks, 2)
            collector._check_streams()
            assert 0 == collector.metrics.concurrent_streams._value.get()
            alone = await read_status(settings)
            assert [] == alone["concurrent_streams"]
            # Two agents: their streams' batches interleave in sealing time.
            for seq in (3, 4, 5):
                gw.publish(make_batch(fleet, seq, clone_b).model_copy(update={"created": now_us()}))
                gw.publish(make_batch(fleet, seq, clone_a).model_copy(update={"created": now_us()}))
            await asyncio.to_thread(gw.wait_acks, 6)
            collector._check_streams()
            assert 1 == collector.metrics.concurrent_streams._value.get()
    report = await read_status(settings)
    assert 1 == len(report["concurrent_streams"])
    flagged = report["concurrent_streams"][0]
    assert (str(fleet.gateway), "gw1") == (flagged["gateway_id"], flagged["name"])
    assert str(clone_a) in flagged["streams"] and str(clone_b) in flagged["streams"]
    assert "gw1" in {g["name"] for g in report["gateways"]}


async def test_watch_prints_a_gateways_frames_decoded(tmp_path: Path) -> None:
    """``watch`` subscribes to one gateway's topics and prints its status frame, batch and ack
    decoded (``mosquitto_sub`` prints binary msgpack); frames of other gateways are not shown."""
    host, port = SYSTEM_MQTT
    p = f"w{uuid.uuid4().hex[:10]}"
    tenant, gateway, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    config = tmp_path / "collector.toml"
    config.write_text(
        '[metadata]\ndsn = "postgresql://x@127.0.0.1/x"\n[timeseries]\ndsn = "postgresql://x@127.0.0.1/x"\n'
        f'[mqtt]\nhost = "{host}"\nport = {port}\nprefix = "{p}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "collector",
        "watch",
        "--config",
        str(config),
        "--gateway",
        str(gateway),
        "--count",
        "3",
        "--seconds",
        "30",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    await asyncio.sleep(2)  # the subscription is made right after connecting
    stream = uuid.uuid4()
    batch = Batch(
        gateway_id=gateway,
        stream=stream,
        seq=7,
        created=now_us(),
        series=[Series(device_id=uuid.uuid4(), metric="t", timestamps=[now_us()], values=[21.5])],
    )
    with GatewayClient(host, port, p, tenant, gateway) as gw:
        gw.publish(batch, gateway=other)
        gw.publish(
            encode_frame(GatewayStatus(gateway_id=gateway, state="online", time=now_us())),
            TopicKind.STATUS,
        )
        gw.publish(batch)
        gw.publish(
            encode_frame(Ack(stream=stream, seq=7, result=AckResult.OK, accepted=1)),
            TopicKind.ACK,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert 0 == proc.returncode, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert ["status", "batch", "ack"] == [line["kind"] for line in lines]
    assert {str(gateway)} == {lines[0]["gateway_id"], lines[1]["gateway_id"]}
    assert (7, 1, 21.5) == (
        lines[1]["seq"],
        lines[1]["readings"],
        lines[1]["series"][0]["last_value"],
    )
    assert ("ok", 1) == (lines[2]["result"], lines[2]["accepted"])


async def test_quarantine_messages_and_list_name_gateways_and_devices(
    dbs: Databases, tmp_path: Path
) -> None:
    """A disabled device's readings are quarantined with a message that names the device, and
    ``quarantine list`` names tenant, gateway and device (ids in brackets)."""
    fleet = dbs.fleet
    assert fleet is not None
    disabled = fleet.devices[1]
    await dbs.meta("UPDATE devices SET enabled = false WHERE id = $1", disabled)
    host, port = SYSTEM_MQTT
    p = f"q{uuid.uuid4().hex[:10]}"
    async with running(collector_settings(dbs, host, port, p)):
        with GatewayClient(host, port, p, fleet.tenant, fleet.gateway) as gw:
            gw.publish(make_batch(fleet, 1, uuid.uuid4(), points=3, device=disabled))
            await asyncio.to_thread(gw.wait_acks, 1)
    (message,) = [r["message"] for r in await dbs.fetch("SELECT message FROM quarantine")]
    assert f"device dev1 [{disabled}] is disabled" == message
    config = tmp_path / "c.toml"
    config.write_text(
        f'[metadata]\ndsn = "{dbs.metadata}"\n[timeseries]\ndsn = "{dbs.timeseries}"\n'
        f'[mqtt]\nprefix = "{p}"\n'
    )
    listed = _cli("quarantine", "list", "--config", str(config))
    assert 0 == listed.returncode, listed.stderr
    assert (
        f"tenant acme [{fleet.tenant}] gateway gw1 [{fleet.gateway}] device dev1 [{disabled}]:"
        in listed.stdout
    )
