"""Gateway provisioning: the written agent.toml loads with the agent's own settings loader."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.inputs.base import InputContext, kind
from agent.settings import Settings, load_settings
from collector.validation import compile_schema
from tests.admin.conftest import Admin


def _gateway_devices(admin: Admin, gateway: str) -> dict[uuid.UUID, dict[str, Any]]:
    rows = admin.query(
        """
        SELECT d.id, d.name, sv.json_schema
        FROM devices d
        JOIN gateways g ON g.id = d.gateway_id
        JOIN device_types dt ON dt.id = d.device_type_id
        JOIN LATERAL (SELECT json_schema FROM schema_versions
                      WHERE schema_id = dt.schema_id ORDER BY version DESC LIMIT 1) sv ON true
        WHERE g.name = $1 AND d.enabled
        """,
        gateway,
    )
    return {r["id"]: r for r in rows}


@pytest.fixture
def demo(admin: Admin) -> Admin:
    """The admin fixture with the demo seed applied."""
    admin.run("seed --demo")
    return admin


@pytest.mark.parametrize("gateway", ["demo-gateway-north", "demo-gateway-south"])
def test_simulated_provision_loads_and_stays_in_range(
    demo: Admin, tmp_path: Path, gateway: str
) -> None:
    """--simulated: the agent loads the file; its devices and metrics are the registry's, in range."""
    out = tmp_path / f"{gateway}.toml"
    demo.run(f"gateways provision {gateway} --simulated --output {out}")
    settings = load_settings(out)
    row = demo.query("SELECT id, tenant_id FROM gateways WHERE name = $1", gateway)[0]
    assert (row["id"], row["tenant_id"]) == (settings.gateway.id, settings.gateway.tenant_id)
    expected = _gateway_devices(demo, gateway)
    assert 1 == len(settings.inputs)
    config: Any = settings.inputs[0]
    assert "simulated" == config.type
    assert set(expected) == {d.id for d in config.devices}
    for device in config.devices:
        schema = expected[device.id]["json_schema"]
        assert set(schema["properties"]) == {m.name for m in device.metrics}
        for metric in device.metrics:
            prop = schema["properties"][metric.name]
            # Ten standard deviations of noise: the range holds for every practical run.
            low = metric.base - metric.amplitude - 10 * metric.noise
            high = metric.base + metric.amplitude + 10 * metric.noise
            assert prop["minimum"] <= low and high <= prop["maximum"], (device.name, metric.name)

    # The input's own first round of values passes the collector's validator.
    context = InputContext(gateway_id=settings.gateway.id, buffer_path=tmp_path / "buffer.db")
    probe = asyncio.run(kind("simulated").factory(config, context).probe())
    for result in probe:
        compiled = compile_schema(expected[result.device_id]["json_schema"])
        for metric, value in result.readings.items():
            rule = compiled.rule(metric)
            assert rule is not None and rule.point_reason(value) is None, (metric, value)


def _uncomment(text: str) -> str:
    """The file with its commented input stanzas switched on, as an operator would."""
    start = text.index("# [[inputs]]")
    tail = [
        line[2:] if line.startswith("# ") or line == "#" else line
        for line in text[start:].splitlines()
        if not line.startswith("##")
    ]
    return text[:start] + "\n".join(line if line != "#" else "" for line in tail) + "\n"


def test_modbus_provision_loads_before_and_after_completion(demo: Admin, tmp_path: Path) -> None:
    """Without --simulated: valid as written (no inputs), and valid with the stanzas uncommented."""
    out = tmp_path / "south.toml"
    demo.run(
        f"gateways provision demo-gateway-south --output {out} --broker-host mqtt.example "
        "--broker-port 8883 --tls --ca-file /etc/sensormine/ca.pem"
    )
    settings = load_settings(out)
    assert [] == settings.inputs
    assert ("mqtt.example", 8883, True, Path("/etc/sensormine/ca.pem"), "sensormine") == (
        settings.mqtt.host,
        settings.mqtt.port,
        settings.mqtt.tls.enabled,
        settings.mqtt.tls.ca_file,
        settings.mqtt.topic_prefix,
    )
    completed = tmp_path / "south-completed.toml"
    completed.write_text(_uncomment(out.read_text()))
    full: Settings = load_settings(completed)
    expected = _gateway_devices(demo, "demo-gateway-south")
    assert 10 == len(full.inputs)
    seen: dict[uuid.UUID, set[str]] = {}
    for config in full.inputs:
        assert "modbus" == config.type
        for device in config.devices:  # type: ignore[attr-defined]
            seen[device.id] = {f.metric for f in device.fields}
    assert {i: set(r["json_schema"]["properties"]) for i, r in expected.items()} == seen


def test_provision_to_stdout_and_output_guard(demo: Admin, tmp_path: Path) -> None:
    """Without --output the file goes to stdout; an existing file needs --force."""
    result = demo.run("gateways provision demo-gateway-north --simulated")
    path = tmp_path / "north.toml"
    path.write_text(result.stdout)
    assert 10 == len(load_settings(path).inputs[0].devices)  # type: ignore[attr-defined]
    assert f"{path} exists; add --force to overwrite it" in demo.fail(
        f"gateways provision demo-gateway-north --output {path}"
    )
    demo.run(f"gateways provision demo-gateway-north --output {path} --force")
    assert [] == load_settings(path).inputs


def test_provision_follows_the_registry(demo: Admin, tmp_path: Path) -> None:
    """Disabled devices are left out, moved devices follow, the collector's prefix is used."""
    demo.run("devices disable env-north-office")
    demo.run("devices update vib-south-fan --gateway demo-gateway-north")
    config = demo.config.read_text() + '\n[mqtt]\nprefix = "acme-prod"\nhost = "10.1.2.3"\n'
    demo.config.write_text(config)
    out = tmp_path / "north.toml"
    demo.run(f"gateways provision demo-gateway-north --simulated --output {out}")
    text = out.read_text()
    assert "env-north-office" in text and "[disabled]" in text
    settings = load_settings(out)
    names = {d.name for d in settings.inputs[0].devices}  # type: ignore[attr-defined]
    assert "env-north-office" not in names and "vib-south-fan" in names
    assert 10 == len(names)
    assert ("acme-prod", "10.1.2.3") == (settings.mqtt.topic_prefix, settings.mqtt.host)


def test_provision_of_empty_gateway(admin: Admin, tmp_path: Path) -> None:
    """A gateway with no device gives a valid file that says how to add devices."""
    admin.run("tenants create acme")
    admin.run("gateways create empty --tenant acme")
    out = tmp_path / "empty.toml"
    admin.run(f"gateways provision empty --simulated --output {out}")
    assert [] == load_settings(out).inputs
    assert "No enabled device is assigned" in out.read_text()
    assert "gateway nosuch not found" in admin.fail("gateways provision nosuch")
