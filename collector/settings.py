"""The collector's configuration: one TOML file validated by pydantic, plus environment overrides.

Durations are written ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1d"``; sizes ``"1MiB"``
(:mod:`service.config`, the same units as the agent's).
Every model forbids unknown keys. Any key can be overridden from the environment as
``SENSORMINE_COLLECTOR__<SECTION>__<KEY>`` (for example
``SENSORMINE_COLLECTOR__MQTT__HOST=broker.example``); the value is parsed as TOML when it can be
(numbers, booleans, quoted strings) and taken as a plain string otherwise.

Secrets never come from the command line: the MQTT password is read from ``mqtt.password_file``,
else ``$SENSORMINE_MQTT_PASSWORD``, else ``$CREDENTIALS_DIRECTORY/mqtt-password``. Database
passwords may be part of the connection setting, else come from
``$SENSORMINE_METADATA_PASSWORD`` / ``$SENSORMINE_TIMESERIES_PASSWORD``, else from
``$CREDENTIALS_DIRECTORY/metadata-password`` / ``timeseries-password``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator

from collector.errors import ConfigError
from collector.lifecycle.settings import LifecycleSettings
from protocol import DEFAULT_PREFIX
from service.config import (
    Duration,
    Listen,
    LogSettings,
    PositiveDuration,
    Section,
    Size,
    TopicPrefix,
    keys_at,
    unknown_key_message,
)

DEFAULT_CONFIG_PATH = Path("/etc/sensormine/collector.toml")
CONFIG_ENV = "SENSORMINE_COLLECTOR_CONFIG"
ENV_PREFIX = "SENSORMINE_COLLECTOR__"
MQTT_PASSWORD_ENV = "SENSORMINE_MQTT_PASSWORD"
MQTT_CREDENTIAL = "mqtt-password"
DEFAULT_GROUP = "sensormine-collectors"


@dataclass(frozen=True)
class ConnectParams:
    """Keyword arguments for ``asyncpg.connect`` made from one connection setting."""

    dsn: str
    password: str | None

    def kwargs(self) -> dict[str, Any]:
        """The arguments to pass to ``asyncpg.connect`` / ``asyncpg.create_pool``."""
        out: dict[str, Any] = {"dsn": self.dsn}
        if self.password is not None:
            out["password"] = self.password
        return out


_SEED_KEYS = {
    "host": "host",
    "server": "host",
    "port": "port",
    "database": "database",
    "username": "user",
    "user id": "user",
    "userid": "user",
    "user": "user",
    "password": "password",
    "sslmode": "sslmode",
    "ssl mode": "sslmode",
}


def to_postgres_url(text: str) -> str:
    """Normalize a PostgreSQL URL or the seed's ``Host=..;Port=..;Database=..`` form to a URL."""
    text = text.strip()
    if text.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(text)
        if not parts.path.strip("/"):
            raise ValueError(f"connection URL {_redact(text)!r} names no database")
        return text
    if "=" not in text:
        raise ValueError(
            "expected a postgresql:// URL or 'Host=...;Port=...;Database=...;Username=...'"
        )
    fields: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        name = _SEED_KEYS.get(key.strip().lower())
        if not sep or name is None:
            raise ValueError(
                f"unknown part {key.strip()!r} in connection string (known: Host, Port, Database, Username, Password, SslMode)"
            )
        fields[name] = value.strip()
    if "host" not in fields or "database" not in fields:
        raise ValueError("connection string needs at least Host=... and Database=...")
    auth = ""
    if "user" in fields:
        auth = quote(fields["user"], safe="")
        if "password" in fields:
            auth += ":" + quote(fields["password"], safe="")
        auth += "@"
    port = f":{int(fields['port'])}" if "port" in fields else ""
    query = f"?sslmode={fields['sslmode'].lower()}" if "sslmode" in fields else ""
    return f"postgresql://{auth}{fields['host']}{port}/{quote(fields['database'], safe='')}{query}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def url_has_password(url: str) -> bool:
    """Whether the URL carries its own password."""
    return urlsplit(url).password is not None


