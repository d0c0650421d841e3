"""The registry's administration: reads and checked writes of the metadata database.

Every write checks the cross-references itself (the seed's decision: no foreign keys between
services, and none from a device type to its schema), so a refusal says exactly what is wrong:
``schema <id> not found``, a device type or gateway of another tenant, a schema still in use.
Every change of a device type writes, in the same transaction, a ``device_type_versions``
snapshot and a ``device_type_audit_logs`` row (actor, action, a JSON diff of what changed).

Any reference argument is an id or, where that is unambiguous, a name (within ``tenant`` when
one is given).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from collector.errors import CollectorError, DatabaseUnavailable

Row = dict[str, Any]

CONDITIONS = (">", ">=", "<", "<=", "==", "!=")
SEVERITIES = ("info", "warning", "error", "critical")
_UNSET: Any = object()


class AdminError(CollectorError):
    """An administration request that was refused; the message says why."""


class NotFound(AdminError):
    """A reference names nothing (``<kind> <ref> not found``)."""


class Refused(AdminError):
    """A change that would break the registry's rules; the message says which and what to do."""


@dataclass(frozen=True)
class Kind:
    """A registry table as the administration sees it."""

    table: str
    label: str


TENANT = Kind("tenants", "tenant")
GATEWAY = Kind("gateways", "gateway")
SCHEMA = Kind("schemas", "schema")
DEVICE_TYPE = Kind("device_types", "device type")
DEVICE = Kind("devices", "device")
ALERT_RULE = Kind("alert_rules", "alert rule")
KINDS = {k.table: k for k in (TENANT, GATEWAY, SCHEMA, DEVICE_TYPE, DEVICE, ALERT_RULE)}


def parse_uuid(text: str) -> uuid.UUID | None:
    """The UUID that ``text`` spells, or ``None`` when it is a name."""
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


def new_id(given: str | uuid.UUID | None) -> uuid.UUID:
    """The id to create a row with: the given one, checked, or a fresh random UUID."""
    if given is None:
        return uuid.uuid4()
    if isinstance(given, uuid.UUID):
        return given
    parsed = parse_uuid(given)
    if parsed is None:
        raise Refused(f"--id {given!r} is not a UUID")
    return parsed


