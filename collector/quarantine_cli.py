"""``sensormine-collector quarantine``: list, show, replay and purge what waits in quarantine.

Every command reads the collector's configuration (``--config`` or
``$SENSORMINE_COLLECTOR_CONFIG``) and takes the same filters: ``--tenant``, ``--gateway``,
``--device``, ``--reason`` (repeatable), ``--since``/``--until`` (ISO 8601 times of receipt) and
``--id`` (repeatable). ``replay`` runs the matching rows through today's registry and schemas and
stores what now passes, exactly once; ``purge`` deletes rows for good and asks for ``--yes``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from collector.alerts.engine import AlertEngine
from collector.errors import CollectorError, DatabaseUnavailable
from collector.names import Names, fetch_names
from collector.quarantine import Filters, payload_preview, purge, replay, rows, summary
from collector.service import build_pipeline, build_registry, db_kwargs
from collector.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, Settings, load_settings
from collector.writer import write_items
from protocol import Reason
from service.cli import config_option

T = TypeVar("T")

_KNOWN_REASONS = sorted(r.value for r in Reason)


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-12-01T08:00:00Z)", param_hint=option
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _filters(
    tenant: uuid.UUID | None,
    gateway: uuid.UUID | None,
    device: uuid.UUID | None,
    reasons: tuple[str, ...],
    since: str | None,
    until: str | None,
    ids: tuple[int, ...],
) -> Filters:
    unknown = [r for r in reasons if r not in _KNOWN_REASONS]
    if unknown:
        raise click.BadParameter(
            f"unknown reason {', '.join(unknown)}; known: {', '.join(_KNOWN_REASONS)}",
            param_hint="--reason",
        )
    return Filters(
        tenant_id=tenant,
        gateway_id=gateway,
        device_id=device,
        reasons=tuple(sorted(set(reasons))),
        since=_time(since, "--since"),
        until=_time(until, "--until"),
        ids=ids,
    )


_CONFIG = config_option(
    DEFAULT_CONFIG_PATH, "Collector configuration file (TOML).", envvar=CONFIG_ENV
)


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The configuration option and the filters shared by the commands, as one ``filters``."""

    @functools.wraps(fn)
    def with_filters(
        tenant: uuid.UUID | None,
        gateway: uuid.UUID | None,
        device: uuid.UUID | None,
        reasons: tuple[str, ...],
        since: str | None,
        until: str | None,
        ids: tuple[int, ...],
        **rest: Any,
    ) -> Any:
        return fn(filters=_filters(tenant, gateway, device, reasons, since, until, ids), **rest)

    decorated: Callable[..., Any] = with_filters
    for option in reversed(
        [
            _CONFIG,
            click.option("--tenant", type=click.UUID, help="Only this tenant's rows."),
            click.option("--gateway", type=click.UUID, help="Only this gateway's rows."),
            click.option("--device", type=click.UUID, help="Only this device's rows."),
            click.option(
                "--reason",
                "reasons",
                multiple=True,
                help="Only rows quarantined for this reason code (repeatable).",
            ),
            click.option("--since", help="Only rows received at or after this ISO 8601 time."),
            click.option("--until", help="Only rows received before this ISO 8601 time."),
            click.option(
                "--id", "ids", type=int, multiple=True, help="Only this row id (repeatable)."
            ),
        ]
    ):
        decorated = option(decorated)
    return decorated


def _load(config_path: Path) -> Settings:
    try:
        return load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None


