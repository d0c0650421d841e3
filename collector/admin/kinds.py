"""The registry's entity kinds: the one table that the administration is generated from.

A :class:`Kind` says what a registry table holds and how an administrator handles it: the
fields that may be set (with their checks, defaults and references to rows of the same
tenant), what a listing adds to each row, what must be gone before a row may be deleted, and
how the CLI presents it (command group, help texts, listing columns). The store's
``listing``/``show``/``create``/``update``/``delete`` (:mod:`collector.admin.store`) and the
CLI's ``list``/``show``/``create``/``update``/``delete``/``enable``/``disable`` commands
(:mod:`collector.admin.cli`) read this table; only what is specific to one kind (schema
versions, device-type history, provisioning, seeds) is written by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from collector.admin.errors import ChangeRefused

CONDITIONS = (">", ">=", "<", "<=", "==", "!=")
SEVERITIES = ("info", "warning", "error", "critical")
REQUIRED: Any = object()
"""The default of a field that ``create`` must be given."""


def parse_uuid(text: str) -> uuid.UUID | None:
    """The UUID that ``text`` spells, or ``None`` when it is a name."""
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


def check_name(name: str) -> str:
    """A row's name, refused when empty, too long, or looking like an id."""
    name = name.strip()
    if not name:
        raise ChangeRefused("a name must not be empty")
    if parse_uuid(name) is not None:
        raise ChangeRefused(f"a name must not be a UUID ({name!r}): ids and names must stay apart")
    if len(name) > 128:
        raise ChangeRefused(f"name {name[:20]!r}... is longer than 128 characters")
    return name


def _as_given(value: Any) -> Any:
    return value


def _metric(metric: str) -> str:
    if not metric.strip():
        raise ChangeRefused("an alert rule needs a metric")
    return metric


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _optional_duration(seconds: float | None) -> timedelta | None:
    if seconds is None:
        return None
    if seconds <= 0:
        raise ChangeRefused("a no-data duration must be positive")
    return timedelta(seconds=seconds)


def _duration(seconds: float) -> timedelta:
    if seconds < 0:
        raise ChangeRefused("a duration must not be negative")
    return timedelta(seconds=seconds)


@dataclass(frozen=True, eq=False)
class Field:
    """A column an administrator sets, and its ``--option`` on ``create``, ``update`` or ``list``.

    ``name`` is the keyword the store takes and the option's name; a ``ref`` field takes the
    name or id of a row of ``ref`` in the same tenant and stores its id in ``<name>_id``.
    """

    name: str
    help: str = ""
    update_help: str | None = None  # None: the same as ``help``
    ref: Kind | None = None
    check: Callable[[Any], Any] = _as_given
    choices: tuple[str, ...] = ()
    default: Any = REQUIRED
    shown_default: str | None = None  # the CLI's default as the user writes it
    value: Literal["text", "float", "duration", "json"] = "text"  # how the CLI reads it
    option: str = ""  # default: ``--name`` with dashes
    updatable: bool = True
    nullable: bool = False  # ``update`` has ``--no-<name>`` (help: ``clear_help``) to clear it
    clear_help: str = ""
    on_cli: bool = True

    @property
    def column(self) -> str:
        """The table column the field sets: ``<name>_id`` for a reference."""
        return f"{self.name}_id" if self.ref is not None else self.name

    @property
    def flag(self) -> str:
        """The CLI option, e.g. ``--device-type``."""
        return self.option or "--" + self.name.replace("_", "-")

    def checked(self, value: Any) -> Any:
        """``value`` as the column holds it; refused with the reason when it is not allowed."""
        if self.choices and value not in self.choices:
            raise ChangeRefused(f"{self.name} {value!r} is not one of {', '.join(self.choices)}")
        return self.check(value)


@dataclass(frozen=True)
class Dependent:
    """Rows that name a row (``table.column``): while there are any, it is not deleted.

    ``refusal`` says so, with ``{n}`` (how many) and ``{names}`` (the first few), and what to
    do first.
    """

    column: str
    refusal: str

    @property
    def query(self) -> str:
        """The names of the rows that name the row ``$1``."""
        table, column = self.column.split(".")
        return f"SELECT name FROM {table} WHERE {column} = $1 ORDER BY name"


