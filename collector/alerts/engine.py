"""The collector's alert engine: rules from the registry, evaluation in the writer's
transaction, no-data checks, closing the alerts of disabled rules, publishing transitions.

Rules are loaded from the metadata database at start-up (before the first batch is consumed)
and again within a second of every ``NOTIFY sensormine_registry 'alert_rules:<id>'``. A reload
keeps every state: a state whose rule's condition changed restarts its pending timer at its
next reading (:func:`collector.alerts.evaluator.changed_rule`); the alerts of rules that were
disabled, deleted or moved to another metric are closed by :meth:`AlertEngine.sweep` with the
reason. The writer calls :meth:`AlertEngine.evaluate` inside its flush's transaction; with no
rule on a series' (tenant, metric) that costs one dictionary lookup per series.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import msgpack
import structlog

from collector.alerts import store
from collector.alerts.evaluator import Bounds, chunk_bounds, evaluate_columns, rewind, silence
from collector.alerts.rules import Rule, RuleError, RuleIndex
from collector.alerts.store import Work, to_dt, to_us
from collector.errors import DatabaseUnavailable
from collector.settings import AlertSettings

log = structlog.get_logger("collector.alerts")
NIL = uuid.UUID(int=0)
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

Publish = Callable[[str, bytes], Callable[[], bool]]


class RuleSource(Protocol):
    """Where rules and devices come from (the registry cache)."""

    async def alert_rules(self) -> list[dict[str, Any]]: ...

    async def devices(self, ids: Any) -> Mapping[uuid.UUID, Any]: ...


class SeriesOfItem(Protocol):
    """The parts of a staged series the engine reads."""

    tenant_id: uuid.UUID
    device_id: uuid.UUID
    metric: str
    timestamps: list[int]
    values: list[Any]


_STREAM_LOCK_SQL = """
SELECT pg_advisory_xact_lock(k) FROM (SELECT unnest($1::bigint[]) AS k ORDER BY 1) AS keys
"""
_WATERMARKS_SQL = """
SELECT w.gateway_id, w.stream, w.evaluated_seq,
       EXISTS (SELECT 1 FROM alert_parked p
               WHERE p.gateway_id = w.gateway_id AND p.stream = w.stream) AS parked
FROM alert_streams w
JOIN unnest($1::uuid[], $2::uuid[]) AS k(gateway_id, stream)
  ON w.gateway_id = k.gateway_id AND w.stream = k.stream
-- A mark older than park_timeout with nothing waiting is not waited on: the stream's tenant may
-- have had no rules meanwhile (its batches were not counted), or it sends rarely.
WHERE w.updated_at > now() - $3::interval
   OR EXISTS (SELECT 1 FROM alert_parked p
              WHERE p.gateway_id = w.gateway_id AND p.stream = w.stream)
"""
_PARKED_SQL = """
SELECT p.gateway_id, p.stream, p.seq, p.payload FROM alert_parked p
JOIN unnest($1::uuid[], $2::uuid[]) AS k(gateway_id, stream)
  ON p.gateway_id = k.gateway_id AND p.stream = k.stream
ORDER BY p.seq
"""
_PARK_SQL = """
INSERT INTO alert_parked (gateway_id, stream, seq, payload) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
"""
_RELEASE_SQL = """
DELETE FROM alert_parked p
USING unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS k(gateway_id, stream, seq)
WHERE p.gateway_id = k.gateway_id AND p.stream = k.stream AND p.seq = k.seq
"""
_MARK_SQL = """
INSERT INTO alert_streams (gateway_id, stream, evaluated_seq)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) ORDER BY 1, 2
ON CONFLICT (gateway_id, stream) DO UPDATE
SET evaluated_seq = greatest(alert_streams.evaluated_seq, EXCLUDED.evaluated_seq),
    updated_at = now()
