"""``sensormine-collector``: run the collector, migrate its databases, report ingest status."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import click
import structlog

from collector import __version__, layout, migrations
from collector.admin.cli import register as register_admin
from collector.alerts.report import alert_report
from collector.alerts.report import render as render_alerts
from collector.api.command import api as api_command
from collector.api.tokens_cli import tokens as tokens_group
from collector.clock_skew import describe, gateway_skews
from collector.doctor.command import doctor
from collector.errors import CollectorError
from collector.filecheck import check_files, current_account, default_account, find_account
from collector.names import fetch_names
from collector.quarantine_cli import quarantine as quarantine_group
from collector.service import Collector, db_kwargs, migrate_all
from collector.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, Settings, load_settings
from collector.streams import concurrent_streams
from collector.watch import watch
from service.cli import config_option
from service.logs import configure_logging

_CONFIG = config_option(
    DEFAULT_CONFIG_PATH, "Collector configuration file (TOML).", envvar=CONFIG_ENV
)


def _load(config_path: Path) -> Settings:
    try:
        return load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sensormine-collector")
def main() -> None:
    """Sensormine collector: MQTT batches into TimescaleDB, exactly once.

    \b
    Environment:
      SENSORMINE_COLLECTOR_CONFIG      configuration file (instead of --config)
      SENSORMINE_COLLECTOR__<SECTION>__<KEY>
                                       overrides one key, e.g.
                                       SENSORMINE_COLLECTOR__MQTT__HOST=broker.example
      SENSORMINE_MQTT_PASSWORD         the broker password, when mqtt.password_file
                                       is not set
      SENSORMINE_METADATA_PASSWORD     metadata database password
      SENSORMINE_TIMESERIES_PASSWORD   time-series database password
      CREDENTIALS_DIRECTORY            systemd credentials: mqtt-password,
                                       metadata-password, timeseries-password
    """


@main.command()
@_CONFIG
def run(config_path: Path) -> None:
    """Consume batches until SIGTERM/SIGINT, then drain (flush, commit, ack) and exit 0."""
    settings = _load(config_path)
    # A file it cannot read stops it here, before it migrates or connects anywhere.
    missing = [
        p for p in check_files(settings, config_path, current_account()) if p.severity == "error"
    ]
    if missing:
        raise click.ClickException("\n".join(f"{config_path}: {p}" for p in missing))
    configure_logging(settings.log.level, settings.log.format)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Collector(settings).run(stop)

    try:
        asyncio.run(serve())
    except CollectorError as exc:
        structlog.get_logger("collector").error("collector.failed", error=str(exc))
        raise click.ClickException(str(exc)) from None


@main.command()
@_CONFIG
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="List applied and pending migrations; change nothing.",
)
@click.option(
    "--skip-layout-move",
    "skip_layout",
    is_flag=True,
    help="Leave readings of the old storage layout for the collectors' `layout` job to move.",
)
def migrate(config_path: Path, show_status: bool, skip_layout: bool) -> None:
    """Apply pending migrations to the metadata and time-series databases.

    Then move readings still in the first storage layout (telemetry_v1) into the series catalog
    and narrow tables, printing progress; safe to interrupt and run again, it goes on where it
    stopped.
    """
    settings = _load(config_path)
    configure_logging(settings.log.level, "console" if sys.stderr.isatty() else settings.log.format)

    async def go() -> None:
        if show_status:
            for db in migrations.KINDS:
                kwargs = db_kwargs(settings, db)
                states = await migrations.status(kwargs["dsn"], db, connect_kwargs=kwargs)
                for st in states:
                    when = (
                        st.applied_at.isoformat(timespec="seconds") if st.applied_at else "pending"
                    )
                    click.echo(f"{db:<10} {st.version:04d}_{st.name:<30} {when}")
            return
        done = await migrate_all(settings)
        for kind, versions in done.items():
            applied = ", ".join(f"{v:04d}" for v in versions) or "nothing pending"
            click.echo(f"{kind}: {applied}")
        if not skip_layout:
            await move_layout(settings)

    try:
        asyncio.run(go())
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None


async def move_layout(settings: Settings) -> None:
    """Move what is left of the first storage layout, a slice per transaction, with progress."""
    kwargs = db_kwargs(settings, "timeseries")
    try:
        conn = await asyncpg.connect(**kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise CollectorError(f"cannot connect to the time-series database: {exc}") from None
    try:
        if not await layout.pending(conn):
            return
        click.echo("timeseries: moving readings of the first storage layout (resumable)")
        last = [0.0]

        def show(p: layout.Progress) -> None:
            if time.monotonic() - last[0] >= 2.0:
                last[0] = time.monotonic()
                click.echo(p.line())

        while True:
            done = await layout.move(conn, on_progress=show)
            if done.get("locked"):
                click.echo("another collector is moving the layout; waiting for it")
                await asyncio.sleep(5)
                continue
            break
        progress = await layout.status(conn)
        click.echo(
            "timeseries: layout move finished"
            if progress is None
            else f"timeseries: layout move not finished: {progress.line()}"
        )
    except asyncpg.PostgresError as exc:
        raise CollectorError(f"layout move failed (run migrate again to resume): {exc}") from None
    finally:
        await conn.close()


async def read_status(settings: Settings) -> dict[str, Any]:
    """Ledger totals, the last batch per gateway and rejects by reason, from the time-series database."""
    kwargs = db_kwargs(settings, "timeseries")
    try:
        conn = await asyncpg.connect(**kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise CollectorError(f"cannot connect to the time-series database: {exc}") from None
    try:
        totals = await conn.fetchrow(
            "SELECT count(*) AS batches, coalesce(sum(accepted), 0) AS accepted,"
            " coalesce(sum(quarantined), 0) AS quarantined,"
            " coalesce(sum(rejected), 0) AS rejected FROM ingest_ledger"
        )
        held = await conn.fetch(
            "SELECT reason, count(*) AS n, coalesce(sum(points), 0) AS points,"
            " coalesce(sum(bytes), 0) AS bytes FROM quarantine GROUP BY reason ORDER BY reason"
        )
        by_result = await conn.fetch(
            "SELECT result, count(*) AS n FROM ingest_ledger GROUP BY result ORDER BY result"
        )
        gateways = await conn.fetch(
            "SELECT DISTINCT ON (gateway_id) gateway_id, stream, seq, result, received_at FROM ingest_ledger ORDER BY gateway_id, received_at DESC"
        )
        rejects = await conn.fetch(
            "SELECT reason, count(*) AS batches, coalesce(sum(points), 0) AS points FROM ingest_rejects GROUP BY reason ORDER BY reason"
        )
        doubled = await concurrent_streams(conn)
        alerts = await _alerts(settings, conn)
        clocks = await gateway_skews(
            conn,
            db_kwargs(settings, "metadata"),
            tolerance=settings.validation.clock_tolerance,
        )
    finally:
        await conn.close()
    names = await fetch_names(settings)
    for entry in doubled:
        entry["name"] = names.name(entry["gateway_id"])
    return {
        "ledger": {
            "batches": int(totals["batches"]),
            "accepted": int(totals["accepted"]),
            "quarantined": int(totals["quarantined"]),
            "rejected": int(totals["rejected"]),
            "by_result": {r["result"]: int(r["n"]) for r in by_result},
        },
        "quarantine": [
            {
                "reason": r["reason"],
                "rows": int(r["n"]),
                "points": int(r["points"]),
                "bytes": int(r["bytes"]),
            }
            for r in held
        ],
        "gateways": [
            {
                "gateway_id": str(g["gateway_id"]),
                "name": names.name(g["gateway_id"]),
                "stream": str(g["stream"]),
                "seq": int(g["seq"]),
                "result": g["result"],
                "received_at": g["received_at"].isoformat(),
            }
            for g in gateways
        ],
        "rejects": [
            {"reason": r["reason"], "messages": int(r["batches"]), "points": int(r["points"])}
            for r in rejects
        ],
        "concurrent_streams": doubled,
        "alerts": alerts,
        "clock_tolerance_s": settings.validation.clock_tolerance,
        "clocks": clocks,
    }


async def _alerts(settings: Settings, ts: asyncpg.Connection) -> dict[str, Any] | None:
    """The alert section, or ``None`` when the metadata database cannot be read."""
    try:
        meta = await asyncpg.connect(**db_kwargs(settings, "metadata"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        return await alert_report(meta, ts)
    finally:
        await meta.close()


@main.command()
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_path: Path, as_json: bool) -> None:
    """Show ledger totals, the last batch of each gateway, rejects by reason, open alerts and the
    gateways whose clocks are off the collector's beyond validation.clock_tolerance (by name)."""
    settings = _load(config_path)
    try:
        report = asyncio.run(read_status(settings))
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    ledger = report["ledger"]
    click.echo(
        f"ledger: {ledger['batches']} batches, {ledger['accepted']} readings stored,"
        f" {ledger['quarantined']} quarantined, {ledger['rejected']} refused"
    )
    for result, n in ledger["by_result"].items():
        click.echo(f"  {result:<10} {n}")
    click.echo("last batch per gateway:")
    for g in report["gateways"]:
        click.echo(
            f"  {_named(g['name'], g['gateway_id'])}  stream {g['stream']} seq {g['seq']}"
            f" {g['result']} at {g['received_at']}"
        )
    if report["concurrent_streams"]:
        click.echo("TWO AGENTS WITH ONE GATEWAY ID (batches from two streams at once):")
        for g in report["concurrent_streams"]:
            streams = ", ".join(f"{s} ({n} batches)" for s, n in g["streams"].items())
            click.echo(f"  {_named(g['name'], g['gateway_id'])}: {streams}")
    click.echo("quarantine by reason (sensormine-collector quarantine list):")
    for r in report["quarantine"]:
        click.echo(
            f"  {r['reason']:<26} {r['rows']} rows, {r['points']} readings, {r['bytes']} bytes"
        )
    click.echo("refused by reason:")
    for r in report["rejects"]:
        click.echo(f"  {r['reason']:<26} {r['messages']} messages, {r['points']} readings")
    if report["alerts"] is None:
        click.echo("alerts: unknown (the metadata database cannot be reached)")
    else:
        for line in render_alerts(report["alerts"]):
            click.echo(line)
    click.echo(
        f"gateway clocks beyond {report['clock_tolerance_s']:g} s (last 15 min):"
        + ("" if report["clocks"] else " none")
    )
    for g in report["clocks"]:
        click.echo(f"  {describe(g)}")


