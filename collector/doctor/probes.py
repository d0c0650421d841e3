"""The checks ``doctor`` runs: each a function of a :class:`Context`, registered with :func:`probe`.

Probes of the time-series database run in registration order on one connection, after the
migrations are known to be applied; each adds its section to ``report.data`` and names what
needs an operator in ``report.problems``. To add one::

    @probe("clock")
    async def _clock(ctx: Context) -> None:
        ctx.report.data["clock"] = ...

A probe that fails with a database error ends the examination of that database with a problem
naming the probe; the broker is checked whatever happened before.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from collector import layout, migrations
from collector.alerts.report import alert_report
from collector.clock_skew import describe, gateway_skews
from collector.errors import CollectorError
from collector.lifecycle.compression import LAYOUT as COMPRESSED_TABLES
from collector.lifecycle.compression import horizons as compression_ages
from collector.lifecycle.edition import HYPERTABLES, Edition, detect
from collector.lifecycle.jobs import job_states
from collector.lifecycle.runner import lifecycle_jobs
from collector.names import fetch_names
from collector.settings import Settings, mqtt_password
from collector.streams import concurrent_streams

from .report import Report, iso, seconds_text

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# TimescaleDB numbers its own jobs (telemetry, job history retention) below 1000, policies and
# user jobs from 1000 on.
_FIRST_USER_JOB = 1000


@dataclass
class Context:
    """What a probe may look at: the settings, the time-series database, the edition, the report."""

    settings: Settings
    conn: asyncpg.Connection
    edition: Edition
    report: Report


Probe = Callable[[Context], Awaitable[None]]
PROBES: dict[str, Probe] = {}


def probe(name: str) -> Callable[[Probe], Probe]:
    """Register a probe of the time-series database under ``name`` (unique)."""

    def add(fn: Probe) -> Probe:
        if name in PROBES:
            raise ValueError(f"doctor probe {name!r} is registered twice")
        PROBES[name] = fn
        return fn

    return add


def _db_kwargs(settings: Settings, kind: str) -> dict[str, Any]:
    from collector.service import db_kwargs

    kwargs = db_kwargs(settings, kind)
    kwargs["server_settings"] = {"application_name": "sensormine-doctor"}
    return kwargs


async def _migrations(settings: Settings, report: Report) -> None:
    out: dict[str, Any] = {}
    for kind in migrations.KINDS:
        kwargs = _db_kwargs(settings, kind)
        try:
            states = await migrations.status(kwargs["dsn"], kind, connect_kwargs=kwargs)
        except CollectorError as exc:
            out[kind] = {"reachable": False, "error": str(exc)}
            report.problems.append(f"{kind} database: {exc}")
            continue
        pending = [f"{s.version:04d}_{s.name}" for s in states if not s.applied]
        out[kind] = {"reachable": True, "pending_migrations": pending}
        if pending:
            report.problems.append(
                f"{kind} database: migrations pending ({', '.join(pending)}): run "
                "`sensormine-collector migrate` or start the collector with migrate_on_start"
            )
    report.data["databases"] = out


def _chunk_interval(settings: Settings, table: str) -> float:
    short = ("telemetry", "telemetry_text", "events")
    return settings.timeseries.chunk_interval * (1 if table in short else 7)


@probe("hypertables")
async def _hypertables(ctx: Context) -> None:
    conn, report = ctx.conn, ctx.report
    rows = await conn.fetch(
        """
        SELECT h.hypertable_name AS name,
               hypertable_size(format('%I.%I', h.hypertable_schema, h.hypertable_name)::regclass) AS bytes,
               count(c.chunk_name) AS chunks,
               count(c.chunk_name) FILTER (WHERE c.is_compressed) AS compressed_chunks,
               min(c.range_start) AS oldest, max(c.range_end) AS newest
        FROM timescaledb_information.hypertables h
        LEFT JOIN timescaledb_information.chunks c
          ON c.hypertable_schema = h.hypertable_schema AND c.hypertable_name = h.hypertable_name
        GROUP BY h.hypertable_schema, h.hypertable_name
        ORDER BY h.hypertable_name
        """
    )
    tables: dict[str, Any] = {}
    for r in rows:
        entry: dict[str, Any] = {
            "chunks": int(r["chunks"]),
            "size_bytes": int(r["bytes"] or 0),
            "oldest_chunk_start": iso(r["oldest"]),
            "newest_chunk_end": iso(r["newest"]),
            "compressed_chunks": int(r["compressed_chunks"]),
            "compression_ratio": None,
        }
        if r["compressed_chunks"]:
            stats = await conn.fetchrow(
                "SELECT sum(before_compression_total_bytes) AS before, "
                "sum(after_compression_total_bytes) AS after "
                "FROM hypertable_compression_stats($1::regclass)",
                r["name"],
            )
            if stats is not None and stats["after"]:
                entry["compression_ratio"] = round(
                    float(stats["before"]) / float(stats["after"]), 2
                )
        tables[r["name"]] = entry
    missing = [t for t in HYPERTABLES if t not in tables]
    if missing:
        report.problems.append(f"hypertables missing: {', '.join(missing)}")
    report.data["hypertables"] = tables


@probe("layout")
async def _layout(ctx: Context) -> None:
    progress = await layout.status(ctx.conn)
    ctx.report.data["layout_move"] = None if progress is None else progress.line()
    if progress is not None:
        ctx.report.problems.append(
            f"storage: readings of the first layout are still being moved ({progress.line()}); "
            "rollups wait until it is done: run `sensormine-collector migrate` or keep a "
            "collector running"
        )


async def _native_policies(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT job_id, hypertable_name, proc_name, schedule_interval, config::text AS config, "
        "next_start FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL"
    )
    return {
        (r["hypertable_name"], r["proc_name"]): {
            **json.loads(r["config"] or "{}"),
            "job_id": int(r["job_id"]),
            "schedule_interval": seconds_text(r["schedule_interval"].total_seconds()),
            "next_start": iso(r["next_start"]),
        }
        for r in rows
    }


async def _same_interval(conn: asyncpg.Connection, text: Any, seconds: float) -> bool:
    # A policy's config holds the interval as text ("90 days"): let PostgreSQL compare.
    return bool(
        await conn.fetchval(
            "SELECT $1::text::interval = make_interval(secs => $2)", str(text), seconds
        )
    )


@probe("retention")
async def _retention(ctx: Context) -> None:
    conn, settings, report = ctx.conn, ctx.settings, ctx.report
    lc = settings.lifecycle
    enabled = lc.enabled and lc.retention.enabled
    policies = await _native_policies(conn) if ctx.edition.native_policies else {}
    states = await job_states(conn)
    last = states.get("retention")
    live: dict[str, Any] = (last.last_detail.get("horizons") or {}) if last else {}
    out: dict[str, Any] = {
        "enabled": enabled,
        "mode": "collector job `retention` (drop_chunks), both editions",
        "interval": seconds_text(lc.retention.interval),
        "last_run": None if last is None else iso(last.last_finished),
        "tables": {},
    }
    for table, horizon in lc.retention.horizons().items():
        # Whole chunks are dropped when wholly past the horizon, by a job that runs every
        # interval: data may outlive the horizon by one chunk plus one interval (and a margin).
        slack = _chunk_interval(settings, table) + lc.retention.interval + 300
        oldest = await conn.fetchval(
            "SELECT extract(epoch FROM now() - min(range_start)) "
            "FROM timescaledb_information.chunks WHERE hypertable_name = $1",
            table,
        )
        applied = live.get(table)
        data_age = await _oldest_data_age(conn, table) if oldest is not None else None
        entry: dict[str, Any] = {
            "configured": seconds_text(horizon),
            "live": None if applied is None else seconds_text(float(applied)),
            "oldest_chunk_age_days": None if oldest is None else round(float(oldest) / 86400, 2),
            "oldest_data_age_days": None if data_age is None else round(data_age / 86400, 2),
        }
        policy = policies.get((table, "policy_retention"))
        if policy is not None:
            entry["native_policy"] = policy
            if not await _same_interval(conn, policy.get("drop_after"), horizon):
                report.problems.append(
                    f"retention: {table} has a native TimescaleDB policy dropping after "
                    f"{policy.get('drop_after')} while the settings say {seconds_text(horizon)} "
                    "(the collector's `retention` job removes such policies when it runs)"
                )
        if enabled and applied is not None and float(applied) != horizon:
            report.problems.append(
                f"retention: {table} is configured to keep {seconds_text(horizon)} but the last "
                f"run kept {seconds_text(float(applied))}: restart the collectors to apply the "
                "settings (they take effect at the next start)"
            )
        if enabled and oldest is not None and float(oldest) > horizon + slack:
            report.problems.append(
                f"retention: {table} holds a chunk {float(oldest) / 86400:.1f} days old, past its "
                f"{seconds_text(horizon)} horizon by more than a chunk and a job interval: "
                "retention is not running"
            )
        out["tables"][table] = entry
    report.data["retention"] = out


async def _oldest_data_age(conn: asyncpg.Connection, table: str) -> float | None:
    """Seconds since the oldest row of ``table`` (its oldest chunk's start is not the data's:
    a 7-day chunk of a database made 15 minutes ago starts days ago). Looked up in the oldest
    chunk's time range only, compressed or not, within 2 s; ``None`` if that is not enough."""
    row = await conn.fetchrow(
        "SELECT d.column_name, c.range_start, c.range_end"
        " FROM timescaledb_information.chunks c JOIN timescaledb_information.dimensions d"
        " ON d.hypertable_name = c.hypertable_name AND d.hypertable_schema = c.hypertable_schema"
        " AND d.dimension_number = 1"
        " WHERE c.hypertable_name = $1 ORDER BY c.range_start LIMIT 1",
        table,
    )
    if row is None:
        return None
    column = str(row["column_name"]).replace('"', '""')
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = '2s'")
            age = await conn.fetchval(
                f'SELECT extract(epoch FROM now() - min("{column}")) FROM {table}'
                f' WHERE "{column}" >= $1 AND "{column}" < $2',
                row["range_start"],
                row["range_end"],
            )
    except asyncpg.QueryCanceledError:
        return None
    return None if age is None else float(age)