def _run(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def go() -> T:
        try:
            conn = await asyncpg.connect(**db_kwargs(settings, "timeseries"))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise click.ClickException(
                f"cannot connect to the time-series database: {exc}"
            ) from None
        try:
            return await work(conn)
        except asyncpg.UndefinedTableError:
            raise click.ClickException(
                "the time-series database has no quarantine table: run 'sensormine-collector migrate'"
            ) from None
        finally:
            await conn.close()

    return asyncio.run(go())


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


@click.group()
def quarantine() -> None:
    """Readings kept for a healable reason (unknown device, schema, clock...): list, replay, purge."""


@quarantine.command("list")
@_options
@click.option("--rows", "as_rows", is_flag=True, help="One line per row instead of a summary.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(config_path: Path, filters: Filters, as_rows: bool, limit: int, as_json: bool) -> None:
    """What waits in quarantine, grouped by tenant, gateway, device and reason."""
    settings = _load(config_path)
    if as_rows:
        found = _run(settings, lambda conn: rows(conn, filters, limit))
    else:
        found = _run(settings, lambda conn: summary(conn, filters))
    names = asyncio.run(fetch_names(settings)) if found else Names()
    data = [{k: _jsonable(v) for k, v in r.items()} for r in found]
    for r in data:
        for kind in ("tenant", "gateway", "device"):
            r[f"{kind}_name"] = names.name(r.get(f"{kind}_id"))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("quarantine: nothing matches")
        return
    for r in data:
        if as_rows:
            click.echo(
                f"{r['id']:>8}  {r['received_at']}  {r['reason']:<24} {r['kind']:<8}"
                f" gateway {names.label(r['gateway_id'])} device {names.label(r['device_id'])}"
                f" metric {r['metric'] or '-'}  {r['points']} readings"
            )
        else:
            click.echo(
                f"{r['reason']:<24} tenant {names.label(r['tenant_id'])}"
                f" gateway {names.label(r['gateway_id'])} device {names.label(r['device_id'])}:"
                f" {r['rows']} rows, {r['points']} readings, {r['bytes']} bytes,"
                f" {r['first_received']} .. {r['last_received']}"
            )


@quarantine.command()
@click.argument("row_id", type=int)
@_CONFIG
@click.option("--limit", type=click.IntRange(1, 100_000), default=20, show_default=True)
def show(row_id: int, config_path: Path, limit: int) -> None:
    """One row with its reason, message and (up to --limit of) its readings or entries."""
    settings = _load(config_path)

    async def work(conn: asyncpg.Connection) -> dict[str, Any] | None:
        row = await conn.fetchrow("SELECT * FROM quarantine WHERE id = $1", row_id)
        if row is None:
            return None
        out = {k: _jsonable(v) for k, v in dict(row).items() if k != "payload"}
        out["data"] = payload_preview(row["kind"], bytes(row["payload"]), limit)
        return out

    found = _run(settings, work)
    if found is None:
        raise click.ClickException(f"no quarantine row {row_id}")
    click.echo(json.dumps(found, indent=2, default=str))


@quarantine.command("replay")
@_options
@click.option(
    "--any-time",
    is_flag=True,
    help="Accept readings outside validation.max_age/max_skew (only once their times are known to be right).",
)
@click.option("--max-rows", type=click.IntRange(1), help="Stop after examining this many rows.")
def replay_(config_path: Path, filters: Filters, any_time: bool, max_rows: int | None) -> None:
    """Store what now passes the registry and schemas, exactly once; leave the rest."""
    settings = _load(config_path)
    s = settings

    async def work(conn: asyncpg.Connection) -> Any:
        registry = build_registry(s)
        try:
            await registry.start()
        except DatabaseUnavailable as exc:
            raise click.ClickException(str(exc)) from None
        try:
            pipeline = build_pipeline(s, registry)
            # Replayed readings are evaluated by the alert rules like ingested ones; a running
            # collector publishes what they raise or clear from the outbox.
            alerts = AlertEngine(registry, s.alerts, prefix=s.mqtt.prefix)
            if s.alerts.enabled:
                await alerts.load()
            write = functools.partial(write_items, alerts=alerts if s.alerts.enabled else None)
            return await replay(
                conn, pipeline, write, filters, check_time=not any_time, max_rows=max_rows
            )
        except DatabaseUnavailable as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await registry.close()

    report = _run(settings, work)
    click.echo(
        f"replay: examined {report.examined} rows; stored {report.readings_stored} readings"
        f" from {report.stored_rows} rows; {report.unchanged} rows unchanged,"
        f" {report.still_quarantined} re-quarantined, {report.refused} refused"
    )


@quarantine.command("purge")
@_options
@click.option("--yes", is_flag=True, help="Really delete: purged data cannot be replayed.")
def purge_(config_path: Path, filters: Filters, yes: bool) -> None:
    """Delete matching rows for good (needs at least one filter and --yes)."""
    if filters == Filters():
        raise click.UsageError("purge needs at least one filter (use --since 1970-01-01 for all)")
    if not yes:
        raise click.UsageError("purge deletes data for good: add --yes")
    settings = _load(config_path)
    n = _run(settings, lambda conn: purge(conn, filters))
    click.echo(f"purged {n} rows")
