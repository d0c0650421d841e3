"""Alert state, alerts, events and the outbox in the time-series database.

Everything here runs inside a transaction the caller owns: the writer's flush (so a batch's
readings and the transitions they cause commit together, or not at all) or the engine's own
for no-data checks and disabled rules. State rows are created with ``INSERT … ON CONFLICT DO
NOTHING`` and locked with ``SELECT … FOR UPDATE``, both in (rule, series) order: two collectors
evaluating the same series wait for each other instead of deadlocking, and the second one sees
the first one's state.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from collector.alerts.evaluator import Reading, State, Transition
from collector.alerts.rules import Rule

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EVENT_COLUMNS = (
    "time",
    "tenant_id",
    "gateway_id",
    "device_id",
    "severity",
    "kind",
    "message",
    "attributes",
)


def to_us(value: datetime) -> int:
    """Microseconds since the epoch."""
    return (value - EPOCH) // timedelta(microseconds=1)


def to_dt(us: int | None) -> datetime | None:
    """An aware datetime, or ``None``."""
    return None if us is None else EPOCH + timedelta(microseconds=us)


@dataclass(slots=True)
class Work:
    """One (rule, series) to evaluate in a transaction, and what came of it."""

    rule: Rule
    series_id: int
    tenant_id: uuid.UUID
    gateway_id: uuid.UUID
    device_id: uuid.UUID
    metric: str
    times: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    state: State | None = None
    transitions: list[Transition] = field(default_factory=list)


_ENSURE_SQL = """
INSERT INTO alert_state (rule_id, series_id, tenant_id, gateway_id, device_id, rule_digest)
SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[])
    AS t(rule_id, series_id, tenant_id, gateway_id, device_id, rule_digest)
ORDER BY rule_id, series_id
ON CONFLICT DO NOTHING
"""

_LOCK_SQL = """
SELECT s.rule_id, s.series_id, s.rule_digest, s.level, s.since, s.last_time, s.last_value,
       s.checkpoints::text AS checkpoints, s.raised_at, s.evaluated, s.skipped
FROM alert_state s
JOIN unnest($1::uuid[], $2::int[]) AS k(rule_id, series_id)
  ON s.rule_id = k.rule_id AND s.series_id = k.series_id
ORDER BY s.rule_id, s.series_id
FOR UPDATE OF s
"""

_SAVE_SQL = """
UPDATE alert_state s
SET rule_digest = t.rule_digest, level = t.level, since = t.since, last_time = t.last_time,
    last_value = t.last_value, checkpoints = t.checkpoints::jsonb, raised_at = t.raised_at,
    evaluated = t.evaluated, skipped = t.skipped, gateway_id = t.gateway_id, updated_at = now()
FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::timestamptz[],
            $6::timestamptz[], $7::float8[], $8::text[], $9::timestamptz[],
            $10::bigint[], $11::bigint[], $12::uuid[])
    AS t(rule_id, series_id, rule_digest, level, since, last_time, last_value, checkpoints,
         raised_at, evaluated, skipped, gateway_id)
WHERE s.rule_id = t.rule_id AND s.series_id = t.series_id
"""

_HISTORY_SQL = """
SELECT time, value FROM telemetry WHERE series_id = $1 AND time > $2 ORDER BY time
"""

_PUBLISHED_SQL = """
SELECT raised_at, cleared_at, clear_reason FROM alerts
WHERE rule_id = $1 AND series_id = $2 AND (raised_at > $3 OR cleared_at > $3)
"""
# Clears decided by readings (not by a rule being disabled or changed).
_EVALUATED_CLEARS = ("threshold", "data")

_CLOSE_SQL = """
UPDATE alerts a
SET cleared_at = k.cleared_at, cleared_value = k.cleared_value, cleared_late = k.cleared_late,
    clear_reason = k.clear_reason
FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::timestamptz[], $5::float8[],
            $6::bool[], $7::text[])
    AS k(rule_id, series_id, raised_at, cleared_at, cleared_value, cleared_late, clear_reason)
WHERE a.rule_id = k.rule_id AND a.series_id = k.series_id AND a.raised_at = k.raised_at
  AND a.cleared_at IS NULL
"""

_OPEN_SQL = """
INSERT INTO alerts (rule_id, rule_name, tenant_id, gateway_id, device_id, series_id, metric,
                    severity, condition, threshold, raised_at, raised_value, raised_late,
                    cleared_at, cleared_value, cleared_late, clear_reason)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::int[],
                     $7::text[], $8::text[], $9::text[], $10::float8[], $11::timestamptz[],
                     $12::float8[], $13::bool[], $14::timestamptz[], $15::float8[],
                     $16::bool[], $17::text[])
