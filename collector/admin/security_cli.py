"""``sensormine-collector pki`` and ``broker``: the deployment's CA and the broker's access files.

``pki init`` creates the CA, ``pki issue`` a gateway's client certificate (from the gateway's
CSR, or with a key made here and handed over once), ``pki server-cert`` the broker's TLS
certificate, ``pki revoke`` and ``pki crl`` revoke and publish; ``pki list`` shows what was
issued. ``broker sync`` writes Mosquitto's password files, ACL, CRL and listeners from the
registry and reloads the broker. The CA key is read only by the commands that sign, never
printed and never stored in the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509

from collector.admin import broker as brokerfiles
from collector.admin import identity, pki
from collector.admin.cli import (
    _actor_option,
    _config_option,
    _json_option,
    _listing,
    _metadata_kwargs,
    _run,
    _settings,
    _tenant_option,
    to_json,
)
from collector.admin.credentials import (
    GATEWAY_CA,
    GATEWAY_CERT,
    GATEWAY_KEY,
    CaAccess,
    IssuedCertificate,
    issue_certificate,
    pki_options,
    read_csr,
    write_public,
    write_secret,
)
from collector.admin.kinds import GATEWAY
from collector.admin.store import RegistryStore, Row, connect
from collector.errors import CollectorError
from collector.settings import MQTT_CREDENTIAL

F = TypeVar("F", bound=Callable[..., Any])


def _certificate_file_options(out_help: str, days: int) -> Callable[[F], F]:
    """``--out`` (a directory), ``--days`` (the certificate's validity) and ``--force``."""

    def decorate(f: F) -> F:
        f = click.option("--force", is_flag=True, help="Replace existing files in --out.")(f)
        f = click.option(
            "--days", type=click.IntRange(1, 3650), default=days, show_default=True,
            help="Validity of the certificate.",
        )(f)  # fmt: skip
        return click.option(
            "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
            help=out_help,
        )(f)  # fmt: skip

    return decorate


def _crl_days_option(flag: str, help_text: str) -> Callable[[F], F]:
    """How many days a CRL made now is valid."""
    return click.option(
        flag, type=click.IntRange(1, 365), default=pki.CRL_DAYS, show_default=True, help=help_text
    )


# --- pki --------------------------------------------------------------------------------------


@click.group()
def pki_group() -> None:
    """The deployment's certificate authority: gateway and broker certificates, revocation.

    The CA key stays in the file the operator names (--ca-key, default ca.key in --pki-dir),
    created 0600 and never printed, logged or copied into the database.
    """


@pki_group.command("init")
@pki_options
@click.option(
    "--name", default="Sensormine Edge CA", show_default=True, help="The CA's common name."
)
@click.option(
    "--days", type=click.IntRange(1, 36500), default=pki.CA_DAYS, show_default=True,
    help="Validity of the CA certificate.",
)  # fmt: skip
def pki_init(
    pki_dir: Path, ca_key: Path | None, ca_passphrase_file: Path | None, name: str, days: int
) -> None:
    """Create the CA: ca.pem in --pki-dir and its key (0600), encrypted with the passphrase of
    --ca-passphrase-file when given. An existing CA is never overwritten."""
    access = CaAccess.of(pki_dir, ca_key, ca_passphrase_file)
    try:
        cert = pki.init_ca(access.files, name, days, access.passphrase())
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"created CA {name!r}: certificate {access.files.cert}, key {access.files.key} (0600)"
    )
    click.echo(f"fingerprint (SHA-256) {pki.fingerprint(cert)}")


