"""Credentials handed to a gateway: where they go, how they are written, how a certificate is
issued. Shared by `gateways provision` and `pki issue`.

Keys and passwords are written once, 0600 from the moment the file exists, into a directory
made 0700; certificates and the CA certificate 0644. A gateway's key made here is never kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509

from collector.admin import identity, pki
from collector.admin.store import RegistryStore, Row

F = TypeVar("F", bound=Callable[..., Any])

# Where a gateway keeps its credentials (the agent's unit and installer use the same place).
GATEWAY_CREDENTIALS = Path("/etc/sensormine/credentials")
GATEWAY_CERT = "gateway.pem"
GATEWAY_KEY = "gateway.key"
GATEWAY_CA = "ca.pem"
GATEWAY_PASSWORD = "mqtt-password"


def pki_options(f: F) -> F:
    """``--pki-dir``, ``--ca-key`` and ``--ca-passphrase-file``."""
    f = click.option(
        "--ca-passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="File holding the passphrase of an encrypted CA key.",
    )(f)
    f = click.option(
        "--ca-key",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="SENSORMINE_CA_KEY",
        help="The CA's private key (default: ca.key in --pki-dir).",
    )(f)
    return click.option(
        "--pki-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=pki.DEFAULT_PKI_DIR,
        show_default=True,
        envvar="SENSORMINE_PKI_DIR",
        help="Directory of the deployment's CA certificate (ca.pem).",
    )(f)


@dataclass(frozen=True)
class CaAccess:
    """How to reach the CA: its files and, for an encrypted key, the passphrase file."""

    files: pki.CaFiles
    passphrase_file: Path | None

    @classmethod
    def of(cls, pki_dir: Path, ca_key: Path | None, passphrase_file: Path | None) -> CaAccess:
        """From the command's options."""
        return cls(pki.CaFiles.locate(pki_dir, ca_key), passphrase_file)

    def passphrase(self) -> bytes | None:
        """The key's passphrase (first line of the file), if any."""
        if self.passphrase_file is None:
            return None
        try:
            text = self.passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise click.ClickException(
                f"{self.passphrase_file}: cannot read the passphrase: {exc.strerror}"
            ) from None
        if not text:
            raise click.ClickException(f"{self.passphrase_file}: the passphrase is empty")
        return text.encode()

    def load(self) -> tuple[x509.Certificate, pki.PrivateKey]:
        """The CA certificate and key; a click error when they cannot be used."""
        try:
            return pki.load_ca(self.files, self.passphrase())
        except pki.PkiError as exc:
            raise click.ClickException(str(exc)) from None

    def cert(self) -> x509.Certificate:
        """The CA certificate alone."""
        try:
            return pki.load_ca_cert(self.files)
        except pki.PkiError as exc:
            raise click.ClickException(str(exc)) from None


def write_secret(path: Path, data: bytes, force: bool) -> None:
    """A key or password file: 0600 from its creation; never replaced without --force."""
    try:
        pki.write_new_file(path, data, 0o600, overwrite=force)
    except pki.PkiError as exc:
        raise click.ClickException(f"{exc} (add --force to replace it)") from None


def write_public(path: Path, data: bytes, force: bool = True) -> None:
    """A certificate or CA file, 0644."""
    try:
        pki.write_new_file(path, data, 0o644, overwrite=force)
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate issued to a gateway; ``key`` only when it was made here."""

    cert: x509.Certificate
    key: pki.PrivateKey | None
    row: Row


async def issue_certificate(
    store: RegistryStore,
    gateway: Row,
    ca: tuple[x509.Certificate, pki.PrivateKey],
    csr: x509.CertificateSigningRequest | None,
    days: int,
) -> IssuedCertificate:
    """Sign the CSR's key (or a new key) for ``gateway`` and record the certificate."""
    key = None if csr is not None else pki.new_key()
    public = pki.csr_key(csr) if csr is not None else key.public_key()  # type: ignore[union-attr]
    cert = pki.sign_gateway(ca[0], ca[1], public, gateway["id"], gateway["tenant_id"], days)
    row = await identity.record_certificate(store.conn, gateway["id"], cert, store.actor)
    return IssuedCertificate(cert, key, row)


def read_csr(path: Path) -> x509.CertificateSigningRequest:
    """The CSR file, checked."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the request: {exc.strerror}") from None
    try:
        return pki.load_csr(data, str(path))
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None


def gateway_files(directory: Path) -> dict[str, Path]:
    """Where the credential files of a gateway are in ``directory``."""
    return {
        "cert": directory / GATEWAY_CERT,
        "key": directory / GATEWAY_KEY,
        "ca": directory / GATEWAY_CA,
        "password": directory / GATEWAY_PASSWORD,
    }


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if it does not exist (credentials live there)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.stat(path).st_mode & 0o077 and not any(path.iterdir()):
        os.chmod(path, 0o700)
