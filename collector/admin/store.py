"""The registry's administration: reads and checked writes of the metadata database.

Every write checks the cross-references itself (the registry has no foreign keys, so that its
tables can be managed, backed up and restored on their own), so a refusal says exactly what is wrong:
``schema <id> not found``, a device type or gateway of another tenant, a schema still in use.
Every change of a device type writes, in the same transaction, a ``device_type_versions``
snapshot and a ``device_type_audit_logs`` row (actor, action, a JSON diff of what changed).

``listing``, ``show``, ``create``, ``update`` and ``delete`` work on any kind of
:mod:`collector.admin.kinds`; schema versions, a device type's history and the devices of a
gateway are their own methods. Any reference argument is an id or, where that is unambiguous,
a name (within ``tenant`` when one is given).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg

from collector.admin.errors import AdminError as AdminError
from collector.admin.errors import ChangeRefused as ChangeRefused
from collector.admin.errors import NotFound as NotFound
from collector.admin.kinds import (
    ALERT_RULE,
    DEVICE_TYPE,
    GATEWAY,
    OWNED_BY_TENANT,
    REQUIRED,
    SCHEMA,
    TENANT,
    Kind,
    parse_uuid,
)
from collector.alerts.rules import RuleError, check_clear_threshold
from collector.errors import DatabaseUnavailable

Row = dict[str, Any]


def new_id(given: str | uuid.UUID | None) -> uuid.UUID:
    """The id to create a row with: the given one, checked, or a fresh random UUID."""
    if given is None:
        return uuid.uuid4()
    if isinstance(given, uuid.UUID):
        return given
    parsed = parse_uuid(given)
    if parsed is None:
        raise ChangeRefused(f"--id {given!r} is not a UUID")
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


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
            row = await self.get(kind, ident)
            if row is None:
                raise NotFound(f"{kind.label} {ref} not found")
            return row
        scoped = kind.owned and tenant_id is not None
        records = await self.conn.fetch(
            f"SELECT * FROM {kind.table} WHERE name = $1"
            + (" AND tenant_id = $2" if scoped else ""),
            ref,
            *([tenant_id] if scoped else []),
        )
        if not records:
            where = f" in tenant {await self._tenant_name(tenant_id)}" if scoped else ""
            raise NotFound(f"{kind.label} {ref} not found{where}")
        if len(records) > 1:
            raise ChangeRefused(
                f"{kind.label} name {ref!r} is used in {len(records)} tenants; give its id or --tenant"
            )
        return _row(records[0])

    async def get(self, kind: Kind, ident: uuid.UUID) -> Row | None:
        """The row of ``kind`` with id ``ident``, or ``None``."""
        record = await self.conn.fetchrow(f"SELECT * FROM {kind.table} WHERE id = $1", ident)
        return None if record is None else dict(record.items())

    async def tenant_ref(self, ref: str | uuid.UUID | None) -> uuid.UUID | None:
        """The id of the tenant that ``ref`` names (``None`` stays ``None``)."""
        if ref is None:
            return None
        tenant: uuid.UUID = (await self.resolve(TENANT, ref))["id"]
        return tenant

    async def _tenant_name(self, tenant_id: uuid.UUID | None) -> str:
        name = await self.conn.fetchval("SELECT name FROM tenants WHERE id = $1", tenant_id)
        return str(name) if name is not None else str(tenant_id)

    async def _same_tenant(self, kind: Kind, ref: str | uuid.UUID, tenant_id: uuid.UUID) -> Row:
        """Resolve ``ref`` and refuse it when it belongs to another tenant than ``tenant_id``."""
        row = await self.resolve(kind, ref, tenant_id)
        if row["tenant_id"] != tenant_id:
            raise ChangeRefused(
                f"{kind.label} {ref} belongs to tenant {await self._tenant_name(row['tenant_id'])}, "
                f"not to tenant {await self._tenant_name(tenant_id)}"
            )
        return row

    async def _values(
        self, kind: Kind, given: Row, tenant_id: uuid.UUID | None, current: Row
    ) -> Row:
        """The column values of ``given`` (by field name) for ``current`` (``{}``: a new row)."""
        values: Row = {}
        for field in kind.fields:
            if field.name not in given:
                continue
            value = given[field.name]
            if field.ref is not None and value is not None:
                assert tenant_id is not None
                value = (await self._same_tenant(field.ref, value, tenant_id))["id"]
            elif field.ref is None:
                value = field.checked(value)
            values[field.column] = value
        if kind is ALERT_RULE:
            await self._check_rule(given, values, current)
        return values

    async def _names_of(self, sql: str, *args: Any) -> list[str]:
        return [str(r[0]) for r in await self.conn.fetch(sql, *args)]

    # --- any kind -----------------------------------------------------------------------------

    async def listing(
        self,
        kind: Kind,
        tenant: str | None = None,
        *,
        ident: uuid.UUID | None = None,
        **filters: str | None,
    ) -> list[Row]:
        """Rows of ``kind`` (of one tenant, or narrowed by ``kind.filters``) with their counts."""
        tenant_id = await self.tenant_ref(tenant)
        a = kind.alias
        where: list[str] = []
        args: list[Any] = []
        narrowed = [("id", ident), ("tenant_id", tenant_id if kind.owned else None)]
        for field in kind.filters:
            ref = filters.get(field.name)
            assert field.ref is not None
            found = None if ref is None else await self.resolve(field.ref, ref, tenant_id)
            narrowed.append((field.column, None if found is None else found["id"]))
        for column, value in narrowed:
            if value is not None:
                args.append(value)
                where.append(f"{a}.{column} = ${len(args)}")
        records = await self.conn.fetch(
            kind.listing
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + (f" ORDER BY t.name, {a}.name" if kind.owned else " ORDER BY t.name"),
            *args,
        )
        return [dict(r.items()) for r in records]

    async def show(self, kind: Kind, ref: str, tenant: str | None = None) -> Row:
        """A row as its listing shows it; a tenant with what it owns, a gateway with its devices."""
        row = await self.resolve(kind, ref, await self.tenant_ref(tenant))
        if kind is TENANT:
            for table in OWNED_BY_TENANT:
                row[table] = await self.conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE tenant_id = $1", row["id"]
                )
            return row
        (listed,) = await self.listing(kind, ident=row["id"])
        if kind is GATEWAY:
            listed["devices"] = [
                {k: v for k, v in device.items() if k not in ("json_schema", "attributes")}
                for device in await self.gateway_devices(row["id"])
            ]
        return listed

    async def create(
        self,
        kind: Kind,
        tenant: str | None,
        name: str,
        given: Row | None = None,
        *,
        id: str | uuid.UUID | None = None,
    ) -> Row:
        """Create a row of ``kind`` called ``name`` of ``tenant`` from the ``given`` fields.

        References must name rows of the same tenant; fields not given take their defaults.
        """
        given = {"name": name, **(given or {})}
        for field in kind.fields:
            if field.name not in given:
                if field.default is REQUIRED:
                    raise ChangeRefused(f"a {kind.label} needs {field.flag}")
                given[field.name] = field.default
        async with self.conn.transaction():
            row: Row = {"id": new_id(id)}
            tenant_id = None
            if kind.owned:
                assert tenant is not None
                row["tenant_id"] = tenant_id = await self.tenant_ref(tenant)
            row.update(await self._values(kind, given, tenant_id, {}))
            created = await self._insert(kind, row)
            if kind.audited:
                await self._record_change(None, created, "create")
        return created

    async def update(self, kind: Kind, ref: str, given: Row, tenant: str | None = None) -> Row:
        """Change the ``given`` fields of the row ``ref`` names (a field given ``None``: cleared)."""
        row = await self.resolve(kind, ref, await self.tenant_ref(tenant))
        return await self.change(kind, row, given) or row

    async def change(self, kind: Kind, row: Row, given: Row) -> Row | None:
        """Change the ``given`` fields of ``row``; ``None`` when none differs.

        A device type's change bumps its version, snapshots it and is audited.
        """
        for name in given:
            if not kind.field(name).updatable:
                raise ChangeRefused(f"the {name} of a {kind.label} is set when it is created")
        async with self.conn.transaction():
            before = _row(
                await self.conn.fetchrow(
                    f"SELECT * FROM {kind.table} WHERE id = $1 FOR UPDATE", row["id"]
                )
            )
            values = await self._values(kind, given, before.get("tenant_id"), before)
            values = {k: v for k, v in values.items() if before[k] != v}
            if not values:
                return None
            if kind.audited:
                values["version"] = before["version"] + 1
            after = await self._update(kind, before["id"], values)
            if kind.audited:
                action = "update"
                if set(values) == {"enabled", "version"}:
                    action = "enable" if after["enabled"] else "disable"
                await self._record_change(before, after, action)
        return after

    async def delete(self, kind: Kind, ref: str, tenant: str | None = None) -> Row:
        """Delete the row ``ref`` names when nothing refers to it any more."""
        async with self.conn.transaction():
            row = await self.resolve(kind, ref, await self.tenant_ref(tenant))
            if kind is TENANT:
                owned = await self.show(TENANT, str(row["id"]))
                counts = [f"{owned[t]} {t.replace('_', ' ')}" for t in OWNED_BY_TENANT if owned[t]]
                if counts:
                    raise ChangeRefused(
                        f"tenant {ref} still owns {', '.join(counts)}; delete those first "
                        "(or disable the tenant instead)"
                    )
            for dependent in kind.dependents:
                names = await self._names_of(dependent.query, row["id"])
                if names:
                    refusal = dependent.refusal.format(n=len(names), names=_names(names))
                    raise ChangeRefused(f"{kind.label} {ref} {refusal}")
            # No foreign keys, so no cascade: what belongs to the row goes explicitly.
            for table, column in kind.cascade:
                await self.conn.execute(f"DELETE FROM {table} WHERE {column} = $1", row["id"])
            await self.conn.execute(f"DELETE FROM {kind.table} WHERE id = $1", row["id"])
            if kind.audited:
                await self._audit(row, "delete", {k: _plain(v) for k, v in row.items()})
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
    def _unique_refusal(
        kind: Kind, values: Row, exc: asyncpg.UniqueViolationError
    ) -> ChangeRefused:
        if str(exc.constraint_name).endswith("_pkey"):
            return ChangeRefused(f"{kind.label} {values.get('id')} already exists")
        scope = "" if kind is TENANT else " in this tenant"
        return ChangeRefused(f"{kind.label} name {values.get('name')!r} is already used{scope}")

    # --- gateways -----------------------------------------------------------------------------

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

    # --- schema versions ----------------------------------------------------------------------

    async def create_schema(
        self,
        tenant: str | None,
        name: str,
        given: Row | None = None,
        *,
        id: str | uuid.UUID | None = None,
        document: dict[str, Any] | None = None,
    ) -> Row:
        """Create a schema, with a first version when ``document`` (already checked) is given."""
        async with self.conn.transaction():
            row = await self.create(SCHEMA, tenant, name, given, id=id)
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
        row["device_types"] = await self._names_of(
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

    # --- device-type history ------------------------------------------------------------------

    async def _record_change(self, before: Row | None, after: Row, action: str) -> None:
        """A device type's snapshot at its new version and the audit row of the change."""
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
        await self._audit(after, action, changes)

    async def _audit(self, row: Row, action: str, changes: dict[str, Any]) -> None:
        await self.conn.execute(
            """
            INSERT INTO device_type_audit_logs (device_type_id, tenant_id, actor, action, changes)
            VALUES ($1, $2, $3, $4, $5)
            """,
            row["id"],
            row["tenant_id"],
            self.actor,
            action,
            changes,
        )

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

    # --- alert rules --------------------------------------------------------------------------

    async def _check_rule(self, given: Row, values: Row, current: Row) -> None:
        """A rule's device must be of its device type; its metric must be one of that type's;
        its clear threshold must be on the side where the alert clears."""
        condition = values.get("condition", current.get("condition"))
        threshold = values.get("threshold", current.get("threshold"))
        clear = values.get("clear_threshold", current.get("clear_threshold"))
        if condition is not None and threshold is not None:
            try:
                check_clear_threshold(condition, float(threshold), clear)
            except RuleError as exc:
                raise ChangeRefused(str(exc)) from None
        if "metric" not in values:
            return
        type_id = values.get("device_type_id", current.get("device_type_id"))
        device_id = values.get("device_id", current.get("device_id"))
        if device_id is not None:
            device_type = await self.conn.fetchval(
                "SELECT device_type_id FROM devices WHERE id = $1", device_id
            )
            if "device_id" in values and type_id is not None and device_type != type_id:
                raise ChangeRefused(
                    f"device {given['device']} is not of device type {given['device_type']}"
                )
            type_id = type_id or device_type
        if type_id is None:
            return
        type_row = _row(
            await self.conn.fetchrow("SELECT * FROM device_types WHERE id = $1", type_id)
        )
        schema = None
        if type_row["schema_id"] is not None:
            schema = await self.current_version(type_row["schema_id"])
        if schema is None:
            return
        properties = schema["json_schema"].get("properties", {})
        metric = values["metric"]
        if metric not in properties and schema["json_schema"].get("additionalProperties") is False:
            raise ChangeRefused(
                f"metric {metric!r} is not a metric of device type {type_row['name']} "
                f"(its schema version {schema['version']} has: {', '.join(sorted(properties))})"
            )


def _plain(value: Any) -> Any:
    """A value as JSON can hold it (ids and times as text)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