ON CONFLICT (rule_id, series_id, raised_at) DO NOTHING
"""


async def lock_states(
    conn: asyncpg.Connection, works: Sequence[Work], known: set[tuple[uuid.UUID, int]]
) -> None:
    """Lock the state rows of ``works`` (creating the missing ones) and load them.

    ``known`` holds the (rule, series) whose rows exist already (a cache of this process):
    when all do, one statement locks them; otherwise they are created first (``ON CONFLICT DO
    NOTHING``: another collector may be creating the same ones), then all are locked, always in
    (rule, series) order.
    """
    ordered = sorted(works, key=lambda w: (w.rule.id, w.series_id))
    rules = [w.rule.id for w in ordered]
    series = [w.series_id for w in ordered]
    if not all((w.rule.id, w.series_id) in known for w in ordered):
        await conn.execute(
            _ENSURE_SQL,
            rules,
            series,
            [w.tenant_id for w in ordered],
            [w.gateway_id for w in ordered],
            [w.device_id for w in ordered],
            [w.rule.digest for w in ordered],
        )
    by_key = {(r["rule_id"], r["series_id"]): r for r in await conn.fetch(_LOCK_SQL, rules, series)}
    if len(by_key) < len(ordered):
        # A row deleted meanwhile (its rule was disabled and enabled again): made afresh.
        await conn.execute(
            _ENSURE_SQL,
            rules,
            series,
            [w.tenant_id for w in ordered],
            [w.gateway_id for w in ordered],
            [w.device_id for w in ordered],
            [w.rule.digest for w in ordered],
        )
        rows = await conn.fetch(_LOCK_SQL, rules, series)
        by_key = {(r["rule_id"], r["series_id"]): r for r in rows}
    known.update(by_key)
    for w in ordered:
        r = by_key[(w.rule.id, w.series_id)]
        w.state = State(
            digest=r["rule_digest"],
            level=r["level"],
            since=_us(r["since"]),
            last_time=_us(r["last_time"]),
            last_value=r["last_value"],
            raised_at=_us(r["raised_at"]),
            evaluated=r["evaluated"],
            skipped=r["skipped"],
            checkpoints=[
                (int(c[0]), None if c[1] is None else int(c[1]))
                for c in json.loads(r["checkpoints"])
            ],
        )


def _us(value: datetime | None) -> int | None:
    return None if value is None else to_us(value)


async def history(conn: asyncpg.Connection, series_id: int, after: int) -> list[Reading]:
    """The stored readings of a series after ``after``, in order."""
    rows = await conn.fetch(_HISTORY_SQL, series_id, to_dt(after))
    return [(to_us(r["time"]), float(r["value"])) for r in rows if r["value"] is not None]


async def published(
    conn: asyncpg.Connection, rule_id: uuid.UUID, series_id: int, after: int
) -> list[tuple[str, int]]:
    """The transitions of (rule, series) recorded after ``after``: (kind, time), in order."""
    rows = await conn.fetch(_PUBLISHED_SQL, rule_id, series_id, to_dt(after))
    out: list[tuple[str, int]] = []
    for r in rows:
        if r["raised_at"] > to_dt(after):
            out.append(("raised", to_us(r["raised_at"])))
        if r["cleared_at"] is not None and r["clear_reason"] in _EVALUATED_CLEARS:
            out.append(("cleared", to_us(r["cleared_at"])))
    return sorted(out, key=lambda x: (x[1], x[0] == "raised"))


async def save(conn: asyncpg.Connection, works: Sequence[Work], now_us: int, late_us: int) -> int:
    """Store the states, the alerts, the events and the outbox rows of ``works``' transitions.

    Returns the number of transitions written.
    """
    done = [w for w in works if w.state is not None]
    if not done:
        return 0
    states = [w.state for w in done if w.state is not None]
    await conn.execute(
        _SAVE_SQL,
        [w.rule.id for w in done],
        [w.series_id for w in done],
        [s.digest for s in states],
        [s.level for s in states],
        [to_dt(s.since) for s in states],
        [to_dt(s.last_time) for s in states],
        [s.last_value for s in states],
        [json.dumps(s.checkpoints) for s in states],
        [to_dt(s.raised_at) for s in states],
        [s.evaluated for s in states],
        [s.skipped for s in states],
        [w.gateway_id for w in done],
    )
    closes: list[tuple[Any, ...]] = []
    opens: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    outbox: list[tuple[uuid.UUID, str]] = []
    for w in done:
        if not w.transitions:
            continue
        cleared = {t.raised_at: t for t in w.transitions if t.kind == "cleared"}
        raised = {t.raised_at for t in w.transitions if t.kind == "raised"}
        for t in w.transitions:
            late = now_us - t.time > late_us
            if t.kind == "raised":
                c = cleared.get(t.raised_at)
                opens.append(
                    (
                        w.rule.id,
                        w.rule.name,
                        w.tenant_id,
                        w.gateway_id,
                        w.device_id,
                        w.series_id,
                        w.metric,
                        w.rule.severity,
                        "no data" if w.rule.is_no_data else w.rule.condition,
                        None if w.rule.is_no_data else w.rule.threshold,
                        to_dt(t.time),
                        t.value,
                        late,
                        None if c is None else to_dt(c.time),
                        None if c is None else c.value,
                        c is not None and now_us - c.time > late_us,
                        None if c is None else c.reason,
                    )
                )
            elif t.raised_at not in raised:
                closes.append(
                    (
                        w.rule.id,
                        w.series_id,
                        to_dt(t.raised_at),
                        to_dt(t.time),
                        t.value,
                        late,
                        t.reason,
                    )
                )
            events.append(event_row(w, t, late))
            outbox.append((w.tenant_id, payload(w, t, late)))
    if closes:
        await conn.execute(_CLOSE_SQL, *(list(column) for column in zip(*closes, strict=True)))
    if opens:
        await conn.execute(_OPEN_SQL, *(list(column) for column in zip(*opens, strict=True)))
    await write_transitions(conn, events, outbox)
    return len(events)


async def write_transitions(
    conn: asyncpg.Connection, events: list[tuple[Any, ...]], outbox: list[tuple[uuid.UUID, str]]
) -> None:
    """The ``events`` rows and the outbox rows of transitions."""
    if events:
        await conn.copy_records_to_table("events", records=events, columns=EVENT_COLUMNS)
    if outbox:
        await conn.execute(
            "INSERT INTO alert_outbox (tenant_id, payload)"
            " SELECT t, p::jsonb FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS o(t, p, n)"
            " ORDER BY n",
            [t for t, _ in outbox],
            [p for _, p in outbox],
        )


def describe(w: Work, t: Transition) -> str:
    """The event's message, as an operator reads it."""
    r = w.rule
    if r.is_no_data:
        what = f"{w.metric} silent for {(r.no_data_us or 0) / 1e6:g} s"
        return f"{r.name}: {what}" if t.kind == "raised" else f"{r.name}: data again"
    value = "" if t.value is None else f"{t.value:g} "
    if t.kind == "raised":
        return f"{r.name}: {w.metric} {value}{r.condition} {r.threshold:g}"
    if t.reason == "threshold":
        return f"{r.name}: cleared, {w.metric} {value}past {r.clear_threshold:g}"
    return f"{r.name}: cleared ({t.reason})"