"""
_OVERDUE_SQL = """
SELECT gateway_id, stream FROM alert_parked
GROUP BY gateway_id, stream HAVING min(parked_at) < now() - $1::interval
"""


def _stream_key(gateway_id: uuid.UUID, stream: uuid.UUID) -> int:
    """The advisory lock key of one gateway stream."""
    digest = hashlib.blake2b(gateway_id.bytes + stream.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(slots=True)
class _ParkedSeries:
    tenant_id: uuid.UUID
    device_id: uuid.UUID
    metric: str
    timestamps: list[int]
    values: list[Any]


@dataclass(slots=True)
class _ParkedBatch:
    gateway_id: uuid.UUID
    series: list[_ParkedSeries]


def _pack(item: Any, ids: Mapping[tuple[uuid.UUID, uuid.UUID, str], int]) -> bytes:
    """A batch's readings, as a parked row keeps them."""
    rows = [
        [
            s.tenant_id.bytes,
            s.device_id.bytes,
            s.metric,
            ids[(s.tenant_id, s.device_id, s.metric)],
            s.timestamps,
            s.values,
        ]
        for s in item.series
    ]
    packed: bytes = msgpack.packb(rows, use_bin_type=True)
    return packed


def _unpack(
    gateway_id: uuid.UUID, payload: bytes, ids: dict[tuple[uuid.UUID, uuid.UUID, str], int]
) -> _ParkedBatch:
    """A parked batch back; its series ids go into ``ids``."""
    series = []
    for tenant, device, metric, sid, times, values in msgpack.unpackb(payload, raw=False):
        s = _ParkedSeries(uuid.UUID(bytes=tenant), uuid.UUID(bytes=device), metric, times, values)
        ids[(s.tenant_id, s.device_id, metric)] = int(sid)
        series.append(s)
    return _ParkedBatch(gateway_id, series)


def _numeric(times: list[int], values: list[Any]) -> tuple[list[int], list[float]]:
    """The readings a rule can compare: numbers and booleans, not strings."""
    if not values or type(values[0]) is str:
        return [], []
    try:
        max(values)  # raises TypeError on a string among numbers
    except TypeError:
        kept = [(t, v) for t, v in zip(times, values, strict=True) if type(v) is not str]
        return [t for t, _ in kept], [v for _, v in kept]
    return times, values


def now_us() -> int:
    """The clock, in microseconds since the epoch."""
    return time.time_ns() // 1000


def alerts_topic(prefix: str, tenant_id: uuid.UUID) -> str:
    """``{prefix}/v1/{tenant}/alerts``: where a tenant's transitions are published."""
    return f"{prefix}/v1/{tenant_id}/alerts"