@dataclass(frozen=True, eq=False)
class Kind:
    """A registry table, as the store and the CLI handle it."""

    table: str
    fields: tuple[Field, ...]
    help: str  # the CLI group's help
    helps: dict[str, str]  # the generated commands and their help; the others are by hand
    columns: tuple[str, ...]  # of the CLI's listing table
    listing: str  # SQL: each row with its tenant's name and what a listing adds
    filters: tuple[Field, ...] = ()  # ``list`` options that narrow to one referenced row
    dependents: tuple[Dependent, ...] = ()
    cascade: tuple[tuple[str, str], ...] = ()  # (table, column) rows deleted with a row
    owned: bool = True  # has a tenant_id
    audited: bool = False  # changes are versioned and written to an audit log
    switchable: bool = True  # has an ``enabled`` flag

    @property
    def label(self) -> str:
        """What a row is called in messages, e.g. ``device type``."""
        return self.table.removesuffix("s").replace("_", " ")

    @property
    def alias(self) -> str:
        """The table's alias in ``listing``: its words' initials, e.g. ``dt``."""
        return "".join(word[0] for word in self.table.split("_"))

    @property
    def command(self) -> str:
        """The CLI group, e.g. ``device-types``."""
        return self.table.replace("_", "-")

    @property
    def metavar(self) -> str:
        """The CLI argument that names a row, e.g. ``TYPE``."""
        return self.label.split()[-1].upper()

    def field(self, name: str) -> Field:
        """The field called ``name``."""
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.label} has no field {name!r}")


def _pairs(text: str) -> list[tuple[str, str]]:
    """``key: text`` lines (a line starting with spaces continues the text of the one before)."""
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith(" " * 12):
            key, previous = pairs.pop()
            pairs.append((key, f"{previous} {line.strip()}"))
        else:
            key, _, value = line.strip().partition(": ")
            pairs.append((key, value))
    return pairs


def _helps(text: str) -> dict[str, str]:
    """``command: help`` lines: the generated commands of a kind and their help."""
    return dict(_pairs(text))


def _dependents(text: str) -> tuple[Dependent, ...]:
    """``table.column: refusal`` lines: the rows that keep a row from being deleted."""
    return tuple(Dependent(column, refusal) for column, refusal in _pairs(text))


NAME = Field("name", "New name.", check=check_name)
ENABLED = Field("enabled", check=bool, default=True, on_cli=False)


def _description(help_text: str) -> Field:
    return Field("description", help_text, update_help="New description.", default="")


TENANT = Kind(
    "tenants",
    (NAME, ENABLED),
    help="Tenants: the owners of gateways, schemas, device types and devices.",
    helps=_helps(
        """
        create: Create a tenant called NAME.
        list: List tenants with their gateway and device counts.
        show: Show TENANT (name or id) and how much it owns.
        update: Rename TENANT.
        delete: Delete TENANT; refused while it still owns anything.
        """
    ),
    columns=("id", "name", "enabled", "gateways", "devices"),
    listing="""
        SELECT t.*,
               (SELECT count(*) FROM gateways g WHERE g.tenant_id = t.id) AS gateways,
               (SELECT count(*) FROM devices d WHERE d.tenant_id = t.id) AS devices
        FROM tenants t
    """,
    cascade=(("users", "tenant_id"),),
    owned=False,
)

