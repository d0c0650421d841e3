"""Gateway provisioning: a ready-to-use ``agent.toml`` for one registered gateway.

The file carries the gateway's id and tenant id, the broker address and topic prefix, and one
input stanza per device assigned to the gateway: commented ``modbus`` stanzas with one field per
metric of the device's schema for the operator to complete (address, host or serial port), or,
with ``simulated=True``, a working ``simulated`` input whose waveforms stay inside every
metric's range, so that a demo gateway sends only readings the collector accepts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from collector.admin.kinds import GATEWAY
from collector.admin.store import RegistryStore, Row

DEFAULT_BUFFER_PATH = "/var/lib/sensormine/buffer.db"
# A simulated metric swings over this share of its range around its centre, and never more
# than half the distance from the centre to the nearer bound; noise is a small share of that.
SWING = 0.05
NOISE = 0.02
PERIOD = "60s"


@dataclass(frozen=True)
class BrokerAddress:
    """Where the gateway's agent finds the broker."""

    host: str
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None
    topic_prefix: str = "sensormine"


@dataclass(frozen=True)
class GatewayCredential:
    """The credential issued with the file, by the paths the agent finds it at on the gateway."""

    kind: str  # "certificate" or "password"
    directory: str = "/etc/sensormine/credentials"
    with_ca: bool = True

    def path(self, name: str) -> str:
        """A file of the credentials directory, as the gateway sees it."""
        return f"{self.directory.rstrip('/')}/{name}"


@dataclass(frozen=True)
class SimulatedMetric:
    """A waveform that stays within one metric's range."""

    name: str
    base: float
    amplitude: float
    noise: float
    decimals: int


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(text, ensure_ascii=False)


def _num(value: float) -> str:
    text = repr(float(value))
    return text if ("." in text or "e" in text) else text + ".0"


