"""The deployment's certificate authority: client certificates for gateways, the broker's TLS
certificate and the certificate revocation list (CRL), on the ``cryptography`` package.

The CA is two files in a directory the operator chooses (``pki init --dir``): ``ca.pem``, the
certificate every gateway and the broker trust, and ``ca.key``, its private key, created 0600
and never printed, logged or stored in the database (``--ca-key`` keeps it elsewhere, for
example on removable media, and may be encrypted with a passphrase). A gateway's certificate
carries the gateway id as its common name (CN), which the broker takes as the MQTT username and
client id (``use_identity_as_username``, ``use_username_as_clientid``). A gateway's private key
is made on the gateway (a CSR is signed) or made here and handed over once: the collector
keeps the certificate (public) and never the key.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector.admin.store import AdminError

DEFAULT_PKI_DIR = Path("/etc/sensormine/pki")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
CLIENT_DAYS = 825
SERVER_DAYS = 825
CRL_DAYS = 30
# Certificates are backdated a little: a gateway whose clock is a few minutes behind must not
# find its new certificate "not yet valid".
BACKDATE = timedelta(minutes=10)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class PkiError(AdminError):
    """A PKI request that cannot be done; the message names the file or the problem."""


@dataclass(frozen=True)
class CaFiles:
    """Where the CA certificate and its key are."""

    cert: Path
    key: Path

    @classmethod
    def locate(cls, directory: Path, key: Path | None = None) -> CaFiles:
        """``ca.pem`` in ``directory``; the key there too unless ``key`` says otherwise."""
        return cls(directory / CA_CERT, key if key is not None else directory / CA_KEY)


@dataclass(frozen=True)
class RevokedEntry:
    """One CRL entry: a serial, since when, and why (an RFC 5280 reason)."""

    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags


def write_new_file(path: Path, data: bytes, mode: int, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` created with ``mode`` from the start (never wider, not even for
    a moment), through a temporary file and a rename; refuse an existing file unless
    ``overwrite``."""
    if path.exists() and not overwrite:
        raise PkiError(f"{path} exists; it is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails on an existing target, so two runs at once cannot both win.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PkiError(f"{path} exists; it is never overwritten") from None
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key: small, fast on a Raspberry Pi, supported by every TLS stack."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """The key as PKCS#8 PEM, encrypted when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, ``AB:CD:...`` as ``openssl x509 -fingerprint -sha256`` prints it."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def serial_hex(serial: int) -> str:
    """A serial number as upper-case hex, as openssl prints it."""
    return f"{serial:X}"


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_usage(**granted: bool) -> x509.KeyUsage:
    """A key usage extension: what ``granted`` names, nothing else."""
    usages = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{usage: granted.get(usage, False) for usage in usages})


def init_ca(
    files: CaFiles, name: str, days: int = CA_DAYS, passphrase: bytes | None = None
) -> x509.Certificate:
    """Create the CA: its key (0600) and self-signed certificate; never overwrite either."""
    for path in (files.cert, files.key):
        if path.exists():
            raise PkiError(
                f"{path} exists: a CA is never overwritten (remove it first if you mean to)"
            )
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_new_file(files.key, key_pem(key, passphrase), 0o600)
    write_new_file(files.cert, cert_pem(cert), 0o644)
    return cert


def load_ca_cert(files: CaFiles) -> x509.Certificate:
    """The CA certificate; a clear error when it is missing."""
    try:
        return x509.load_pem_x509_certificate(files.cert.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{files.cert}: no CA here; create one with `pki init`") from None
    except OSError as exc:
        raise PkiError(f"{files.cert}: cannot read the CA certificate: {exc.strerror}") from None
    except ValueError:
        raise PkiError(f"{files.cert}: not a PEM certificate") from None


def load_ca(files: CaFiles, passphrase: bytes | None = None) -> tuple[x509.Certificate, PrivateKey]:
    """The CA certificate and its key, checked to belong together."""
    cert = load_ca_cert(files)
    try:
        data = files.key.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{files.key}: the CA key is not here (see --ca-key)") from None
    except OSError as exc:
        raise PkiError(f"{files.key}: cannot read the CA key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:
        raise PkiError(
            f"{files.key}: the CA key is encrypted: give its passphrase (--ca-passphrase-file)"
            if passphrase is None
            else f"{files.key}: the CA key is not encrypted: leave out --ca-passphrase-file"
        ) from None
    except ValueError:
        # The message of cryptography says nothing about the key's content; keep it that way.
        raise PkiError(f"{files.key}: not a readable private key (or a wrong passphrase)") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise PkiError(f"{files.key}: unsupported key type {type(key).__name__}")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PkiError(f"{files.key} is not the key of {files.cert}")
    return cert, key


def load_csr(data: bytes, source: str) -> x509.CertificateSigningRequest:
    """A certificate signing request (PEM or DER) whose signature checks out."""
    try:
        csr = (
            x509.load_pem_x509_csr(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_csr(data)
        )
    except ValueError:
        raise PkiError(f"{source}: not a certificate signing request (PEM or DER)") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise PkiError(f"{source}: the request's signature does not match its key")
    return csr


def _issue(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    subject: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    days: int,
    usage: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(
                digital_signature=True,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, _signing_hash(ca_key))


def _public_key(csr: x509.CertificateSigningRequest) -> CertificateIssuerPublicKeyTypes:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise PkiError(f"unsupported key type in the request: {type(key).__name__}")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise PkiError(f"an RSA key of {key.key_size} bits is too weak (at least 2048)")
    return key


def sign_gateway(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    public_key: CertificateIssuerPublicKeyTypes,
    gateway_id: uuid.UUID,
    tenant_id: uuid.UUID,
    days: int = CLIENT_DAYS,
) -> x509.Certificate:
    """A TLS client certificate whose CN is the gateway id (the broker's username and client
    id for it) and whose OU is its tenant id. Whatever the CSR asked for, only its key is used."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(tenant_id)),
            x509.NameAttribute(NameOID.COMMON_NAME, str(gateway_id)),
        ]
    )
    return _issue(ca_cert, ca_key, subject, public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def csr_key(csr: x509.CertificateSigningRequest) -> CertificateIssuerPublicKeyTypes:
    """The public key of a checked request, refused when too weak or of an unknown type."""
    return _public_key(csr)


def sign_server(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    public_key: CertificateIssuerPublicKeyTypes,
    names: Iterable[str],
    days: int = SERVER_DAYS,
) -> x509.Certificate:
    """The broker's TLS server certificate for host names and IP addresses (first one is CN)."""
    names = list(names)
    if not names:
        raise PkiError("name at least one host name or address of the broker")
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return _issue(ca_cert, ca_key, subject, public_key, days, ExtendedKeyUsageOID.SERVER_AUTH, alt)


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    entries: Iterable[RevokedEntry],
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA, valid ``days`` (run `broker sync` or `pki crl` well before then:
    a broker that checks an expired CRL refuses every certificate)."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(entry.reason), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(ca_key, _signing_hash(ca_key))


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    """The CRL as PEM (what Mosquitto's ``crlfile`` reads)."""
    return crl.public_bytes(serialization.Encoding.PEM)
