"""The agent's configuration: one TOML file validated by pydantic.

Durations are written ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h"``; sizes ``"512MiB"``, ``"64KiB"``,
``"1GB"`` (:mod:`service.config`, the same units as the collector's). Every model forbids unknown
keys. :func:`load_settings` turns every problem into a
:class:`~agent.errors.ConfigError` whose message names the file, the key and the problem.
Secrets never come from the command line: the MQTT password is read from ``mqtt.password_file``,
else ``$SENSORMINE_MQTT_PASSWORD``, else ``$CREDENTIALS_DIRECTORY/mqtt-password`` (systemd
``LoadCredential=``).
"""

from __future__ import annotations

import json
import os
import tomllib
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from agent.inputs.base import InputConfig, RegistryError, kind
from protocol import DEFAULT_PREFIX
from service.config import (
    Duration,
    Listen,
    LogSettings,
    PositiveDuration,
    Section,
    Size,
    SizeOrZero,
    TopicPrefix,
    format_size,
    keys_at,
    unknown_key_message,
)

DEFAULT_CONFIG_PATH = Path("/etc/sensormine/agent.toml")
PASSWORD_ENV = "SENSORMINE_MQTT_PASSWORD"
USERNAME_ENV = "SENSORMINE_MQTT_USERNAME"
CREDENTIAL_NAME = "mqtt-password"


class GatewaySettings(Section):
    """Who this agent is: its gateway id (also the MQTT client id) and its tenant."""

    id: uuid.UUID
    tenant_id: uuid.UUID