class DatabaseSettings(Section):
    """One PostgreSQL connection: a URL or the seed's ``Host=...;Database=...`` form.

    Every session the collector opens carries ``statement_timeout``, ``lock_timeout`` and
    ``idle_in_transaction_session_timeout``, and every call waits at most ``command_timeout`` for
    the server: a hung database or a lock held by a wedged collector fails the flush (which is
    retried, nothing acknowledged) instead of stalling the group. ``"0s"`` turns a timeout off.
    """

    dsn: str = Field(description="postgresql:// URL or Host=...;Port=...;Database=...;Username=...")
    password_file: Path | None = None
    connect_timeout: PositiveDuration = 10.0
    statement_timeout: Duration = 120.0
    lock_timeout: Duration = 30.0
    idle_in_transaction_timeout: Duration = 60.0
    command_timeout: Duration = 150.0

    def session_settings(self) -> dict[str, str]:
        """The server settings of every session (milliseconds)."""
        return {
            "statement_timeout": str(int(self.statement_timeout * 1000)),
            "lock_timeout": str(int(self.lock_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(
                int(self.idle_in_transaction_timeout * 1000)
            ),
        }

    @field_validator("dsn")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return to_postgres_url(value)

    def redacted(self) -> str:
        """The URL with its password masked, for logs."""
        return _redact(self.dsn)


class TimeseriesSettings(DatabaseSettings):
    """The TimescaleDB connection and the hypertables' shape."""

    chunk_interval: PositiveDuration = 86400.0


class MqttSettings(Section):
    """Broker connection and subscription."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str = Field(default="sensormine-collector-1", min_length=1, max_length=128)
    username: str | None = None
    password_file: Path | None = None
    prefix: TopicPrefix = DEFAULT_PREFIX
    group: str = Field(default=DEFAULT_GROUP, min_length=1)
    # 1.5 x keepalive is how long the broker takes to notice a collector whose host or network
    # went away: short, so that its share of the group moves on within a minute.
    keepalive: PositiveDuration = 10.0
    # Short on purpose: Mosquitto hands an absent member its share of the group's messages
    # until its session expires, then drops them; the agents resend after their ack_timeout.
    session_expiry: PositiveDuration = Field(
        default=10.0,
        description="How long the broker keeps this collector's session, and queues its share"
        " of the group's messages, while it is away; back within it, the collector gets its"
        " unacknowledged messages again, and until it ends the other members do not get them.",
    )
    receive_maximum: int = Field(default=1000, ge=1, le=65535)
    reconnect_min: PositiveDuration = 1.0
    reconnect_max: PositiveDuration = 30.0
    tls: bool = False
    ca_file: Path | None = None

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if set(value) & set("+#/\x00"):
            raise ValueError(f"group {value!r} must not contain '+', '#', '/' or NUL")
        return value


class WriterSettings(Section):
    """When staged rows are flushed, and how a failing database is retried."""

    max_rows: int = Field(default=20_000, ge=1)
    max_age: PositiveDuration = 0.2
    max_staged_rows: int = Field(default=200_000, ge=1)
    retry_min: PositiveDuration = 0.5
    retry_max: PositiveDuration = 10.0


class ValidationSettings(Section):
    """What counts as a valid point besides the schema."""

    max_age: PositiveDuration = 30 * 86400.0
    max_skew: PositiveDuration = 300.0
    allow_non_finite: bool = False
    reject_sample: int = Field(default=5, ge=0, le=100)
    max_frame_bytes: Size = 1 << 20
    max_points: int = Field(default=100_000, ge=1)
    clock_tolerance: Duration = 2.0


class QuarantineSettings(Section):
    """Where healable refusals wait: quotas, retry bound, replay on registry changes.

    Quarantined data counts against ``max_bytes_per_tenant`` (registered gateways) or
    ``max_bytes_per_unknown_gateway`` (per gateway id the registry does not know); what exceeds
    its quota is refused with ``quota_exceeded``. A batch whose processing fails
    ``max_attempts`` times (an internal error) is quarantined whole as ``internal_error``.
    With ``auto_replay`` the collector replays what waits for a gateway, device, device type or
    schema ``replay_delay`` after the registry announces a change of it.
    """

    max_bytes_per_tenant: Size = 1 << 30
    max_bytes_per_unknown_gateway: Size = 16 << 20
    max_attempts: int = Field(default=5, ge=1, le=1000)
    auto_replay: bool = True
    replay_delay: PositiveDuration = 2.0


class RegistrySettings(Section):
    """The in-memory cache of gateways, devices, device types and schemas."""

    refresh_interval: PositiveDuration = 300.0
    negative_ttl: PositiveDuration = 5.0


class AlertSettings(Section):
    """Alert rules evaluated on ingest (docs/alerts.md).

    A transition whose reading is older than ``late_after`` when it is evaluated is marked
    late. No-data rules are checked against the clock every ``no_data_interval``. A batch that
    arrives before its predecessor in its gateway's stream waits up to ``park_timeout`` for it
    before it is evaluated without it. Transitions are published on
    ``{prefix}/v1/{tenant}/alerts`` when ``publish`` is on.
    """

    enabled: bool = True
    late_after: Duration = 60.0
    no_data_interval: Duration = 5.0
    park_timeout: Duration = 30.0
    publish: bool = True


class MetricsSettings(Section):
    """The Prometheus endpoint; an empty ``listen`` turns it off."""

    listen: Listen = "127.0.0.1:9464"


class ApiSettings(Section):
    """The query API and status page (``sensormine-collector api``).

    ``timeseries_replicas`` and ``metadata_replicas`` are streaming replicas the API reads from
    (tried in order, the primary when none answers), so queries never compete with ingest; they
    use the primary's password settings.
    """

    listen: Listen = "127.0.0.1:8080"
    max_points: int = Field(default=5000, ge=10, le=100_000)
    max_range: PositiveDuration = 400 * 86400.0
    max_devices: int = Field(default=50_000, ge=1, le=1_000_000)
    pool_size: int = Field(default=10, ge=1, le=200)
    timeseries_replicas: list[str] = Field(default_factory=list)
    metadata_replicas: list[str] = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _listen_required(cls, value: str) -> str:
        if not value:
            raise ValueError("the API needs an address to listen on, e.g. '127.0.0.1:8080'")
        return value


class Settings(Section):
    """The whole collector configuration."""

    metadata: DatabaseSettings
    timeseries: TimeseriesSettings
    mqtt: MqttSettings = MqttSettings()
    writer: WriterSettings = WriterSettings()
    validation: ValidationSettings = ValidationSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    registry: RegistrySettings = RegistrySettings()
    alerts: AlertSettings = AlertSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    api: ApiSettings = ApiSettings()
    drain_deadline: PositiveDuration = 20.0
    migrate_on_start: bool = True

    @model_validator(mode="after")
    def _ledger_covers_the_age_window(self) -> Settings:
        # A batch resent after its ledger row is gone is written again; the age window is what
        # keeps a resend that old out, so it must end before the ledger forgets.
        horizon = self.lifecycle.ledger.horizon
        window = self.validation.max_age + self.validation.max_skew
        if horizon <= window:
            raise ValueError(
                f"lifecycle.ledger.horizon ({horizon:g} s) must exceed validation.max_age +"
                f" validation.max_skew ({window:g} s): a batch resent after its ledger row is"
                " trimmed would be stored twice; raise lifecycle.ledger.horizon or lower"
                " validation.max_age"
            )
        return self


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Return ``data`` with ``SENSORMINE_COLLECTOR__SECTION__KEY`` variables merged in."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {name}: {part!r} is not a section")
            node = child
        node[path[-1]] = _env_value(raw)
    return out


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden" and loc:
            message = unknown_key_message(str(loc[-1]), keys_at(Settings, loc[:-1]))
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse_settings(data: dict[str, Any], source: str = "<config>") -> Settings:
    """Validate a configuration mapping; raise ``ConfigError`` naming the source and the key."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_settings(path: Path | str, environ: dict[str, str] | None = None) -> Settings:
    """Read the TOML file at ``path``, merge environment overrides, validate."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = apply_env_overrides(data, dict(os.environ) if environ is None else environ)
    return parse_settings(data, str(path))


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text().strip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None


def mqtt_password(settings: MqttSettings, environ: dict[str, str] | None = None) -> str | None:
    """The MQTT password from the password file, the environment or systemd credentials."""
    env = dict(os.environ) if environ is None else environ
    if settings.password_file is not None:
        return _read_secret(settings.password_file, "mqtt.password_file")
    if MQTT_PASSWORD_ENV in env:
        return env[MQTT_PASSWORD_ENV]
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / MQTT_CREDENTIAL).is_file():
        return _read_secret(Path(creds) / MQTT_CREDENTIAL, "credentials")
    return None


def connect_params(
    db: DatabaseSettings,
    kind: Literal["metadata", "timeseries"],
    environ: dict[str, str] | None = None,
) -> ConnectParams:
    """Connection arguments for ``kind``, with the password from wherever it is configured."""
    env = dict(os.environ) if environ is None else environ
    if url_has_password(db.dsn):
        return ConnectParams(db.dsn, None)
    if db.password_file is not None:
        return ConnectParams(db.dsn, _read_secret(db.password_file, f"{kind}.password_file"))
    var = f"SENSORMINE_{kind.upper()}_PASSWORD"
    if var in env:
        return ConnectParams(db.dsn, env[var])
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / f"{kind}-password").is_file():
        return ConnectParams(db.dsn, _read_secret(Path(creds) / f"{kind}-password", "credentials"))
    return ConnectParams(db.dsn, None)