@pki_group.command("issue")
@click.argument("gateway")
@_tenant_option()
@pki_options
@click.option(
    "--csr", type=click.Path(dir_okay=False, path_type=Path),
    help="The gateway's certificate signing request (its key stays on the gateway).",
)  # fmt: skip
@_certificate_file_options(
    "Directory for gateway.pem, ca.pem and, without --csr, gateway.key (0600).", pki.CLIENT_DAYS
)
@_actor_option
@_json_option
@_config_option
def pki_issue(
    gateway: str,
    tenant: str | None,
    pki_dir: Path,
    ca_key: Path | None,
    ca_passphrase_file: Path | None,
    csr: Path | None,
    out_dir: Path,
    days: int,
    force: bool,
    actor: str,
    as_json: bool,
    config_path: Path,
) -> None:
    """Issue GATEWAY (name or id) a client certificate whose CN is its gateway id.

    With --csr the gateway's own key is certified; without it a new key is written to --out
    once (0600) and kept nowhere else: hand it to the gateway and delete it. `gateways
    provision` does the same together with the agent.toml.
    """
    access = CaAccess.of(pki_dir, ca_key, ca_passphrase_file)
    request = read_csr(csr) if csr is not None else None
    ca = access.load()
    key_path = out_dir / GATEWAY_KEY
    if request is None and key_path.exists() and not force:
        raise click.ClickException(f"{key_path} exists (add --force to replace it)")

    async def work(store: RegistryStore) -> tuple[Row, IssuedCertificate]:
        row = await store.resolve(GATEWAY, gateway, await store.tenant_ref(tenant))
        return row, await issue_certificate(store, row, ca, request, days)

    row, issued = _run(config_path, work, actor)
    if issued.key is not None:
        write_secret(key_path, pki.key_pem(issued.key), force)
    write_public(out_dir / GATEWAY_CERT, pki.cert_pem(issued.cert))
    write_public(out_dir / GATEWAY_CA, pki.cert_pem(ca[0]))
    if as_json:
        click.echo(to_json({**issued.row, "gateway": row["name"], "directory": str(out_dir)}))
        return
    click.echo(
        f"issued certificate {issued.row['serial']} to gateway {row['name']} {row['id']},"
        f" valid until {issued.cert.not_valid_after_utc:%Y-%m-%d}; files in {out_dir}"
    )
    click.echo("run `sensormine-collector broker sync` so that the broker knows the gateway")


@pki_group.command("server-cert")
@click.argument("names", nargs=-1, required=True)
@pki_options
@_certificate_file_options(
    "Directory for broker.pem (with the CA appended) and broker.key (0600).", pki.SERVER_DAYS
)
def pki_server_cert(
    names: tuple[str, ...],
    pki_dir: Path,
    ca_key: Path | None,
    ca_passphrase_file: Path | None,
    out_dir: Path,
    days: int,
    force: bool,
) -> None:
    """Issue the broker's TLS certificate for NAMES (host names or IP addresses the gateways
    and collectors use; the first is the CN)."""
    access = CaAccess.of(pki_dir, ca_key, ca_passphrase_file)
    ca_cert, ca_private = access.load()
    key = pki.new_key()
    try:
        cert = pki.sign_server(ca_cert, ca_private, key.public_key(), names, days)
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    write_secret(out_dir / "broker.key", pki.key_pem(key), force)
    write_public(out_dir / "broker.pem", pki.cert_pem(cert) + pki.cert_pem(ca_cert), force)
    click.echo(
        f"issued broker certificate {pki.serial_hex(cert.serial_number)} for {', '.join(names)}:"
        f" {out_dir / 'broker.pem'}, key {out_dir / 'broker.key'} (0600; chown it to the broker's user)"
    )


@pki_group.command("revoke")
@click.argument("target")
@_tenant_option()
@click.option(
    "--reason",
    type=click.Choice(sorted(identity.REASONS)),
    default="unspecified",
    show_default=True,
    help="Why (recorded in the CRL).",
)
@_config_option
def pki_revoke(target: str, tenant: str | None, reason: str, config_path: Path) -> None:
    """Revoke the certificate with serial TARGET, or every certificate of gateway TARGET.

    The broker refuses it after the next `broker sync` (which writes the CRL and reloads)."""

    async def work(store: RegistryStore) -> str:
        hex_text = target.replace(":", "")
        if all(c in "0123456789abcdefABCDEF" for c in hex_text) and len(hex_text) >= 16:
            try:
                row = await identity.revoke_serial(store.conn, target, reason)
            except CollectorError:
                pass
            else:
                return f"revoked certificate {row['serial']} of gateway {row['gateway_id']}"
        gw = await store.resolve(GATEWAY, target, await store.tenant_ref(tenant))
        count = await identity.revoke_gateway(store.conn, gw["id"], reason, ("certificate",))
        return f"revoked {count} certificate(s) of gateway {gw['name']} {gw['id']}"

    click.echo(_run(config_path, work))
    click.echo("run `sensormine-collector broker sync` to refuse it at the broker")


