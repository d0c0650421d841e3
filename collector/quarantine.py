"""The quarantine: healable refusals kept in the time-series database until they can be stored.

Rows are written by the writer in the flush's own transaction, with the batch's ledger row, so a
batch is either fully accounted for (stored, quarantined or refused) or not committed at all.
Each row counts against a quota (:class:`QuotaSettings`): per tenant for registered gateways, per
gateway id for unknown ones; what does not fit is refused with ``quota_exceeded`` and counted in
``quarantine_usage.refused_points``. The quota is checked against the usage read at the start of
the flush, so concurrent collectors may overshoot it by at most one flush each.

Replay (:func:`replay`) takes rows with ``FOR UPDATE SKIP LOCKED``, runs their data through the
collector's pipeline as it is now (registry, schemas, limits), writes what passes and
re-quarantines the rest, and deletes the original row, all in one transaction: a row is replayed
by exactly one replay, and replaying twice stores nothing twice. Rows whose outcome does not
change are left as they are (their replay count goes up).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import msgpack
import structlog

from collector.outcomes import QuarantineRow, RejectRow
from collector.pipeline import (
    NIL_UUID,
    Incoming,
    Pipeline,
    Staged,
    to_datetime_or_none,
)
from protocol import (
    Batch,
    DeviceStatus,
    Event,
    ProtocolError,
    Reason,
    Series,
    TopicAddress,
    TopicKind,
    build_topic,
    decode_batch,
)

log = structlog.get_logger("collector.quarantine")

QUARANTINE_COLUMNS = (
    "reason",
    "message",
    "kind",
    "tenant_id",
    "gateway_id",
    "quota_scope",
    "quota_id",
    "stream",
    "seq",
    "device_id",
    "metric",
    "points",
    "first_time",
    "last_time",
    "bytes",
    "payload",
    "replays",
)

_USAGE_SQL = """
INSERT INTO quarantine_usage AS u (scope, id, bytes, rows, refused_points)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::bigint[], $5::bigint[])
ORDER BY 1, 2
ON CONFLICT (scope, id) DO UPDATE SET
    bytes = greatest(u.bytes + excluded.bytes, 0),
    rows = greatest(u.rows + excluded.rows, 0),
    refused_points = u.refused_points + excluded.refused_points
