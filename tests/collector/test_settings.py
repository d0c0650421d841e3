"""Configuration: the example file, connection-string forms, environment overrides, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from collector.errors import ConfigError
from collector.settings import (
    Settings,
    connect_params,
    load_settings,
    mqtt_password,
    parse_settings,
    to_postgres_url,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "collector.example.toml"


def _documented(model: type[BaseModel], text: str, where: str) -> list[str]:
    """Dotted keys of ``model`` that the example file does not mention."""
    missing = []
    for key, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if f"[{where}{key}]" in text:
                missing += _documented(sub, text, f"{where}{key}.")
            elif not where:
                missing.append(f"[{key}]")
        elif f"{key} =" not in text:
            missing.append(where + key)
    return missing


CORE_SECTIONS = (
    "metadata",
    "timeseries",
    "mqtt",
    "writer",
    "validation",
    "registry",
    "metrics",
    "log",
)


def test_example_config_loads_and_documents_every_key() -> None:
    """config/collector.example.toml is valid and shows every key of the sections it has."""
    settings = load_settings(EXAMPLE, environ={})
    assert "postgresql://sensormine@127.0.0.1:5432/sensormine_timeseries" == settings.timeseries.dsn
    text = EXAMPLE.read_text()
    missing = [m for m in _documented(Settings, text, "") if m.strip("[]") not in ("lifecycle",)]
    assert [] == missing
    assert all(f"[{s}]" in text for s in CORE_SECTIONS)


def test_seed_connection_string_becomes_a_url() -> None:
    """The seed's Host=...;Database=... form is accepted, with special characters quoted."""
    assert to_postgres_url("Host=db;Port=6432;Database=sm;Username=app;Password=p@ss") == (
        "postgresql://app:p%40ss@db:6432/sm"
    )
    with pytest.raises(ValueError, match="unknown part 'Colour'"):
        to_postgres_url("Host=db;Database=sm;Colour=red")


def _minimal(**extra: object) -> dict[str, object]:
    return {
        "metadata": {"dsn": "postgresql://u@h/meta"},
        "timeseries": {"dsn": "postgresql://u@h/ts"},
        **extra,
    }


def test_errors_name_the_key() -> None:
    """A bad value is reported with its source and dotted key."""
    with pytest.raises(ConfigError, match=r"site.toml: writer.max_age: .*not a duration"):
        parse_settings(_minimal(writer={"max_age": "soon"}), "site.toml")
    with pytest.raises(ConfigError, match=r"mqtt.colour: unknown key \(allowed here: .*host"):
        parse_settings(_minimal(mqtt={"colour": 1}), "site.toml")
    with pytest.raises(ConfigError, match=r"mqtt.hots: unknown key \(did you mean 'host'\?\)"):
        parse_settings(_minimal(mqtt={"hots": "broker"}), "site.toml")


def test_environment_overrides_keys(tmp_path: Path) -> None:
    """SENSORMINE_COLLECTOR__SECTION__KEY overrides the file, typed as TOML when it parses."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[metadata]\ndsn = "postgresql://u@h/meta"\n[timeseries]\ndsn = "postgresql://u@h/ts"\n'
    )
    env = {
        "SENSORMINE_COLLECTOR__MQTT__PORT": "1884",
        "SENSORMINE_COLLECTOR__MQTT__HOST": "broker.example",
    }
    settings = load_settings(path, environ=env)
    assert (settings.mqtt.host, settings.mqtt.port) == ("broker.example", 1884)


def test_passwords_come_from_files_environment_or_credentials(tmp_path: Path) -> None:
    """Secrets: password file first, then the environment, then $CREDENTIALS_DIRECTORY."""
    settings = parse_settings(_minimal())
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-creds\n")
    (creds / "timeseries-password").write_text("ts-creds\n")
    assert mqtt_password(settings.mqtt, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-creds"
    assert (
        mqtt_password(
            settings.mqtt, {"SENSORMINE_MQTT_PASSWORD": "env", "CREDENTIALS_DIRECTORY": str(creds)}
        )
        == "env"
    )
    assert (
        connect_params(
            settings.timeseries, "timeseries", {"CREDENTIALS_DIRECTORY": str(creds)}
        ).password
        == "ts-creds"
    )
    assert (
        connect_params(
            settings.metadata, "metadata", {"SENSORMINE_METADATA_PASSWORD": "m"}
        ).password
        == "m"
    )
    with_url = parse_settings(_minimal(metadata={"dsn": "postgresql://u:inurl@h/meta"}))
    assert (
        connect_params(
            with_url.metadata, "metadata", {"SENSORMINE_METADATA_PASSWORD": "m"}
        ).password
        is None
    )