@probe("compression")
async def _compression(ctx: Context) -> None:
    conn, settings, report, edition = ctx.conn, ctx.settings, ctx.report, ctx.edition
    lc = settings.lifecycle
    c = lc.compression
    out: dict[str, Any] = {
        "available": edition.native_policies,
        "enabled": lc.enabled and c.enabled,
        "after": seconds_text(c.after),
        "metrics_after": seconds_text(c.metrics_after),
        "interval": seconds_text(c.interval),
        "segment_by": {t: seg for t, (seg, _) in COMPRESSED_TABLES.items()},
        "order_by": {t: order for t, (_, order) in COMPRESSED_TABLES.items()},
    }
    if not edition.native_policies:
        out["status"] = f"skipped: not available on the {edition.license} edition"
        if out["enabled"]:
            report.notes.append(
                f"compression: skipped, the {edition.license} edition of TimescaleDB has none; "
                "readings stay uncompressed (install the community edition to compress)"
            )
        report.data["compression"] = out
        return
    policies = await _native_policies(conn)
    states = await job_states(conn)
    last = states.get("compression")
    live: dict[str, Any] = (last.last_detail.get("after") or {}) if last else {}
    tables: dict[str, Any] = {}
    for table, age in compression_ages(c).items():
        slack = _chunk_interval(settings, table) + c.interval + 300
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE NOT is_compressed AND range_end <= now() - make_interval(secs => $2)) AS overdue, "
            "count(*) FILTER (WHERE is_compressed) AS compressed "
            "FROM timescaledb_information.chunks WHERE hypertable_name = $1",
            table,
            age + slack,
        )
        assert row is not None
        applied = live.get(table)
        tables[table] = {
            "configured_after": seconds_text(age),
            "live_after": None if applied is None else seconds_text(float(applied)),
            "compressed_chunks": int(row["compressed"]),
            "overdue_chunks": int(row["overdue"]),
            "ratio": report.data.get("hypertables", {}).get(table, {}).get("compression_ratio"),
            "native_policy": policies.get((table, "policy_compression")),
        }
        if not out["enabled"]:
            continue
        if row["overdue"]:
            report.problems.append(
                f"compression: {table} has {row['overdue']} chunks older than "
                f"{seconds_text(age)} plus a chunk and a job interval still uncompressed: "
                "the `compression` job is not running or failing"
            )
        if applied is not None and float(applied) != age:
            report.problems.append(
                f"compression: {table} is configured to compress after {seconds_text(age)} but "
                f"the last run used {seconds_text(float(applied))}: restart the collectors"
            )
    out["tables"] = tables
    out["status"] = "collector job `compression`" if out["enabled"] else "off"
    report.data["compression"] = out


