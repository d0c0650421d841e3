"""The registry's administration commands of ``sensormine-collector``.

``tenants``, ``gateways``, ``schemas``, ``device-types``, ``devices`` and ``alert-rules`` manage
the metadata database: their ``list``, ``show``, ``create``, ``update``, ``delete``, ``enable``
and ``disable`` are generated from the table of kinds (:mod:`collector.admin.kinds`); what is
specific to one kind is written here by hand (``gateways provision`` writes a gateway's
``agent.toml``, ``schemas check``/``create``/``add-version``/``show``, ``device-types
history``); ``seed`` applies a seed file. Each command connects to the metadata database named
by the collector's configuration (``--config`` or ``$SENSORMINE_COLLECTOR_CONFIG``, with its
environment overrides). :data:`COMMANDS` lists them for the collector's click group.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import click

from collector.admin import pki
from collector.admin.broker import CERT_PORT, PASSWORD_PORT
from collector.admin.credentials import (
    GATEWAY_CREDENTIALS,
    CaAccess,
    ensure_private_dir,
    gateway_files,
    issue_certificate,
    pki_options,
    read_csr,
    write_public,
    write_secret,
)
from collector.admin.identity import issue_password
from collector.admin.kinds import KINDS, REQUIRED, Field, Kind
from collector.admin.pki import CLIENT_DAYS
from collector.admin.provision import (
    DEFAULT_BUFFER_PATH,
    BrokerAddress,
    GatewayCredential,
    provision,
)
from collector.admin.schemafile import SchemaFileError, load_schema_file, metrics_of
from collector.admin.seed import DEMO_SEED, apply_seed, load_seed
from collector.admin.store import RegistryStore, Row, connect
from collector.errors import CollectorError
from collector.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, Settings, load_settings
from service.cli import config_option
from service.config import parse_duration

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[Any], Any]


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


_config_option = config_option(
    DEFAULT_CONFIG_PATH,
    "Collector configuration file (TOML); its [metadata] section names the database.",
    envvar=CONFIG_ENV,
)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def _tenant_option(required: bool = False) -> Callable[[F], F]:
    help_text = (
        "The tenant (name or id)."
        if required
        else "The tenant (name or id) in which names are looked up."
    )
    return click.option("--tenant", required=required, help=help_text)


def _actor_option(f: F) -> F:
    return click.option(
        "--actor",
        default=_default_actor,
        show_default="the OS user",
        help="Who makes the change (recorded in the audit log).",
    )(f)


def _id_option(f: F) -> F:
    return click.option("--id", "ident", help="Create with this UUID instead of a random one.")(f)


def _settings(config_path: Path) -> Settings:
    try:
        return load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None


def _metadata_kwargs(settings: Settings) -> dict[str, Any]:
    from collector.service import db_kwargs

    return db_kwargs(settings, "metadata")


def _run(
    config_path: Path,
    work: Callable[[RegistryStore], Awaitable[T]],
    actor: str = "",
    settings: Settings | None = None,
) -> T:
    settings = settings or _settings(config_path)

    async def go() -> T:
        async with connect(_metadata_kwargs(settings)) as conn:
            return await work(RegistryStore(conn, actor))

    try:
        return asyncio.run(go())
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    raise TypeError(f"cannot show {type(value).__name__}")


def to_json(value: Any) -> str:
    """JSON text of rows (ids and times as text, durations as ``"300s"``)."""
    return json.dumps(value, default=_plain, indent=2, ensure_ascii=False)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, default=_plain, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    return str(value)


def _table(rows: Sequence[Row], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_text(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _record(row: Row, skip: Sequence[str] = ()) -> None:
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            click.echo(f"{key}:")
            for item in value:
                click.echo("  - " + ", ".join(f"{k}={_text(v)}" for k, v in item.items()))
        else:
            click.echo(f"{key}: {_text(value)}")


def _show(row: Row, as_json: bool, skip: Sequence[str] = ()) -> None:
    if as_json:
        click.echo(to_json(row))
    else:
        _record(row, skip)


def _listing(rows: list[Row], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        click.echo(to_json(rows))
    else:
        _table(rows, columns)


def _done(what: str, row: Row, as_json: bool = False) -> None:
    if as_json:
        click.echo(to_json(row))
    else:
        click.echo(f"{what} {row['name']} {row['id']}")


def _document(path: Path) -> dict[str, Any]:
    try:
        return load_schema_file(path)
    except SchemaFileError as exc:
        raise click.ClickException(str(exc)) from None


def _read(field: Field, text: Any) -> Any:
    """An option's value as the store takes it: a duration in seconds, a JSON object."""
    if field.value == "duration":
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=field.flag) from None
    if field.value == "json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc.msg}", param_hint=field.flag) from None
        if not isinstance(value, dict):
            raise click.BadParameter("must be a JSON object", param_hint=field.flag)
        return value
    return text


