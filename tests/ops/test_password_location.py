"""The MQTT password has one location: the file the unit loads as a systemd credential. The
provisioned configuration, the examples, the installer and every document name that file."""

from __future__ import annotations

import re
import uuid

from collector.admin.provision import BrokerAddress, render_agent_config
from tests.ops.units import REPO

# A path under /etc/sensormine that ends in mqtt-password, wherever it is written.
PASSWORD_PATH = re.compile(r"/etc/sensormine/[\w./-]*mqtt-password")


def unit_credential(unit: str) -> str:
    """The file the unit's ``LoadCredential=mqtt-password:`` loads."""
    text = (REPO / "systemd" / unit).read_text()
    paths: list[str] = re.findall(r"^LoadCredential=mqtt-password:(\S+)$", text, flags=re.M)
    assert 1 == len(paths), unit
    return paths[0]


def test_provisioned_agent_config_names_the_units_password_file() -> None:
    """The agent.toml that ``gateways provision`` writes points the operator at the file the
    unit loads, not at a second location."""
    gateway = {"id": uuid.uuid4(), "tenant_id": uuid.uuid4(), "name": "pump-house"}
    text = render_agent_config(gateway, "acme", [], BrokerAddress(host="broker.example"))
    named = set(PASSWORD_PATH.findall(text))
    assert {unit_credential("sensormine-agent.service")} == named


def test_every_document_and_example_names_one_password_location() -> None:
    """Docs, examples, units and scripts mention only the credential file of the units."""
    expected = {
        unit_credential("sensormine-agent.service"),
        unit_credential("sensormine-collector.service"),
    }
    assert {"/etc/sensormine/credentials/mqtt-password"} == expected
    sources = [
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "config").rglob("*.toml"),
        *(REPO / "systemd").glob("*.service"),
        *(REPO / "scripts").iterdir(),
        *(REPO / "agent").rglob("*.py"),
        *(REPO / "collector").rglob("*.py"),
    ]
    found: dict[str, set[str]] = {}
    for path in sources:
        if path.is_file():
            for mention in PASSWORD_PATH.findall(path.read_text()):
                found.setdefault(mention, set()).add(str(path.relative_to(REPO)))
    assert expected == set(found), found
