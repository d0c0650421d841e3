"""Configuration: the shipped examples load, units parse, secrets come from the right place."""

from __future__ import annotations

import tomllib
import uuid
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.inputs.simulated import SimulatedConfig
from agent.settings import (
    PASSWORD_ENV,
    effective_config,
    load_settings,
    mqtt_password,
    settings_from_dict,
)

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = {"id": str(uuid.uuid4()), "tenant_id": str(uuid.uuid4())}


def test_example_configuration_loads_and_documents_every_key() -> None:
    """config/agent.example.toml is valid, and names every key of every section."""
    path = ROOT / "config" / "agent.example.toml"
    settings = load_settings(path)
    assert 1 == len(settings.inputs)
    text = path.read_text()
    from agent import settings as module

    for section in ("buffer", "batch", "mqtt", "runtime", "log"):
        model = getattr(settings, section).__class__
        for key in model.model_fields:
            documented = f"{key} =" in text or f"[{section}.{key}]" in text
            assert documented, f"{section}.{key} is not documented in the example"
    for key in module.TlsSettings.model_fields:
        assert f"{key} =" in text, f"mqtt.tls.{key} is not documented in the example"


def test_simulated_sample_loads() -> None:
    """agent/inputs/simulated/sample.toml is a valid simulated input configuration."""
    data = tomllib.loads((ROOT / "agent" / "inputs" / "simulated" / "sample.toml").read_text())
    settings = settings_from_dict({"gateway": GATEWAY, **data})
    [config] = settings.inputs
    assert isinstance(config, SimulatedConfig)
    assert 2 == len(config.devices)
    assert 4 == len(config.devices[0].metrics)


def test_password_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """password_file wins over the environment, which wins over the systemd credential."""
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("from-systemd\n")
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    base = {"gateway": GATEWAY}
    assert "from-systemd" == mqtt_password(settings_from_dict(base).mqtt)
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert "from-env" == mqtt_password(settings_from_dict(base).mqtt)
    with_file = settings_from_dict({**base, "mqtt": {"password_file": str(secret)}})
    assert "from-file" == mqtt_password(with_file.mqtt)
    # check-config never shows it.
    assert "********" == effective_config(with_file)["mqtt"]["password"]


def test_password_on_the_command_line_is_impossible() -> None:
    """There is no password key in the file and no option for it: only file, env, credential."""
    with pytest.raises(ConfigError, match=r"mqtt\.password: unknown key"):
        settings_from_dict({"gateway": GATEWAY, "mqtt": {"password": "x"}})


def test_cross_field_errors_name_the_key() -> None:
    """A TLS key without a certificate is refused, naming the section."""
    with pytest.raises(ConfigError, match=r"mqtt\.tls: .*cert_file and key_file"):
        settings_from_dict({"gateway": GATEWAY, "mqtt": {"tls": {"key_file": "/k"}}})