@probe("timescaledb_jobs")
async def _timescaledb_jobs(ctx: Context) -> None:
    """TimescaleDB's own background jobs: their last runs and recent errors."""
    conn, report, edition = ctx.conn, ctx.report, ctx.edition
    rows = await conn.fetch(
        """
        SELECT j.job_id, j.application_name, j.proc_name, j.hypertable_name, j.scheduled,
               j.schedule_interval, s.last_run_status, s.last_run_started_at,
               s.last_successful_finish, s.total_runs, s.total_failures, s.next_start,
               CASE WHEN isfinite(s.next_start) THEN extract(epoch FROM now() - s.next_start) END
                   AS overdue
        FROM timescaledb_information.jobs j
        LEFT JOIN timescaledb_information.job_stats s USING (job_id)
        ORDER BY j.job_id
        """
    )
    errors = await conn.fetch(
        "SELECT DISTINCT ON (job_id) job_id, finish_time, sqlerrcode, err_message "
        "FROM timescaledb_information.job_errors WHERE finish_time > now() - interval '1 day' "
        "ORDER BY job_id, finish_time DESC"
    )
    last_error = {int(e["job_id"]): e for e in errors}
    out: dict[str, Any] = {}
    builtin_failing: list[str] = []
    for r in rows:
        job_id = int(r["job_id"])
        err = last_error.get(job_id)
        name = f"{r['application_name']}" + (
            f" on {r['hypertable_name']}" if r["hypertable_name"] else ""
        )
        entry = {
            "job_id": job_id,
            "proc": r["proc_name"],
            "hypertable": r["hypertable_name"],
            "scheduled": bool(r["scheduled"]),
            "schedule_interval": seconds_text(r["schedule_interval"].total_seconds()),
            "last_run_status": r["last_run_status"],
            "last_run_started_at": iso(r["last_run_started_at"]),
            "total_runs": int(r["total_runs"] or 0),
            "total_failures": int(r["total_failures"] or 0),
            "next_start": iso(r["next_start"]),
            "last_error": None
            if err is None
            else f"{err['sqlerrcode'] or ''} {err['err_message'] or ''}".strip() or "(no message)",
        }
        out[name] = entry
        failed = r["last_run_status"] == "Failed"
        if job_id < _FIRST_USER_JOB and not edition.native_policies and failed:
            # Debian's Apache-2 build runs TimescaleDB's own housekeeping jobs, which the
            # license then refuses: nothing of the collector depends on them.
            builtin_failing.append(str(r["application_name"]))
            continue
        if not r["scheduled"]:
            continue
        if failed:
            report.problems.append(
                f"timescaledb job {name} (id {job_id}): last run failed"
                + (f": {entry['last_error']}" if entry["last_error"] else "")
                + f" ({entry['total_failures']} of {entry['total_runs']} runs failed)"
            )
        elif not entry["total_runs"] and r["overdue"] is not None:
            interval = r["schedule_interval"].total_seconds()
            if float(r["overdue"]) > max(interval, 300):
                report.problems.append(
                    f"timescaledb job {name} (id {job_id}): has never run, due "
                    f"{seconds_text(round(float(r['overdue'])))} ago: is the background worker "
                    "scheduler running (timescaledb.max_background_workers)?"
                )
    if builtin_failing:
        report.notes.append(
            f"timescaledb: its own jobs ({', '.join(builtin_failing)}) fail under the "
            f"{edition.license} license; the collector runs its own lifecycle jobs instead"
        )
    report.data["timescaledb_jobs"] = out