class AlertEngine:
    """Rules, evaluation and the engine's own background work for one collector."""

    def __init__(
        self,
        rules: RuleSource,
        settings: AlertSettings,
        *,
        prefix: str,
        connect_kwargs: dict[str, Any] | None = None,
        refresh_interval: float = 300.0,
    ) -> None:
        self.source = rules
        self.settings = settings
        self.prefix = prefix
        self._connect_kwargs = connect_kwargs
        self.refresh_interval = refresh_interval
        self.index = RuleIndex()
        self.rows: dict[uuid.UUID, dict[str, Any]] = {}
        self.problems: dict[uuid.UUID, str] = {}
        self.loaded = False
        self._reload = asyncio.Event()
        self._wake = asyncio.Event()
        self.late_us = int(settings.late_after * 1_000_000)
        self.evaluated_transitions = 0
        self.published = 0
        self.closed_by_sweep = 0
        # (rule, series) whose state rows exist: locked without trying to create them first.
        self.known: set[tuple[uuid.UUID, int]] = set()

    # --- rules ---------------------------------------------------------------------------------

    def registry_changed(self, table: str, _ident: uuid.UUID | None) -> None:
        """Registry listener: reload the rules after a change of ``alert_rules`` (or a gap)."""
        if table in ("alert_rules", "*"):
            self._reload.set()
            self._wake.set()

    async def load(self) -> None:
        """Load every rule; keep the enabled ones that can be evaluated."""
        rows = await self.source.alert_rules()
        rules: list[Rule] = []
        problems: dict[uuid.UUID, str] = {}
        for row in rows:
            if not row.get("enabled", True):
                continue
            try:
                rules.append(Rule.from_row(row))
            except (RuleError, KeyError, TypeError, ValueError) as exc:
                problems[row["id"]] = str(exc)
                log.error("alerts.rule_invalid", rule=row.get("name"), error=str(exc))
        self.rows = {r["id"]: r for r in rows}
        self.problems = problems
        self.index = RuleIndex(rules)
        self.loaded = True
        log.info("alerts.rules_loaded", rules=len(rules), invalid=len(problems))

    def _gone(self, rule_id: uuid.UUID) -> str:
        row = self.rows.get(rule_id)
        if row is None:
            return "rule deleted"
        if not row.get("enabled", True):
            return "rule disabled"
        return f"rule cannot be evaluated: {self.problems.get(rule_id, 'unknown')}"

    # --- evaluation in the writer's transaction --------------------------------------------------

    async def evaluate(
        self,
        conn: asyncpg.Connection,
        items: Sequence[Any],
        ids: Mapping[tuple[uuid.UUID, uuid.UUID, str], int],
    ) -> int:
        """Evaluate the readings of ``items`` (being written in ``conn``'s transaction).

        Returns the number of transitions written with them.
        """
        if not self.index.rules or not self.settings.enabled:
            return 0
        batches, more_ids = await self._in_stream_order(conn, items, ids)
        if more_ids:
            ids = {**ids, **more_ids}
        return await self._evaluate(conn, batches, ids)

    async def _in_stream_order(
        self,
        conn: asyncpg.Connection,
        items: Sequence[Any],
        ids: Mapping[tuple[uuid.UUID, uuid.UUID, str], int],
    ) -> tuple[list[Any], dict[tuple[uuid.UUID, uuid.UUID, str], int]]:
        """The batches to evaluate now, in each gateway stream's order.

        A batch whose predecessor in its stream has not been evaluated yet (another collector
        holds it, or it is still on its way) is parked, in this transaction, with its readings;
        the flush that evaluates the predecessor evaluates the parked batches that follow it.
        Flushes touching the same stream take its advisory lock first (in key order), so that
        one of them always sees what the other committed.
        """
        # A tenant without rules costs nothing: its batches are neither ordered nor evaluated.
        tenants = self.index.tenants
        items = [i for i in items if i.tenant_id in tenants]
        keyed = [i for i in items if i.key is not None]
        now: list[Any] = [i for i in items if i.key is None]
        more: dict[tuple[uuid.UUID, uuid.UUID, str], int] = {}
        if not keyed:
            return now, more
        streams = sorted({(i.key[0], i.key[1]) for i in keyed})
        await conn.execute(_STREAM_LOCK_SQL, sorted(_stream_key(g, s) for g, s in streams))
        rows = await conn.fetch(
            _WATERMARKS_SQL,
            [g for g, _ in streams],
            [s for _, s in streams],
            timedelta(seconds=self.settings.park_timeout),
        )
        marks = {(r["gateway_id"], r["stream"]): int(r["evaluated_seq"]) for r in rows}
        waiting = [(r["gateway_id"], r["stream"]) for r in rows if r["parked"]]
        parked: dict[tuple[uuid.UUID, uuid.UUID], dict[int, bytes]] = {}
        if waiting:
            for r in await conn.fetch(
                _PARKED_SQL, [g for g, _ in waiting], [s for _, s in waiting]
            ):
                parked.setdefault((r["gateway_id"], r["stream"]), {})[r["seq"]] = r["payload"]
        to_park: list[tuple[uuid.UUID, uuid.UUID, int, bytes]] = []
        released: list[tuple[uuid.UUID, uuid.UUID, int]] = []
        new_marks: list[tuple[uuid.UUID, uuid.UUID, int]] = []
        for g, st in streams:
            here = {i.key[2]: i for i in keyed if (i.key[0], i.key[1]) == (g, st)}
            waits = parked.get((g, st), {})
            mark = marks.get((g, st), min(here) - 1)
            # At or before the mark: out of order for good (the wait timed out): evaluated now.
            now.extend(i for seq, i in here.items() if seq <= mark)
            nxt = mark + 1
            while True:
                if nxt in here:
                    now.append(here[nxt])
                elif nxt in waits:
                    now.append(_unpack(g, waits[nxt], more))
                    released.append((g, st, nxt))
                else:
                    break
                nxt += 1
            to_park.extend((g, st, seq, _pack(i, ids)) for seq, i in here.items() if seq > nxt)
            if nxt - 1 != marks.get((g, st)):
                new_marks.append((g, st, nxt - 1))
            if any(seq > nxt for seq in here):
                log.info("alerts.parked", gateway_id=str(g), waiting_for=nxt)
        if to_park:
            await conn.executemany(_PARK_SQL, to_park)
        if released:
            await conn.execute(
                _RELEASE_SQL,
                [g for g, _, _ in released],
                [s for _, s, _ in released],
                [q for _, _, q in released],
            )
        if new_marks:
            await conn.execute(
                _MARK_SQL,
                [g for g, _, _ in new_marks],
                [s for _, s, _ in new_marks],
                [q for _, _, q in new_marks],
            )
        return now, more

    async def release_parked(self, conn: asyncpg.Connection) -> int:
        """Evaluate batches parked longer than ``park_timeout`` (their predecessor never came)."""
        rows = await conn.fetch(_OVERDUE_SQL, timedelta(seconds=self.settings.park_timeout))
        written = 0
        for r in sorted(rows, key=lambda r: (r["gateway_id"], r["stream"])):
            g, st = r["gateway_id"], r["stream"]
            async with conn.transaction():
                await conn.execute(_STREAM_LOCK_SQL, [_stream_key(g, st)])
                waits = await conn.fetch(_PARKED_SQL, [g], [st])
                if not waits:
                    continue
                more: dict[tuple[uuid.UUID, uuid.UUID, str], int] = {}
                batches = [_unpack(g, w["payload"], more) for w in waits]
                last = max(int(w["seq"]) for w in waits)
                log.warning(
                    "alerts.park_timeout",
                    gateway_id=str(g),
                    stream=str(st),
                    batches=len(waits),
                    hint="a batch of this stream never arrived; the ones after it are evaluated"
                    " without it",
                )
                written += await self._evaluate(conn, batches, more)
                await conn.execute(
                    _RELEASE_SQL, [g] * len(waits), [st] * len(waits), [w["seq"] for w in waits]
                )
                await conn.execute(_MARK_SQL, [g], [st], [last])
        return written

    async def _evaluate(
        self,
        conn: asyncpg.Connection,
        items: Sequence[Any],
        ids: Mapping[tuple[uuid.UUID, uuid.UUID, str], int],
    ) -> int:
        index = self.index
        works: dict[tuple[uuid.UUID, int], Work] = {}
        for item in items:
            gateway = item.gateway_id or NIL
            for s in item.series:
                rules = index.for_metric(s.tenant_id, s.metric)
                if not rules:
                    continue
                sid = ids[(s.tenant_id, s.device_id, s.metric)]
                times, values = _numeric(s.timestamps, s.values)
                if not times:
                    continue
                for rule in rules:
                    if rule.device_id is not None and rule.device_id != s.device_id:
                        continue
                    w = works.get((rule.id, sid))
                    if w is None:
                        w = works[(rule.id, sid)] = Work(
                            rule, sid, s.tenant_id, gateway, s.device_id, s.metric
                        )
                    w.times.extend(times)
                    w.values.extend(values)
        if index.typed and works:
            await self._by_type(works)
        if not works:
            return 0
        todo = list(works.values())
        await store.lock_states(conn, todo, self.known)
        bounds: dict[int, tuple[Bounds, list[Bounds]]] = {}
        for w in todo:
            assert w.state is not None
            if len(w.times) > 1 and w.times != sorted(w.times):
                pairs = sorted(zip(w.times, w.values, strict=True))
                w.times, w.values = [t for t, _ in pairs], [v for _, v in pairs]
            # The rules on one series share its readings: their bounds are computed once.
            pre = bounds.get(w.series_id)
            if pre is None:
                pre = bounds[w.series_id] = chunk_bounds(w.values)
            outcome = evaluate_columns(w.rule, w.state, w.times, w.values, pre)
            if outcome.rewind_from is None:
                w.transitions = outcome.transitions
            else:
                start = outcome.rewind_from
                stored = await store.history(conn, w.series_id, start)
                done = await store.published(conn, w.rule.id, w.series_id, start)
                w.transitions = rewind(w.rule, w.state, outcome, stored, done)
                log.info(
                    "alerts.rewound",
                    rule=w.rule.name,
                    series_id=w.series_id,
                    readings=len(stored),
                    transitions=len(w.transitions),
                    skipped=w.state.skipped,
                )
        written = await store.save(conn, todo, now_us(), self.late_us)
        self.evaluated_transitions += written
        return written

    async def _by_type(self, works: dict[tuple[uuid.UUID, int], Work]) -> None:
        typed = [w for w in works.values() if w.rule.device_type_id is not None]
        if not typed:
            return
        devices = await self.source.devices({w.device_id for w in typed})
        for key, w in list(works.items()):
            if w.rule.device_type_id is None:
                continue
            entry = devices.get(w.device_id)
            if entry is None or entry.device_type_id != w.rule.device_type_id:
                del works[key]

    def flushed(self, report: Any) -> None:
        """Writer hook after a commit: transitions may wait in the outbox."""
        self._wake.set()

    # --- the engine's own work --------------------------------------------------------------------

    async def sweep(self, conn: asyncpg.Connection) -> int:
        """Close the open alerts of rules no longer evaluated (disabled, deleted, other metric)."""
        enabled = self.index.rules
        stamp = now_us()
        closed = 0
        async with conn.transaction():
            await conn.execute(
                "DELETE FROM alert_state WHERE NOT (rule_id = ANY($1::uuid[]))", list(enabled)
            )
            self.known = {k for k in self.known if k[0] in enabled}
            # Streams of agents that started afresh long ago.
            await conn.execute(
                "DELETE FROM alert_streams WHERE updated_at < now() - interval '30 days'"
            )
            rows = await conn.fetch(
                "SELECT * FROM alerts WHERE cleared_at IS NULL ORDER BY id FOR UPDATE"
            )
            events: list[tuple[Any, ...]] = []
            outbox: list[tuple[uuid.UUID, str]] = []
            for r in rows:
                rule = enabled.get(r["rule_id"])
                if rule is not None and rule.metric == r["metric"]:
                    continue
                reason = (
                    "rule changed: another metric" if rule is not None else self._gone(r["rule_id"])
                )
                await conn.execute(
                    "UPDATE alerts SET cleared_at = $2, clear_reason = $3 WHERE id = $1",
                    r["id"],
                    to_dt(stamp),
                    reason,
                )
                await conn.execute(
                    "DELETE FROM alert_state WHERE rule_id = $1 AND series_id = $2",
                    r["rule_id"],
                    r["series_id"],
                )
                attributes = {
                    "rule_id": str(r["rule_id"]),
                    "rule": r["rule_name"],
                    "metric": r["metric"],
                    "series_id": r["series_id"],
                    "condition": r["condition"],
                    "threshold": r["threshold"],
                    "value": None,
                    "raised_at": r["raised_at"].isoformat().replace("+00:00", "Z"),
                    "late": False,
                    "reason": reason,
                }
                message = f"{r['rule_name']}: cleared ({reason})"
                events.append(
                    (
                        to_dt(stamp),
                        r["tenant_id"],
                        r["gateway_id"],
                        r["device_id"],
                        "info",
                        "alert.cleared",
                        message,
                        json.dumps(attributes),
                    )
                )
                body = {
                    "v": 1,
                    "kind": "alert.cleared",
                    "time": datetime.fromtimestamp(stamp / 1e6, UTC)
                    .isoformat()
                    .replace("+00:00", "Z"),
                    "tenant_id": str(r["tenant_id"]),
                    "gateway_id": str(r["gateway_id"]),
                    "device_id": str(r["device_id"]),
                    "severity": r["severity"],
                    "message": message,
                    **attributes,
                }
                outbox.append((r["tenant_id"], json.dumps(body, separators=(",", ":"))))
                closed += 1
                log.info("alerts.closed", rule=r["rule_name"], reason=reason, alert_id=r["id"])
            await store.write_transitions(conn, events, outbox)
        self.closed_by_sweep += closed
        return closed

    async def check_silence(self, conn: asyncpg.Connection) -> int:
        """Raise the no-data alerts of series silent longer than their rule allows."""
        stamp = now_us()
        works: dict[tuple[uuid.UUID, int], Work] = {}
        latest: dict[tuple[uuid.UUID, int], int] = {}
        for rule in self.index.no_data_rules():
            assert rule.no_data_us is not None
            rows = await conn.fetch(
                """
                SELECT s.id, s.device_id, l.time FROM series s
                JOIN series_latest l ON l.series_id = s.id
                WHERE s.tenant_id = $1 AND s.metric = $2 AND l.time < $3
                  AND NOT EXISTS (SELECT 1 FROM alert_state a WHERE a.rule_id = $4
                                  AND a.series_id = s.id AND a.level = 'firing')
                """,
                rule.tenant_id,
                rule.metric,
                to_dt(stamp - rule.no_data_us),
                rule.id,
            )
            if not rows:
                continue
            devices = await self.source.devices({r["device_id"] for r in rows})
            for r in rows:
                entry = devices.get(r["device_id"])
                type_id = entry.device_type_id if entry is not None else None
                if not rule.applies(r["device_id"], type_id):
                    continue
                gateway = (entry.gateway_id if entry is not None else None) or NIL
                key = (rule.id, r["id"])
                works[key] = Work(
                    rule, r["id"], rule.tenant_id, gateway, r["device_id"], rule.metric
                )
                latest[key] = to_us(r["time"])
        if not works:
            return 0
        todo = list(works.values())
        async with conn.transaction():
            await store.lock_states(conn, todo, self.known)
            for w in todo:
                assert w.state is not None
                if w.state.last_time is None:
                    w.state.last_time = latest[(w.rule.id, w.series_id)]
                w.transitions = silence(w.rule, w.state, stamp)
            written = await store.save(conn, todo, stamp, self.late_us)
        self._wake.set()
        return written

    async def publish_outbox(self, conn: asyncpg.Connection, publish: Publish) -> int:
        """Publish committed transitions in order (QoS 1); delete each once the broker has it."""
        sent_total = 0
        while True:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, tenant_id, payload::text AS payload FROM alert_outbox"
                    " ORDER BY id LIMIT 200 FOR UPDATE SKIP LOCKED"
                )
                if not rows:
                    return sent_total
                checks = [
                    publish(alerts_topic(self.prefix, r["tenant_id"]), r["payload"].encode())
                    for r in rows
                ]
                deadline = time.monotonic() + 10.0
                while not all(check() for check in checks):
                    if time.monotonic() > deadline:
                        # Rolled back: published again later (subscribers may see it twice).
                        raise TimeoutError("the broker did not acknowledge alert transitions")
                    await asyncio.sleep(0.01)
                await conn.execute(
                    "DELETE FROM alert_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
                )
            sent_total += len(rows)
            self.published += len(rows)

    async def run(self, stop: asyncio.Event, publish: Publish | None) -> None:
        """Reload rules on changes, check silences, publish transitions; until ``stop``."""
        assert self._connect_kwargs is not None
        conn: asyncpg.Connection | None = None
        next_refresh = time.monotonic() + self.refresh_interval
        delay = 0.5
        self._reload.set()  # a first sweep after start-up
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.no_data_interval)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(**self._connect_kwargs)
                if self._reload.is_set() or time.monotonic() >= next_refresh:
                    self._reload.clear()
                    next_refresh = time.monotonic() + self.refresh_interval
                    await self.load()
                    await self.sweep(conn)
                await self.check_silence(conn)
                await self.release_parked(conn)
                if publish is not None:
                    await self.publish_outbox(conn, publish)
                delay = 0.5
            except (DatabaseUnavailable, *_DB_ERRORS) as exc:
                log.warning("alerts.failed", error=str(exc), retry_in=delay)
                self._reload.set()  # whatever was interrupted is done again
                if conn is not None:
                    conn.terminate()
                conn = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)
                self._wake.set()
        if conn is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await conn.close()