GATEWAY = Kind(
    "gateways",
    (NAME, _description("Free text, e.g. the site."), ENABLED),
    help="Gateways: the site computers that run sensormine-agent.",
    helps=_helps(
        """
        create: Register a gateway called NAME.
        list: List gateways with their device counts.
        show: Show GATEWAY (name or id) and the devices assigned to it.
        update: Rename or describe GATEWAY.
        delete: Delete GATEWAY; refused while devices are assigned to it.
        """
    ),
    columns=("id", "name", "tenant", "enabled", "devices"),
    listing="""
        SELECT g.*, t.name AS tenant,
               (SELECT count(*) FROM devices d WHERE d.gateway_id = g.id) AS devices
        FROM gateways g JOIN tenants t ON t.id = g.tenant_id
    """,
    dependents=_dependents(
        """
        devices.gateway_id: has {n} device(s) assigned ({names}); move them to another gateway
            (`devices update <device> --gateway ...`) or unassign them (`--no-gateway`) first
        """
    ),
)

SCHEMA = Kind(
    "schemas",
    (NAME, _description("Free text.")),
    help="""Schemas: JSON Schema documents of a device type's telemetry, versioned.

    A schema's content changes only by adding a version (`add-version`); the highest version is
    the one the collector validates against. Schemas have no enabled flag: disable the device
    types that use one instead.
    """,
    helps=_helps(
        """
        list: List schemas with their current version and how many device types use them.
        update: Rename or describe SCHEMA (its content changes with add-version).
        delete: Delete SCHEMA and its versions; refused while a device type uses it.
        """
    ),
    columns=("id", "name", "tenant", "version", "device_types"),
    listing="""
        SELECT s.*, t.name AS tenant,
               (SELECT max(version) FROM schema_versions v WHERE v.schema_id = s.id) AS version,
               (SELECT count(*) FROM device_types dt WHERE dt.schema_id = s.id) AS device_types
        FROM schemas s JOIN tenants t ON t.id = s.tenant_id
    """,
    dependents=_dependents(
        """
        device_types.schema_id: is used by {n} device type(s) ({names}); point them at
            another schema (`device-types update <type> --schema ...`) first
        """
    ),
    cascade=(("schema_versions", "schema_id"),),
    switchable=False,
)

DEVICE_TYPE = Kind(
    "device_types",
    (
        NAME,
        _description("Free text."),
        Field(
            "schema",
            "The schema (name or id) its telemetry follows.",
            update_help="Another schema (name or id).",
            ref=SCHEMA,
            default=None,
            nullable=True,
            clear_help="Detach the schema: any metric is accepted.",
        ),
        ENABLED,
    ),
    help="""Device types: a kind of device and the schema its telemetry follows.

    Every change bumps the type's version, stores a snapshot (device_type_versions) and an audit
    row (device_type_audit_logs: who, when, what changed); see `history`.
    """,
    helps=_helps(
        """
        create: Create a device type called NAME.
        list: List device types with their schema and device counts.
        show: Show the device type TYPE (name or id).
        update: Change TYPE; the change is versioned and audited.
        delete: Delete TYPE; refused while a device or an alert rule uses it.
        """
    ),
    columns=("id", "name", "tenant", "schema", "schema_version", "version", "enabled", "devices"),
    listing="""
        SELECT dt.*, t.name AS tenant, s.name AS schema,
               (SELECT max(version) FROM schema_versions v WHERE v.schema_id = dt.schema_id)
                   AS schema_version,
               (SELECT count(*) FROM devices d WHERE d.device_type_id = dt.id) AS devices
        FROM device_types dt
        JOIN tenants t ON t.id = dt.tenant_id
        LEFT JOIN schemas s ON s.id = dt.schema_id
    """,
    dependents=_dependents(
        """
        devices.device_type_id: is used by {n} device(s) ({names}); give them another type or
            delete them first
        alert_rules.device_type_id: is used by {n} alert rule(s) ({names}); delete them first
        """
    ),
    audited=True,
)