@probe("jobs")
async def _jobs(ctx: Context) -> None:
    conn, settings, report, edition = ctx.conn, ctx.settings, ctx.report, ctx.edition
    lc = settings.lifecycle
    pending = await layout.pending(conn)
    expected = lifecycle_jobs(edition, lc, layout_pending=pending) if lc.enabled else []
    states = await job_states(conn)
    out: dict[str, Any] = {}
    for job in expected:
        state = states.get(job.name)
        entry: dict[str, Any] = {"interval": seconds_text(job.interval)}
        if state is None or state.last_result == "never":
            entry["last_result"] = "never"
            report.problems.append(
                f"job {job.name}: has never run (is a collector with this configuration running?)"
            )
        else:
            entry.update(
                last_started=iso(state.last_started),
                last_finished=iso(state.last_finished),
                last_result=state.last_result,
                last_error=state.last_error,
                last_detail=state.last_detail,
                last_runner=state.last_runner,
                runs=state.runs,
                seconds_since_finished=None if state.age is None else round(state.age, 1),
            )
            if state.last_result == "error":
                report.problems.append(f"job {job.name}: last run failed: {state.last_error}")
            elif state.age is None:
                report.problems.append(f"job {job.name}: started but never finished")
            elif state.age > 2 * job.interval + 300:
                report.problems.append(
                    f"job {job.name}: last finished {seconds_text(round(state.age))} ago, every "
                    f"{seconds_text(job.interval)} expected (is a collector running?)"
                )
        out[job.name] = entry
    report.data["jobs"] = out
    r = lc.rollups
    dirty = await conn.fetchrow(
        "SELECT count(*) AS n, extract(epoch FROM now() - min(flushed_at)) AS age FROM ingest_dirty"
    )
    assert dirty is not None
    age = None if dirty["age"] is None else round(float(dirty["age"]), 1)
    report.data["rollups"] = {
        "enabled": lc.enabled and r.enabled,
        "periods": [seconds_text(p) for p in r.periods],
        "lag": seconds_text(r.lag),
        "dirty_ranges": int(dirty["n"]),
        "oldest_dirty_seconds": age,
        "waiting_for_layout_move": pending,
    }
    if lc.enabled and r.enabled and not pending and age is not None and age > max(10 * r.lag, 300):
        report.problems.append(
            f"rollups: {dirty['n']} dirty ranges waiting, the oldest {seconds_text(round(age))} old "
            f"(lag {seconds_text(r.lag)}): the rollup job is not keeping up or not running"
        )