"""


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """Bytes of quarantine per tenant and per unknown gateway id."""

    per_tenant: int
    per_unknown_gateway: int


def record(row: QuarantineRow) -> tuple[Any, ...]:
    """A row in ``QUARANTINE_COLUMNS`` order."""
    scope, quota_id = row.quota_scope
    return (
        row.reason,
        row.message,
        row.kind,
        row.tenant_id,
        row.gateway_id,
        scope,
        quota_id,
        row.stream,
        row.seq,
        row.device_id,
        row.metric.replace("\x00", "\ufffd") if row.metric is not None else None,
        row.points,
        to_datetime_or_none(row.first_us),
        to_datetime_or_none(row.last_us),
        row.bytes,
        row.payload,
        row.attempts,
    )


async def apply_quota(
    conn: asyncpg.Connection, items: Sequence[Staged], quota: QuotaSettings
) -> None:
    """Refuse, with ``quota_exceeded``, the quarantine rows of ``items`` that do not fit."""
    scopes = {q.quota_scope for item in items for q in item.quarantine}
    if not scopes:
        return
    rows = await conn.fetch(
        "SELECT scope, id, bytes FROM quarantine_usage WHERE (scope, id) IN "
        "(SELECT * FROM unnest($1::text[], $2::uuid[]))",
        [s for s, _ in scopes],
        [i for _, i in scopes],
    )
    used: dict[tuple[str, uuid.UUID], int] = {(r[0], r[1]): int(r[2]) for r in rows}
    for item in items:
        kept: list[QuarantineRow] = []
        for q in item.quarantine:
            scope = q.quota_scope
            limit = quota.per_tenant if scope[0] == "tenant" else quota.per_unknown_gateway
            if used.get(scope, 0) + q.bytes <= limit:
                used[scope] = used.get(scope, 0) + q.bytes
                kept.append(q)
                continue
            item.quota_refused[scope] = item.quota_refused.get(scope, 0) + q.points
            item.rejects.append(
                RejectRow(
                    reason=Reason.QUOTA_EXCEEDED.value,
                    message=f"quarantine quota of {scope[0]} {scope[1]} ({limit} bytes) is full;"
                    f" {q.kind} refused for {q.reason}: {q.message}"[:1000],
                    topic=item.incoming.topic[:512],
                    tenant_id=q.tenant_id,
                    gateway_id=q.gateway_id,
                    stream=q.stream,
                    seq=q.seq,
                    device_id=q.device_id,
                    metric=q.metric,
                    points=q.points,
                )
            )
        if len(kept) != len(item.quarantine):
            item.quarantine = kept
            item.settle()


async def insert_rows(conn: asyncpg.Connection, items: Sequence[Staged]) -> int:
    """COPY the quarantine rows of ``items`` and add them (and quota refusals) to the usage."""
    rows = [q for item in items for q in item.quarantine]
    if rows:
        await conn.copy_records_to_table(
            "quarantine", records=[record(q) for q in rows], columns=QUARANTINE_COLUMNS
        )
    usage: dict[tuple[str, uuid.UUID], list[int]] = {}
    for q in rows:
        entry = usage.setdefault(q.quota_scope, [0, 0, 0])
        entry[0] += q.bytes
        entry[1] += 1
    for item in items:
        for scope, points in item.quota_refused.items():
            usage.setdefault(scope, [0, 0, 0])[2] += points
    await add_usage(conn, usage)
    return len(rows)


async def add_usage(
    conn: asyncpg.Connection, usage: dict[tuple[str, uuid.UUID], list[int]]
) -> None:
    """Add ``{scope: [bytes, rows, refused_points]}`` (negative to remove) to the usage table."""
    if not usage:
        return
    keys = sorted(usage)
    await conn.execute(
        _USAGE_SQL,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [usage[k][0] for k in keys],
        [usage[k][1] for k in keys],
        [usage[k][2] for k in keys],
    )


# --- listing, purging ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filters:
    """Which quarantine rows an operation applies to (``None``: any)."""

    tenant_id: uuid.UUID | None = None
    gateway_id: uuid.UUID | None = None
    device_id: uuid.UUID | None = None
    reasons: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[int, ...] = ()

    def where(self, first: int = 1) -> tuple[str, list[Any]]:
        """A WHERE clause (starting with ``WHERE`` or empty) and its arguments."""
        parts: list[str] = []
        args: list[Any] = []

        def add(sql: str, value: Any) -> None:
            args.append(value)
            parts.append(sql.format(n=first + len(args) - 1))

        if self.tenant_id is not None:
            add("tenant_id = ${n}", self.tenant_id)
        if self.gateway_id is not None:
            add("gateway_id = ${n}", self.gateway_id)
        if self.device_id is not None:
            add("device_id = ${n}", self.device_id)
        if self.reasons:
            add("reason = ANY(${n}::text[])", list(self.reasons))
        if self.since is not None:
            add("received_at >= ${n}", self.since)
        if self.until is not None:
            add("received_at < ${n}", self.until)
        if self.ids:
            add("id = ANY(${n}::bigint[])", list(self.ids))
        return (" WHERE " + " AND ".join(parts)) if parts else "", args


async def summary(conn: asyncpg.Connection, filters: Filters) -> list[dict[str, Any]]:
    """Quarantined data grouped by tenant, gateway, device and reason."""
    where, args = filters.where()
    rows = await conn.fetch(
        "SELECT tenant_id, gateway_id, device_id, reason, count(*) AS rows,"
        " sum(points) AS points, sum(bytes) AS bytes, min(received_at) AS first_received,"
        " max(received_at) AS last_received, max(replays) AS replays"
        f" FROM quarantine{where}"
        " GROUP BY tenant_id, gateway_id, device_id, reason"
        " ORDER BY tenant_id, gateway_id, device_id NULLS FIRST, reason",
        *args,
    )
    return [dict(r) for r in rows]


async def rows(conn: asyncpg.Connection, filters: Filters, limit: int) -> list[dict[str, Any]]:
    """Quarantine rows (without their payload), oldest first."""
    where, args = filters.where()
    found = await conn.fetch(
        "SELECT id, received_at, reason, message, kind, tenant_id, gateway_id, stream, seq,"
        " device_id, metric, points, first_time, last_time, bytes, replays, last_replay"
        f" FROM quarantine{where} ORDER BY id LIMIT {int(limit)}",
        *args,
    )
    return [dict(r) for r in found]


def payload_preview(kind: str, payload: bytes, limit: int = 20) -> Any:
    """What a row holds, for ``quarantine show``: readings, entries, or the frame's size."""
    if kind == "frame":
        return {"frame_bytes": len(payload)}
    data = msgpack.unpackb(payload, raw=False)
    if kind == "readings":
        ts, values = data
        return [[t, v] for t, v in zip(ts[:limit], values[:limit], strict=True)]
    return [[_text(v) for v in entry] for entry in data[:limit]]


