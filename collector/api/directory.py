"""Names from the metadata database, per tenant, cached until the registry changes.

The time-series database knows ids only; every answer of the API names things from here (never a
join across the two databases). A tenant's directory is read once and kept until a ``NOTIFY
sensormine_registry`` (sent by every change of tenants, gateways, device types and devices) or
:data:`MAX_AGE` seconds, whichever comes first; without a listener it is kept
:data:`MAX_AGE_UNLISTENED` seconds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from collector.api.databases import Cluster

log = structlog.get_logger("collector.api")

MAX_AGE = 300.0
MAX_AGE_UNLISTENED = 5.0


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    id: uuid.UUID
    name: str
    enabled: bool
    description: str


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    id: uuid.UUID
    name: str
    enabled: bool
    gateway_id: uuid.UUID | None
    device_type_id: uuid.UUID


@dataclass
class TenantDirectory:
    """One tenant's names."""

    id: uuid.UUID
    name: str
    enabled: bool
    gateways: dict[uuid.UUID, GatewayEntry]
    devices: dict[uuid.UUID, DeviceEntry]
    device_types: dict[uuid.UUID, str]
    read_at: float = field(default_factory=time.monotonic)
    device_ids: list[uuid.UUID] = field(default_factory=list)
    device_names: list[str] = field(default_factory=list)
    """The names of ``device_ids``, in the same order."""

    def gateway_name(self, ident: uuid.UUID | None) -> str | None:
        g = self.gateways.get(ident) if ident is not None else None
        return g.name if g else None

    def device_name(self, ident: uuid.UUID | None) -> str | None:
        d = self.devices.get(ident) if ident is not None else None
        return d.name if d else None

    def ref(self, kind: str, ident: uuid.UUID | None) -> dict[str, Any] | None:
        """``{"id": ..., "name": ...}`` of a gateway or device, ``None`` for no id."""
        if ident is None:
            return None
        name = self.gateway_name(ident) if kind == "gateway" else self.device_name(ident)
        return {"id": str(ident), "name": name}


class Directory:
    """Tenant directories, read from the metadata database on demand."""

    def __init__(self, metadata: Cluster, listen_kwargs: dict[str, Any] | None) -> None:
        self.metadata = metadata
        self._listen_kwargs = listen_kwargs
        self._cache: dict[uuid.UUID, TenantDirectory] = {}
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def start(self) -> None:
        """Listen for registry changes (in the background, reconnecting)."""
        if self._listen_kwargs is not None:
            self._task = asyncio.create_task(self._listen_loop())

    async def _listen_loop(self) -> None:
        assert self._listen_kwargs is not None
        while True:
            try:
                conn = await asyncpg.connect(**self._listen_kwargs)
                await conn.add_listener("sensormine_registry", self._on_notify)
                self._listener = conn
                self._cache.clear()  # changes made while not listening
                await self._until_closed(conn)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("api.registry_listen_failed", error=str(exc))
            self._listener = None
            await asyncio.sleep(2.0)

    @staticmethod
    async def _until_closed(conn: asyncpg.Connection) -> None:
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _c: closed.set())
        await closed.wait()

    def _on_notify(self, *_args: Any) -> None:
        self._cache.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._listener is not None:
            await self._listener.close()

    def forget(self) -> None:
        self._cache.clear()

    async def tenant(self, tenant_id: uuid.UUID) -> TenantDirectory:
        """The directory of ``tenant_id`` (read now when not cached or too old)."""
        max_age = MAX_AGE if self.listening else MAX_AGE_UNLISTENED
        found = self._cache.get(tenant_id)
        if found is not None and time.monotonic() - found.read_at < max_age:
            return found
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            found = self._cache.get(tenant_id)
            if found is not None and time.monotonic() - found.read_at < max_age:
                return found
            found = await self._read(tenant_id)
            self._cache[tenant_id] = found
            return found

    async def _read(self, tenant_id: uuid.UUID) -> TenantDirectory:
        async with self.metadata.connection() as (conn, _):
            tenant = await conn.fetchrow(
                "SELECT id, name, enabled FROM tenants WHERE id = $1", tenant_id
            )
            gateways = await conn.fetch(
                "SELECT id, name, enabled, description FROM gateways WHERE tenant_id = $1",
                tenant_id,
            )
            devices = await conn.fetch(
                "SELECT id, name, enabled, gateway_id, device_type_id FROM devices"
                " WHERE tenant_id = $1 ORDER BY name, id",
                tenant_id,
            )
            types = await conn.fetch(
                "SELECT id, name FROM device_types WHERE tenant_id = $1", tenant_id
            )
        devs = {
            r["id"]: DeviceEntry(
                r["id"], r["name"], r["enabled"], r["gateway_id"], r["device_type_id"]
            )
            for r in devices
        }
        return TenantDirectory(
            id=tenant_id,
            name=tenant["name"] if tenant else str(tenant_id),
            enabled=bool(tenant["enabled"]) if tenant else False,
            gateways={
                r["id"]: GatewayEntry(r["id"], r["name"], r["enabled"], r["description"] or "")
                for r in gateways
            },
            devices=devs,
            device_types={r["id"]: r["name"] for r in types},
            device_ids=list(devs),
            device_names=[d.name for d in devs.values()],
        )