def _bound(prop: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = prop.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def simulate_metric(name: str, prop: dict[str, Any]) -> SimulatedMetric | None:
    """A sine wave inside the metric's range; ``None`` for metrics a number cannot satisfy."""
    types = prop.get("type", "number")
    names = {types} if isinstance(types, str) else set(types)
    if not names & {"number", "integer"}:
        return None
    integer = "number" not in names
    enum = prop.get("enum")
    if enum is not None:
        numbers = sorted(v for v in enum if isinstance(v, int | float) and not isinstance(v, bool))
        if not numbers:
            return None
        # A constant enum member: the only waveform guaranteed to hit members exactly.
        return SimulatedMetric(name, float(numbers[0]), 0.0, 0.0, 6)
    low = _bound(prop, "minimum", "exclusiveMinimum")
    high = _bound(prop, "maximum", "exclusiveMaximum")
    default = _bound(prop, "default")
    if low is not None and high is not None:
        centre = default if default is not None and low < default < high else (low + high) / 2
        amplitude = min((high - low) * SWING, min(centre - low, high - centre) / 2)
    elif low is not None:
        centre = default if default is not None and default > low else low + 10.0
        amplitude = min(abs(centre) * SWING or 1.0, (centre - low) / 2)
    elif high is not None:
        centre = default if default is not None and default < high else high - 10.0
        amplitude = min(abs(centre) * SWING or 1.0, (high - centre) / 2)
    else:
        centre = default if default is not None else 50.0
        amplitude = abs(centre) * SWING or 1.0
    if integer:
        # A constant whole number inside the range: a waveform would produce fractions.
        return SimulatedMetric(name, float(math.ceil(centre)), 0.0, 0.0, 6)
    return SimulatedMetric(name, centre, amplitude, amplitude * NOISE, 3)


def _metrics(device: Row) -> dict[str, dict[str, Any]]:
    document = device.get("json_schema") or {}
    props = document.get("properties", {}) if isinstance(document, dict) else {}
    return {str(k): v for k, v in props.items() if isinstance(v, dict)}


def _describe(prop: dict[str, Any]) -> str:
    parts = []
    if isinstance(prop.get("unit"), str):
        parts.append(prop["unit"])
    low = _bound(prop, "minimum", "exclusiveMinimum")
    high = _bound(prop, "maximum", "exclusiveMaximum")
    if low is not None or high is not None:
        parts.append(f"{'' if low is None else f'{low:g}'}..{'' if high is None else f'{high:g}'}")
    types = prop.get("type")
    if types is not None:
        parts.append(types if isinstance(types, str) else "|".join(types))
    return ", ".join(parts)


def _input_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", device_name).strip("-") or "device"


def render_agent_config(
    gateway: Row,
    tenant_name: str,
    devices: list[Row],
    broker: BrokerAddress,
    *,
    simulated: bool = False,
    interval: str = "1s",
    seed: int = 1,
    buffer_path: str = DEFAULT_BUFFER_PATH,
    credential: GatewayCredential | None = None,
) -> str:
    """The text of the gateway's ``agent.toml``; with ``credential``, its [mqtt] part logs in
    with that certificate or password (TLS)."""
    active = [d for d in devices if d["enabled"]]
    inactive = [d for d in devices if not d["enabled"]]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    out = [
        f"# Sensormine agent configuration for gateway {gateway['name']!r} of tenant {tenant_name!r},",
        f"# written by `sensormine-collector gateways provision` at {now}.",
        "# Install: copy this file to /etc/sensormine/agent.toml on the gateway, complete the input",
        "# stanzas below, then run `sensormine-agent check-config` (see docs/install-agent.md).",
        "# Every key and its default: docs/configuration.md.",
        "",
        "[gateway]",
        f"id = {_q(str(gateway['id']))}",
        f"tenant_id = {_q(str(gateway['tenant_id']))}",
        "",
        "[mqtt]",
        f"host = {_q(broker.host)}",
        f"port = {broker.port}",
        f"topic_prefix = {_q(broker.topic_prefix)}",
    ]
    out += _credential_lines(gateway, broker, credential)
    out += [
        "",
        "[buffer]",
        f"path = {_q(buffer_path)}",
        "",
        f"# Devices assigned to this gateway in the registry: {len(active)}"
        + (f" ({len(inactive)} disabled, left out)" if inactive else ""),
    ]
    width = max((len(d["name"]) for d in devices), default=0)
    for device in devices:
        state = "" if device["enabled"] else "  [disabled]"
        out.append(f"#   {device['name']:<{width}}  {device['id']}  {device['device_type']}{state}")
    out.append("")
    if not active:
        out.append(
            "# No enabled device is assigned: add devices with `sensormine-collector devices"
        )
        out.append(
            "# create ... --gateway` (or `devices update <device> --gateway ...`), then provision again."
        )
    elif simulated:
        out += _simulated_stanza(active, interval, seed)
    else:
        for device in active:
            if is_gateway_health(device):
                out += _system_stanza(device, gateway["id"])
            else:
                out += _modbus_stanza(device)
    return "\n".join(out).rstrip() + "\n"


SYSTEM_GROUPS: dict[str, frozenset[str]] = {
    "cpu": frozenset({"cpu_percent"}),
    "memory": frozenset({"memory_total_bytes", "memory_available_bytes", "memory_used_percent"}),
    "disk": frozenset({"disk_total_bytes", "disk_free_bytes", "disk_free_percent"}),
    "load": frozenset({"load_1m", "load_5m", "load_15m"}),
    "temperature": frozenset({"temperature"}),
    "uptime": frozenset({"uptime_seconds"}),
    "agent": frozenset(
        {
            "agent_buffer_readings",
            "agent_buffer_held_readings",
            "agent_buffer_batches",
            "agent_buffer_bytes",
            "agent_dropped",
            "agent_produced",
            "agent_rss_bytes",
            "agent_link_up",
        }
    ),
}
"""What each group of the agent's ``system`` input reports (config/schemas/gateway-health.json
describes every metric)."""
GATEWAY_HEALTH_METRICS = frozenset().union(*SYSTEM_GROUPS.values())


def is_gateway_health(device: Row) -> bool:
    """Whether ``device``'s schema is the gateway's own health (the ``system`` input's metrics)."""
    metrics = _metrics(device)
    return bool(metrics) and set(metrics) <= GATEWAY_HEALTH_METRICS


def _system_stanza(device: Row, gateway_id: Any) -> list[str]:
    """A ``system`` input for the gateway-health device: it reads the gateway itself, nothing
    to complete."""
    out = [
        f"## Device {device['name']} ({device['device_type']}): the gateway's own health.",
        "[[inputs]]",
        'type = "system"',
        f"name = {_q(_input_name(device['name']))}",
        'interval = "30s"',
        f"device_name = {_q(device['name'])}",
    ]
    metrics = set(_metrics(device))
    groups = [g for g, names in SYSTEM_GROUPS.items() if names <= metrics]
    if len(groups) < len(SYSTEM_GROUPS):
        # Only what the device type's schema describes: anything else would be quarantined.
        out.append(f"groups = [{', '.join(_q(g) for g in groups)}]")
    if str(device["id"]) != str(gateway_id):
        out.append(f"device_id = {_q(str(device['id']))}")
    return [*out, ""]


def _credential_lines(
    gateway: Row, broker: BrokerAddress, credential: GatewayCredential | None
) -> list[str]:
    """The login part of [mqtt] and the [mqtt.tls] table."""
    if credential is None:
        out = [
            "# No credential was issued with this file (gateways provision --credential none):",
            "# username is the gateway id; put the password in a file readable by the agent only.",
            f"# username = {_q(str(gateway['id']))}",
            '# password_file = "/etc/sensormine/credentials/mqtt-password"',
            "",
            "[mqtt.tls]",
            f"enabled = {'true' if broker.tls else 'false'}",
        ]
        if broker.ca_file:
            out.append(f"ca_file = {_q(broker.ca_file)}")
        elif broker.tls:
            out.append('# ca_file = "/etc/sensormine/ca.pem"  # default: the system\'s CA store')
        return out
    ca = credential.path("ca.pem") if credential.with_ca else broker.ca_file
    if credential.kind == "password":
        out = [
            "# The broker knows this gateway by its id; the password was written once, next to",
            "# this file, and is kept nowhere else (the registry holds only its hash).",
            f"username = {_q(str(gateway['id']))}",
            f"password_file = {_q(credential.path('mqtt-password'))}",
            "",
            "[mqtt.tls]",
            "enabled = true",
        ]
    else:
        out = [
            "# The broker knows this gateway by its client certificate (CN = the gateway id).",
            "",
            "[mqtt.tls]",
            "enabled = true",
            f"cert_file = {_q(credential.path('gateway.pem'))}",
            f"key_file = {_q(credential.path('gateway.key'))}",
        ]
    if ca:
        out.append(f"ca_file = {_q(ca)}")
    else:
        out.append('# ca_file = "/etc/sensormine/ca.pem"  # default: the system\'s CA store')
    return out


def _simulated_stanza(devices: list[Row], interval: str, seed: int) -> list[str]:
    out = [
        "# Simulated readings for every device, inside each metric's range in its schema.",
        "[[inputs]]",
        'type = "simulated"',
        'name = "simulated"',
        f"interval = {_q(interval)}",
        f"seed = {seed}",
    ]
    for device in devices:
        out += [
            "",
            "[[inputs.devices]]",
            f"id = {_q(str(device['id']))}",
            f"name = {_q(device['name'])}",
        ]
        metrics = _metrics(device)
        if not metrics:
            out.append("# Its device type has no schema: the input's default metrics are sent.")
            continue
        skipped = []
        for name, prop in metrics.items():
            sim = simulate_metric(name, prop)
            if sim is None:
                skipped.append(name)
                continue
            out += [
                "",
                "  [[inputs.devices.metrics]]",
                f"  name = {_q(sim.name)}  # {_describe(prop)}",
                '  waveform = "sine"',
                f"  base = {_num(sim.base)}",
                f"  amplitude = {_num(sim.amplitude)}",
                f"  period = {_q(PERIOD)}",
                f"  noise = {_num(sim.noise)}",
                f"  decimals = {sim.decimals}",
            ]
        if skipped:
            out.append(f"  # Not simulated (not numeric): {', '.join(skipped)}")
    return out


_DATA_TYPES = {"number": ("holding", "float32", 2), "integer": ("holding", "int32", 2)}


def _modbus_stanza(device: Row) -> list[str]:
    """A commented ``modbus`` stanza: uncommenting every ``# `` line gives a valid input."""
    metrics = _metrics(device)
    out = [
        f"## Device {device['name']} ({device['device_type']}): complete and uncomment one input",
        "## stanza. Shown: Modbus TCP, one float32 holding register pair per metric; take the",
        "## addresses, data types, word order and scale from the device's register map.",
        "## Other kinds (sysfs, mqtt, command, system): agent/inputs/<kind>/sample.toml.",
        "# [[inputs]]",
        '# type = "modbus"',
        f"# name = {_q(_input_name(device['name']))}",
        '# transport = "tcp"         # or "rtu" with serial_port = "/dev/ttyUSB0"',
        '# host = "192.0.2.10"       # REPLACE: the device or its TCP-to-RTU gateway',
        "# port = 502",
        '# interval = "10s"',
        "#",
        "# [[inputs.devices]]",
        f"# id = {_q(str(device['id']))}",
        f"# name = {_q(device['name'])}",
        "# unit = 1                  # REPLACE: the Modbus unit id",
    ]
    address = 0
    written = 0
    for name, prop in metrics.items():
        types = prop.get("type", "number")
        names = {types} if isinstance(types, str) else set(types)
        if "boolean" in names and not names & {"number", "integer"}:
            table, data_type, width = "coil", None, 1
        elif names & {"number", "integer"}:
            table, data_type, width = _DATA_TYPES["number" if "number" in names else "integer"]
        else:
            out.append(f"## metric {name} ({_describe(prop)}) is text: Modbus cannot read it")
            continue
        out += [
            "#",
            "# [[inputs.devices.fields]]",
            f"# metric = {_q(name)}  # {_describe(prop)}",
            f'# table = "{table}"',
            f"# address = {address}  # REPLACE",
        ]
        if data_type is not None:
            out.append(f'# data_type = "{data_type}"')
        address += width
        written += 1
    if not metrics:
        out += [
            "#",
            "# [[inputs.devices.fields]]",
            '# metric = "value"          # REPLACE: its type has no schema; name the metrics',
            '# table = "holding"',
            "# address = 0",
            '# data_type = "float32"',
        ]
    elif not written:
        out.append("## (no metric of this device can be read over Modbus)")
    out.append("")
    return out


async def provision(
    store: RegistryStore,
    gateway_ref: str,
    broker: BrokerAddress,
    *,
    tenant: str | None = None,
    simulated: bool = False,
    interval: str = "1s",
    seed: int = 1,
    buffer_path: str = DEFAULT_BUFFER_PATH,
    credential: GatewayCredential | None = None,
    issue: Callable[[Row], Awaitable[None]] | None = None,
) -> tuple[Row, str]:
    """The gateway's row and the text of its ``agent.toml``; ``issue`` (when given) issues the
    gateway's credential in the same connection before the file is made."""
    gateway = await store.resolve(GATEWAY, gateway_ref, await store.tenant_ref(tenant))
    if issue is not None:
        await issue(gateway)
    devices = await store.gateway_devices(gateway["id"])
    tenant_name = await store.conn.fetchval(
        "SELECT name FROM tenants WHERE id = $1", gateway["tenant_id"]
    )
    text = render_agent_config(
        gateway,
        str(tenant_name),
        devices,
        broker,
        simulated=simulated,
        interval=interval,
        seed=seed,
        buffer_path=buffer_path,
        credential=credential,
    )
    return gateway, text
