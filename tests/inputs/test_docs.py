"""docs/inputs.md cannot rot: its examples load, and every configuration key is documented."""

from __future__ import annotations

import re
import tomllib
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.inputs.command.config import CommandConfig
from agent.inputs.common import DeviceConfig
from agent.inputs.modbus.config import FieldConfig, ModbusConfig, ModbusDevice
from agent.inputs.mqtt.config import MqttDevice, MqttInputConfig, Subscription
from agent.inputs.sysfs.config import FileDevice, HwmonDevice, SysfsConfig, ThermalDevice, W1Device
from agent.inputs.system.config import SystemConfig
from agent.settings import settings_from_dict

DOC = (Path(__file__).resolve().parents[2] / "docs" / "inputs.md").read_text()


def section(kind: str) -> str:
    """The text of the ``## kind`` section."""
    match = re.search(rf"^## {kind}\n(.*?)(?=^## )", DOC, flags=re.S | re.M)
    assert match is not None, f"docs/inputs.md has no section {kind}"
    return match.group(1)


def test_every_example_loads_into_the_agent_settings() -> None:
    """Each ```toml block is a valid [[inputs]] list of a complete agent configuration."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
    assert len(blocks) == 5
    for block in blocks:
        document = tomllib.loads(block)
        settings = settings_from_dict(
            {"gateway": {"id": str(uuid.uuid4()), "tenant_id": str(uuid.uuid4())}, **document},
            "docs/inputs.md",
        )
        assert len(settings.inputs) == len(document["inputs"])


@pytest.mark.parametrize(
    ("kind", "models"),
    [
        ("modbus", [ModbusConfig, ModbusDevice, FieldConfig]),
        ("mqtt", [MqttInputConfig, Subscription, MqttDevice]),
        ("sysfs", [SysfsConfig, W1Device, ThermalDevice, HwmonDevice, FileDevice]),
        ("command", [CommandConfig, DeviceConfig]),
        ("system", [SystemConfig]),
    ],
)
def test_every_key_is_documented(kind: str, models: list[type[BaseModel]]) -> None:
    """Every field of the kind's configuration models is named in its section."""
    text = section(kind)
    common = {"type", "name", "id"}
    for model in models:
        for key in model.model_fields:
            if key in common:
                continue
            assert f"`{key}`" in text, f"docs/inputs.md ## {kind} does not mention `{key}`"