# --- the commands every kind has, generated from its row of the table -------------------------


def _field_option(field: Field, updating: bool) -> Callable[[F], F]:
    help_text = field.update_help if updating and field.update_help is not None else field.help
    kwargs: dict[str, Any] = {"help": help_text or None}
    if field.choices:
        kwargs["type"] = click.Choice(field.choices)
    elif field.value == "float":
        kwargs["type"] = float
    if not updating and field.default is REQUIRED:
        kwargs["required"] = True
    elif not updating and field.shown_default is not None:
        kwargs.update(default=field.shown_default, show_default=True)
    return click.option(field.flag, field.name, **kwargs)


def _clear_option(field: Field) -> Callable[[F], F]:
    return click.option(
        f"--no-{field.flag[2:]}", f"no_{field.name}", is_flag=True, help=field.clear_help
    )


def _given(fields: Sequence[Field], params: dict[str, Any]) -> Row:
    """The fields given on the command line (a ``--no-<field>`` flag: ``None``)."""
    given: Row = {}
    for field in fields:
        value, cleared = params.get(field.name), params.get(f"no_{field.name}", False)
        if value is not None and cleared:
            raise click.UsageError(f"{field.flag} and --no-{field.flag[2:]} exclude each other")
        if cleared:
            given[field.name] = None
        elif value is not None:
            given[field.name] = _read(field, value)
    return given


def _command(
    name: str, help_text: str, callback: Callable[..., None], options: Sequence[Decorator]
) -> click.Command:
    for decorate in reversed(options):
        callback = decorate(callback)
    return click.command(name, help=help_text)(callback)


def kind_group(kind: Kind) -> click.Group:
    """The command group of ``kind`` with the commands its row of the table asks for."""
    group = click.Group(kind.command, help=kind.help)
    ref = click.argument("ref", metavar=kind.metavar)
    scope = [_tenant_option()] if kind.owned else []
    audit = [_actor_option] if kind.audited else []
    fields = [f for f in kind.fields if f.on_cli and f.name != "name"]
    updatable = [f for f in kind.fields if f.on_cli and f.updatable]

    def create(name: str, **p: Any) -> None:
        given = _given(fields, p)
        row = _run(
            p["config_path"],
            lambda s: s.create(kind, p.get("tenant"), name, given, id=p["ident"]),
            p.get("actor", ""),
        )
        _done(f"created {kind.label}", row, p["as_json"])

    def list_(**p: Any) -> None:
        filters = {f.name: p[f.name] for f in kind.filters}
        rows = _run(p["config_path"], lambda s: s.listing(kind, p.get("tenant"), **filters))
        _listing(rows, p["as_json"], kind.columns)

    def show(ref: str, **p: Any) -> None:
        _show(_run(p["config_path"], lambda s: s.show(kind, ref, p.get("tenant"))), p["as_json"])

    def update(ref: str, **p: Any) -> None:
        given = _given(updatable, p)
        row = _run(
            p["config_path"],
            lambda s: s.update(kind, ref, given, p.get("tenant")),
            p.get("actor", ""),
        )
        if kind.audited and not p["as_json"]:
            click.echo(f"{kind.label} {row['name']} {row['id']} is at version {row['version']}")
        else:
            _done(f"updated {kind.label}", row, p["as_json"])

    def delete(ref: str, **p: Any) -> None:
        row = _run(
            p["config_path"], lambda s: s.delete(kind, ref, p.get("tenant")), p.get("actor", "")
        )
        click.echo(f"deleted {kind.label} {row['name']} {row['id']}")

    required = [_tenant_option(required=True)] if kind.owned else []
    create_options = [*(_field_option(f, False) for f in fields), _id_option]
    update_options = [
        *(
            o
            for f in updatable
            for o in (_field_option(f, True), *([_clear_option(f)] if f.nullable else []))
        ),
    ]
    commands: dict[str, tuple[Callable[..., None], list[Decorator]]] = {
        "create": (
            create,
            [click.argument("name"), *required, *create_options, *audit, _json_option],
        ),
        "list": (list_, [*scope, *(_field_option(f, True) for f in kind.filters), _json_option]),
        "show": (show, [ref, *scope, _json_option]),
        "update": (update, [ref, *scope, *update_options, *audit, _json_option]),
        "delete": (delete, [ref, *scope, *audit]),
    }
    for name, help_text in kind.helps.items():
        callback, options = commands[name]
        group.add_command(_command(name, help_text, callback, [*options, _config_option]))
    if kind.switchable:
        for enabled in (False, True):
            _switch_command(group, kind, enabled)
    return group


