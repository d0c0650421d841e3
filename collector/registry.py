"""Registry cache: gateways, devices, device types and compiled schemas from the metadata database.

Entries are loaded on first use and kept in memory. The metadata database's triggers send
``NOTIFY sensormine_registry, '<table>:<id>'`` on every change, and the matching entry is dropped
so that the next batch loads it afresh; the whole cache is also dropped every
``refresh_interval`` and whenever the listening connection had to be re-established (a
notification may have been missed). An id that is not found is remembered as unknown for
``negative_ttl`` so that a flood of batches from an unknown gateway costs one query, not one per
batch. A lookup started before an invalidation does not store its (possibly stale) result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import structlog

from collector.errors import DatabaseUnavailable
from collector.validation import CompiledSchema, SchemaError, compile_schema

log = structlog.get_logger("collector.registry")
CHANNEL = "sensormine_registry"

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def named(name: str, ident: uuid.UUID) -> str:
    """``name [id]`` where the name is known, else the id."""
    return f"{name} [{ident}]" if name else str(ident)


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    """A registered gateway."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    enabled: bool
    name: str = ""

    def label(self) -> str:
        """``name [id]`` for messages an operator reads."""
        return named(self.name, self.id)


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """A registered device; ``gateway_id`` is ``None`` when it is not tied to one gateway."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    gateway_id: uuid.UUID | None
    device_type_id: uuid.UUID
    enabled: bool
    name: str = ""

    def label(self) -> str:
        """``name [id]`` for messages an operator reads."""
        return named(self.name, self.id)


@dataclass(frozen=True, slots=True)
class DeviceTypeEntry:
    """A device type and the schema its telemetry follows (``None``: unconstrained)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    schema_id: uuid.UUID | None
    enabled: bool
    name: str = ""

    def label(self) -> str:
        """``name [id]`` for messages an operator reads."""
        return named(self.name, self.id)


@dataclass(frozen=True, slots=True)
class SchemaEntry:
    """The current version of a schema, compiled; ``compiled`` is ``None`` if it cannot be used."""

    schema_id: uuid.UUID
    version: int
    compiled: CompiledSchema | None
    problem: str = ""


E = TypeVar("E")


class _Cache(Generic[E]):
    """Positive entries until invalidated; negative ones (``None``) for ``negative_ttl``."""

    def __init__(self, negative_ttl: float) -> None:
        self.negative_ttl = negative_ttl
        self.entries: dict[uuid.UUID, tuple[E | None, float]] = {}

    def get(self, key: uuid.UUID) -> tuple[bool, E | None]:
        hit = self.entries.get(key)
        if hit is None:
            return False, None
        entry, expires = hit
        if entry is None and time.monotonic() >= expires:
            del self.entries[key]
            return False, None
        return True, entry

    def put(self, key: uuid.UUID, entry: E | None) -> None:
        self.entries[key] = (entry, time.monotonic() + self.negative_ttl)