@asynccontextmanager
async def connect(connect_kwargs: dict[str, Any]) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the metadata database with JSON codecs, closed on exit."""
    try:
        conn = await asyncpg.connect(**connect_kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"cannot connect to the metadata database: {exc}") from exc
    try:
        for name in ("json", "jsonb"):
            await conn.set_type_codec(
                name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        if not await conn.fetchval("SELECT to_regclass('device_types') IS NOT NULL"):
            raise AdminError(
                "the metadata database has no registry tables; run `sensormine-collector migrate` first"
            )
        yield conn
    finally:
        await conn.close()


def _row(record: asyncpg.Record | None) -> Row:
    assert record is not None
    return dict(record.items())


class RegistryStore:
    """Checked reads and writes of the registry over one connection."""

    def __init__(self, conn: asyncpg.Connection, actor: str = "") -> None:
        self.conn = conn
        self.actor = actor

    # --- references ---------------------------------------------------------------------------

    async def resolve(
        self, kind: Kind, ref: str | uuid.UUID, tenant_id: uuid.UUID | None = None
    ) -> Row:
        """The row that ``ref`` (an id, or a name unique within ``tenant_id`` or overall) names."""
        ident = ref if isinstance(ref, uuid.UUID) else parse_uuid(ref)
        if ident is not None:
            record = await self.conn.fetchrow(f"SELECT * FROM {kind.table} WHERE id = $1", ident)
            if record is None:
                raise NotFound(f"{kind.label} {ref} not found")
            return _row(record)
        if kind is TENANT or tenant_id is None:
            records = await self.conn.fetch(f"SELECT * FROM {kind.table} WHERE name = $1", ref)
        else:
            records = await self.conn.fetch(
                f"SELECT * FROM {kind.table} WHERE name = $1 AND tenant_id = $2", ref, tenant_id
            )
        if not records:
            where = (
                ""
                if tenant_id is None or kind is TENANT
                else f" in tenant {await self._tenant_name(tenant_id)}"
            )
            raise NotFound(f"{kind.label} {ref} not found{where}")
        if len(records) > 1:
            raise Refused(
                f"{kind.label} name {ref!r} is used in {len(records)} tenants; give its id or --tenant"
            )
        return _row(records[0])

    async def tenant_ref(self, ref: str | uuid.UUID | None) -> uuid.UUID | None:
        """The id of the tenant that ``ref`` names (``None`` stays ``None``)."""
        if ref is None:
            return None
        tenant: uuid.UUID = (await self.resolve(TENANT, ref))["id"]
        return tenant

    async def _tenant_name(self, tenant_id: uuid.UUID) -> str:
        name = await self.conn.fetchval("SELECT name FROM tenants WHERE id = $1", tenant_id)
        return str(name) if name is not None else str(tenant_id)

    async def _same_tenant(self, kind: Kind, ref: str | uuid.UUID, tenant_id: uuid.UUID) -> Row:
        """Resolve ``ref`` and refuse it when it belongs to another tenant than ``tenant_id``."""
        row = await self.resolve(kind, ref, tenant_id)
        if row["tenant_id"] != tenant_id:
            raise Refused(
                f"{kind.label} {ref} belongs to tenant {await self._tenant_name(row['tenant_id'])}, "
                f"not to tenant {await self._tenant_name(tenant_id)}"
            )
        return row

    async def _insert(self, kind: Kind, values: Row) -> Row:
        columns = ", ".join(values)
        params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        try:
            record = await self.conn.fetchrow(
                f"INSERT INTO {kind.table} ({columns}) VALUES ({params}) RETURNING *",
                *values.values(),
            )
        except asyncpg.UniqueViolationError as exc:
            raise self._unique_refusal(kind, values, exc) from None
        return _row(record)

    async def _update(self, kind: Kind, ident: uuid.UUID, values: Row) -> Row:
        if not values:
            return _row(
                await self.conn.fetchrow(f"SELECT * FROM {kind.table} WHERE id = $1", ident)
            )
        sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(values, start=2))
        try:
            record = await self.conn.fetchrow(
                f"UPDATE {kind.table} SET {sets}, updated_at = now() WHERE id = $1 RETURNING *",
                ident,
                *values.values(),
            )
        except asyncpg.UniqueViolationError as exc:
            raise self._unique_refusal(kind, values, exc) from None
        return _row(record)

    @staticmethod
    def _unique_refusal(kind: Kind, values: Row, exc: asyncpg.UniqueViolationError) -> Refused:
        if str(exc.constraint_name).endswith("_pkey"):
            return Refused(f"{kind.label} {values.get('id')} already exists")
        scope = "" if kind is TENANT else " in this tenant"
        return Refused(f"{kind.label} name {values.get('name')!r} is already used{scope}")

    async def _count(self, sql: str, *args: Any) -> list[str]:
        return [str(r[0]) for r in await self.conn.fetch(sql, *args)]

    @staticmethod
    def _listing(names: list[str], limit: int = 5) -> str:
        shown = ", ".join(names[:limit])
        return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

    async def set_enabled(
        self, kind: Kind, ref: str, enabled: bool, tenant: str | None = None
    ) -> Row:
        """Enable or disable a tenant, gateway, device or alert rule (device types: see below)."""
        if kind is DEVICE_TYPE:
            return await self.update_device_type(ref, tenant=tenant, enabled=enabled)
        row = await self.resolve(kind, ref, await self.tenant_ref(tenant))
        return await self._update(kind, row["id"], {"enabled": enabled})

    # --- tenants ------------------------------------------------------------------------------

    async def create_tenant(self, name: str, *, id: str | uuid.UUID | None = None) -> Row:
        """Create a tenant."""
        return await self._insert(TENANT, {"id": new_id(id), "name": _name(name)})

    async def list_tenants(self) -> list[Row]:
        """Every tenant with how many gateways and devices it has."""
        records = await self.conn.fetch(
            """
            SELECT t.*,
                   (SELECT count(*) FROM gateways g WHERE g.tenant_id = t.id) AS gateways,
                   (SELECT count(*) FROM devices d WHERE d.tenant_id = t.id) AS devices
            FROM tenants t ORDER BY t.name
            """
        )
        return [dict(r.items()) for r in records]

    async def show_tenant(self, ref: str) -> Row:
        """A tenant with the counts of what it owns."""
        row = await self.resolve(TENANT, ref)
        for table in ("gateways", "schemas", "device_types", "devices", "alert_rules"):
            row[table] = await self.conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE tenant_id = $1", row["id"]
            )
        return row

    async def update_tenant(self, ref: str, *, name: str | None = None) -> Row:
        """Rename a tenant."""
        row = await self.resolve(TENANT, ref)
        return await self._update(TENANT, row["id"], {} if name is None else {"name": _name(name)})

    async def delete_tenant(self, ref: str) -> Row:
        """Delete a tenant that owns nothing any more."""
        row = await self.show_tenant(ref)
        owned = [
            f"{row[t]} {t.replace('_', ' ')}"
            for t in ("gateways", "schemas", "device_types", "devices", "alert_rules")
            if row[t]
        ]
        if owned:
            raise Refused(
                f"tenant {ref} still owns {', '.join(owned)}; delete those first "
                "(or disable the tenant instead)"
            )
        # No foreign keys (the seed's decision): what belongs to the row goes explicitly.
        async with self.conn.transaction():
            await self.conn.execute("DELETE FROM users WHERE tenant_id = $1", row["id"])
            await self.conn.execute("DELETE FROM tenants WHERE id = $1", row["id"])
        return row

    # --- gateways -----------------------------------------------------------------------------

    async def create_gateway(
        self,
        tenant: str,
        name: str,
        *,
        description: str = "",
        id: str | uuid.UUID | None = None,
    ) -> Row:
        """Register a gateway of ``tenant``."""
        tenant_id = await self.tenant_ref(tenant)
        return await self._insert(
            GATEWAY,
            {
                "id": new_id(id),
                "tenant_id": tenant_id,
                "name": _name(name),
                "description": description,
            },
        )

    async def list_gateways(self, tenant: str | None = None) -> list[Row]:
        """Gateways (of one tenant, or all) with how many devices each has."""
        tenant_id = await self.tenant_ref(tenant)
        records = await self.conn.fetch(
            """
            SELECT g.*, t.name AS tenant,
                   (SELECT count(*) FROM devices d WHERE d.gateway_id = g.id) AS devices
            FROM gateways g JOIN tenants t ON t.id = g.tenant_id
            WHERE $1::uuid IS NULL OR g.tenant_id = $1
            ORDER BY t.name, g.name
            """,
            tenant_id,
        )
        return [dict(r.items()) for r in records]

    async def show_gateway(self, ref: str, tenant: str | None = None) -> Row:
        """A gateway with the devices assigned to it."""
        row = await self.resolve(GATEWAY, ref, await self.tenant_ref(tenant))
        row["tenant"] = await self._tenant_name(row["tenant_id"])
        row["devices"] = await self.gateway_devices(row["id"])
        return row

    async def gateway_devices(self, gateway_id: uuid.UUID) -> list[Row]:
        """The devices assigned to a gateway, with their type and the type's current schema."""
        records = await self.conn.fetch(
            """
            SELECT d.id, d.name, d.description, d.enabled, d.attributes,
                   dt.id AS device_type_id, dt.name AS device_type, dt.schema_id,
                   sv.version AS schema_version, sv.json_schema
            FROM devices d
            JOIN device_types dt ON dt.id = d.device_type_id
            LEFT JOIN LATERAL (
                SELECT version, json_schema FROM schema_versions
                WHERE schema_id = dt.schema_id ORDER BY version DESC LIMIT 1
            ) sv ON true
            WHERE d.gateway_id = $1
            ORDER BY d.name
            """,
            gateway_id,
        )
        return [dict(r.items()) for r in records]

    async def update_gateway(
        self,
        ref: str,
        *,
        tenant: str | None = None,
        name: str | None = None,
        description: str | None = None,
    ) -> Row:
        """Rename or describe a gateway."""
        row = await self.resolve(GATEWAY, ref, await self.tenant_ref(tenant))
        values: Row = {}
        if name is not None:
            values["name"] = _name(name)
        if description is not None:
            values["description"] = description
        return await self._update(GATEWAY, row["id"], values)

    async def delete_gateway(self, ref: str, tenant: str | None = None) -> Row:
        """Delete a gateway that has no device assigned."""
        row = await self.resolve(GATEWAY, ref, await self.tenant_ref(tenant))
        names = await self._count(
            "SELECT name FROM devices WHERE gateway_id = $1 ORDER BY name", row["id"]
        )
        if names:
            raise Refused(
                f"gateway {ref} has {len(names)} device(s) assigned ({self._listing(names)}); "
                "move them to another gateway (`devices update <device> --gateway ...`) "
                "or unassign them (`--no-gateway`) first"
            )
        await self.conn.execute("DELETE FROM gateways WHERE id = $1", row["id"])
        return row

    # --- schemas ------------------------------------------------------------------------------

    async def create_schema(
        self,
        tenant: str,
        name: str,
        *,
        description: str = "",
        id: str | uuid.UUID | None = None,
        document: dict[str, Any] | None = None,
    ) -> Row:
        """Create a schema, with a first version when ``document`` (already checked) is given."""
        tenant_id = await self.tenant_ref(tenant)
        async with self.conn.transaction():
            row = await self._insert(
                SCHEMA,
                {
                    "id": new_id(id),
                    "tenant_id": tenant_id,
                    "name": _name(name),
                    "description": description,
                },
            )
            if document is not None:
                version, _ = await self.add_schema_version(str(row["id"]), document)
                row["version"] = version["version"]
        return row

    async def current_version(self, schema_id: uuid.UUID) -> Row | None:
        """The highest version of a schema, or ``None`` when it has none."""
        record = await self.conn.fetchrow(
            "SELECT * FROM schema_versions WHERE schema_id = $1 ORDER BY version DESC LIMIT 1",
            schema_id,
        )
        return None if record is None else dict(record.items())

    async def add_schema_version(
        self, ref: str, document: dict[str, Any], tenant: str | None = None
    ) -> tuple[Row, bool]:
        """Store ``document`` (already checked) as the next version; ``False``: same as current."""
        async with self.conn.transaction():
            schema = await self.resolve(SCHEMA, ref, await self.tenant_ref(tenant))
            # Serializes concurrent additions to one schema: version numbers stay dense.
            await self.conn.execute("SELECT 1 FROM schemas WHERE id = $1 FOR UPDATE", schema["id"])
            current = await self.current_version(schema["id"])
            if current is not None and current["json_schema"] == document:
                return current, False
            version = 1 if current is None else current["version"] + 1
            record = await self.conn.fetchrow(
                """
                INSERT INTO schema_versions (schema_id, version, json_schema, created_by)
                VALUES ($1, $2, $3, $4) RETURNING *
                """,
                schema["id"],
                version,
                document,
                self.actor,
            )
            await self.conn.execute(
                "UPDATE schemas SET updated_at = now() WHERE id = $1", schema["id"]
            )
            return _row(record), True

    async def list_schemas(self, tenant: str | None = None) -> list[Row]:
        """Schemas with their current version and how many device types use each."""
        tenant_id = await self.tenant_ref(tenant)
        records = await self.conn.fetch(
            """
            SELECT s.*, t.name AS tenant,
                   (SELECT max(version) FROM schema_versions v WHERE v.schema_id = s.id) AS version,
                   (SELECT count(*) FROM device_types dt WHERE dt.schema_id = s.id) AS device_types
            FROM schemas s JOIN tenants t ON t.id = s.tenant_id
            WHERE $1::uuid IS NULL OR s.tenant_id = $1
            ORDER BY t.name, s.name
            """,
            tenant_id,
        )
        return [dict(r.items()) for r in records]

    async def show_schema(
        self, ref: str, tenant: str | None = None, version: int | None = None
    ) -> Row:
        """A schema, its versions, and the document of the current (or the given) version."""
        row = await self.resolve(SCHEMA, ref, await self.tenant_ref(tenant))
        row["tenant"] = await self._tenant_name(row["tenant_id"])
        versions = await self.conn.fetch(
            "SELECT version, created_by, created_at FROM schema_versions WHERE schema_id = $1 ORDER BY version",
            row["id"],
        )
        row["versions"] = [dict(v.items()) for v in versions]
        row["device_types"] = await self._count(
            "SELECT name FROM device_types WHERE schema_id = $1 ORDER BY name", row["id"]
        )
        if version is None:
            current = await self.current_version(row["id"])
        else:
            record = await self.conn.fetchrow(
                "SELECT * FROM schema_versions WHERE schema_id = $1 AND version = $2",
                row["id"],
                version,
            )
            if record is None:
                raise NotFound(f"schema {ref} has no version {version}")
            current = dict(record.items())
        row["version"] = None if current is None else current["version"]
        row["json_schema"] = None if current is None else current["json_schema"]
        return row

    async def update_schema(
        self,
        ref: str,
        *,
        tenant: str | None = None,
        name: str | None = None,
        description: str | None = None,
    ) -> Row:
        """Rename or describe a schema (its content changes only by adding a version)."""
        row = await self.resolve(SCHEMA, ref, await self.tenant_ref(tenant))
        values: Row = {}
        if name is not None:
            values["name"] = _name(name)
        if description is not None:
            values["description"] = description
        return await self._update(SCHEMA, row["id"], values)

    async def delete_schema(self, ref: str, tenant: str | None = None) -> Row:
        """Delete a schema and its versions when no device type refers to it."""
        row = await self.resolve(SCHEMA, ref, await self.tenant_ref(tenant))
        names = await self._count(
            "SELECT name FROM device_types WHERE schema_id = $1 ORDER BY name", row["id"]
        )
        if names:
            raise Refused(
                f"schema {ref} is used by {len(names)} device type(s) ({self._listing(names)}); "
                "point them at another schema (`device-types update <type> --schema ...`) first"
            )
        async with self.conn.transaction():
            await self.conn.execute("DELETE FROM schema_versions WHERE schema_id = $1", row["id"])
            await self.conn.execute("DELETE FROM schemas WHERE id = $1", row["id"])
        return row

    # --- device types -------------------------------------------------------------------------

    async def _schema_for(self, ref: str | None, tenant_id: uuid.UUID) -> uuid.UUID | None:
        if ref is None:
            return None
        ident = parse_uuid(ref)
        try:
            row = await self.resolve(SCHEMA, ident or ref, tenant_id)
        except NotFound:
            raise NotFound(f"schema {ref} not found") from None
        if row["tenant_id"] != tenant_id:
            raise Refused(
                f"schema {ref} belongs to tenant {await self._tenant_name(row['tenant_id'])}, "
                f"not to tenant {await self._tenant_name(tenant_id)}"
            )
        schema_id: uuid.UUID = row["id"]
        return schema_id

    async def _record_type_change(
        self, before: Row | None, after: Row, action: str
    ) -> dict[str, Any]:
        fields = ("name", "description", "schema_id", "enabled")
        changes = {
            f: {"old": _plain(None if before is None else before[f]), "new": _plain(after[f])}
            for f in fields
            if before is None or before[f] != after[f]
        }
        snapshot = {k: _plain(v) for k, v in after.items()}
        if after["schema_id"] is not None:
            current = await self.current_version(after["schema_id"])
            snapshot["schema_version"] = None if current is None else current["version"]
        await self.conn.execute(
            """
            INSERT INTO device_type_versions (device_type_id, version, snapshot, created_by)
            VALUES ($1, $2, $3, $4)
            """,
            after["id"],
            after["version"],
            snapshot,
            self.actor,
        )
        await self.conn.execute(
            """
            INSERT INTO device_type_audit_logs (device_type_id, tenant_id, actor, action, changes)
            VALUES ($1, $2, $3, $4, $5)
            """,
            after["id"],
            after["tenant_id"],
            self.actor,
            action,
            changes,
        )
        return changes

    async def create_device_type(
        self,
        tenant: str,
        name: str,
        *,
        schema: str | None = None,
        description: str = "",
        id: str | uuid.UUID | None = None,
    ) -> Row:
        """Create a device type; ``schema`` must exist in the same tenant."""
        async with self.conn.transaction():
            tenant_id = await self.tenant_ref(tenant)
            assert tenant_id is not None
            schema_id = await self._schema_for(schema, tenant_id)
            row = await self._insert(
                DEVICE_TYPE,
                {
                    "id": new_id(id),
                    "tenant_id": tenant_id,
                    "name": _name(name),
                    "description": description,
                    "schema_id": schema_id,
                    "version": 1,
                },
            )
            await self._record_type_change(None, row, "create")
        return row

    async def update_device_type(
        self,
        ref: str,
        *,
        tenant: str | None = None,
        name: str | None = None,
        description: str | None = None,
        schema: str | None = _UNSET,
        enabled: bool | None = None,
    ) -> Row:
        """Change a device type; a change bumps its version, snapshots it and is audited."""
        async with self.conn.transaction():
            found = await self.resolve(DEVICE_TYPE, ref, await self.tenant_ref(tenant))
            before = _row(
                await self.conn.fetchrow(
                    "SELECT * FROM device_types WHERE id = $1 FOR UPDATE", found["id"]
                )
            )
            values: Row = {}
            if name is not None:
                values["name"] = _name(name)
            if description is not None:
                values["description"] = description
            if schema is not _UNSET:
                values["schema_id"] = await self._schema_for(schema, before["tenant_id"])
            if enabled is not None:
                values["enabled"] = enabled
            values = {k: v for k, v in values.items() if before[k] != v}
            if not values:
                return before
            values["version"] = before["version"] + 1
            after = await self._update(DEVICE_TYPE, before["id"], values)
            action = "update"
            if set(values) == {"enabled", "version"}:
                action = "enable" if enabled else "disable"
            await self._record_type_change(before, after, action)
        return after

    async def list_device_types(self, tenant: str | None = None) -> list[Row]:
        """Device types with their schema's name and current version and their device count."""
        tenant_id = await self.tenant_ref(tenant)
        records = await self.conn.fetch(
            """
            SELECT dt.*, t.name AS tenant, s.name AS schema,
                   (SELECT max(version) FROM schema_versions v WHERE v.schema_id = dt.schema_id)
                       AS schema_version,
                   (SELECT count(*) FROM devices d WHERE d.device_type_id = dt.id) AS devices
            FROM device_types dt
            JOIN tenants t ON t.id = dt.tenant_id
            LEFT JOIN schemas s ON s.id = dt.schema_id
            WHERE $1::uuid IS NULL OR dt.tenant_id = $1
            ORDER BY t.name, dt.name
            """,
            tenant_id,
        )
        return [dict(r.items()) for r in records]

    async def show_device_type(self, ref: str, tenant: str | None = None) -> Row:
        """A device type with its schema, current schema version and device count."""
        row = await self.resolve(DEVICE_TYPE, ref, await self.tenant_ref(tenant))
        for item in await self.list_device_types(None):
            if item["id"] == row["id"]:
                return item
        return row

    async def device_type_history(self, ref: str, tenant: str | None = None) -> Row:
        """A device type's version snapshots and audit log, oldest first."""
        row = await self.resolve(DEVICE_TYPE, ref, await self.tenant_ref(tenant))
        versions = await self.conn.fetch(
            "SELECT version, snapshot, created_by, created_at FROM device_type_versions WHERE device_type_id = $1 ORDER BY version",
            row["id"],
        )
        audit = await self.conn.fetch(
            "SELECT actor, action, changes, created_at FROM device_type_audit_logs WHERE device_type_id = $1 ORDER BY id",
            row["id"],
        )
        return {
            "id": row["id"],
            "name": row["name"],
            "versions": [dict(v.items()) for v in versions],
            "audit": [dict(a.items()) for a in audit],
        }

    async def delete_device_type(self, ref: str, tenant: str | None = None) -> Row:
        """Delete a device type that no device and no alert rule uses (the audit log stays)."""
        async with self.conn.transaction():
            row = await self.resolve(DEVICE_TYPE, ref, await self.tenant_ref(tenant))
            names = await self._count(
                "SELECT name FROM devices WHERE device_type_id = $1 ORDER BY name", row["id"]
            )
            if names:
                raise Refused(
                    f"device type {ref} is used by {len(names)} device(s) ({self._listing(names)}); "
                    "give them another type or delete them first"
                )
            rules = await self._count(
                "SELECT name FROM alert_rules WHERE device_type_id = $1 ORDER BY name", row["id"]
            )
            if rules:
                raise Refused(
                    f"device type {ref} is used by {len(rules)} alert rule(s) ({self._listing(rules)}); "
                    "delete them first"
                )
            await self.conn.execute("DELETE FROM device_types WHERE id = $1", row["id"])
            await self.conn.execute(
                """
                INSERT INTO device_type_audit_logs (device_type_id, tenant_id, actor, action, changes)
                VALUES ($1, $2, $3, 'delete', $4)
                """,
                row["id"],
                row["tenant_id"],
                self.actor,
                {k: _plain(v) for k, v in row.items()},
            )
        return row

    # --- devices ------------------------------------------------------------------------------

    async def create_device(
        self,
        tenant: str,
        name: str,
        device_type: str,
        *,
        gateway: str | None = None,
        description: str = "",
        attributes: dict[str, Any] | None = None,
        id: str | uuid.UUID | None = None,
    ) -> Row:
        """Register a device; its type and gateway must belong to its tenant."""
        tenant_id = await self.tenant_ref(tenant)
        assert tenant_id is not None
        type_row = await self._same_tenant(DEVICE_TYPE, device_type, tenant_id)
        gateway_id = None
        if gateway is not None:
            gateway_id = (await self._same_tenant(GATEWAY, gateway, tenant_id))["id"]
        return await self._insert(
            DEVICE,
            {
                "id": new_id(id),
                "tenant_id": tenant_id,
                "device_type_id": type_row["id"],
                "gateway_id": gateway_id,
                "name": _name(name),
                "description": description,
                "attributes": attributes or {},
            },
        )

    async def list_devices(
        self,
        tenant: str | None = None,
        gateway: str | None = None,
        device_type: str | None = None,
    ) -> list[Row]:
        """Devices, optionally of one tenant, gateway or device type."""
        tenant_id = await self.tenant_ref(tenant)
        gateway_id = (
            None if gateway is None else (await self.resolve(GATEWAY, gateway, tenant_id))["id"]
        )
        type_id = (
            None
            if device_type is None
            else (await self.resolve(DEVICE_TYPE, device_type, tenant_id))["id"]
        )
        records = await self.conn.fetch(
            """
            SELECT d.*, t.name AS tenant, dt.name AS device_type, g.name AS gateway
            FROM devices d
            JOIN tenants t ON t.id = d.tenant_id
            JOIN device_types dt ON dt.id = d.device_type_id
            LEFT JOIN gateways g ON g.id = d.gateway_id
            WHERE ($1::uuid IS NULL OR d.tenant_id = $1)
              AND ($2::uuid IS NULL OR d.gateway_id = $2)
              AND ($3::uuid IS NULL OR d.device_type_id = $3)
            ORDER BY t.name, d.name
            """,
            tenant_id,
            gateway_id,
            type_id,
        )
        return [dict(r.items()) for r in records]

    async def show_device(self, ref: str, tenant: str | None = None) -> Row:
        """A device with its tenant, type and gateway names."""
        row = await self.resolve(DEVICE, ref, await self.tenant_ref(tenant))
        for item in await self.list_devices(str(row["tenant_id"])):
            if item["id"] == row["id"]:
                return item
        return row

    async def update_device(
        self,
        ref: str,
        *,
        tenant: str | None = None,
        name: str | None = None,
        description: str | None = None,
        device_type: str | None = None,
        gateway: str | None = _UNSET,
        attributes: dict[str, Any] | None = None,
    ) -> Row:
        """Change a device; a new type or gateway must belong to the device's tenant."""
        row = await self.resolve(DEVICE, ref, await self.tenant_ref(tenant))
        values: Row = {}
        if name is not None:
            values["name"] = _name(name)
        if description is not None:
            values["description"] = description
        if device_type is not None:
            values["device_type_id"] = (
                await self._same_tenant(DEVICE_TYPE, device_type, row["tenant_id"])
            )["id"]
        if gateway is not _UNSET:
            values["gateway_id"] = (
                None
                if gateway is None
                else (await self._same_tenant(GATEWAY, gateway, row["tenant_id"]))["id"]
            )
        if attributes is not None:
            values["attributes"] = attributes
        return await self._update(DEVICE, row["id"], values)

    async def delete_device(self, ref: str, tenant: str | None = None) -> Row:
        """Delete a device that no alert rule names (its stored telemetry stays)."""
        row = await self.resolve(DEVICE, ref, await self.tenant_ref(tenant))
        rules = await self._count(
            "SELECT name FROM alert_rules WHERE device_id = $1 ORDER BY name", row["id"]
        )
        if rules:
            raise Refused(
                f"device {ref} is named by {len(rules)} alert rule(s) ({self._listing(rules)}); "
                "delete them first"
            )
        await self.conn.execute("DELETE FROM devices WHERE id = $1", row["id"])
        return row

    # --- alert rules --------------------------------------------------------------------------

    async def _check_metric(self, type_id: uuid.UUID | None, metric: str) -> None:
        if type_id is None:
            return
        type_row = _row(
            await self.conn.fetchrow("SELECT * FROM device_types WHERE id = $1", type_id)
        )
        if type_row["schema_id"] is None:
            return
        current = await self.current_version(type_row["schema_id"])
        if current is None:
            return
        properties = current["json_schema"].get("properties", {})
        if metric not in properties and current["json_schema"].get("additionalProperties") is False:
            raise Refused(
                f"metric {metric!r} is not a metric of device type {type_row['name']} "
                f"(its schema version {current['version']} has: {', '.join(sorted(properties))})"
            )

    async def _rule_targets(
        self, tenant_id: uuid.UUID, device_type: str | None, device: str | None
    ) -> tuple[uuid.UUID | None, uuid.UUID | None, uuid.UUID | None]:
        type_id = device_id = None
        checked_type = None
        if device_type is not None:
            type_id = (await self._same_tenant(DEVICE_TYPE, device_type, tenant_id))["id"]
            checked_type = type_id
        if device is not None:
            device_row = await self._same_tenant(DEVICE, device, tenant_id)
            device_id = device_row["id"]
            if type_id is not None and device_row["device_type_id"] != type_id:
                raise Refused(f"device {device} is not of device type {device_type}")
            checked_type = device_row["device_type_id"]
        return type_id, device_id, checked_type

    async def create_alert_rule(
        self,
        tenant: str,
        name: str,
        *,
        metric: str,
        condition: str,
        threshold: float,
        duration: float = 0.0,
        severity: str = "warning",
        device_type: str | None = None,
        device: str | None = None,
        id: str | uuid.UUID | None = None,
    ) -> Row:
        """Create an alert rule on a metric of a device type, of one device, or tenant-wide."""
        tenant_id = await self.tenant_ref(tenant)
        assert tenant_id is not None
        type_id, device_id, checked_type = await self._rule_targets(tenant_id, device_type, device)
        await self._check_metric(checked_type, metric)
        return await self._insert(
            ALERT_RULE,
            {
                "id": new_id(id),
                "tenant_id": tenant_id,
                "name": _name(name),
                "device_type_id": type_id,
                "device_id": device_id,
                "metric": _check_rule_metric(metric),
                "condition": _check_condition(condition),
                "threshold": float(threshold),
                "duration": timedelta(seconds=_check_duration(duration)),
                "severity": _check_severity(severity),
            },
        )

    async def list_alert_rules(self, tenant: str | None = None) -> list[Row]:
        """Alert rules with the names of what they watch."""
        tenant_id = await self.tenant_ref(tenant)
        records = await self.conn.fetch(
            """
            SELECT r.*, t.name AS tenant, dt.name AS device_type, d.name AS device
            FROM alert_rules r
            JOIN tenants t ON t.id = r.tenant_id
            LEFT JOIN device_types dt ON dt.id = r.device_type_id
            LEFT JOIN devices d ON d.id = r.device_id
            WHERE $1::uuid IS NULL OR r.tenant_id = $1
            ORDER BY t.name, r.name
            """,
            tenant_id,
        )
        return [dict(r.items()) for r in records]

    async def show_alert_rule(self, ref: str, tenant: str | None = None) -> Row:
        """An alert rule with the names of what it watches."""
        row = await self.resolve(ALERT_RULE, ref, await self.tenant_ref(tenant))
        for item in await self.list_alert_rules(str(row["tenant_id"])):
            if item["id"] == row["id"]:
                return item
        return row

    async def update_alert_rule(
        self,
        ref: str,
        *,
        tenant: str | None = None,
        name: str | None = None,
        metric: str | None = None,
        condition: str | None = None,
        threshold: float | None = None,
        duration: float | None = None,
        severity: str | None = None,
    ) -> Row:
        """Change an alert rule's name, metric, condition, threshold, duration or severity."""
        row = await self.resolve(ALERT_RULE, ref, await self.tenant_ref(tenant))
        values: Row = {}
        if name is not None:
            values["name"] = _name(name)
        if metric is not None:
            type_id = row["device_type_id"]
            if type_id is None and row["device_id"] is not None:
                type_id = await self.conn.fetchval(
                    "SELECT device_type_id FROM devices WHERE id = $1", row["device_id"]
                )
            await self._check_metric(type_id, metric)
            values["metric"] = _check_rule_metric(metric)
        if condition is not None:
            values["condition"] = _check_condition(condition)
        if threshold is not None:
            values["threshold"] = float(threshold)
        if duration is not None:
            values["duration"] = timedelta(seconds=_check_duration(duration))
        if severity is not None:
            values["severity"] = _check_severity(severity)
        return await self._update(ALERT_RULE, row["id"], values)

    async def delete_alert_rule(self, ref: str, tenant: str | None = None) -> Row:
        """Delete an alert rule."""
        row = await self.resolve(ALERT_RULE, ref, await self.tenant_ref(tenant))
        await self.conn.execute("DELETE FROM alert_rules WHERE id = $1", row["id"])
        return row


def _name(name: str) -> str:
    name = name.strip()
    if not name:
        raise Refused("a name must not be empty")
    if parse_uuid(name) is not None:
        raise Refused(f"a name must not be a UUID ({name!r}): ids and names must stay apart")
    if len(name) > 128:
        raise Refused(f"name {name[:20]!r}... is longer than 128 characters")
    return name


def _check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise Refused(f"condition {condition!r} is not one of {' '.join(CONDITIONS)}")
    return condition


def _check_severity(severity: str) -> str:
    if severity not in SEVERITIES:
        raise Refused(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    return severity


def _check_duration(seconds: float) -> float:
    if seconds < 0:
        raise Refused("a duration must not be negative")
    return seconds


def _check_rule_metric(metric: str) -> str:
    if not metric.strip():
        raise Refused("an alert rule needs a metric")
    return metric


def _plain(value: Any) -> Any:
    """A value as JSON can hold it (ids and times as text)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