@pki_group.command("list")
@click.argument("gateway", required=False)
@_tenant_option()
@click.option("--all", "show_all", is_flag=True, help="Include revoked credentials.")
@_json_option
@_config_option
def pki_list(
    gateway: str | None, tenant: str | None, show_all: bool, as_json: bool, config_path: Path
) -> None:
    """List the credentials issued (certificates and passwords, never a secret)."""

    async def work(store: RegistryStore) -> list[Row]:
        gateway_id = None
        if gateway is not None:
            gateway_id = (await store.resolve(GATEWAY, gateway, await store.tenant_ref(tenant)))[
                "id"
            ]
        rows = await identity.list_credentials(store.conn, gateway_id)
        return [r for r in rows if show_all or r["revoked_at"] is None]

    rows = _run(config_path, work)
    _listing(
        rows,
        as_json,
        (
            "gateway",
            "gateway_id",
            "kind",
            "serial",
            "not_after",
            "issued_at",
            "revoked_at",
            "revocation_reason",
        ),
    )


@pki_group.command("crl")
@pki_options
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="Where to write the CRL (PEM).",
)  # fmt: skip
@_crl_days_option("--days", "Validity of the CRL: publish a new one well before it ends.")
@_config_option
def pki_crl(
    pki_dir: Path,
    ca_key: Path | None,
    ca_passphrase_file: Path | None,
    output: Path,
    days: int,
    config_path: Path,
) -> None:
    """Write the CRL: revoked certificates, those of disabled gateways (on hold, released when
    enabled again) and of deleted ones. `broker sync` writes it itself when it can read the CA
    key; where the key lives elsewhere, run this there and pass the file to `broker sync --crl`."""
    access = CaAccess.of(pki_dir, ca_key, ca_passphrase_file)
    ca_cert, ca_private = access.load()
    view = _run(config_path, lambda s: identity.broker_view(s.conn))
    crl = pki.build_crl(ca_cert, ca_private, view.revoked, days)
    write_public(output, pki.crl_pem(crl))
    click.echo(f"wrote {output}: {len(view.revoked)} certificate(s) refused, valid {days} days")


# --- broker -----------------------------------------------------------------------------------


@click.group("broker")
def broker_group() -> None:
    """The MQTT broker's access files, generated from the registry."""


def _listener(text: str, option: str) -> brokerfiles.Listener | None:
    if text in ("", "off"):
        return None
    address, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not [ADDRESS:]PORT or off", param_hint=option
        ) from None
    if not 1 <= number <= 65535:
        raise click.BadParameter(f"port {number} out of range", param_hint=option)
    return brokerfiles.Listener(number, address.strip("[]"))


def _listen_option(listener: str, port: int, what: str) -> Callable[[F], F]:
    """``--<listener>-listen``: where a broker listener listens."""
    return click.option(
        f"--{listener}-listen",
        default=str(port),
        envvar=f"SENSORMINE_BROKER_{listener.upper()}_LISTEN",
        show_default=True,
        help=f"[ADDRESS:]PORT of {what}.",
    )


def _path_option(
    flag: str,
    env: str,
    default: Path,
    help_text: str,
    dest: str | None = None,
    directory: bool = False,
) -> Callable[[F], F]:
    """A path option of ``broker sync`` that ``$SENSORMINE_BROKER_<env>`` can also give."""
    kind = click.Path(file_okay=not directory, dir_okay=directory, path_type=Path)
    decls = [flag] if dest is None else [flag, dest]
    return click.option(
        *decls, type=kind, default=default, envvar=f"SENSORMINE_BROKER_{env}",
        show_default=True, help=help_text,
    )  # fmt: skip