def _text(value: Any) -> Any:
    if isinstance(value, bytes) and len(value) == 16:
        return str(uuid.UUID(bytes=value))
    return value


async def purge(conn: asyncpg.Connection, filters: Filters) -> int:
    """Delete the matching rows (and their usage); return how many went."""
    where, args = filters.where()
    async with conn.transaction():
        gone = await conn.fetch(
            f"DELETE FROM quarantine{where} RETURNING quota_scope, quota_id, bytes", *args
        )
        usage: dict[tuple[str, uuid.UUID], list[int]] = {}
        for r in gone:
            entry = usage.setdefault((r[0], r[1]), [0, 0, 0])
            entry[0] -= int(r[2])
            entry[1] -= 1
        await add_usage(conn, usage)
    return len(gone)


# --- replay -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ReplayReport:
    """What one replay did."""

    examined: int = 0
    stored_rows: int = 0
    readings_stored: int = 0
    still_quarantined: int = 0
    refused: int = 0
    unchanged: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


WriteItems = Callable[[asyncpg.Connection, list[Staged]], Awaitable[Any]]
"""Writes the rows of staged items inside the caller's transaction (the writer's own code)."""


def _batch_of(row: asyncpg.Record, limits: Any) -> Batch:
    kind, payload = row["kind"], bytes(row["payload"])
    if kind == "frame":
        return decode_batch(payload, limits)
    data = msgpack.unpackb(payload, raw=False)
    base: dict[str, Any] = {
        "gateway_id": row["gateway_id"],
        "stream": row["stream"] or NIL_UUID,
        "seq": row["seq"] or 0,
        "created": 0,
    }
    if kind == "readings":
        ts, values = data
        series = [
            Series.model_construct(
                device_id=row["device_id"], metric=row["metric"], timestamps=ts, values=values
            )
        ]
        return Batch.model_construct(series=series, events=[], status=[], **base)
    if kind == "events":
        events = [
            Event.model_construct(
                time=e[0],
                device_id=uuid.UUID(bytes=e[1]) if e[1] else None,
                severity=e[2],
                kind=e[3],
                message=e[4],
                attributes=e[5],
            )
            for e in data
        ]
        return Batch.model_construct(series=[], events=events, status=[], **base)
    status = [
        DeviceStatus.model_construct(
            time=d[0], device_id=uuid.UUID(bytes=d[1]), status=d[2], reason=d[3]
        )
        for d in data
    ]
    return Batch.model_construct(series=[], events=[], status=status, **base)