@probe("ingest")
async def _ingest(ctx: Context) -> None:
    conn, settings, report = ctx.conn, ctx.settings, ctx.report
    last = await conn.fetchrow(
        "SELECT max(received_at) AS at, extract(epoch FROM now() - max(received_at)) AS age "
        "FROM ingest_ledger"
    )
    assert last is not None
    lag = await conn.fetchrow(
        "SELECT count(*) AS n, "
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - created)) AS p50, "
        "max(extract(epoch FROM received_at - created)) AS max "
        "FROM ingest_ledger WHERE received_at > now() - interval '15 minutes' AND created IS NOT NULL"
    )
    assert lag is not None
    report.data["ingest"] = {
        "last_batch_at": iso(last["at"]),
        "seconds_since_last_batch": None if last["age"] is None else round(float(last["age"]), 1),
        "batches_last_15m": int(lag["n"]),
        "lag_p50_seconds": None if lag["p50"] is None else round(float(lag["p50"]), 3),
        "lag_max_seconds": None if lag["max"] is None else round(float(lag["max"]), 3),
    }
    size = await conn.fetchrow(
        "SELECT (SELECT reltuples FROM pg_class WHERE oid = 'ingest_ledger'::regclass) AS estimate, "
        "pg_total_relation_size('ingest_ledger') AS bytes, "
        "extract(epoch FROM now() - (SELECT min(received_at) FROM ingest_ledger)) AS oldest"
    )
    assert size is not None
    estimate = float(size["estimate"])
    rows = (
        int(await conn.fetchval("SELECT count(*) FROM ingest_ledger"))
        if estimate < 1_000_000
        else int(estimate)
    )
    horizon = settings.lifecycle.ledger.horizon
    oldest = None if size["oldest"] is None else float(size["oldest"])
    report.data["ledger"] = {
        "rows": rows,
        "size_bytes": int(size["bytes"]),
        "oldest_row_age_days": None if oldest is None else round(oldest / 86400, 2),
        "horizon": seconds_text(horizon),
    }
    window = settings.validation.max_age + settings.validation.max_skew
    if horizon <= window:
        report.problems.append(
            f"ledger: horizon {seconds_text(horizon)} does not exceed validation.max_age + max_skew "
            f"({seconds_text(window)}): a batch resent after its ledger row is removed would be stored twice"
        )
    if (
        settings.lifecycle.enabled
        and oldest is not None
        and oldest > horizon + 2 * settings.lifecycle.ledger.interval + 300
    ):
        report.problems.append(
            f"ledger: rows {oldest / 86400:.1f} days old, past the {seconds_text(horizon)} horizon: "
            "the `ledger` job is not running"
        )
    rejects = await conn.fetch(
        "SELECT reason, count(*) AS messages, coalesce(sum(points), 0) AS points FROM ingest_rejects "
        "WHERE received_at > now() - interval '24 hours' GROUP BY reason ORDER BY count(*) DESC, reason"
    )
    report.data["rejects_24h"] = {
        r["reason"]: {"messages": int(r["messages"]), "points": int(r["points"])} for r in rejects
    }