def _switch_command(group: click.Group, kind: Kind, enabled: bool) -> None:
    verb = "enable" if enabled else "disable"

    def switch(ref: str, actor: str, config_path: Path, tenant: str | None = None) -> None:
        row = _run(config_path, lambda s: s.update(kind, ref, {"enabled": enabled}, tenant), actor)
        click.echo(f"{verb}d {kind.label} {row['name']} {row['id']}")

    help_text = f"{verb.capitalize()} the {kind.label} REF (name or id)" + (
        ": the collector refuses readings of a disabled one."
        if not enabled and kind.label != "alert rule"
        else "."
    )
    actor = click.option(
        "--actor",
        default=_default_actor,
        show_default="the OS user",
        help="Who makes the change (recorded in a device type's audit log).",
    )
    scope = [_tenant_option()] if kind.owned else []
    options = [click.argument("ref"), *scope, actor, _config_option]
    group.add_command(_command(verb, help_text, switch, options))


GROUPS = {kind.table: kind_group(kind) for kind in KINDS}


gateways = GROUPS["gateways"]
schemas = GROUPS["schemas"]
device_types = GROUPS["device_types"]


# --- what is specific to one kind ---------------------------------------------------------------


@gateways.command("provision")
@click.argument("gateway")
@_tenant_option()
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the agent.toml here (default: standard output).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option(
    "--broker-host",
    help="Broker address as the gateway reaches it (default: the collector's mqtt.host).",
)
@click.option(
    "--broker-port", type=click.IntRange(1, 65535), help="Broker port (default: the collector's)."
)
@click.option("--tls/--no-tls", default=None, help="TLS to the broker (default: the collector's).")
@click.option("--ca-file", help="CA bundle path on the gateway, for TLS.")
@click.option(
    "--simulated",
    is_flag=True,
    help="Configure a working `simulated` input for every device (demos) instead of modbus stanzas to complete.",
)
@click.option(
    "--interval", default="1s", show_default=True, help="Reading interval of the simulated input."
)
@click.option(
    "--seed", "sim_seed", default=1, show_default=True, help="Seed of the simulated input."
)
@click.option(
    "--buffer-path",
    default=DEFAULT_BUFFER_PATH,
    show_default=True,
    help="The agent's SQLite buffer file.",
)
@click.option(
    "--credential",
    type=click.Choice(["auto", "certificate", "password", "none"]),
    default="auto",
    show_default=True,
    help="Issue a client certificate or a password with the file. auto: a certificate when"
    " --pki-dir holds a CA, else a password; none when the file goes to standard output.",
)
@click.option(
    "--csr",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Certify this request made on the gateway (its key never leaves it); implies a certificate.",
)
@click.option(
    "--credentials-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the credential files here now (default: <output>-credentials/ next to --output).",
)
@click.option(
    "--credentials-path",
    default=str(GATEWAY_CREDENTIALS),
    show_default=True,
    help="Where the agent finds those files on the gateway (written into agent.toml).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=CLIENT_DAYS,
    show_default=True,
    help="Validity of a certificate.",
)
@pki_options
@_actor_option
@_config_option
def gateway_provision(
    gateway: str,
    tenant: str | None,
    output: Path | None,
    force: bool,
    broker_host: str | None,
    broker_port: int | None,
    tls: bool | None,
    ca_file: str | None,
    simulated: bool,
    interval: str,
    sim_seed: int,
    buffer_path: str,
    credential: str,
    csr: Path | None,
    credentials_dir: Path | None,
    credentials_path: str,
    days: int,
    pki_dir: Path,
    ca_key: Path | None,
    ca_passphrase_file: Path | None,
    actor: str,
    config_path: Path,
) -> None:
    """Write a ready-to-use agent.toml for GATEWAY (name or id), with its credential.

    The file holds the gateway's id and tenant id, the broker address and topic prefix, its
    login, and one input stanza per device assigned to the gateway: commented modbus stanzas to
    complete, or a working simulated input with --simulated. The credential is a client
    certificate of the deployment CA (CN = the gateway id; its key made here and written once,
    or made on the gateway: --csr) or a random password (written once; the registry keeps only
    its hash). Copy the file to /etc/sensormine/agent.toml and the credential files to
    /etc/sensormine/credentials/ on the gateway, run `sensormine-collector broker sync`, and
    start the agent (docs/registry.md, docs/security.md).
    """
    if output is not None and output.exists() and not force:
        raise click.ClickException(f"{output} exists; add --force to overwrite it")
    try:
        parse_duration(interval)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--interval") from None
    access = CaAccess.of(pki_dir, ca_key, ca_passphrase_file)
    if csr is not None:
        if credential in ("password", "none"):
            raise click.BadParameter(
                f"--csr needs a certificate, not {credential}", param_hint="--credential"
            )
        credential = "certificate"
    if credential == "auto":
        if output is None and credentials_dir is None:
            credential = "none"
        else:
            credential = "certificate" if access.files.cert.exists() else "password"
    if credential != "none":
        if credentials_dir is None:
            if output is None:
                raise click.UsageError(
                    "a credential is written to files: give --output or --credentials-dir"
                )
            credentials_dir = output.with_name(f"{output.stem}-credentials")
        if tls is False:
            raise click.BadParameter(
                "credentials travel over TLS only; leave out --no-tls", param_hint="--tls"
            )
    settings = _settings(config_path)
    default_port = {"certificate": CERT_PORT, "password": PASSWORD_PORT}.get(
        credential, settings.mqtt.port
    )
    broker = BrokerAddress(
        host=broker_host or settings.mqtt.host,
        port=broker_port or default_port,
        tls=True if credential != "none" else (settings.mqtt.tls if tls is None else tls),
        ca_file=ca_file,
        topic_prefix=settings.mqtt.prefix,
    )
    request = read_csr(csr) if csr is not None else None
    ca = access.load() if credential == "certificate" else None
    ca_cert = ca[0] if ca is not None else (access.cert() if access.files.cert.exists() else None)
    files = gateway_files(credentials_dir) if credentials_dir is not None else {}
    if credential != "none" and not force:
        for secret in ("key", "password"):
            if files[secret].exists():
                raise click.ClickException(f"{files[secret]} exists; add --force to replace it")
    issued: dict[str, Any] = {}

    async def issue(row: Row) -> None:
        if credential == "certificate" and ca is not None:
            issued["certificate"] = await issue_certificate(store_of[0], row, ca, request, days)
        elif credential == "password":
            issued["password"] = await issue_password(store_of[0].conn, row["id"], actor)

    store_of: list[RegistryStore] = []

    async def work(store: RegistryStore) -> tuple[Row, str]:
        store_of.append(store)
        return await provision(
            store,
            gateway,
            broker,
            tenant=tenant,
            simulated=simulated,
            interval=interval,
            seed=sim_seed,
            buffer_path=buffer_path,
            credential=None
            if credential == "none"
            else GatewayCredential(credential, credentials_path, with_ca=ca_cert is not None),
            issue=None if credential == "none" else issue,
        )

    row, text = _run(config_path, work, actor, settings=settings)
    if credentials_dir is not None and credential != "none":
        ensure_private_dir(credentials_dir)
        if ca_cert is not None:
            write_public(files["ca"], pki.cert_pem(ca_cert))
        certificate = issued.get("certificate")
        if certificate is not None:
            if certificate.key is not None:
                write_secret(files["key"], pki.key_pem(certificate.key), True)
            write_public(files["cert"], pki.cert_pem(certificate.cert))
            click.echo(
                f"issued certificate {certificate.row['serial']} (CN {row['id']}) into {credentials_dir}",
                err=True,
            )
        if "password" in issued:
            write_secret(files["password"], (issued["password"] + "\n").encode(), True)
            click.echo(
                f"issued a new password into {files['password']} (shown nowhere else;"
                " any previous password of the gateway is superseded)",
                err=True,
            )
    if not row["enabled"]:
        click.echo(
            f"warning: gateway {row['name']} is disabled: the collector refuses its batches "
            "until `gateways enable`",
            err=True,
        )
    if output is None:
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output} for gateway {row['name']} {row['id']}", err=True)
    if credential != "none":
        click.echo(
            "next: `sensormine-collector broker sync` admits it at the broker; on the gateway,"
            f" {output.name} goes to /etc/sensormine/agent.toml and {credentials_dir}/* to"
            f" {credentials_path}/",
            err=True,
        )


