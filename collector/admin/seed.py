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

from collector.admin.errors import AdminError
from collector.admin.kinds import ALERT_RULE, DEVICE, DEVICE_TYPE, GATEWAY, SCHEMA, TENANT, Kind
from collector.admin.schemafile import SchemaFileError, load_schema_file
from collector.admin.store import RegistryStore, Row
from service.config import parse_duration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SEED = REPO_ROOT / "config" / "seed" / "demo.toml"


class SeedError(AdminError):
    """A seed file that cannot be read or applied; the message names the file and the entry."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    name: str = Field(min_length=1, max_length=128)

    def values(self) -> Row:
        """The entry's fields as the store takes them (see :mod:`collector.admin.kinds`)."""
        return self.model_dump(exclude={"id", "name", "tenant"})


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

    def values(self) -> Row:
        """The schema's description (its file becomes a version)."""
        return {"description": self.description}


class SeedDeviceType(_Owned):
    """A device type and the schema its telemetry follows."""

    description: str = ""
    schema_: str | None = Field(default=None, alias="schema")
    enabled: bool = True

    def values(self) -> Row:
        """The type's fields, its schema by name."""
        return {"description": self.description, "schema": self.schema_, "enabled": self.enabled}


class SeedDevice(_Owned):
    """A device of a device type, assigned to a gateway or to none."""

    type: str
    gateway: str | None = None
    description: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True

    def values(self) -> Row:
        """The device's fields, its type as ``device_type``."""
        values = super().values()
        values["device_type"] = values.pop("type")
        return values


class SeedAlertRule(_Owned):
    """An alert rule on a metric of a device type or of one device."""

    metric: str
    condition: Literal[">", ">=", "<", "<=", "==", "!="]
    threshold: float
    duration: str = "0s"
    clear_threshold: float | None = None
    keep_firing_for: str = "0s"
    no_data_for: str | None = None
    severity: Literal["info", "warning", "error", "critical"] = "warning"
    device_type: str | None = None
    device: str | None = None
    enabled: bool = True

    def values(self) -> Row:
        """The rule's fields, its durations in seconds."""
        return super().values() | {
            "duration": parse_duration(self.duration),
            "keep_firing_for": parse_duration(self.keep_firing_for),
            "no_data_for": None if self.no_data_for is None else parse_duration(self.no_data_for),
        }


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


async def apply_seed(
    store: RegistryStore, seed: SeedFile, documents: dict[uuid.UUID, dict[str, Any]]
) -> SeedReport:
    """Upsert every entry of ``seed`` in one transaction; return what was done."""
    report = SeedReport()
    groups: tuple[tuple[Kind, list[Any]], ...] = (
        (TENANT, seed.tenants),
        (GATEWAY, seed.gateways),
        (SCHEMA, seed.schemas),
        (DEVICE_TYPE, seed.device_types),
        (DEVICE, seed.devices),
        (ALERT_RULE, seed.alert_rules),
    )
    async with store.conn.transaction():
        for kind, entries in groups:
            for entry in entries:
                try:
                    outcome = await _upsert(store, kind, entry, documents.get(entry.id))
                except SeedError:
                    raise
                except AdminError as exc:
                    raise SeedError(f"{kind.label} {entry.name}: {exc}") from None
                report.add(kind, outcome)
    return report


async def _upsert(
    store: RegistryStore, kind: Kind, entry: _Entry, document: dict[str, Any] | None
) -> str:
    """Create the entry's row, or change it to match the entry: what was done."""
    tenant = getattr(entry, "tenant", None)
    given = entry.values()
    row = await store.get(kind, entry.id)
    if row is None:
        if kind is SCHEMA:
            await store.create_schema(tenant, entry.name, given, id=entry.id, document=document)
        else:
            await store.create(kind, tenant, entry.name, given, id=entry.id)
        return "created"
    if tenant is not None and row["tenant_id"] != await store.tenant_ref(tenant):
        raise SeedError(
            f"{kind.label} {row['id']} exists in another tenant; a seed does not move rows between tenants"
        )
    changes = {"name": entry.name} | {k: v for k, v in given.items() if kind.field(k).updatable}
    changed = await store.change(kind, row, changes) is not None
    if document is not None:
        changed = (await store.add_schema_version(str(entry.id), document))[1] or changed
    return "updated" if changed else "unchanged"