@probe("gateways")
async def _gateways(ctx: Context) -> None:
    """Gateways whose batches come from two streams at once: one gateway id, two agents."""
    doubled = await concurrent_streams(ctx.conn)
    names = await fetch_names(ctx.settings) if doubled else None
    for entry in doubled:
        label = names.label(entry["gateway_id"]) if names else entry["gateway_id"]
        entry["name"] = names.name(entry["gateway_id"]) if names else None
        ctx.report.problems.append(
            f"gateway {label}: batches from {len(entry['streams'])} streams at once in the last"
            " 10 minutes: two agents run with this gateway id (a cloned SD card or agent.toml);"
            " give the clone its own gateway (gateways create, gateways provision)"
        )
    ctx.report.data["concurrent_streams"] = doubled


@probe("clocks")
async def _clocks(ctx: Context) -> None:
    """Gateways whose times are off the collector's clock beyond validation.clock_tolerance."""
    tolerance = ctx.settings.validation.clock_tolerance
    skewed = await gateway_skews(
        ctx.conn, _db_kwargs(ctx.settings, "metadata"), tolerance=tolerance
    )
    ctx.report.data["clocks"] = {"tolerance_s": tolerance, "skewed": skewed}
    for g in skewed:
        ctx.report.problems.append(f"clock skew: {describe(g)}")


@probe("quarantine")
async def _quarantine(ctx: Context) -> None:
    """What waits in quarantine, and quota scopes that are (nearly) full."""
    conn, settings, report = ctx.conn, ctx.settings, ctx.report
    held = await conn.fetch(
        "SELECT reason, count(*) AS rows, coalesce(sum(points), 0) AS points,"
        " extract(epoch FROM now() - min(received_at)) AS oldest"
        " FROM quarantine GROUP BY reason ORDER BY reason"
    )
    usage = await conn.fetch(
        "SELECT scope, id, bytes, refused_points FROM quarantine_usage"
        " WHERE bytes > 0 OR refused_points > 0 ORDER BY bytes DESC"
    )
    q = settings.quarantine
    report.data["quarantine"] = {
        "by_reason": {
            r["reason"]: {
                "rows": int(r["rows"]),
                "points": int(r["points"]),
                "oldest_days": round(float(r["oldest"]) / 86400, 2),
            }
            for r in held
        },
        "scopes": [
            {
                "scope": u["scope"],
                "id": str(u["id"]),
                "bytes": int(u["bytes"]),
                "quota": q.max_bytes_per_tenant
                if u["scope"] == "tenant"
                else q.max_bytes_per_unknown_gateway,
                "refused_points": int(u["refused_points"]),
            }
            for u in usage
        ],
    }
    for scope in report.data["quarantine"]["scopes"]:
        if scope["refused_points"]:
            report.problems.append(
                f"quarantine: {scope['scope']} {scope['id']} reached its quota of"
                f" {scope['quota']} bytes and {scope['refused_points']} readings were refused:"
                " replay or purge what waits (sensormine-collector quarantine list), or raise"
                " quarantine.max_bytes_per_*"
            )
        elif scope["bytes"] > 0.8 * scope["quota"]:
            report.problems.append(
                f"quarantine: {scope['scope']} {scope['id']} holds {scope['bytes']} of its"
                f" {scope['quota']}-byte quota (sensormine-collector quarantine list)"
            )