async def _evaluate(
    pipeline: Pipeline, row: asyncpg.Record, check_time: bool
) -> tuple[Staged | None, str]:
    """The row's data through today's pipeline, or ``None`` and why nothing changes."""
    address = TopicAddress(
        pipeline.prefix, row["tenant_id"], row["gateway_id"], TopicKind.TELEMETRY
    )
    refusal = await pipeline.gateway_refusal(address)
    if refusal is not None:
        return None, refusal.reason.value
    try:
        batch = _batch_of(row, pipeline.limits)
    except ProtocolError as exc:
        return None, exc.reason.value
    topic = build_topic(pipeline.prefix, row["tenant_id"], row["gateway_id"], TopicKind.TELEMETRY)
    staged = Staged(
        incoming=Incoming(mid=0, qos=0, topic=topic, payload=b"", generation=0),
        tenant_id=row["tenant_id"],
        gateway_id=row["gateway_id"],
        stream=row["stream"],
        seq=row["seq"] or 0,
        ack_topic=topic,  # never published: replay sends no acks; settle() needs an addressee
    )
    await pipeline.evaluate(staged, address, batch, check_time=check_time)
    for q in staged.quarantine:
        q.attempts = int(row["replays"]) + 1
    return staged, ""


def _unchanged(row: asyncpg.Record, staged: Staged) -> bool:
    """Nothing stored and the data is held back for the same single reason as before."""
    if staged.accepted or staged.events or staged.status or staged.rejects:
        return False
    return len(staged.quarantine) == 1 and staged.quarantine[0].reason == row["reason"]


async def replay(
    conn: asyncpg.Connection,
    pipeline: Pipeline,
    write_items: WriteItems,
    filters: Filters,
    *,
    check_time: bool = True,
    batch_rows: int = 200,
    max_rows: int | None = None,
) -> ReplayReport:
    """Run matching quarantine rows through today's pipeline; store what passes, exactly once."""
    report = ReplayReport()
    where, args = filters.where()
    last_id = 0
    while max_rows is None or report.examined < max_rows:
        take = batch_rows if max_rows is None else min(batch_rows, max_rows - report.examined)
        clause = (where + " AND" if where else " WHERE") + f" id > ${len(args) + 1}"
        async with conn.transaction():
            found = await conn.fetch(
                f"SELECT * FROM quarantine{clause} ORDER BY id LIMIT {int(take)}"
                " FOR UPDATE SKIP LOCKED",
                *args,
                last_id,
            )
            if not found:
                break
            last_id = int(found[-1]["id"])
            done: list[asyncpg.Record] = []
            items: list[Staged] = []
            same: list[int] = []
            for row in found:
                report.examined += 1
                staged, _why = await _evaluate(pipeline, row, check_time)
                if staged is None or _unchanged(row, staged):
                    same.append(int(row["id"]))
                    continue
                done.append(row)
                items.append(staged)
                report.stored_rows += (
                    1 if (staged.accepted or staged.events or staged.status) else 0
                )
                report.readings_stored += staged.accepted
                report.still_quarantined += len(staged.quarantine)
                report.refused += len(staged.rejects)
                for q in staged.quarantine:
                    report.by_reason[q.reason] = report.by_reason.get(q.reason, 0) + 1
            report.unchanged += len(same)
            if same:
                await conn.execute(
                    "UPDATE quarantine SET replays = replays + 1, last_replay = now()"
                    " WHERE id = ANY($1::bigint[])",
                    same,
                )
            if items:
                await write_items(conn, items)
                await conn.execute(
                    "DELETE FROM quarantine WHERE id = ANY($1::bigint[])",
                    [int(r["id"]) for r in done],
                )
                usage: dict[tuple[str, uuid.UUID], list[int]] = {}
                for r in done:
                    entry = usage.setdefault((r["quota_scope"], r["quota_id"]), [0, 0, 0])
                    entry[0] -= int(r["bytes"])
                    entry[1] -= 1
                await add_usage(conn, usage)
        if len(found) < take:
            break
    if report.examined:
        log.info(
            "quarantine.replayed",
            examined=report.examined,
            readings_stored=report.readings_stored,
            still_quarantined=report.still_quarantined + report.unchanged,
            refused=report.refused,
        )
    return report
