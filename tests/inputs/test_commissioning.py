"""`sensormine-agent inputs list` and `inputs test <name>` against the real test peers."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from tests.inputs.modbus_peer import ModbusPeer
from tests.inputs.test_mqtt import publish
from tests.inputs.test_sysfs import W1_BAD_CRC, W1_GOOD, write

ROOT = Path(__file__).resolve().parents[2]
METER, PROBE, BAD_PROBE, UPS, DOOR = (uuid.uuid4() for _ in range(5))


async def agent(*args: str) -> tuple[int, str]:
    """Run ``sensormine-agent`` (as ``python -m agent``) and return its status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


def write_config(tmp_path: Path, modbus_port: int, mqtt: tuple[str, int], prefix: str) -> Path:
    """An agent configuration with one input of each kind of this issue."""
    tree = tmp_path / "root"
    write(tree, "/sys/bus/w1/devices/28-0316a2795aff/w1_slave", W1_GOOD)
    write(tree, "/sys/bus/w1/devices/28-000005e2fdc3/w1_slave", W1_BAD_CRC)
    program = tmp_path / "ups.py"
    program.write_text('print(\'{"volts": 13.5, "on_battery": false}\')\n')
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

[[inputs]]
type = "modbus"
name = "meters"
host = "127.0.0.1"
port = {modbus_port}
timeout = "500ms"

[[inputs.devices]]
id = "{METER}"
name = "meter"
unit = 1

[[inputs.devices.fields]]
metric = "voltage"
address = 0
data_type = "float32"

[[inputs.devices.fields]]
metric = "breaker"
table = "coil"
address = 0

[[inputs]]
type = "sysfs"
name = "probes"
root = "{tree}"

[[inputs.devices]]
kind = "w1"
id = "{PROBE}"
name = "flow"
sensor = "28-0316a2795aff"

[[inputs.devices]]
kind = "w1"
id = "{BAD_PROBE}"
name = "return"
sensor = "28-000005e2fdc3"

[[inputs]]
type = "command"
name = "ups"
command = ["{sys.executable}", "{program}"]

[[inputs.devices]]
id = "{UPS}"
name = "ups"

[[inputs]]
type = "system"
name = "health"

[[inputs]]
type = "mqtt"
name = "local"
host = "{mqtt[0]}"
port = {mqtt[1]}
probe_wait = "3s"

[[inputs.subscriptions]]
topic = "{prefix}/z2m/+"
device_level = 2
all_fields = true

[[inputs.devices]]
id = "{DOOR}"
name = "door"
"""
    )
    return path


async def test_inputs_list_shows_every_kind(tmp_path: Path, mqtt_address: tuple[str, int]) -> None:
    """`inputs list` names the kinds of this issue and the configured instances."""
    config = write_config(tmp_path, 1, mqtt_address, "unused")
    status, output = await agent("inputs", "list", "--config", str(config))
    assert status == 0, output
    for name in ("modbus", "mqtt", "sysfs", "command", "system"):
        assert f"  {name} " in output
    for name, type_ in (("meters", "modbus"), ("probes", "sysfs"), ("local", "mqtt")):
        assert f"type={type_}" in output
        assert name in output


async def test_inputs_test_against_the_peers(tmp_path: Path, mqtt_address: tuple[str, int]) -> None:
    """`inputs test` prints each device's readings or error, and exits 1 when one failed."""
    prefix = f"smtest-{uuid.uuid4().hex[:10]}"
    peer = ModbusPeer()
    await peer.start()
    await publish(mqtt_address, [(f"{prefix}/z2m/door", '{"contact": true}')], retain=True)
    try:
        config = str(write_config(tmp_path, peer.port, mqtt_address, prefix))
        status, output = await agent("inputs", "test", "meters", "--config", config)
        assert status == 0, output
        assert f"meter ({METER})\n  voltage = 12.5\n  breaker = true\n" in output

        status, output = await agent("inputs", "test", "probes", "--config", config)
        assert status == 1, output
        assert "flow" in output and "temperature = 20.687" in output
        assert "error: crc check failed (crc=e1 NO)" in output

        status, output = await agent("inputs", "test", "ups", "--config", config)
        assert status == 0, output
        assert "volts = 13.5" in output and "on_battery = false" in output

        status, output = await agent("inputs", "test", "health", "--config", config)
        assert status == 0, output
        assert "cpu_percent = " in output and "agent_rss_bytes = " in output

        status, output = await agent("inputs", "test", "local", "--config", config)
        assert status == 0, output
        assert "contact = true" in output

        await peer.stop()
        status, output = await agent("inputs", "test", "meters", "--config", config)
        assert status == 1, output
        assert f"error: cannot connect to tcp 127.0.0.1:{peer.port}" in output
    finally:
        await peer.stop()
        await publish(mqtt_address, [(f"{prefix}/z2m/door", b"")], retain=True)
