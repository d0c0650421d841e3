"""The API's reads of the time-series database: one function per answer, ids in, rows out.

Every query names the caller's tenant (``tenant_id = $1``) as well as the ids the metadata
database gave for it, so that an id of another tenant finds nothing even if it were asked for.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

Resolution = Literal["raw", "1m", "1h"]
PERIODS: dict[str, timedelta] = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1)}


def num(x: float | None) -> float | None:
    """A number as JSON can say it: non-finite values (allowed by validation.allow_non_finite) as null."""
    if x is None or not math.isfinite(x):
        return None
    return x


# --- gateways -----------------------------------------------------------------------------------

_GATEWAY_STATUS = """
SELECT g.id AS gateway_id, cur.time, cur.status, cur.reason,
       (SELECT min(h.time) FROM device_status_history h
        WHERE h.gateway_id = g.id AND h.device_id IS NULL AND h.tenant_id = $1
          AND h.time > coalesce((SELECT max(p.time) FROM device_status_history p
                                 WHERE p.gateway_id = g.id AND p.device_id IS NULL
                                   AND p.tenant_id = $1 AND p.status <> cur.status),
                                '-infinity')) AS since
FROM unnest($2::uuid[]) AS g(id)
CROSS JOIN LATERAL (
    SELECT time, status, reason FROM device_status_history
    WHERE gateway_id = g.id AND device_id IS NULL AND tenant_id = $1
    ORDER BY time DESC LIMIT 1
) cur
"""

_LAST_BATCH = """
SELECT g.id AS gateway_id, b.received_at, b.created, b.result, b.stream, b.seq
FROM unnest($2::uuid[]) AS g(id)
CROSS JOIN LATERAL (
    SELECT received_at, created, result, stream, seq FROM ingest_ledger
    WHERE gateway_id = g.id AND tenant_id = $1
    ORDER BY received_at DESC, created DESC NULLS LAST, seq DESC LIMIT 1
) b
"""

_LAST_BACKLOG = """
SELECT g.id AS gateway_id, e.time, e.kind, e.attributes
FROM unnest($2::uuid[]) AS g(id)
CROSS JOIN LATERAL (
    SELECT time, kind, attributes FROM events
    WHERE gateway_id = g.id AND tenant_id = $1 AND device_id IS NULL
      AND kind IN ('backlog.draining', 'backlog.progress', 'backlog.drained')
      AND time > now() - interval '30 days'
    ORDER BY time DESC LIMIT 1
) e
"""

_LAST_SKEW = """
SELECT g.id AS gateway_id, e.time, e.attributes
FROM unnest($2::uuid[]) AS g(id)
CROSS JOIN LATERAL (
    SELECT time, attributes FROM events
    WHERE gateway_id = g.id AND tenant_id = $1 AND kind LIKE 'clock.%'
      AND attributes ? 'skew_s' AND time > now() - interval '30 days'
    ORDER BY time DESC LIMIT 1
) e
"""


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def backlog_of(row: asyncpg.Record) -> dict[str, Any]:
    a = row["attributes"] if isinstance(row["attributes"], dict) else {}
    buffered = _float(a.get("buffered_readings"))
    return {
        "state": "drained" if row["kind"] == "backlog.drained" else "draining",
        "at": row["time"],
        "buffered_readings": None if buffered is None else int(buffered),
        "ack_rate": _float(a.get("ack_rate")),
        "production_rate": _float(a.get("production_rate")),
        "estimate_s": _float(a.get("estimate_s")),
        "done_percent": _float(a.get("done_percent")),
    }


@dataclass
class GatewayFacts:
    status: dict[uuid.UUID, asyncpg.Record]
    batch: dict[uuid.UUID, asyncpg.Record]
    backlog: dict[uuid.UUID, asyncpg.Record]
    skew: dict[uuid.UUID, float]


async def gateway_facts(
    conn: asyncpg.Connection, tenant: uuid.UUID, gateways: list[uuid.UUID]
) -> GatewayFacts:
    """Status, last batch, backlog and clock skew of each gateway."""
    status = {r["gateway_id"]: r for r in await conn.fetch(_GATEWAY_STATUS, tenant, gateways)}
    batch = {r["gateway_id"]: r for r in await conn.fetch(_LAST_BATCH, tenant, gateways)}
    backlog = {r["gateway_id"]: r for r in await conn.fetch(_LAST_BACKLOG, tenant, gateways)}
    skew: dict[uuid.UUID, float] = {}
    for r in await conn.fetch(_LAST_SKEW, tenant, gateways):
        a = r["attributes"] if isinstance(r["attributes"], dict) else {}
        s = _float(a.get("skew_s"))
        if s is not None:
            skew[r["gateway_id"]] = s
    return GatewayFacts(status, batch, backlog, skew)


# --- devices ------------------------------------------------------------------------------------

_LATEST_ALL = """
SELECT s.device_id, s.metric, s.kind, l.time, l.value, l.value_text
FROM series s JOIN series_latest l ON l.series_id = s.id
WHERE s.tenant_id = $1
"""

_LATEST_SOME = """
SELECT s.device_id, s.metric, s.kind, l.time, l.value, l.value_text
FROM series s JOIN series_latest l ON l.series_id = s.id
WHERE s.tenant_id = $1 AND s.device_id = ANY($2::uuid[])
"""

# "since": the first row of the current run of the same status (a status restated, e.g. at a
# reconnect, does not restart it).
# The latest value of every metric of each device, as the JSON object the API answers, built by
# the server (10,000 devices would cost the API far more to decode and encode row by row).
_LATEST_JSON = """
SELECT s.device_id,
       max(l.time) AS last_seen,
       json_object_agg(s.metric, json_build_object(
           'value', CASE WHEN s.kind = 'text' OR l.value_text IS NOT NULL THEN to_json(l.value_text)
                         WHEN l.value IN ('NaN', 'Infinity', '-Infinity') THEN NULL
                         ELSE to_json(l.value) END,
           'time', to_char(l.time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.USOF":00"'),
           'kind', s.kind,
           'age_s', round(extract(epoch FROM statement_timestamp() - l.time)::numeric, 3)
       ) ORDER BY s.metric)::text AS latest
FROM series s JOIN series_latest l ON l.series_id = s.id
WHERE s.tenant_id = $1 AND ($2::uuid[] IS NULL OR s.device_id = ANY($2::uuid[]))
GROUP BY s.device_id
"""


# The devices array of GET /latest as one JSON text, sorted by name: the names come from the
# metadata database as parameters (never a join across the databases), the rest is built here.
_LATEST_DOCUMENT = (
    """
WITH names AS (
    SELECT * FROM unnest($3::uuid[], $4::text[]) AS n(device_id, name)
), per_device AS (
"""
    + _LATEST_JSON.replace("::text AS latest", " AS latest")
    + """
)
SELECT coalesce(json_agg(json_build_object(
           'id', p.device_id,
           'name', n.name,
           'last_seen', to_char(p.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.USOF":00"'),
           'latest', p.latest
       ) ORDER BY n.name NULLS LAST, p.device_id), '[]')::text
FROM per_device p LEFT JOIN names n USING (device_id)
"""
)


async def latest_document(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    devices: list[uuid.UUID] | None,
    name_ids: list[uuid.UUID],
    names: list[str],
) -> str:
    """The JSON array of GET /latest: per device its id, name (``names`` of ``name_ids``, from the
    metadata database), last_seen and latest values; of ``devices`` or all."""
    return str(await conn.fetchval(_LATEST_DOCUMENT, tenant, devices, name_ids, names))


_DEVICE_STATUS = """
SELECT d.id AS device_id, cur.time, cur.status, cur.reason,
       (SELECT min(h.time) FROM device_status_history h
        WHERE h.device_id = d.id AND h.tenant_id = $1
          AND h.time > coalesce((SELECT max(p.time) FROM device_status_history p
                                 WHERE p.device_id = d.id AND p.tenant_id = $1
                                   AND p.status <> cur.status),
                                '-infinity')) AS since
FROM unnest($2::uuid[]) AS d(id)
CROSS JOIN LATERAL (
    SELECT time, status, reason FROM device_status_history
    WHERE device_id = d.id AND tenant_id = $1
    ORDER BY time DESC LIMIT 1
) cur
"""


async def latest_values(
    conn: asyncpg.Connection, tenant: uuid.UUID, devices: list[uuid.UUID] | None
) -> list[asyncpg.Record]:
    """The newest reading of every series of the tenant (or of ``devices``)."""
    if devices is None:
        return list(await conn.fetch(_LATEST_ALL, tenant))
    return list(await conn.fetch(_LATEST_SOME, tenant, devices))


async def device_status(
    conn: asyncpg.Connection, tenant: uuid.UUID, devices: list[uuid.UUID]
) -> dict[uuid.UUID, asyncpg.Record]:
    """The latest status row of each device that has one."""
    return {r["device_id"]: r for r in await conn.fetch(_DEVICE_STATUS, tenant, devices)}


# --- series -------------------------------------------------------------------------------------


class TooManyPoints(Exception):
    """The range holds more points than the caller allows at the resolution asked."""


@dataclass
class SeriesInfo:
    id: int
    kind: Literal["number", "boolean", "text"]


async def find_series(
    conn: asyncpg.Connection, tenant: uuid.UUID, device: uuid.UUID, metric: str
) -> SeriesInfo | None:
    row = await conn.fetchrow(
        "SELECT id, kind FROM series WHERE tenant_id = $1 AND device_id = $2 AND metric = $3",
        tenant,
        device,
        metric,
    )
    return None if row is None else SeriesInfo(int(row["id"]), row["kind"])


async def device_metrics(
    conn: asyncpg.Connection, tenant: uuid.UUID, device: uuid.UUID
) -> list[str]:
    rows = await conn.fetch(
        "SELECT metric FROM series WHERE tenant_id = $1 AND device_id = $2 ORDER BY metric",
        tenant,
        device,
    )
    return [r["metric"] for r in rows]


async def raw_points(
    conn: asyncpg.Connection,
    series: SeriesInfo,
    start: datetime,
    end: datetime,
    limit: int,
) -> list[asyncpg.Record] | None:
    """Readings of the range in time order; ``None`` when there are more than ``limit``."""
    table = "telemetry_text" if series.kind == "text" else "telemetry"
    rows = await conn.fetch(
        f"SELECT time, value FROM {table} WHERE series_id = $1 AND time >= $2 AND time < $3"
        " ORDER BY time LIMIT $4",
        series.id,
        start,
        end,
        limit + 1,
    )
    return None if len(rows) > limit else list(rows)


_ROLLUP_EDGE = """
SELECT (SELECT max(bucket) FROM metrics
        WHERE series_id = $1 AND period = $2 AND bucket >= $3 AND bucket < $4) AS last_bucket,
       (SELECT min(first_time) FROM ingest_dirty WHERE series_id = $1) AS dirty_from
"""

_ROLLUP_ROWS = """
SELECT bucket, count, sum, min, max FROM metrics
WHERE series_id = $1 AND period = $2 AND bucket >= $3 AND bucket < $4
ORDER BY bucket
"""

_ROLLUP_LIVE = """
SELECT time_bucket($2::interval, time) AS bucket, count(*) AS count, sum(value) AS sum,
       min(value) AS min, max(value) AS max
FROM telemetry
WHERE series_id = $1 AND time >= $3 AND time < $4
GROUP BY 1 ORDER BY 1
"""


async def rollup_points(
    conn: asyncpg.Connection,
    series: SeriesInfo,
    period: timedelta,
    start: datetime,
    end: datetime,
) -> list[tuple[datetime, int, float | None, float | None, float | None]]:
    """Buckets of ``period`` over the range: the stored rollups, and where the rollup job has not
    yet been (buckets after the last rolled-up one, or from the oldest range written since it
    last ran), computed from the readings now. Returns (bucket, count, average, min, max)."""
    first = _floor(start, period)
    edge = await conn.fetchrow(_ROLLUP_EDGE, series.id, period, first, end)
    assert edge is not None
    cutoff = first if edge["last_bucket"] is None else edge["last_bucket"] + period
    if edge["dirty_from"] is not None:
        cutoff = min(cutoff, max(first, _floor(edge["dirty_from"], period)))
    out: list[tuple[datetime, int, float | None, float | None, float | None]] = []
    if cutoff > first:
        for r in await conn.fetch(_ROLLUP_ROWS, series.id, period, first, cutoff):
            n = int(r["count"])
            out.append((r["bucket"], n, _avg(r["sum"], n), num(r["min"]), num(r["max"])))
    if cutoff < end:
        for r in await conn.fetch(_ROLLUP_LIVE, series.id, period, cutoff, end):
            n = int(r["count"])
            out.append((r["bucket"], n, _avg(r["sum"], n), num(r["min"]), num(r["max"])))
    return out


def _avg(total: float | None, n: int) -> float | None:
    return None if total is None or n == 0 else num(total / n)


def _floor(t: datetime, period: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=t.tzinfo)
    step = period.total_seconds()
    seconds = (t - epoch).total_seconds()
    return epoch + timedelta(seconds=math.floor(seconds / step) * step)


# --- history, events, quarantine, rejects --------------------------------------------------------


async def status_history(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    gateway: uuid.UUID | None,
    device: uuid.UUID | None,
    start: datetime,
    end: datetime,
    limit: int,
) -> list[asyncpg.Record]:
    """Status changes of a device (or of a gateway itself, ``device`` None), newest first."""
    if device is not None:
        sql = (
            "SELECT time, status, reason FROM device_status_history WHERE tenant_id = $1"
            " AND device_id = $2 AND time >= $3 AND time < $4 ORDER BY time DESC LIMIT $5"
        )
        return list(await conn.fetch(sql, tenant, device, start, end, limit))
    sql = (
        "SELECT time, status, reason FROM device_status_history WHERE tenant_id = $1"
        " AND gateway_id = $2 AND device_id IS NULL AND time >= $3 AND time < $4"
        " ORDER BY time DESC LIMIT $5"
    )
    return list(await conn.fetch(sql, tenant, gateway, start, end, limit))


async def events(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    start: datetime,
    end: datetime,
    limit: int,
    gateway: uuid.UUID | None = None,
    device: uuid.UUID | None = None,
    kind: str | None = None,
    severity: str | None = None,
) -> list[asyncpg.Record]:
    """Events newest first; ``kind`` ending in ``.`` matches every kind it starts."""
    prefix = kind is not None and kind.endswith(".")
    sql = """
SELECT time, gateway_id, device_id, severity, kind, message, attributes FROM events
WHERE tenant_id = $1 AND time >= $2 AND time < $3
  AND ($4::uuid IS NULL OR gateway_id = $4)
  AND ($5::uuid IS NULL OR device_id = $5)
  AND ($6::text IS NULL OR (CASE WHEN $7 THEN starts_with(kind, $6) ELSE kind = $6 END))
  AND ($8::text IS NULL OR severity = $8)
ORDER BY time DESC LIMIT $9
"""
    return list(
        await conn.fetch(sql, tenant, start, end, gateway, device, kind, prefix, severity, limit)
    )


async def backlog_history(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    gateway: uuid.UUID,
    start: datetime,
    end: datetime,
    limit: int,
) -> list[asyncpg.Record]:
    sql = """
SELECT time, kind, attributes FROM events
WHERE tenant_id = $1 AND gateway_id = $2 AND device_id IS NULL
  AND kind IN ('backlog.draining', 'backlog.progress', 'backlog.drained')
  AND time >= $3 AND time < $4
ORDER BY time LIMIT $5
"""
    return list(await conn.fetch(sql, tenant, gateway, start, end, limit))


async def lag_history(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    gateway: uuid.UUID,
    start: datetime,
    end: datetime,
    bucket: timedelta,
) -> list[asyncpg.Record]:
    sql = """
SELECT time_bucket($5::interval, received_at) AS time, count(*) AS batches,
       avg(extract(epoch FROM received_at - created))::float8 AS lag_avg,
       max(extract(epoch FROM received_at - created))::float8 AS lag_max
FROM ingest_ledger
WHERE tenant_id = $1 AND gateway_id = $2 AND received_at >= $3 AND received_at < $4
GROUP BY 1 ORDER BY 1
"""
    return list(await conn.fetch(sql, tenant, gateway, start, end, bucket))


async def quarantine_groups(conn: asyncpg.Connection, tenant: uuid.UUID) -> list[asyncpg.Record]:
    sql = """
SELECT gateway_id, reason, count(*) AS rows, coalesce(sum(points), 0) AS readings,
       coalesce(sum(bytes), 0) AS bytes, min(received_at) AS first, max(received_at) AS last
FROM quarantine WHERE tenant_id = $1
GROUP BY gateway_id, reason ORDER BY readings DESC, reason
"""
    return list(await conn.fetch(sql, tenant))


async def reject_reasons(
    conn: asyncpg.Connection, tenant: uuid.UUID, start: datetime, end: datetime
) -> list[asyncpg.Record]:
    sql = """
SELECT reason, count(*) AS messages, coalesce(sum(points), 0) AS readings,
       min(received_at) AS first, max(received_at) AS last
FROM ingest_rejects WHERE tenant_id = $1 AND received_at >= $2 AND received_at < $3
GROUP BY reason ORDER BY readings DESC, reason
"""
    return list(await conn.fetch(sql, tenant, start, end))


async def recent_rejects(
    conn: asyncpg.Connection, tenant: uuid.UUID, start: datetime, end: datetime, limit: int
) -> list[asyncpg.Record]:
    sql = """
SELECT received_at, reason, message, gateway_id, device_id, metric, points, sample
FROM ingest_rejects WHERE tenant_id = $1 AND received_at >= $2 AND received_at < $3
ORDER BY received_at DESC LIMIT $4
"""
    return list(await conn.fetch(sql, tenant, start, end, limit))


async def alerts(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    start: datetime,
    end: datetime,
    limit: int,
    open_only: bool,
    gateway: uuid.UUID | None = None,
    device: uuid.UUID | None = None,
    severity: str | None = None,
) -> list[asyncpg.Record]:
    """Alerts raised in the range (or every open one), newest first."""
    sql = """
SELECT id, rule_id, rule_name, gateway_id, device_id, metric, severity, condition, threshold,
       raised_at, raised_value, cleared_at, cleared_value, clear_reason
FROM alerts
WHERE tenant_id = $1
  AND (CASE WHEN $5 THEN cleared_at IS NULL ELSE raised_at >= $2 AND raised_at < $3 END)
  AND ($6::uuid IS NULL OR gateway_id = $6)
  AND ($7::uuid IS NULL OR device_id = $7)
  AND ($8::text IS NULL OR severity = $8)
ORDER BY raised_at DESC LIMIT $4
"""
    return list(
        await conn.fetch(sql, tenant, start, end, limit, open_only, gateway, device, severity)
    )