DEVICE = Kind(
    "devices",
    (
        NAME,
        _description("Free text."),
        Field(
            "device_type",
            "Its device type (name or id).",
            update_help="Another device type (name or id).",
            ref=DEVICE_TYPE,
            option="--type",
        ),
        Field(
            "gateway",
            "The gateway that reads it (name or id).",
            update_help="Assign to this gateway (name or id).",
            ref=GATEWAY,
            default=None,
            nullable=True,
            clear_help="Assign to no gateway.",
        ),
        Field(
            "attributes",
            'JSON object of attributes, e.g. \'{"room": "B12"}\'.',
            update_help="Replace the attributes with this JSON object.",
            check=dict,
            default={},
            value="json",
        ),
        ENABLED,
    ),
    help="Devices: the sensors and meters whose readings the collector stores.",
    helps=_helps(
        """
        create: Register a device called NAME.
        list: List devices.
        show: Show DEVICE (name or id).
        update: Change DEVICE.
        delete: Delete DEVICE (its stored telemetry stays); refused while an alert rule names it.
        """
    ),
    columns=("id", "name", "tenant", "device_type", "gateway", "enabled"),
    listing="""
        SELECT d.*, t.name AS tenant, dt.name AS device_type, g.name AS gateway
        FROM devices d
        JOIN tenants t ON t.id = d.tenant_id
        JOIN device_types dt ON dt.id = d.device_type_id
        LEFT JOIN gateways g ON g.id = d.gateway_id
    """,
    filters=(
        Field("gateway", "Only the devices of this gateway (name or id).", ref=GATEWAY),
        Field(
            "device_type",
            "Only the devices of this type (name or id).",
            ref=DEVICE_TYPE,
            option="--type",
        ),
    ),
    dependents=_dependents(
        """
        alert_rules.device_id: is named by {n} alert rule(s) ({names}); delete them first
        """
    ),
)

ALERT_RULE = Kind(
    "alert_rules",
    (
        NAME,
        Field("metric", "The metric it watches.", update_help="Another metric.", check=_metric),
        Field("condition", "Comparison.", choices=CONDITIONS),
        Field("threshold", "Value compared against.", check=float, value="float"),
        Field(
            "duration",
            "How long the condition must hold.",
            check=_duration,
            default=0.0,
            shown_default="0s",
            value="duration",
        ),
        Field(
            "clear_threshold",
            "Clears only past this value (hysteresis); default: the threshold.",
            check=_optional_float,
            value="float",
            default=None,
            nullable=True,
            clear_help="Clear at the threshold itself again.",
        ),
        Field(
            "keep_firing_for",
            "Keeps firing this long after the condition stopped holding.",
            check=_duration,
            default=0.0,
            shown_default="0s",
            value="duration",
        ),
        Field(
            "no_data_for",
            "A no-data rule instead: fires when the metric is silent this long.",
            check=_optional_duration,
            default=None,
            value="duration",
            nullable=True,
            clear_help="Make it a threshold rule again.",
        ),
        Field("severity", choices=SEVERITIES, default="warning", shown_default="warning"),
        Field(
            "device_type",
            "Only devices of this type (name or id).",
            ref=DEVICE_TYPE,
            default=None,
            updatable=False,
        ),
        Field(
            "device",
            "Only this device (name or id).",
            ref=DEVICE,
            default=None,
            updatable=False,
        ),
        ENABLED,
    ),
    help="Alert rules: a condition on a metric of a device type, of one device, or tenant-wide.",
    helps=_helps(
        """
        create: Create an alert rule called NAME.
        list: List alert rules.
        show: Show the alert rule RULE (name or id).
        update: Change RULE.
        delete: Delete RULE.
        """
    ),
    columns=(
        "id",
        "name",
        "tenant",
        "device_type",
        "device",
        "metric",
        "condition",
        "threshold",
        "severity",
        "enabled",
    ),
    listing="""
        SELECT ar.*, t.name AS tenant, dt.name AS device_type, d.name AS device
        FROM alert_rules ar
        JOIN tenants t ON t.id = ar.tenant_id
        LEFT JOIN device_types dt ON dt.id = ar.device_type_id
        LEFT JOIN devices d ON d.id = ar.device_id
    """,
)

KINDS = (TENANT, GATEWAY, SCHEMA, DEVICE_TYPE, DEVICE, ALERT_RULE)
OWNED_BY_TENANT = tuple(k.table for k in KINDS if k.owned)
