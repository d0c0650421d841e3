"""``sensormine-collector tokens create|list|revoke``: the query API's per-tenant tokens."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from collector.api import tokens as store
from collector.errors import CollectorError
from collector.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_settings
from service.cli import config_option
from service.config import parse_duration

T = TypeVar("T")

_CONFIG = config_option(
    DEFAULT_CONFIG_PATH,
    "Collector configuration file (TOML); its [metadata] section names the database.",
    envvar=CONFIG_ENV,
)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _run(config_path: Path, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    from collector.service import db_kwargs

    try:
        settings = load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None

    async def go() -> T:
        try:
            conn = await asyncpg.connect(**db_kwargs(settings, "metadata"))
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise click.ClickException(f"cannot connect to the metadata database: {exc}") from None
        try:
            return await work(conn)
        except store.TokenError as exc:
            raise click.ClickException(str(exc)) from None
        except asyncpg.UndefinedTableError:
            raise click.ClickException(
                "the metadata database has no api_tokens table: run `sensormine-collector migrate`"
            ) from None
        finally:
            await conn.close()

    return asyncio.run(go())


async def _tenant_id(conn: asyncpg.Connection, tenant: str) -> uuid.UUID:
    try:
        ident: uuid.UUID | None = uuid.UUID(tenant)
    except ValueError:
        ident = None
    row = await conn.fetchrow(
        "SELECT id FROM tenants WHERE id = $1 OR name = $2",
        ident,
        tenant,
    )
    if row is None:
        raise store.TokenError(f"no tenant {tenant!r} (give its name or id)")
    return uuid.UUID(str(row["id"]))


def _as_dict(r: store.TokenRecord, tenant_name: str | None) -> dict[str, Any]:
    return {
        "id": str(r.id),
        "tenant_id": str(r.tenant_id),
        "tenant": tenant_name,
        "name": r.name,
        "token_prefix": r.token_prefix,
        "created_at": r.created_at.isoformat(),
        "created_by": r.created_by,
        "expires_at": r.expires_at.isoformat() if r.expires_at else None,
        "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
    }


@click.group("tokens")
def tokens() -> None:
    """Tokens of the query API (`sensormine-collector api`): one tenant each, stored hashed."""


@tokens.command("create")
@_CONFIG
@click.option("--tenant", required=True, help="The tenant the token reads (name or id).")
@click.option("--name", required=True, help="What the token is for, e.g. grafana or ops-laptop.")
@click.option(
    "--expires",
    default=None,
    metavar="DURATION",
    help="Validity, e.g. 90d or 12h (default: until revoked).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the token) instead.")
def create_command(
    config_path: Path, tenant: str, name: str, expires: str | None, as_json: bool
) -> None:
    """Make a token for one tenant and print it (it is shown only this once)."""
    expires_at = None
    if expires is not None:
        try:
            expires_at = datetime.now(UTC) + timedelta(seconds=parse_duration(expires))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--expires") from None

    async def work(conn: asyncpg.Connection) -> tuple[store.TokenRecord, str]:
        tenant_id = await _tenant_id(conn, tenant)
        return await store.create(conn, tenant_id, name, _actor(), expires_at)

    record, secret = _run(config_path, work)
    if as_json:
        click.echo(json.dumps({**_as_dict(record, tenant), "token": secret}, indent=2))
        return
    click.echo(secret)
    click.echo(
        f"token {record.name!r} [{record.id}] for tenant {tenant}: shown only now, keep it safe;"
        f" send it as 'Authorization: Bearer <token>'",
        err=True,
    )


@tokens.command("list")
@_CONFIG
@click.option("--tenant", default=None, help="Only this tenant's tokens (name or id).")
@click.option("--revoked", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(config_path: Path, tenant: str | None, revoked: bool, as_json: bool) -> None:
    """List tokens (never their secrets): id, tenant, name, first characters, dates."""

    async def work(
        conn: asyncpg.Connection,
    ) -> tuple[list[store.TokenRecord], dict[str, str]]:
        tenant_id = None if tenant is None else await _tenant_id(conn, tenant)
        names = {str(r["id"]): r["name"] for r in await conn.fetch("SELECT id, name FROM tenants")}
        return await store.listing(conn, tenant_id, revoked), names

    records, names = _run(config_path, work)
    if as_json:
        click.echo(
            json.dumps([_as_dict(r, names.get(str(r.tenant_id))) for r in records], indent=2)
        )
        return
    if not records:
        click.echo("no tokens")
        return
    click.echo(f"{'ID':<36}  {'TENANT':<16}  {'NAME':<20}  {'TOKEN':<14}  {'CREATED':<20}  STATE")
    for r in records:
        state = (
            f"revoked {r.revoked_at:%Y-%m-%d %H:%M}"
            if r.revoked_at
            else (f"expires {r.expires_at:%Y-%m-%d %H:%M}" if r.expires_at else "valid")
        )
        click.echo(
            f"{r.id!s:<36}  {names.get(str(r.tenant_id), str(r.tenant_id)):<16}  {r.name:<20}"
            f"  {r.token_prefix + '…':<14}  {r.created_at:%Y-%m-%d %H:%M:%S}  {state}"
        )


@tokens.command("revoke")
@_CONFIG
@click.argument("token")
def revoke_command(config_path: Path, token: str) -> None:
    """Revoke TOKEN (its id, the token itself, or its first characters as listed): refused at its next request."""
    record = _run(config_path, lambda conn: store.revoke(conn, token))
    click.echo(f"revoked token {record.name!r} [{record.id}]")
