"""Seed data: a TOML file of tenants, gateways, schemas, device types, devices and alert rules.

Every entry carries a fixed id, so applying a file is an upsert: a missing row is created, a row
that differs from the file is updated to match it (device types through the audited path, a
changed schema file as a new schema version), and a row that matches is left alone. Applying the
same file twice therefore changes nothing the second time. The whole file is applied in one
transaction: all of it or none of it. References between entries are names (or ids) within the
entry's tenant; schema files are paths relative to the seed file.
"""

from __future__ import annotations

import tomllib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from collector.admin.schemafile import SchemaFileError, load_schema_file
from collector.admin.store import (
    ALERT_RULE,
    DEVICE,
    DEVICE_TYPE,
    GATEWAY,
    SCHEMA,
    TENANT,
    AdminError,
    Kind,
    RegistryStore,
    Row,
)
from collector.quantities import parse_duration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SEED = REPO_ROOT / "config" / "seed" / "demo.toml"


class SeedError(AdminError):
    """A seed file that cannot be read or applied; the message names the file and the entry."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    name: str = Field(min_length=1, max_length=128)


class _Owned(_Entry):
    tenant: str = Field(min_length=1, description="the tenant's name or id")


class SeedTenant(_Entry):
    """A tenant."""

    enabled: bool = True


class SeedGateway(_Owned):
    """A gateway of a tenant."""

    description: str = ""
    enabled: bool = True


class SeedSchema(_Owned):
    """A schema whose current version is the JSON Schema file ``file``."""

    description: str = ""
    file: Path


class SeedDeviceType(_Owned):
    """A device type and the schema its telemetry follows."""

    description: str = ""
    schema_: str | None = Field(default=None, alias="schema")
    enabled: bool = True


class SeedDevice(_Owned):
    """A device of a device type, assigned to a gateway or to none."""

    type: str
    gateway: str | None = None
    description: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True


class SeedAlertRule(_Owned):
    """An alert rule on a metric of a device type or of one device."""

    metric: str
    condition: Literal[">", ">=", "<", "<=", "==", "!="]
    threshold: float
    duration: str = "0s"
    severity: Literal["info", "warning", "error", "critical"] = "warning"
    device_type: str | None = None
    device: str | None = None
    enabled: bool = True


class SeedFile(BaseModel):
    """The whole seed file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[SeedTenant] = Field(default_factory=list)
    gateways: list[SeedGateway] = Field(default_factory=list)
    schemas: list[SeedSchema] = Field(default_factory=list)
    device_types: list[SeedDeviceType] = Field(default_factory=list)
    devices: list[SeedDevice] = Field(default_factory=list)
    alert_rules: list[SeedAlertRule] = Field(default_factory=list)