@probe("alerts")
async def _alerts(ctx: Context) -> None:
    """Open alerts; rules that reference unknown metrics, were never evaluated, or skipped
    readings; transitions stuck in the outbox."""
    try:
        meta = await asyncpg.connect(**_db_kwargs(ctx.settings, "metadata"))
    except _DB_ERRORS as exc:
        ctx.report.problems.append(f"alerts: cannot read the rules: {exc}")
        return
    try:
        section = await alert_report(meta, ctx.conn)
    finally:
        await meta.close()
    ctx.report.problems.extend(section.pop("problems"))
    ctx.report.data["alerts"] = section


def check_broker(settings: Settings, timeout: float) -> dict[str, Any]:
    """Connect to the broker as a throw-away client (never the collector's own client id)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    s = settings.mqtt
    result: dict[str, Any] = {"host": s.host, "port": s.port, "tls": s.tls}
    done = threading.Event()
    outcome: dict[str, Any] = {}
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"sensormine-doctor-{uuid.uuid4().hex[:10]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        outcome["reason"] = str(reason)
        outcome["ok"] = not reason.is_failure
        done.set()

    client.on_connect = on_connect
    try:
        if s.username is not None:
            client.username_pw_set(s.username, mqtt_password(s))
        if s.tls:
            client.tls_set_context(
                ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            )
        client.connect(s.host, s.port, keepalive=max(5, round(timeout) * 2))
        client.loop_start()
        if not done.wait(timeout):
            outcome = {"ok": False, "reason": f"no CONNACK within {timeout:g} s"}
        elif not outcome.get("ok"):
            # The broker answered: it is reachable, it refused the login.
            outcome["answered"] = True
    except (OSError, ssl.SSLError, ValueError, CollectorError) as exc:
        outcome = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if outcome.get("ok"):
            client.disconnect()
        client.loop_stop()
    result["reachable"] = bool(outcome.get("ok") or outcome.get("answered"))
    result["authorized"] = bool(outcome.get("ok"))
    result["detail"] = outcome.get("reason", "")
    return result


async def examine(settings: Settings, *, broker_timeout: float = 5.0) -> Report:
    """Look at the databases and the broker; return the report."""
    report = Report()
    await _migrations(settings, report)
    report.data["settings"] = {"lifecycle_enabled": settings.lifecycle.enabled}
    try:
        conn = await asyncpg.connect(**_db_kwargs(settings, "timeseries"))
    except _DB_ERRORS as exc:
        report.problems.append(f"timeseries database: cannot connect: {exc}")
        conn = None
    if conn is not None:
        current = "edition"
        try:
            edition = await detect(conn)
            report.data["timescaledb"] = {
                "license": edition.license,
                "version": edition.version,
                "edition": edition.name,
            }
            if edition.version == "not installed":
                report.problems.append(
                    "timeseries database: the timescaledb extension is not installed"
                )
            elif report.data["databases"]["timeseries"].get("pending_migrations") == []:
                ctx = Context(settings, conn, edition, report)
                for name, check in PROBES.items():
                    current = name
                    await check(ctx)
        except _DB_ERRORS as exc:
            report.problems.append(
                f"timeseries database: {current} query failed: {type(exc).__name__}: {exc}"
            )
        finally:
            await conn.close()
    broker = await asyncio.to_thread(check_broker, settings, broker_timeout)
    report.data["broker"] = broker
    if not broker["reachable"]:
        report.problems.append(
            f"broker {settings.mqtt.host}:{settings.mqtt.port} unreachable: {broker['detail']}"
        )
    elif not broker["authorized"]:
        report.problems.append(
            f"broker {settings.mqtt.host}:{settings.mqtt.port} refused the login:"
            f" {broker['detail']} (check mqtt.username and the password, and that"
            " `sensormine-collector broker sync` wrote the collectors' password file)"
        )
    return report