def attributes(w: Work, t: Transition, late: bool) -> dict[str, Any]:
    """What an alert event carries: rule, series, value, thresholds, times, late."""
    r = w.rule
    return {
        "rule_id": str(r.id),
        "rule": r.name,
        "metric": w.metric,
        "series_id": w.series_id,
        "condition": "no data" if r.is_no_data else r.condition,
        "threshold": None if r.is_no_data else r.threshold,
        "clear_threshold": None if r.is_no_data else r.clear_threshold,
        "no_data_for": None if r.no_data_us is None else r.no_data_us / 1e6,
        "value": t.value if t.value is not None and math.isfinite(t.value) else None,
        "raised_at": _iso(t.raised_at),
        "late": late,
        "reason": t.reason,
    }


def _iso(us: int) -> str:
    dt = to_dt(us)
    assert dt is not None
    return dt.isoformat().replace("+00:00", "Z")


def event_row(w: Work, t: Transition, late: bool) -> tuple[Any, ...]:
    """An ``events`` row ``alert.raised`` / ``alert.cleared``."""
    return (
        to_dt(t.time),
        w.tenant_id,
        w.gateway_id,
        w.device_id,
        w.rule.severity if t.kind == "raised" else "info",
        f"alert.{t.kind}",
        describe(w, t),
        json.dumps(attributes(w, t, late), allow_nan=False),
    )


def payload(w: Work, t: Transition, late: bool) -> str:
    """The JSON published on ``{prefix}/v1/{tenant}/alerts`` (docs/protocol.md)."""
    body = {
        "v": 1,
        "kind": f"alert.{t.kind}",
        "time": _iso(t.time),
        "tenant_id": str(w.tenant_id),
        "gateway_id": str(w.gateway_id),
        "device_id": str(w.device_id),
        "severity": w.rule.severity,
        "message": describe(w, t),
        **attributes(w, t, late),
    }
    return json.dumps(body, allow_nan=False, separators=(",", ":"))
