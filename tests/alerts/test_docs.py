"""docs/alerts.md's settings example is the collector's [alerts] section."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from collector.settings import AlertSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "alerts.md"


def test_the_settings_example_loads_and_shows_the_defaults() -> None:
    """The [alerts] block parses, and its values are the defaults it documents."""
    (block,) = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)
    section = tomllib.loads(block)["alerts"]
    assert AlertSettings() == AlertSettings.model_validate(section)


def test_every_rule_field_is_documented() -> None:
    """Each column an administrator sets on a rule has a row in the doc's rule table."""
    from collector.admin.kinds import ALERT_RULE

    text = DOC.read_text()
    for field in ALERT_RULE.fields:
        if field.name in ("name", "device", "device_type"):
            continue
        assert f"`{field.name}`" in text, field.name