@broker_group.command("sync")
@pki_options
@_path_option(
    "--dir", "DIR", brokerfiles.DEFAULT_BROKER_DIR,
    "Directory of the generated files (the main mosquitto.conf includes it).",
    dest="directory", directory=True,
)  # fmt: skip
@_path_option(
    "--server-cert", "CERT", brokerfiles.DEFAULT_SERVER_CERT,
    "The broker's TLS certificate (pki server-cert, or your own).",
)  # fmt: skip
@_path_option("--server-key", "KEY", brokerfiles.DEFAULT_SERVER_KEY, "Its key.")
@_listen_option(
    "cert", brokerfiles.CERT_PORT, "the listener for gateways with certificates, or off"
)
@_listen_option(
    "password", brokerfiles.PASSWORD_PORT, "the listener for gateways with passwords, or off"
)
@_listen_option("collector", brokerfiles.COLLECTOR_PORT, "the collectors' listener")
@_path_option(
    "--collector-password-file", "COLLECTOR_PASSWORD_FILE",
    Path("/etc/sensormine/credentials") / MQTT_CREDENTIAL,
    "The collectors' MQTT password (hashed into collectors.passwd); when absent, the"
    " existing collectors.passwd is kept.",
)  # fmt: skip
@click.option(
    "--crl", "crl_file", type=click.Path(dir_okay=False, path_type=Path),
    help="A CRL made by `pki crl` where the CA key is (default: made here from the CA key).",
)  # fmt: skip
@_crl_days_option("--crl-days", "Validity of the CRL made here: run sync (a timer) well within it.")
@click.option(
    "--group", default=None, envvar="SENSORMINE_BROKER_GROUP",
    help="Group of the password and ACL files (0640), e.g. mosquitto (default: the current one).",
)  # fmt: skip
@click.option(
    "--pid-file", type=click.Path(dir_okay=False, path_type=Path), envvar="SENSORMINE_BROKER_PID_FILE",
    help="Reload by SIGHUP to the pid in this file (e.g. /run/mosquitto/mosquitto.pid).",
)  # fmt: skip
@click.option(
    "--reload-command", default="systemctl reload mosquitto", show_default=True,
    envvar="SENSORMINE_BROKER_RELOAD_COMMAND",
    help="Command that reloads the broker (when --pid-file is not given).",
)  # fmt: skip
@click.option("--no-reload", is_flag=True, help="Write the files only.")
@_json_option
@_config_option
def broker_sync(
    pki_dir: Path,
    ca_key: Path | None,
    ca_passphrase_file: Path | None,
    directory: Path,
    server_cert: Path,
    server_key: Path,
    cert_listen: str,
    password_listen: str,
    collector_listen: str,
    collector_password_file: Path,
    crl_file: Path | None,
    crl_days: int,
    group: str | None,
    pid_file: Path | None,
    reload_command: str,
    no_reload: bool,
    as_json: bool,
    config_path: Path,
) -> None:
    """Write Mosquitto's password files, ACL, CRL and listeners from the registry; reload it.

    Only enabled gateways of enabled tenants get in: a disabled, deleted or revoked gateway
    loses its access when this runs (its password line and ACL rules go, its certificates
    enter the CRL). Run it after every `gateways provision`, `disable`, `delete` or `pki
    revoke`, and from a daily timer so that the CRL never expires.
    """
    settings = _settings(config_path)
    collector_listener = _listener(collector_listen, "--collector-listen")
    if collector_listener is None:
        raise click.BadParameter("the collectors need a listener", param_hint="--collector-listen")
    layout = brokerfiles.BrokerLayout(
        directory=directory.resolve(),
        server_cert=server_cert.resolve(),
        server_key=server_key.resolve(),
        cert_listener=_listener(cert_listen, "--cert-listen"),
        password_listener=_listener(password_listen, "--password-listen"),
        collector_listener=collector_listener,
        prefix=settings.mqtt.prefix,
        collector_user=settings.mqtt.username or "sensormine-collector",
    )
    access = CaAccess.of(pki_dir, ca_key, ca_passphrase_file)
    for path, option in (
        (layout.server_cert, "--server-cert"),
        (layout.server_key, "--server-key"),
    ):
        if not path.is_file():
            raise click.ClickException(
                f"{path}: no such file ({option}); issue the broker's certificate with"
                " `pki server-cert` or name your own"
            )

    async def read_view() -> identity.BrokerView:
        async with connect(_metadata_kwargs(settings)) as conn:
            return await identity.broker_view(conn)

    try:
        view = asyncio.run(read_view())
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None

    # The collectors' password line: from their password file, else the one already there.
    collector_line = _collector_hash(layout, collector_password_file)
    crl_pem: bytes | None = None
    ca_pem: bytes | None = None
    if layout.cert_listener is not None:
        if not access.files.cert.exists():
            raise click.ClickException(
                f"{access.files.cert}: no CA here for the certificate listener; create one with"
                " `pki init` (see --pki-dir), or give --cert-listen off for gateways with"
                " passwords only"
            )
        ca_cert = access.cert()
        ca_pem = pki.cert_pem(ca_cert)
        if crl_file is not None:
            try:
                crl_pem = crl_file.read_bytes()
                crl = x509.load_pem_x509_crl(crl_pem)
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"{crl_file}: not a readable PEM CRL ({exc})") from None
            if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
                raise click.ClickException(f"{crl_file} is not signed by {access.files.cert}")
        else:
            crl_pem = _current_crl(directory / brokerfiles.CRL, ca_cert, view.revoked, crl_days)
            if crl_pem is None:
                ca_cert, ca_private = access.load()
                crl_pem = pki.crl_pem(pki.build_crl(ca_cert, ca_private, view.revoked, crl_days))

    passwords = [(str(g.id), g.password_hash) for g in view.gateways if g.password_hash]
    files: list[tuple[str, bytes, int]] = [
        (brokerfiles.GATEWAY_PASSWD, brokerfiles.render_passwd(passwords).encode(), 0o640),
        (
            brokerfiles.COLLECTOR_PASSWD,
            brokerfiles.render_passwd([(layout.collector_user, collector_line)]).encode(),
            0o640,
        ),
        (brokerfiles.ACL, brokerfiles.render_acl(view.gateways, layout).encode(), 0o640),
    ]
    if ca_pem is not None and crl_pem is not None:
        files += [(brokerfiles.CA, ca_pem, 0o644), (brokerfiles.CRL, crl_pem, 0o644)]
    listeners = brokerfiles.render_listeners(layout, has_crl=crl_pem is not None).encode()
    changed: list[str] = []
    try:
        for name, data, mode in files:
            if brokerfiles.write_atomic(directory / name, data, mode, group):
                changed.append(name)
        listeners_changed = brokerfiles.write_atomic(
            directory / brokerfiles.LISTENERS, listeners, 0o644, group
        )
        done = "" if no_reload else brokerfiles.reload_broker(pid_file, reload_command)
    except (brokerfiles.BrokerConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    changed_names = changed + ([brokerfiles.LISTENERS] if listeners_changed else [])
    reloaded = done or "not reloaded (--no-reload)"
    summary = {
        "directory": str(directory),
        "gateways": len(view.gateways),
        "with_password": len(passwords),
        "refused_certificates": len(view.revoked),
        "disabled_gateways": view.disabled,
        "certificates_of_deleted_gateways": view.orphaned,
        "changed": changed_names,
        "reload": reloaded,
        "restart_needed": listeners_changed,
    }
    if as_json:
        click.echo(to_json(summary))
        return
    click.echo(
        f"wrote {directory}: {len(view.gateways)} gateway(s) admitted ({len(passwords)} by"
        f" password), {len(view.revoked)} certificate(s) in the CRL,"
        f" {view.disabled} disabled gateway(s) left out"
    )
    click.echo(f"changed: {', '.join(changed_names) or 'nothing'}; {reloaded}")
    if listeners_changed:
        click.echo(
            f"{brokerfiles.LISTENERS} changed: restart the broker (a reload keeps the old listeners)"
        )


def _current_crl(
    path: Path, ca_cert: x509.Certificate, revoked: list[pki.RevokedEntry], days: int
) -> bytes | None:
    """The CRL already written, when it lists exactly ``revoked`` and has more than half of its
    validity left: then nothing changes and the broker need not re-read it."""
    try:
        data = path.read_bytes()
        crl = x509.load_pem_x509_crl(data)
    except (OSError, ValueError):
        return None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        return None
    next_update = crl.next_update_utc
    if next_update is None or next_update - datetime.now(UTC) < timedelta(days=days / 2):
        return None
    listed = set()
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = x509.ReasonFlags.unspecified
        listed.add((entry.serial_number, reason))
    return data if listed == {(e.serial, e.reason) for e in revoked} else None


def _collector_hash(layout: brokerfiles.BrokerLayout, password_file: Path) -> str:
    existing = _existing_hash(
        layout.directory / brokerfiles.COLLECTOR_PASSWD, layout.collector_user
    )
    try:
        password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        if existing is None:
            raise click.ClickException(
                f"{password_file}: the collectors' MQTT password is needed once (no"
                f" {brokerfiles.COLLECTOR_PASSWD} yet); see --collector-password-file"
            ) from None
        return existing
    except OSError as exc:
        raise click.ClickException(f"{password_file}: cannot read: {exc.strerror}") from None
    if not password:
        raise click.ClickException(f"{password_file} is empty")
    if existing is not None and identity.mosquitto_verify(password, existing):
        return existing  # unchanged: no new salt, no needless rewrite and reload
    return identity.mosquitto_hash(password)


def _existing_hash(path: Path, user: str) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, hashed = line.partition(":")
        if name == user and hashed.startswith("$7$"):
            return hashed
    return None