def load_seed(path: Path) -> tuple[SeedFile, dict[uuid.UUID, dict[str, Any]]]:
    """Read and validate a seed file and the schema files it names (by schema id)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SeedError(f"{path}: seed file not found") from None
    except OSError as exc:
        raise SeedError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SeedError(f"{path}: not valid TOML: {exc}") from None
    try:
        seed = SeedFile.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        ]
        raise SeedError("\n".join(lines)) from None
    ids = Counter(
        e.id
        for group in (seed.tenants, seed.gateways, seed.schemas, seed.device_types, seed.devices)
        for e in group
    )
    twice = sorted(str(i) for i, n in ids.items() if n > 1)
    if twice:
        raise SeedError(f"{path}: id {twice[0]} is given to two entries")
    documents = {}
    for i, schema in enumerate(seed.schemas):
        file = schema.file if schema.file.is_absolute() else path.parent / schema.file
        try:
            documents[schema.id] = load_schema_file(file)
        except SchemaFileError as exc:
            raise SeedError(f"{path}: schemas[{i}] ({schema.name}): {exc}") from None
    return seed, documents


class SeedReport:
    """What applying a seed file did: created, updated and unchanged counts per kind."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}

    def add(self, kind: Kind, outcome: str) -> None:
        """Count one entry's outcome (``created``, ``updated`` or ``unchanged``)."""
        self.counts.setdefault(kind.table, Counter())[outcome] += 1

    def total(self, outcome: str) -> int:
        """How many entries had ``outcome``."""
        return sum(c[outcome] for c in self.counts.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Counts per table and outcome."""
        return {
            table: {o: c[o] for o in ("created", "updated", "unchanged")}
            for table, c in self.counts.items()
        }

    def summary(self) -> str:
        """One line per table, e.g. ``devices: 20 created, 0 updated, 0 unchanged``."""
        return "\n".join(
            f"{table}: {c['created']} created, {c['updated']} updated, {c['unchanged']} unchanged"
            for table, c in self.counts.items()
        )


async def _existing(store: RegistryStore, kind: Kind, ident: uuid.UUID) -> Row | None:
    record = await store.conn.fetchrow(f"SELECT * FROM {kind.table} WHERE id = $1", ident)
    return None if record is None else dict(record.items())


def _changed(row: Row, wanted: Row) -> Row:
    return {k: v for k, v in wanted.items() if row[k] != v}


async def _same_tenant_or_refuse(store: RegistryStore, kind: Kind, row: Row, tenant: str) -> None:
    tenant_id = await store.tenant_ref(tenant)
    if row["tenant_id"] != tenant_id:
        raise SeedError(
            f"{kind.label} {row['id']} exists in another tenant; a seed does not move rows between tenants"
        )


async def apply_seed(
    store: RegistryStore, seed: SeedFile, documents: dict[uuid.UUID, dict[str, Any]]
) -> SeedReport:
    """Upsert every entry of ``seed`` in one transaction; return what was done."""
    report = SeedReport()
    async with store.conn.transaction():
        for tenant in seed.tenants:
            await _step(report, TENANT, tenant.name, _tenant(store, tenant))
        for gateway in seed.gateways:
            await _step(report, GATEWAY, gateway.name, _gateway(store, gateway))
        for schema in seed.schemas:
            await _step(report, SCHEMA, schema.name, _schema(store, schema, documents[schema.id]))
        for device_type in seed.device_types:
            await _step(report, DEVICE_TYPE, device_type.name, _device_type(store, device_type))
        for device in seed.devices:
            await _step(report, DEVICE, device.name, _device(store, device))
        for rule in seed.alert_rules:
            await _step(report, ALERT_RULE, rule.name, _alert_rule(store, rule))
    return report


async def _step(report: SeedReport, kind: Kind, name: str, work: Any) -> None:
    try:
        outcome = await work
    except SeedError:
        raise
    except AdminError as exc:
        raise SeedError(f"{kind.label} {name}: {exc}") from None
    report.add(kind, outcome)


async def _tenant(store: RegistryStore, entry: SeedTenant) -> str:
    row = await _existing(store, TENANT, entry.id)
    if row is None:
        await store.create_tenant(entry.name, id=entry.id)
        if not entry.enabled:
            await store.set_enabled(TENANT, str(entry.id), False)
        return "created"
    changes = _changed(row, {"name": entry.name, "enabled": entry.enabled})
    if not changes:
        return "unchanged"
    await store.update_tenant(str(entry.id), name=changes.get("name"))
    if "enabled" in changes:
        await store.set_enabled(TENANT, str(entry.id), entry.enabled)
    return "updated"


async def _gateway(store: RegistryStore, entry: SeedGateway) -> str:
    row = await _existing(store, GATEWAY, entry.id)
    if row is None:
        await store.create_gateway(
            entry.tenant, entry.name, description=entry.description, id=entry.id
        )
        if not entry.enabled:
            await store.set_enabled(GATEWAY, str(entry.id), False)
        return "created"
    await _same_tenant_or_refuse(store, GATEWAY, row, entry.tenant)
    changes = _changed(
        row, {"name": entry.name, "description": entry.description, "enabled": entry.enabled}
    )
    if not changes:
        return "unchanged"
    await store.update_gateway(
        str(entry.id), name=changes.get("name"), description=changes.get("description")
    )
    if "enabled" in changes:
        await store.set_enabled(GATEWAY, str(entry.id), entry.enabled)
    return "updated"


async def _schema(store: RegistryStore, entry: SeedSchema, document: dict[str, Any]) -> str:
    row = await _existing(store, SCHEMA, entry.id)
    if row is None:
        await store.create_schema(
            entry.tenant, entry.name, description=entry.description, id=entry.id, document=document
        )
        return "created"
    await _same_tenant_or_refuse(store, SCHEMA, row, entry.tenant)
    changes = _changed(row, {"name": entry.name, "description": entry.description})
    if changes:
        await store.update_schema(
            str(entry.id), name=changes.get("name"), description=changes.get("description")
        )
    _, added = await store.add_schema_version(str(entry.id), document)
    return "updated" if changes or added else "unchanged"


async def _device_type(store: RegistryStore, entry: SeedDeviceType) -> str:
    row = await _existing(store, DEVICE_TYPE, entry.id)
    if row is None:
        await store.create_device_type(
            entry.tenant,
            entry.name,
            schema=entry.schema_,
            description=entry.description,
            id=entry.id,
        )
        if not entry.enabled:
            await store.update_device_type(str(entry.id), enabled=False)
        return "created"
    await _same_tenant_or_refuse(store, DEVICE_TYPE, row, entry.tenant)
    after = await store.update_device_type(
        str(entry.id),
        name=entry.name,
        description=entry.description,
        schema=entry.schema_,
        enabled=entry.enabled,
    )
    return "updated" if after["version"] != row["version"] else "unchanged"


async def _device(store: RegistryStore, entry: SeedDevice) -> str:
    row = await _existing(store, DEVICE, entry.id)
    if row is None:
        await store.create_device(
            entry.tenant,
            entry.name,
            entry.type,
            gateway=entry.gateway,
            description=entry.description,
            attributes=entry.attributes,
            id=entry.id,
        )
        if not entry.enabled:
            await store.set_enabled(DEVICE, str(entry.id), False)
        return "created"
    await _same_tenant_or_refuse(store, DEVICE, row, entry.tenant)
    type_id = (await store.resolve(DEVICE_TYPE, entry.type, row["tenant_id"]))["id"]
    gateway_id = (
        None
        if entry.gateway is None
        else (await store.resolve(GATEWAY, entry.gateway, row["tenant_id"]))["id"]
    )
    changes = _changed(
        row,
        {
            "name": entry.name,
            "description": entry.description,
            "device_type_id": type_id,
            "gateway_id": gateway_id,
            "attributes": entry.attributes,
            "enabled": entry.enabled,
        },
    )
    if not changes:
        return "unchanged"
    await store.update_device(
        str(entry.id),
        name=changes.get("name"),
        description=changes.get("description"),
        device_type=entry.type if "device_type_id" in changes else None,
        gateway=entry.gateway,
        attributes=changes.get("attributes"),
    )
    if "enabled" in changes:
        await store.set_enabled(DEVICE, str(entry.id), entry.enabled)
    return "updated"


async def _alert_rule(store: RegistryStore, entry: SeedAlertRule) -> str:
    row = await _existing(store, ALERT_RULE, entry.id)
    duration = parse_duration(entry.duration)
    if row is None:
        await store.create_alert_rule(
            entry.tenant,
            entry.name,
            metric=entry.metric,
            condition=entry.condition,
            threshold=entry.threshold,
            duration=duration,
            severity=entry.severity,
            device_type=entry.device_type,
            device=entry.device,
            id=entry.id,
        )
        if not entry.enabled:
            await store.set_enabled(ALERT_RULE, str(entry.id), False)
        return "created"
    await _same_tenant_or_refuse(store, ALERT_RULE, row, entry.tenant)
    wanted = {
        "name": entry.name,
        "metric": entry.metric,
        "condition": entry.condition,
        "threshold": entry.threshold,
        "severity": entry.severity,
        "enabled": entry.enabled,
    }
    changes = _changed(row, wanted)
    if row["duration"].total_seconds() != duration:
        changes["duration"] = duration
    if not changes:
        return "unchanged"
    await store.update_alert_rule(
        str(entry.id),
        name=changes.get("name"),
        metric=changes.get("metric"),
        condition=changes.get("condition"),
        threshold=changes.get("threshold"),
        duration=changes.get("duration"),
        severity=changes.get("severity"),
    )
    if "enabled" in changes:
        await store.set_enabled(ALERT_RULE, str(entry.id), entry.enabled)
    return "updated"