# --- schema versions ----------------------------------------------------------------------------


@schemas.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def schema_check(file: Path) -> None:
    """Check a JSON Schema FILE as `add-version` would, without storing it."""
    document = _document(file)
    metrics = metrics_of(document)
    click.echo(f"{file}: ok, {len(metrics)} metrics: {', '.join(metrics)}")


@schemas.command("create")
@click.argument("name")
@_tenant_option(required=True)
@click.option("--description", default="", help="Free text.")
@click.option(
    "--file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON Schema file to store as version 1.",
)
@_id_option
@_actor_option
@_json_option
@_config_option
def schema_create(
    name: str,
    tenant: str,
    description: str,
    file: Path | None,
    ident: str | None,
    actor: str,
    as_json: bool,
    config_path: Path,
) -> None:
    """Create a schema called NAME (optionally with its first version from --file)."""
    document = None if file is None else _document(file)
    row = _run(
        config_path,
        lambda s: s.create_schema(
            tenant, name, {"description": description}, id=ident, document=document
        ),
        actor,
    )
    _done("created schema", row, as_json)


@schemas.command("add-version")
@click.argument("schema")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_tenant_option()
@_actor_option
@_json_option
@_config_option
def schema_add_version(
    schema: str, file: Path, tenant: str | None, actor: str, as_json: bool, config_path: Path
) -> None:
    """Check the JSON Schema FILE and store it as the next version of SCHEMA."""
    document = _document(file)
    row, added = _run(config_path, lambda s: s.add_schema_version(schema, document, tenant), actor)
    if as_json:
        click.echo(to_json({**row, "added": added}))
    elif added:
        click.echo(f"added version {row['version']} to schema {schema}")
    else:
        click.echo(f"unchanged: {file} is the current version {row['version']} of schema {schema}")


