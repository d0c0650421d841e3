"""docs/registry.md is runnable: its commands, in order, take an empty database to a provisioned gateway."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from agent.settings import load_settings
from collector.admin.schemafile import SchemaFileError, check_schema_document
from tests.admin.conftest import REPO, Admin

DOC = REPO / "docs" / "registry.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text(encoding="utf-8")) if lang == kind]


def _commands() -> list[str]:
    lines = [
        line.removeprefix("$ ").strip()
        for block in _blocks("console")
        for line in block.splitlines()
        if line.startswith("$ ")
    ]
    return lines


def test_doc_walkthrough_runs(
    admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `sensormine-collector` command of the page succeeds, and the provisioned files load."""
    monkeypatch.chdir(tmp_path)
    (json_block,) = _blocks("json")
    (tmp_path / "room-climate.json").write_text(json_block, encoding="utf-8")
    health = REPO / "config" / "schemas" / "gateway-health.json"
    (tmp_path / "gateway-health.json").write_text(health.read_text(encoding="utf-8"))
    commands = _commands()
    assert commands[0].startswith("export SENSORMINE_COLLECTOR_CONFIG=")
    ran = 0
    for command in commands[1:]:
        argv = shlex.split(command)
        assert "sensormine-collector" == argv[0], command
        if argv[1] == "migrate":
            continue  # the fixture's database is migrated; the page's `migrate` is the CLI's own
        if argv[1] == "broker":
            continue  # run against a real broker by tests/ops/test_broker_security.py
        admin.run(*argv[1:])
        ran += 1
    assert ran >= 12
    devices = admin.query("SELECT id FROM devices")
    for name, simulated in (("plant-1.toml", False), ("plant-1-simulated.toml", True)):
        settings = load_settings(tmp_path / name)
        gateway = admin.query("SELECT id, tenant_id FROM gateways WHERE name = 'plant-1'")[0]
        assert (gateway["id"], gateway["tenant_id"]) == (
            settings.gateway.id,
            settings.gateway.tenant_id,
        )
        if simulated:
            configured = {d.id for d in settings.inputs[0].devices}  # type: ignore[attr-defined]
            assert {r["id"] for r in devices} == configured
        else:
            # The gateway-health device gets a system input, never a Modbus stanza.
            (health_device,) = admin.query("SELECT id FROM devices WHERE name = 'plant-1-health'")
            system = [i for i in settings.inputs if i.type == "system"]
            assert [health_device["id"]] == [i.device_id for i in system]  # type: ignore[attr-defined]
            text = (tmp_path / name).read_text()
            assert 'name = "plant-1-health"\n# unit' not in text
            assert text.count('# type = "modbus"') == len(devices) - 1
    history = admin.data("device-types history room-sensor --tenant acme")
    assert ["create", "update"] == [a["action"] for a in history["audit"]]
    assert "alice" == history["audit"][1]["actor"]


def test_doc_schema_example_is_valid() -> None:
    """The page's JSON Schema example passes the schema checks."""
    (json_block,) = _blocks("json")
    document = json.loads(json_block)
    assert document == check_schema_document(document)


def test_doc_error_examples_are_real() -> None:
    """The error lines the page shows are the checker's real messages."""
    (json_block,) = _blocks("json")
    base = json.loads(json_block)
    (text_block,) = _blocks("text")
    shown = [
        line.removeprefix("room-climate.json: ").removesuffix("...)")
        for line in text_block.splitlines()
    ]
    variants = []
    for change in (
        {"temperature": {**base["properties"]["temperature"], "pattern": "^x"}},
        {"humidity": {"type": "object"}},
        {"temperature": {**base["properties"]["temperature"], "minimum": "low"}},
    ):
        document = {**base, "properties": {**base["properties"], **change}}
        with pytest.raises(SchemaFileError) as caught:
            check_schema_document(document, "room-climate.json")
        variants.append(caught.value.problems[0])
    for expected, actual in zip(shown, variants, strict=True):
        assert actual.startswith(expected), (expected, actual)