class Registry:
    """The cache; use as an async context manager, or ``start()`` / ``close()``."""

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        *,
        refresh_interval: float = 300.0,
        negative_ttl: float = 5.0,
        allow_non_finite: bool = False,
    ) -> None:
        self._connect_kwargs = connect_kwargs
        self._refresh_interval = refresh_interval
        self._allow_non_finite = allow_non_finite
        self._gateways: _Cache[GatewayEntry] = _Cache(negative_ttl)
        self._devices: _Cache[DeviceEntry] = _Cache(negative_ttl)
        self._types: _Cache[DeviceTypeEntry] = _Cache(negative_ttl)
        self._schemas: _Cache[SchemaEntry] = _Cache(negative_ttl)
        self._epoch = 0
        # Called with (table, id) after each change the metadata database announces.
        self.on_change: list[Callable[[str, uuid.UUID | None], None]] = []
        self._conn: asyncpg.Connection | None = None
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.invalidations = 0
        self.queries = 0

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and start listening; the cache fills on demand."""
        await self._ensure_listener()
        self._task = asyncio.create_task(self._maintain(), name="registry-maintain")

    async def close(self) -> None:
        """Stop listening and close the connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for conn in (self._conn, self._listener):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except (TimeoutError, *_DB_ERRORS):
                    conn.terminate()
        self._conn = self._listener = None

    # --- invalidation -------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every entry."""
        self._epoch += 1
        for cache in (self._gateways, self._devices, self._types, self._schemas):
            cache.entries.clear()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        table, _, key = payload.partition(":")
        self._epoch += 1
        self.invalidations += 1
        try:
            ident = uuid.UUID(key)
        except ValueError:
            self.clear()
            return
        caches: dict[str, _Cache[Any]] = {
            "gateways": self._gateways,
            "devices": self._devices,
            "device_types": self._types,
            "schema_versions": self._schemas,
        }
        cache = caches.get(table)
        if table == "alert_rules":
            pass  # not cached here: the alert engine reloads its rules (its own listener)
        elif cache is None:
            self.clear()  # a tenant changed: cheap to reload everything, and rare
        else:
            cache.entries.pop(ident, None)
        log.debug("registry.invalidated", table=table, id=key)
        for listener in self.on_change:
            listener(table, ident)

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            listener = await asyncpg.connect(**self._connect_kwargs)
            await listener.add_listener(CHANNEL, self._on_notify)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"metadata database: {exc}") from exc
        self._listener = listener
        # Changes made while nobody listened would otherwise stay invisible.
        self.clear()
        log.info("registry.listening")
        for on_change in self.on_change:
            on_change("*", None)

    async def _maintain(self) -> None:
        next_refresh = time.monotonic() + self._refresh_interval
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._ensure_listener()
            except DatabaseUnavailable as exc:
                log.warning("registry.listen_failed", error=str(exc))
                continue
            if time.monotonic() >= next_refresh:
                self.clear()
                next_refresh = time.monotonic() + self._refresh_interval

    # --- lookups ------------------------------------------------------------------------------

    async def _query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.queries += 1
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(**self._connect_kwargs)
                rows: list[asyncpg.Record] = await self._conn.fetch(sql, *args)
                return rows
            except _DB_ERRORS as exc:
                if self._conn is not None:
                    self._conn.terminate()
                self._conn = None
                if attempt == 2:
                    raise DatabaseUnavailable(f"metadata database: {exc}") from exc
        raise AssertionError("unreachable")

    async def gateway(self, gateway_id: uuid.UUID) -> GatewayEntry | None:
        """The gateway, or ``None`` if it is not registered."""
        found, entry = self._gateways.get(gateway_id)
        if found:
            return entry
        epoch = self._epoch
        rows = await self._query(
            "SELECT id, tenant_id, enabled, name FROM gateways WHERE id = $1", gateway_id
        )
        entry = (
            GatewayEntry(rows[0]["id"], rows[0]["tenant_id"], rows[0]["enabled"], rows[0]["name"])
            if rows
            else None
        )
        if epoch == self._epoch:
            self._gateways.put(gateway_id, entry)
        return entry

    async def devices(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, DeviceEntry | None]:
        """The devices named by ``ids`` (``None`` for each unknown one), in one query at most."""
        out: dict[uuid.UUID, DeviceEntry | None] = {}
        missing: list[uuid.UUID] = []
        for ident in ids:
            if ident in out:
                continue
            found, entry = self._devices.get(ident)
            if found:
                out[ident] = entry
            else:
                missing.append(ident)
                out[ident] = None
        if missing:
            epoch = self._epoch
            rows = await self._query(
                "SELECT id, tenant_id, gateway_id, device_type_id, enabled, name FROM devices"
                " WHERE id = ANY($1::uuid[])",
                missing,
            )
            for r in rows:
                out[r["id"]] = DeviceEntry(
                    r["id"],
                    r["tenant_id"],
                    r["gateway_id"],
                    r["device_type_id"],
                    r["enabled"],
                    r["name"],
                )
            if epoch == self._epoch:
                for ident in missing:
                    self._devices.put(ident, out[ident])
        return out

    async def device_type(self, type_id: uuid.UUID) -> DeviceTypeEntry | None:
        """The device type, or ``None``."""
        found, entry = self._types.get(type_id)
        if found:
            return entry
        epoch = self._epoch
        rows = await self._query(
            "SELECT id, tenant_id, schema_id, enabled, name FROM device_types WHERE id = $1",
            type_id,
        )
        entry = (
            DeviceTypeEntry(
                rows[0]["id"],
                rows[0]["tenant_id"],
                rows[0]["schema_id"],
                rows[0]["enabled"],
                rows[0]["name"],
            )
            if rows
            else None
        )
        if epoch == self._epoch:
            self._types.put(type_id, entry)
        return entry

    async def schema(self, schema_id: uuid.UUID) -> SchemaEntry | None:
        """The compiled current version of a schema, or ``None`` if it has no version."""
        found, entry = self._schemas.get(schema_id)
        if found:
            return entry
        epoch = self._epoch
        rows = await self._query(
            "SELECT version, json_schema::text AS doc FROM schema_versions WHERE schema_id = $1 ORDER BY version DESC LIMIT 1",
            schema_id,
        )
        entry = None
        if rows:
            version = int(rows[0]["version"])
            try:
                compiled = compile_schema(
                    json.loads(rows[0]["doc"]),
                    version=version,
                    allow_non_finite=self._allow_non_finite,
                )
                entry = SchemaEntry(schema_id, version, compiled)
            except SchemaError as exc:
                log.error(
                    "registry.schema_invalid",
                    schema_id=str(schema_id),
                    version=version,
                    error=str(exc),
                )
                entry = SchemaEntry(schema_id, version, None, str(exc))
        if epoch == self._epoch:
            self._schemas.put(schema_id, entry)
        return entry

    async def alert_rules(self) -> list[dict[str, Any]]:
        """Every alert rule (enabled or not), as ``alert_rules`` rows; not cached."""
        rows = await self._query("SELECT * FROM alert_rules ORDER BY tenant_id, name")
        return [dict(r.items()) for r in rows]