class BufferSettings(Section):
    """The SQLite buffer file and its limits."""

    path: Path = Path("/var/lib/sensormine/buffer.db")
    max_bytes: Size = 512 * 2**20
    overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    journal_size_limit: Size = 64 * 2**20
    commit_interval: PositiveDuration = 0.1
    reserve_bytes: SizeOrZero = 4 * 2**20
    """Room kept in ``<path>.reserve`` and given back to SQLite when the file system is full."""
    hold_readings: int = Field(default=100_000, ge=0, le=10_000_000)
    """Readings kept in memory while the disk is full; only what exceeds it is dropped."""

    @field_validator("synchronous", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("max_bytes")
    @classmethod
    def _not_tiny(cls, value: int) -> int:
        if value < 4096:
            raise ValueError(f"{value} bytes is too small for a buffer; the minimum is 4KiB")
        return value


class BatchSettings(Section):
    """When a batch is sealed: whichever of the three limits is reached first."""

    max_points: int = Field(default=5000, ge=1, le=100_000)
    max_age: PositiveDuration = 1.0
    max_frame_bytes: Size = 256 * 2**10

    @field_validator("max_frame_bytes")
    @classmethod
    def _within_protocol(cls, value: int) -> int:
        if value > 2**20:
            raise ValueError("must not exceed 1MiB, the protocol's frame limit")
        if value < 1024:
            raise ValueError("must be at least 1KiB")
        return value


class TlsSettings(Section):
    """TLS to the broker; ``cert_file`` + ``key_file`` make it mutual TLS."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class MqttSettings(Section):
    """The broker connection and the shipper's delivery behaviour."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    topic_prefix: TopicPrefix = DEFAULT_PREFIX
    keepalive: PositiveDuration = 30.0
    username: str | None = None
    password_file: Path | None = None
    tls: TlsSettings = TlsSettings()
    window: int = Field(default=4, ge=1, le=64)
    ack_timeout: PositiveDuration = 15.0
    reconnect_min: PositiveDuration = 0.5
    reconnect_max: PositiveDuration = 60.0
    backlog_rate: float = Field(default=20.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _backoff(self) -> MqttSettings:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be smaller than reconnect_min")
        return self


class RuntimeSettings(Section):
    """Process behaviour: shutdown deadline and how an input is restarted after a crash."""

    drain_timeout: Duration = 20.0
    input_restart_delay: PositiveDuration = 5.0
    status_interval: PositiveDuration = 10.0


class MetricsSettings(Section):
    """The optional Prometheus endpoint of the agent; an empty ``listen`` (the default) turns it
    off. Bind it to 127.0.0.1 unless the scraper is elsewhere on a trusted network."""

    listen: Listen = ""


class ClockSettings(Section):
    """When the gateway's clock is trusted, and how long readings wait for a trusted time.

    The system clock is trusted while the kernel says it is synchronised, it reads after the
    agent's build date and it agrees with the collector's clock within ``tolerance``; otherwise
    readings are converted with the offset measured against the collector (trusted when its
    error bound is within half the tolerance). Without either, sealing waits up to ``max_wait``
    and then seals with the wall clock, marked untrusted.
    """

    tolerance: PositiveDuration = 2.0
    max_wait: Duration = 600.0
    request_interval: PositiveDuration = 2.0


class Settings(Section):
    """The whole agent configuration file."""

    gateway: GatewaySettings
    buffer: BufferSettings = BufferSettings()
    batch: BatchSettings = BatchSettings()
    mqtt: MqttSettings = MqttSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    metrics: MetricsSettings = MetricsSettings()
    clock: ClockSettings = ClockSettings()
    log: LogSettings = LogSettings()
    inputs: list[InputConfig] = Field(default_factory=list)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        """Validate each ``[[inputs]]`` table with the model of the kind its ``type`` names."""
        if not isinstance(value, list):
            raise ValueError("inputs must be a list of [[inputs]] tables")
        built: list[InputConfig] = []
        names: set[str] = set()
        for i, item in enumerate(value):
            if isinstance(item, InputConfig):
                built.append(item)
                continue
            if not isinstance(item, dict):
                raise ValueError(f"inputs[{i}] must be a table")
            label = input_label(i, item.get("name"))
            if "type" not in item:
                raise ValueError(f"{label} has no 'type'")
            try:
                model = kind(str(item["type"])).config_model
            except RegistryError as exc:
                raise ValueError(f"{label}.type: {exc}") from None
            try:
                config = model.model_validate(item)
            except ValidationError as exc:
                raise ValueError(_describe(exc, prefix=label, model=model)) from None
            if config.name in names:
                raise ValueError(f"{label}.name: {config.name!r} is used by another input")
            names.add(config.name)
            built.append(config)
        return built


def input_label(index: int, name: Any) -> str:
    """How errors name an input: by its ``name`` (``inputs["boiler"]``), by its position only
    when it has none."""
    if isinstance(name, str) and name:
        return f"inputs[{json.dumps(name, ensure_ascii=False)}]"
    return f"inputs[{index}] (no name)"


def _location(loc: tuple[Any, ...], prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    return ".".join(parts)


def _describe(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if loc == ("inputs",) and err["type"] == "value_error":
            lines.append(message)  # one input's own errors, already located by its name
            continue
        key = _location(loc, prefix) or "(top level)"
        if err["type"] == "extra_forbidden" and model is not None:
            message = unknown_key_message(str(loc[-1]), keys_at(model, loc[:-1]))
        elif err["type"] == "extra_forbidden":
            message = "unknown key (not allowed here)"
        elif err["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def load_settings(path: Path) -> Settings:
    """Read and validate the TOML file at ``path``; raise ``ConfigError`` naming file and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: the configuration file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return settings_from_dict(data, source=str(path))


def settings_from_dict(data: dict[str, Any], source: str = "<config>") -> Settings:
    """Validate an already-parsed configuration; errors name ``source`` and the key."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc, model=Settings)}") from None


def mqtt_password(settings: MqttSettings) -> str | None:
    """The MQTT password: ``password_file``, then the environment, then systemd's credential."""
    if settings.password_file is not None:
        try:
            return settings.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"mqtt.password_file: cannot read {settings.password_file}: {exc.strerror}"
            ) from None
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidate = Path(credentials) / CREDENTIAL_NAME
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").rstrip("\r\n")
    return None


def exposed_credentials(settings: MqttSettings) -> list[tuple[str, Path, str]]:
    """Credential files that users other than the owner and its group may read or change:
    ``(key, path, mode)`` of ``mqtt.password_file`` and ``mqtt.tls.key_file``. Such a file should
    be 0600 (or 0640 with the service's group); the agent warns at start about each."""
    exposed = []
    for key, path in (
        ("mqtt.password_file", settings.password_file),
        ("mqtt.tls.key_file", settings.tls.key_file),
    ):
        if path is None:
            continue
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # a missing file is reported where it is read
        if mode & 0o007:
            exposed.append((key, path, f"{mode & 0o7777:04o}"))
    return exposed


def mqtt_username(settings: MqttSettings) -> str | None:
    """The MQTT username: ``$SENSORMINE_MQTT_USERNAME`` overrides ``mqtt.username``."""
    return os.environ.get(USERNAME_ENV) or settings.username


def effective_config(settings: Settings) -> dict[str, Any]:
    """The configuration with defaults filled in and secrets masked, for ``check-config``."""
    data = settings.model_dump(mode="json")
    data["buffer"]["max_bytes"] = format_size(settings.buffer.max_bytes)
    data["buffer"]["journal_size_limit"] = format_size(settings.buffer.journal_size_limit)
    data["buffer"]["reserve_bytes"] = format_size(settings.buffer.reserve_bytes)
    data["batch"]["max_frame_bytes"] = format_size(settings.batch.max_frame_bytes)
    password = mqtt_password(settings.mqtt)
    data["mqtt"]["password"] = "********" if password else None
    data["mqtt"]["username"] = mqtt_username(settings.mqtt)
    data["inputs"] = [i.model_dump(mode="json") for i in settings.inputs]
    return data
