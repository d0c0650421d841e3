"""Device status history that follows the gateway: a gateway's will marks its devices offline.

When a gateway's status frame says ``offline`` (its MQTT will, or a clean goodbye), every device
registered behind it (``devices.gateway_id`` in the metadata database) gets an ``offline`` row
with reason ``gateway_offline``. When the gateway says ``online`` again, each device gets back
its own latest status from before (an ``error`` stays ``error``, with its reason); a device that
never reported a status of its own gets ``online`` with reason ``gateway_online``. The agent then
states every device's current status again in its next batch, so a device's latest status is
always its own. The rows carry the frame's own time, so history is in the gateway's order even
when frames arrive late.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog

from collector.errors import DatabaseUnavailable

log = structlog.get_logger("collector.lifecycle")

REASONS = {"offline": "gateway_offline", "online": "gateway_online"}
StatusRow = tuple[datetime, uuid.UUID, uuid.UUID, uuid.UUID | None, str, str]
# (tenant_id, gateway_id, state, time) -> the device rows; what the writer is given.
GatewayDevicesLookup = Callable[[uuid.UUID, uuid.UUID, str, datetime], Awaitable[list[StatusRow]]]

_DEVICES_SQL = "SELECT id, tenant_id FROM devices WHERE gateway_id = $1 ORDER BY id"

# A gateway_online row takes the device's own latest status before it, where there is one.
_INSERT_SQL = """
INSERT INTO device_status_history (time, tenant_id, gateway_id, device_id, status, reason)
SELECT r.time, r.tenant_id, r.gateway_id, r.device_id,
       coalesce(own.status, r.status), coalesce(own.reason, r.reason)
FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[])
     AS r(time, tenant_id, gateway_id, device_id, status, reason)
LEFT JOIN LATERAL (
    SELECT h.status, h.reason FROM device_status_history h
    WHERE r.reason = 'gateway_online' AND h.device_id = r.device_id AND h.time <= r.time
      AND h.reason NOT IN ('gateway_offline', 'gateway_online')
    ORDER BY h.time DESC LIMIT 1
) own ON true
"""


class Querier(Protocol):
    """Anything that runs a query and returns rows: an asyncpg connection or pool."""

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """Run ``query`` with ``args``; return the rows."""
        ...


async def gateway_status_rows(
    metadata: Querier, tenant_id: uuid.UUID, gateway_id: uuid.UUID, state: str, time: datetime
) -> list[StatusRow]:
    """The device status rows that gateway ``gateway_id`` going ``state`` at ``time`` implies.

    ``metadata`` is a connection (or pool) of the metadata database. Devices of another tenant
    than the gateway's are left out (the registry should never hold such a pairing). Raises
    ``DatabaseUnavailable`` when the metadata database cannot be asked.
    """
    reason = REASONS.get(state)
    if reason is None:
        return []
    try:
        rows = await metadata.fetch(_DEVICES_SQL, gateway_id)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"metadata database: {type(exc).__name__}: {exc}") from exc
    return [
        (time, tenant_id, gateway_id, r["id"], state, reason)
        for r in rows
        if r["tenant_id"] == tenant_id
    ]


async def insert_status_rows(conn: asyncpg.Connection, rows: list[StatusRow]) -> int:
    """Insert ``rows`` into ``device_status_history`` (in the caller's transaction); return the count."""
    if not rows:
        return 0
    columns = list(zip(*rows, strict=True))
    await conn.execute(_INSERT_SQL, *(list(c) for c in columns))
    return len(rows)


class GatewayDevices:
    """Looks up a gateway's devices on its own metadata connection, opened on first use."""

    def __init__(self, connect_kwargs: dict[str, Any]) -> None:
        self._connect_kwargs = connect_kwargs
        self._conn: asyncpg.Connection | None = None

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """Run ``query`` on the metadata database, reconnecting once if the connection broke."""
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(**self._connect_kwargs)
                rows: list[Any] = await self._conn.fetch(query, *args)
                return rows
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if self._conn is not None:
                    self._conn.terminate()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def rows(
        self, tenant_id: uuid.UUID, gateway_id: uuid.UUID, state: str, time: datetime
    ) -> list[StatusRow]:
        """``gateway_status_rows`` against this connection."""
        return await gateway_status_rows(self, tenant_id, gateway_id, state, time)

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None
