"""``sensormine-collector doctor``: what the data lifecycle is doing, and what needs attention.

It reports the TimescaleDB edition and version, each hypertable's chunks and size (and its
compression ratio where compressed), the retention and rollup settings with when each job last
ran, ingest lag, the ledger's size, rejects by reason over the last 24 hours and whether the
broker accepts a connection. Every finding that needs an operator is a *problem*; the command
exits 1 when there is any, naming each. Facts that are fine but worth knowing (compression does
not exist on the Apache-2 edition) are *notes* and do not change the exit status.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import click

from collector import layout, migrations
from collector.errors import CollectorError
from collector.lifecycle.edition import HYPERTABLES, Edition, detect
from collector.lifecycle.jobs import job_states
from collector.lifecycle.runner import lifecycle_jobs
from collector.settings import DEFAULT_CONFIG_PATH, Settings, load_settings, mqtt_password

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def _seconds(value: float) -> str:
    """A duration for people: ``30s``, ``5m``, ``2h``, ``90d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


class Report:
    """The findings of one examination, as a JSON-ready mapping plus problems and notes."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        """Everything, with ``ok``, ``problems`` and ``notes`` first."""
        return {
            "ok": not self.problems,
            "problems": self.problems,
            "notes": self.notes,
            **self.data,
        }


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


async def _hypertables(conn: asyncpg.Connection, report: Report) -> None:
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
            "oldest_chunk_start": _iso(r["oldest"]),
            "newest_chunk_end": _iso(r["newest"]),
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


async def _layout(conn: asyncpg.Connection, report: Report) -> None:
    progress = await layout.status(conn)
    report.data["layout_move"] = None if progress is None else progress.line()
    if progress is not None:
        report.problems.append(
            f"storage: readings of the first layout are still being moved ({progress.line()}); "
            "rollups wait until it is done: run `sensormine-collector migrate` or keep a collector running"
        )


async def _policies(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT hypertable_name, proc_name, config::text AS config, next_start "
        "FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL"
    )
    return {
        (r["hypertable_name"], r["proc_name"]): {
            **json.loads(r["config"] or "{}"),
            "next_start": _iso(r["next_start"]),
        }
        for r in rows
    }


async def _retention_and_compression(
    conn: asyncpg.Connection, settings: Settings, edition: Edition, report: Report
) -> None:
    lc = settings.lifecycle
    policies = await _policies(conn) if edition.native_policies else {}
    tables = report.data.get("hypertables", {})
    retention: dict[str, Any] = {
        "enabled": lc.enabled and lc.retention.enabled,
        "mode": "native retention policies"
        if edition.native_policies
        else "collector job `retention` (drop_chunks)",
        "interval": _seconds(
            lc.policy_interval if edition.native_policies else lc.retention.interval
        ),
        "tables": {},
    }
    for table, horizon in lc.retention.horizons().items():
        # Whole chunks are dropped: data may outlive the horizon by one chunk plus a job interval.
        chunk = settings.timeseries.chunk_interval * (
            1 if table in ("telemetry", "telemetry_text", "events") else 7
        )
        slack = chunk + 2 * lc.retention.interval
        oldest = await conn.fetchval(
            "SELECT extract(epoch FROM now() - min(range_start)) "
            "FROM timescaledb_information.chunks WHERE hypertable_name = $1",
            table,
        )
        entry: dict[str, Any] = {
            "horizon": _seconds(horizon),
            "oldest_chunk_age_days": None if oldest is None else round(float(oldest) / 86400, 2),
        }
        if edition.native_policies:
            policy = policies.get((table, "policy_retention"))
            entry["native_policy"] = policy
            if retention["enabled"] and policy is None:
                report.problems.append(
                    f"retention: {table} has no native retention policy (the collector's `policies` job adds it)"
                )
        if retention["enabled"] and oldest is not None and float(oldest) > horizon + slack:
            report.problems.append(
                f"retention: {table} holds a chunk {float(oldest) / 86400:.1f} days old, past its "
                f"{_seconds(horizon)} horizon: retention is not running"
            )
        retention["tables"][table] = entry
    report.data["retention"] = retention

    compression: dict[str, Any] = {
        "available": edition.native_policies,
        "enabled": lc.enabled and lc.compression.enabled,
        "after": _seconds(lc.compression.after),
        "segment_by": "series_id",
        "order_by": "time DESC",
    }
    if not edition.native_policies:
        compression["status"] = f"skipped: not available on the {edition.license} edition"
        if compression["enabled"]:
            report.notes.append(
                f"compression: skipped, the {edition.license} edition of TimescaleDB has none; "
                "telemetry stays uncompressed (install the community edition to compress)"
            )
    else:
        policy = policies.get(("telemetry", "policy_compression"))
        compression["native_policy"] = policy
        ratio = tables.get("telemetry", {}).get("compression_ratio")
        compression["status"] = "policy active" if policy else "no policy"
        compression["telemetry_ratio"] = ratio
        if compression["enabled"] and policy is None:
            report.problems.append(
                "compression: telemetry has no compression policy (the collector's `policies` job adds it)"
            )
    report.data["compression"] = compression


async def _jobs(
    conn: asyncpg.Connection, settings: Settings, edition: Edition, report: Report
) -> None:
    lc = settings.lifecycle
    expected = lifecycle_jobs(edition, lc) if lc.enabled else []
    states = await job_states(conn)
    out: dict[str, Any] = {}
    for job in expected:
        state = states.get(job.name)
        entry: dict[str, Any] = {"interval": _seconds(job.interval)}
        if state is None or state.last_result == "never":
            entry["last_result"] = "never"
            report.problems.append(
                f"job {job.name}: has never run (is a collector with this configuration running?)"
            )
        else:
            entry.update(
                last_started=_iso(state.last_started),
                last_finished=_iso(state.last_finished),
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
                    f"job {job.name}: last finished {_seconds(round(state.age))} ago, every "
                    f"{_seconds(job.interval)} expected (is a collector running?)"
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
        "periods": [_seconds(p) for p in r.periods],
        "lag": _seconds(r.lag),
        "dirty_ranges": int(dirty["n"]),
        "oldest_dirty_seconds": age,
    }
    if lc.enabled and r.enabled and age is not None and age > max(10 * r.lag, 300):
        report.problems.append(
            f"rollups: {dirty['n']} dirty ranges waiting, the oldest {_seconds(round(age))} old "
            f"(lag {_seconds(r.lag)}): the rollup job is not keeping up or not running"
        )


async def _ingest(conn: asyncpg.Connection, settings: Settings, report: Report) -> None:
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
        "last_batch_at": _iso(last["at"]),
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
        "horizon": _seconds(horizon),
    }
    window = settings.validation.max_age + settings.validation.max_skew
    if horizon <= window:
        report.problems.append(
            f"ledger: horizon {_seconds(horizon)} does not exceed validation.max_age + max_skew "
            f"({_seconds(window)}): a batch resent after its ledger row is removed would be stored twice"
        )
    if (
        settings.lifecycle.enabled
        and oldest is not None
        and oldest > horizon + 2 * settings.lifecycle.ledger.interval + 300
    ):
        report.problems.append(
            f"ledger: rows {oldest / 86400:.1f} days old, past the {_seconds(horizon)} horizon: "
            "the `ledger` job is not running"
        )
    rejects = await conn.fetch(
        "SELECT reason, count(*) AS messages, coalesce(sum(points), 0) AS points FROM ingest_rejects "
        "WHERE received_at > now() - interval '24 hours' GROUP BY reason ORDER BY count(*) DESC, reason"
    )
    report.data["rejects_24h"] = {
        r["reason"]: {"messages": int(r["messages"]), "points": int(r["points"])} for r in rejects
    }
    await _quarantine(conn, settings, report)


async def _quarantine(conn: asyncpg.Connection, settings: Settings, report: Report) -> None:
    """What waits in quarantine, and quota scopes that are (nearly) full."""
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
    except (OSError, ssl.SSLError, ValueError, CollectorError) as exc:
        outcome = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if outcome.get("ok"):
            client.disconnect()
        client.loop_stop()
    result["reachable"] = bool(outcome.get("ok"))
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
                await _hypertables(conn, report)
                await _layout(conn, report)
                await _retention_and_compression(conn, settings, edition, report)
                await _jobs(conn, settings, edition, report)
                await _ingest(conn, settings, report)
        except _DB_ERRORS as exc:
            report.problems.append(
                f"timeseries database: query failed: {type(exc).__name__}: {exc}"
            )
        finally:
            await conn.close()
    broker = await asyncio.to_thread(check_broker, settings, broker_timeout)
    report.data["broker"] = broker
    if not broker["reachable"]:
        report.problems.append(
            f"broker {settings.mqtt.host}:{settings.mqtt.port} unreachable: {broker['detail']}"
        )
    return report


def render(report: dict[str, Any]) -> str:
    """The report as lines for a terminal."""
    out: list[str] = []
    ts = report.get("timescaledb")
    if ts:
        out.append(f"TimescaleDB {ts['version']}, license {ts['license']}: {ts['edition']}")
    for kind, db in report.get("databases", {}).items():
        state = "reachable" if db.get("reachable") else f"UNREACHABLE ({db.get('error')})"
        pending = db.get("pending_migrations")
        extra = f", pending migrations: {', '.join(pending)}" if pending else ""
        out.append(f"{kind} database: {state}{extra}")
    if "hypertables" in report:
        out.append("hypertables:")
        for name, t in report["hypertables"].items():
            ratio = f", compression {t['compression_ratio']}:1" if t["compression_ratio"] else ""
            compressed = f" ({t['compressed_chunks']} compressed)" if t["compressed_chunks"] else ""
            out.append(
                f"  {name:<24} {t['chunks']:>5} chunks{compressed}, {t['size_bytes'] / 1048576:.1f} MiB{ratio}"
            )
    if "retention" in report:
        r = report["retention"]
        state = "on" if r["enabled"] else "off"
        out.append(f"retention ({state}): {r['mode']}, every {r['interval']}")
        for name, t in r["tables"].items():
            age = t["oldest_chunk_age_days"]
            oldest = f"oldest chunk {age} days" if age is not None else "no chunks"
            out.append(f"  {name:<24} keep {t['horizon']:<6} {oldest}")
    if "compression" in report:
        c = report["compression"]
        out.append(f"compression: {c['status']} (after {c['after']}, segment by {c['segment_by']})")
    if "rollups" in report:
        r = report["rollups"]
        age = r["oldest_dirty_seconds"]
        out.append(
            f"rollups ({'on' if r['enabled'] else 'off'}): periods {', '.join(r['periods'])}, lag {r['lag']}; "
            f"{r['dirty_ranges']} dirty ranges waiting"
            + (f", oldest {age} s" if age is not None else "")
        )
    if "jobs" in report:
        out.append("jobs:")
        for name, j in report["jobs"].items():
            if j["last_result"] == "never":
                out.append(f"  {name:<10} every {j['interval']:<5} never ran")
                continue
            out.append(
                f"  {name:<10} every {j['interval']:<5} last {j['last_result']} at {j['last_finished']} "
                f"by {j['last_runner']} ({j['runs']} runs)"
            )
    if "ingest" in report:
        i = report["ingest"]
        since = i["seconds_since_last_batch"]
        last = f"{i['last_batch_at']} ({since} s ago)" if since is not None else "none yet"
        lag = (
            f"lag p50 {i['lag_p50_seconds']} s, max {i['lag_max_seconds']} s over {i['batches_last_15m']} batches in 15 min"
            if i["batches_last_15m"]
            else "no batches in the last 15 min"
        )
        out.append(f"ingest: last batch {last}; {lag}")
    if "ledger" in report:
        led = report["ledger"]
        out.append(
            f"ledger: {led['rows']} rows, {led['size_bytes'] / 1048576:.1f} MiB, horizon {led['horizon']}"
            + (
                f", oldest {led['oldest_row_age_days']} days"
                if led["oldest_row_age_days"] is not None
                else ""
            )
        )
    if "rejects_24h" in report:
        rejects = report["rejects_24h"]
        out.append("rejects in the last 24 h:" + ("" if rejects else " none"))
        for reason, r in rejects.items():
            out.append(f"  {reason:<26} {r['messages']} messages, {r['points']} readings")
    if "quarantine" in report:
        held = report["quarantine"]["by_reason"]
        out.append(
            "quarantine (sensormine-collector quarantine list):" + ("" if held else " empty")
        )
        for reason, r in held.items():
            out.append(
                f"  {reason:<26} {r['rows']} rows, {r['points']} readings, oldest {r['oldest_days']} days"
            )
    b = report.get("broker")
    if b:
        state = "reachable" if b["reachable"] else f"UNREACHABLE ({b['detail']})"
        out.append(f"broker {b['host']}:{b['port']}: {state}")
    for note in report["notes"]:
        out.append(f"note: {note}")
    if report["problems"]:
        out.append(f"NEEDS ATTENTION ({len(report['problems'])}):")
        out.extend(f"  - {p}" for p in report["problems"])
    else:
        out.append("all good")
    return "\n".join(out)


@click.command("doctor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    envvar="SENSORMINE_COLLECTOR_CONFIG",
    help="Collector configuration file (TOML).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--broker-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for the broker's CONNACK.",
)
def doctor(config_path: Path, as_json: bool, broker_timeout: float) -> None:
    """Report on the databases, the lifecycle jobs and the broker; exit 1 if something needs attention.

    Shows the TimescaleDB edition, hypertables with chunk counts and sizes, compression, retention
    and rollup settings with each job's last run, ingest lag, ledger size, rejects by reason over
    the last 24 h and broker connectivity. Every problem is listed under NEEDS ATTENTION.
    """
    try:
        settings = load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    report = asyncio.run(examine(settings, broker_timeout=broker_timeout)).as_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(render(report))
    if report["problems"]:
        raise SystemExit(1)
