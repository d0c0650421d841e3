"""The operations docs cannot rot: their configuration examples load into the programs' own
settings models, and every command they tell an operator to run exists."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from agent.cli import main as agent_cli
from agent.settings import settings_from_dict
from collector.cli import main as collector_cli
from collector.settings import parse_settings
from tests.ops.units import REPO, UNITS_DIR, make_scratch_root, verify

DOCS = {
    name: (REPO / "docs" / name).read_text()
    for name in ("install-agent.md", "deploy-collector.md", "troubleshooting.md")
}


def toml_blocks(text: str) -> list[str]:
    """The fenced ```toml blocks of a Markdown page."""
    return re.findall(r"```toml\n(.*?)```", text, flags=re.S)


def merged(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``part`` laid over it, table by table."""
    out = dict(base)
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_collector_instance_example_is_a_valid_configuration() -> None:
    """collector-a.toml in deploy-collector.md loads, and the documented sed for instance b
    gives a valid configuration with its own client id and metrics port."""
    (block,) = [b for b in toml_blocks(DOCS["deploy-collector.md"]) if "collector-a.toml" in b]
    a = parse_settings(tomllib.loads(block), "docs/deploy-collector.md collector-a.toml")
    b_text = block.replace("collector-host1-a", "collector-host1-b").replace(":9464", ":9465")
    b = parse_settings(tomllib.loads(b_text), "collector-b.toml")
    assert (a.mqtt.group, a.mqtt.prefix) == (b.mqtt.group, b.mqtt.prefix)
    assert a.mqtt.client_id != b.mqtt.client_id
    assert a.metrics.listen != b.metrics.listen
    assert (8883, True, "sensormine-collector") == (a.mqtt.port, a.mqtt.tls, a.mqtt.username)


def test_agent_tls_example_is_a_valid_part_of_the_agent_configuration() -> None:
    """The agent's [mqtt] TLS part in deploy-collector.md, laid over the example configuration, loads."""
    (block,) = [b for b in toml_blocks(DOCS["deploy-collector.md"]) if "agent.toml" in b]
    example = tomllib.loads((REPO / "config/agent.example.toml").read_text())
    settings = settings_from_dict(merged(example, tomllib.loads(block)), "docs/deploy-collector.md")
    assert (8883, True) == (settings.mqtt.port, settings.mqtt.tls.enabled)
    # A gateway with a certificate: the broker takes its identity from the certificate's CN.
    assert (None, True) == (settings.mqtt.username, settings.mqtt.tls.key_file is not None)


def test_every_toml_block_in_the_operations_docs_is_checked() -> None:
    """No TOML example in these pages escapes the two tests above."""
    blocks = {name: len(toml_blocks(text)) for name, text in DOCS.items()}
    assert {"install-agent.md": 0, "deploy-collector.md": 2, "troubleshooting.md": 0} == blocks


@pytest.mark.parametrize(
    ("program", "group"), [("sensormine-agent", agent_cli), ("sensormine-collector", collector_cli)]
)
def test_every_command_in_the_operations_docs_exists(program: str, group: click.Group) -> None:
    """Each `program command` the docs show is a command of that program."""
    named = {
        match for text in DOCS.values() for match in re.findall(rf"{program} ([a-z][a-z-]+)", text)
    }
    assert set() == named - set(group.commands)
    assert named  # the docs do show this program's commands


def test_drop_in_example_is_accepted_by_systemd(tmp_path: Path) -> None:
    """The drop-in shown in install-agent.md, installed beside the unit, verifies cleanly."""
    (block,) = re.findall(r"```ini\n(.*?)```", DOCS["install-agent.md"], flags=re.S)
    root = make_scratch_root(tmp_path / "root")
    shutil.copy(UNITS_DIR / "sensormine-agent.service", root / "etc/systemd/system")
    drop_ins = root / "etc/systemd/system/sensormine-agent.service.d"
    drop_ins.mkdir()
    (drop_ins / "override.conf").write_text(block)
    program = root / "opt/sensormine/venv/bin/sensormine-agent"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    result = verify(root, "sensormine-agent.service")
    assert (0, "") == (result.returncode, result.stderr)
