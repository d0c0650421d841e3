"""The series catalog: one small integer id per (tenant, device, metric), shared by all collectors.

Readings are stored as ``(time, series_id, value)``; the names live once, in ``series``. The
writer looks ids up in an in-memory cache and resolves the ones it has not seen inside the
flush's own transaction:

1. ``INSERT ... ON CONFLICT DO NOTHING`` of the missing keys, in key order. A key another
   collector is inserting at the same moment makes this statement wait for that transaction:
   if it commits, ours inserts nothing and reads its id; if it rolls back, ours inserts. The
   unique key guarantees one id per series, and the fixed order keeps two flushes that create
   the same new series from deadlocking.
2. ``SELECT`` of the ids of all missing keys (under READ COMMITTED each statement sees what
   was committed before it started, so the other collector's row is visible).

Ids found or made in a transaction are cached only after it commits (:meth:`commit`): a rolled
back flush must not leave the cache holding an id that does not exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import asyncpg

Kind = Literal["number", "boolean", "text"]
SeriesKey = tuple[uuid.UUID, uuid.UUID, str]

_INSERT = """
INSERT INTO series (tenant_id, device_id, metric, kind)
SELECT tenant_id, device_id, metric, kind
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[]) AS k(tenant_id, device_id, metric, kind)
ORDER BY tenant_id, device_id, metric
ON CONFLICT (tenant_id, device_id, metric) DO NOTHING
"""

_SELECT = """
SELECT s.id, s.tenant_id, s.device_id, s.metric
FROM series s
JOIN unnest($1::uuid[], $2::uuid[], $3::text[]) AS k(tenant_id, device_id, metric)
  ON s.tenant_id = k.tenant_id AND s.device_id = k.device_id AND s.metric = k.metric
"""


def value_kind(values: Iterable[Any]) -> Kind:
    """The kind recorded for a new series: that of its first value."""
    for v in values:
        if type(v) is bool:
            return "boolean"
        if type(v) is str:
            return "text"
        return "number"
    return "number"


class SeriesCatalog:
    """Cache of series ids, filled from the database inside the caller's transactions."""

    def __init__(self, max_entries: int = 2_000_000) -> None:
        self._ids: dict[SeriesKey, int] = {}
        self._pending: dict[SeriesKey, int] = {}
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, key: SeriesKey) -> int | None:
        """The committed id of ``key`` if it is cached."""
        return self._ids.get(key)

    async def resolve(
        self, conn: asyncpg.Connection, wanted: Mapping[SeriesKey, Kind]
    ) -> dict[SeriesKey, int]:
        """Ids of every key of ``wanted`` (key to the kind of its values), creating new series.

        Runs in the caller's transaction; call :meth:`commit` after it commits, :meth:`discard`
        if it does not.
        """
        found: dict[SeriesKey, int] = {}
        missing: list[SeriesKey] = []
        for key in wanted:
            sid = self._ids.get(key)
            if sid is None:
                sid = self._pending.get(key)
            if sid is None:
                missing.append(key)
            else:
                found[key] = sid
        if missing:
            missing.sort()
            tenants = [k[0] for k in missing]
            devices = [k[1] for k in missing]
            metrics = [k[2] for k in missing]
            await conn.execute(_INSERT, tenants, devices, metrics, [wanted[k] for k in missing])
            for row in await conn.fetch(_SELECT, tenants, devices, metrics):
                key = (row["tenant_id"], row["device_id"], row["metric"])
                found[key] = self._pending[key] = int(row["id"])
            absent = [k for k in missing if k not in found]
            if absent:
                # Cannot happen while the unique key holds; a clear error rather than a KeyError.
                raise RuntimeError(f"series ids not found after insert: {absent[:3]}")
        return found

    def commit(self) -> None:
        """The transaction of the last :meth:`resolve` calls committed: cache their ids."""
        if len(self._ids) + len(self._pending) > self.max_entries:
            # A bound on memory: the busiest series come back at the next flush, one query each.
            self._ids.clear()
        self._ids.update(self._pending)
        self._pending.clear()

    def discard(self) -> None:
        """The transaction rolled back: forget the ids it found or made."""
        self._pending.clear()