def _named(name: str | None, ident: str) -> str:
    return f"{name} [{ident}]" if name else ident


@main.command("check-config")
@_CONFIG
@click.option(
    "--user",
    default=None,
    metavar="NAME",
    help="Judge access to the files for this account (default: the service's user sensormine"
    " when it exists and you are root, else you).",
)
def check_config(config_path: Path, user: str | None) -> None:
    """Validate the configuration file (and environment overrides) without connecting anywhere.

    Also checks that the configuration file and every file it names (password files, TLS
    files) exist and that the service's user can read them; each problem is one line on
    stderr, and any error makes the exit status 1.
    """
    settings = _load(config_path)
    account = default_account() if user is None else find_account(user)
    if account is None:
        raise click.ClickException(f"--user {user}: no such user")
    problems = check_files(settings, config_path, account)
    for problem in problems:
        click.echo(f"{problem.severity}: {config_path}: {problem}", err=True)
    if any(p.severity == "error" for p in problems):
        raise click.ClickException(
            f"{config_path}: files checked as user {account.name} (uid {account.uid}): not valid"
        )
    click.echo(f"{config_path}: ok (files checked as user {account.name})")
    click.echo(f"  metadata:   {settings.metadata.redacted()}")
    click.echo(f"  timeseries: {settings.timeseries.redacted()}")
    click.echo(
        f"  mqtt:       {settings.mqtt.host}:{settings.mqtt.port} prefix {settings.mqtt.prefix} group {settings.mqtt.group}"
    )


# Quarantine: list, show, replay, purge.
main.add_command(quarantine_group)

# Registry administration: tenants, gateways, schemas, device-types, devices, alert-rules, seed.
register_admin(main)

# Frames of a prefix, tenant or gateway, decoded.
main.add_command(watch)

# The query API and status page, and its per-tenant tokens.
main.add_command(api_command)
main.add_command(tokens_group)

# Data lifecycle report: edition, chunks, jobs, ingest lag, ledger, rejects, broker.
main.add_command(doctor)
