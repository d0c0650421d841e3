"""The API's connection pools: each database's primary and its streaming replicas.

Reads go to the first replica that answers (so the API's queries never compete with ingest on the
primary) and to the primary when none does; a replica that fails is left alone for
:data:`RETRY_AFTER` seconds. Every answer says where it was read and, for a replica, how far its
replay is behind (:class:`Source`): a lagging replica's "latest" is that much older.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import asyncpg
import structlog

from collector.api.problems import ApiProblem
from collector.settings import Settings

log = structlog.get_logger("collector.api")
T = TypeVar("T")

# Errors that mean the server or the connection is gone, not that the query failed.
_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    OSError,
    ConnectionError,
)

RETRY_AFTER = 5.0
"""Seconds a failed replica is skipped before it is tried again."""

ACQUIRE_TIMEOUT = 5.0

_LAG_SQL = """
SELECT pg_is_in_recovery() AS replica,
       CASE WHEN NOT pg_is_in_recovery() THEN 0.0
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0.0
            ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0.0)
       END::float8 AS lag
"""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb as Python objects (event attributes, reject samples).
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@dataclass(frozen=True)
class Source:
    """Where an answer was read: ``primary`` or ``replica``, and the replica's replay lag."""

    role: Literal["primary", "replica"]
    lag_s: float
    member: str = "primary"

    def as_dict(self) -> dict[str, Any]:
        return {"server": self.role, "replica_lag_s": round(self.lag_s, 3)}


@dataclass
class _Member:
    name: str
    kwargs: dict[str, Any]
    replica: bool
    pool: asyncpg.Pool | None = None
    down_until: float = 0.0
    lag_checked: float = 0.0
    lag_s: float = 0.0


@dataclass
class Cluster:
    """One database: replicas in order, then the primary."""

    kind: str
    members: list[_Member] = field(default_factory=list)
    pool_size: int = 10

    async def _pool(self, m: _Member) -> asyncpg.Pool:
        if m.pool is None:
            m.pool = await asyncpg.create_pool(
                min_size=1 if not m.replica else 0,
                max_size=self.pool_size,
                init=_init_connection,
                **m.kwargs,
            )
        return m.pool

    @asynccontextmanager
    async def connection(
        self, primary: bool = False
    ) -> AsyncIterator[tuple[asyncpg.Connection, Source]]:
        """A connection of the first member that answers (the primary only, if asked), and
        where it is."""
        now = time.monotonic()
        last_error: BaseException | None = None
        for m in self.members:
            if primary and m.replica:
                continue
            if m.down_until > now and not (primary or m is self.members[-1]):
                continue
            try:
                pool = await self._pool(m)
                conn = await pool.acquire(timeout=ACQUIRE_TIMEOUT)
            except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError) as exc:
                last_error = exc
                m.down_until = now + RETRY_AFTER
                if m.pool is not None:
                    pool_, m.pool = m.pool, None
                    pool_.terminate()
                log.warning(
                    "api.database_unavailable", database=self.kind, server=m.name, error=str(exc)
                )
                continue
            try:
                source = await self._source(m, conn)
                yield conn, source
                return
            finally:
                await pool.release(conn)
        raise ApiProblem(
            503,
            "database_unavailable",
            f"the {self.kind} database cannot be reached: {last_error}",
            headers={"Retry-After": "5"},
        )

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> tuple[T, Source]:
        """``work`` on a connection of the first member that answers; a replica lost in the
        middle (stopped, restarted, cut off) is left alone and ``work`` runs again on the next
        member, the primary last."""
        for _ in range(len(self.members)):
            async with self.connection() as (conn, source):
                try:
                    return await work(conn), source
                except _LOST as exc:
                    if source.role == "primary":
                        raise ApiProblem(
                            503,
                            "database_unavailable",
                            f"the {self.kind} database went away: {exc}",
                            headers={"Retry-After": "5"},
                        ) from None
                    self._lost(source, exc)
        raise ApiProblem(503, "database_unavailable", f"no {self.kind} server answers")

    def _lost(self, source: Source, exc: BaseException) -> None:
        for m in self.members:
            if m.name == source.member:
                m.down_until = time.monotonic() + RETRY_AFTER
                if m.pool is not None:
                    pool, m.pool = m.pool, None
                    pool.terminate()
                log.warning("api.replica_lost", database=self.kind, server=m.name, error=str(exc))

    async def _source(self, m: _Member, conn: asyncpg.Connection) -> Source:
        if not m.replica:
            return Source("primary", 0.0, m.name)
        now = time.monotonic()
        if now - m.lag_checked > 1.0:
            row = await conn.fetchrow(_LAG_SQL)
            assert row is not None
            m.lag_s = float(row["lag"]) if row["replica"] else 0.0
            m.lag_checked = now
        return Source("replica", m.lag_s, m.name)

    async def close(self) -> None:
        for m in self.members:
            if m.pool is not None:
                pool, m.pool = m.pool, None
                await pool.close()


def build_cluster(settings: Settings, kind: Literal["metadata", "timeseries"]) -> Cluster:
    """The replicas of ``kind`` named in ``[api]``, then its primary."""
    from collector.service import db_kwargs

    primary = db_kwargs(settings, kind)
    primary["server_settings"] = {
        **primary.get("server_settings", {}),
        "application_name": "sensormine-api",
    }
    replicas = (
        settings.api.timeseries_replicas if kind == "timeseries" else settings.api.metadata_replicas
    )
    members = []
    for i, dsn in enumerate(replicas):
        kw = dict(primary)
        kw["dsn"] = dsn
        # A replica gives up quickly: the primary is there to answer instead.
        kw["timeout"] = min(float(kw.get("timeout", 10.0)), 3.0)
        members.append(_Member(f"replica {i + 1}", kw, replica=True))
    members.append(_Member("primary", primary, replica=False))
    return Cluster(kind, members, settings.api.pool_size)