@schemas.command("show")
@click.argument("schema")
@_tenant_option()
@click.option("--version", type=int, help="Show this version's document (default: the current).")
@_json_option
@_config_option
def schema_show(
    schema: str, tenant: str | None, version: int | None, as_json: bool, config_path: Path
) -> None:
    """Show SCHEMA, its versions and the current version's JSON Schema."""
    row = _run(config_path, lambda s: s.show_schema(schema, tenant, version))
    if as_json:
        click.echo(to_json(row))
        return
    _record(row, skip=("json_schema",))
    click.echo("json_schema:")
    click.echo(json.dumps(row["json_schema"], indent=2, ensure_ascii=False))


@device_types.command("history")
@click.argument("device_type", metavar="TYPE")
@_tenant_option()
@_json_option
@_config_option
def device_type_history(
    device_type: str, tenant: str | None, as_json: bool, config_path: Path
) -> None:
    """Show TYPE's version snapshots and audit log."""
    row = _run(config_path, lambda s: s.device_type_history(device_type, tenant))
    if as_json:
        click.echo(to_json(row))
        return
    click.echo(f"device type {row['name']} {row['id']}")
    for entry in row["audit"]:
        click.echo(
            f"  {_text(entry['created_at'])}  {entry['actor'] or '-'}  {entry['action']}  "
            f"{json.dumps(entry['changes'], ensure_ascii=False)}"
        )


# --- seed -------------------------------------------------------------------------------------


@click.command("seed")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--demo",
    is_flag=True,
    help=f"Apply the demo seed ({DEMO_SEED.relative_to(DEMO_SEED.parents[2])}).",
)
@_actor_option
@_json_option
@_config_option
def seed(file: Path | None, demo: bool, actor: str, as_json: bool, config_path: Path) -> None:
    """Create or update the registry entries of a seed FILE (idempotent: fixed ids, upserts).

    The whole file is applied in one transaction. Applying it again changes nothing unless the
    file (or one of the schema files it names) changed.
    """
    if demo == (file is not None):
        raise click.UsageError("give either a seed FILE or --demo")
    path = DEMO_SEED if demo else file
    assert path is not None
    try:
        entries, documents = load_seed(path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    report = _run(config_path, lambda s: apply_seed(s, entries, documents), actor)
    if as_json:
        click.echo(to_json({"file": str(path), **report.as_dict()}))
        return
    click.echo(f"seed {path}:")
    click.echo(report.summary())


COMMANDS: list[click.Command] = [*GROUPS.values(), seed]


def register(group: click.Group) -> None:
    """Add the administration commands to the collector's click group."""
    from collector.admin.security_cli import broker_group, pki_group

    for command in COMMANDS:
        group.add_command(command)
    group.add_command(pki_group, "pki")
    group.add_command(broker_group, "broker")
