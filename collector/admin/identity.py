"""Gateway credentials in the registry: issued passwords (their broker hash only) and client
certificates (never their keys), revocation, and what the broker must know about them.

``gateway_credentials`` (metadata migration 0002) holds one row per credential. A gateway has
at most one valid password (a new one supersedes the old) and any number of certificates (a
new one and the old one overlap during a rotation until the old is revoked or expires).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from cryptography import x509

from collector.admin.pki import RevokedEntry, cert_pem, fingerprint, serial_hex
from collector.admin.store import ChangeRefused, NotFound, Row

# Mosquitto's own default (mosquitto_passwd, Mosquitto 2.0 `PW_DEFAULT_ITERATIONS`). The
# passwords issued here are 256 random bits, so iterations add nothing against guessing; a
# higher count would only make every gateway (re)connect cost the broker more CPU.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12  # Mosquitto accepts only 12-byte salts (security_default.c)

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}


def new_password() -> str:
    """A random MQTT password: 256 bits, URL-safe text (no quoting needed anywhere)."""
    return secrets.token_urlsafe(32)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto 2.0's password-file hash: ``$7$<iterations>$<base64 salt>$<base64 hash>``,
    PBKDF2-HMAC-SHA512 over a 12-byte salt, as ``mosquitto_passwd`` writes it."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"Mosquitto needs a {SALT_BYTES}-byte salt")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (constant-time comparison)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(digest, expected)


async def issue_password(conn: asyncpg.Connection, gateway_id: uuid.UUID, actor: str) -> str:
    """A new password for the gateway; its previous one is superseded. Returns the plain
    password, which exists only in the caller's hands from here on."""
    password = new_password()
    async with conn.transaction():
        await conn.execute(
            "UPDATE gateway_credentials SET revoked_at = now(), revocation_reason = 'superseded'"
            " WHERE gateway_id = $1 AND kind = 'password' AND revoked_at IS NULL",
            gateway_id,
        )
        await conn.execute(
            "INSERT INTO gateway_credentials (gateway_id, kind, password_hash, issued_by)"
            " VALUES ($1, 'password', $2, $3)",
            gateway_id,
            mosquitto_hash(password),
            actor,
        )
    return password


async def record_certificate(
    conn: asyncpg.Connection, gateway_id: uuid.UUID, cert: x509.Certificate, actor: str
) -> Row:
    """Store an issued certificate (public) against its gateway."""
    row = await conn.fetchrow(
        "INSERT INTO gateway_credentials"
        " (gateway_id, kind, serial, certificate, fingerprint, not_after, issued_by)"
        " VALUES ($1, 'certificate', $2, $3, $4, $5, $6)"
        " RETURNING id, gateway_id, kind, serial, fingerprint, not_after, issued_at",
        gateway_id,
        serial_hex(cert.serial_number),
        cert_pem(cert).decode(),
        fingerprint(cert),
        cert.not_valid_after_utc,
        actor,
    )
    return dict(row.items())


_LIST = (
    "SELECT c.id, c.gateway_id, g.name AS gateway, c.kind, c.serial, c.fingerprint, c.not_after,"
    " c.issued_at, c.issued_by, c.revoked_at, c.revocation_reason"
    " FROM gateway_credentials c LEFT JOIN gateways g ON g.id = c.gateway_id"
)


async def list_credentials(
    conn: asyncpg.Connection, gateway_id: uuid.UUID | None = None
) -> list[Row]:
    """Every credential (newest first), of one gateway or of all; never a secret."""
    if gateway_id is None:
        rows = await conn.fetch(_LIST + " ORDER BY c.issued_at DESC")
    else:
        rows = await conn.fetch(
            _LIST + " WHERE c.gateway_id = $1 ORDER BY c.issued_at DESC", gateway_id
        )
    return [dict(r.items()) for r in rows]


async def revoke_serial(conn: asyncpg.Connection, serial: str, reason: str) -> Row:
    """Revoke one certificate by its serial number (hex, as `pki list` shows it)."""
    text = serial.upper().replace(":", "").lstrip("0") or "0"
    row = await conn.fetchrow(
        "SELECT id, gateway_id, serial, revoked_at FROM gateway_credentials WHERE serial = $1",
        text,
    )
    if row is None:
        raise NotFound(f"certificate with serial {serial} not found")
    if row["revoked_at"] is not None:
        raise ChangeRefused(
            f"certificate {text} was already revoked at {row['revoked_at']:%Y-%m-%d %H:%M:%SZ}"
        )
    await conn.execute(
        "UPDATE gateway_credentials SET revoked_at = now(), revocation_reason = $2 WHERE id = $1",
        row["id"],
        reason,
    )
    return dict(row.items())


async def revoke_gateway(
    conn: asyncpg.Connection, gateway_id: uuid.UUID, reason: str, kinds: tuple[str, ...]
) -> int:
    """Revoke every valid credential of ``kinds`` of one gateway; returns how many."""
    result = await conn.execute(
        "UPDATE gateway_credentials SET revoked_at = now(), revocation_reason = $2"
        " WHERE gateway_id = $1 AND revoked_at IS NULL AND kind = ANY($3::text[])",
        gateway_id,
        reason,
        list(kinds),
    )
    return int(result.split()[-1])


@dataclass(frozen=True)
class BrokerGateway:
    """A gateway the broker lets in: its ids and, when it has one, its password hash."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    password_hash: str | None


@dataclass(frozen=True)
class BrokerView:
    """What the broker's files are made of: the gateways allowed in, and the CRL's entries."""

    gateways: list[BrokerGateway]
    revoked: list[RevokedEntry]
    disabled: int
    orphaned: int


async def broker_view(conn: asyncpg.Connection) -> BrokerView:
    """Enabled gateways with a valid credential (and their password hash, if any); every
    certificate that must be
    refused: revoked ones with their reason, those of disabled gateways on hold (released when
    the gateway is enabled again) and those of deleted gateways as ceased."""
    now = datetime.now(UTC)
    gateways = await conn.fetch(
        "SELECT g.id, g.tenant_id, g.enabled AND t.enabled AS enabled, c.password_hash"
        " FROM gateways g JOIN tenants t ON t.id = g.tenant_id"
        " LEFT JOIN gateway_credentials c ON c.gateway_id = g.id AND c.kind = 'password'"
        "  AND c.revoked_at IS NULL"
        " ORDER BY g.tenant_id, g.id"
    )
    enabled = {r["id"]: r for r in gateways if r["enabled"]}
    known = {r["id"] for r in gateways}
    certs = await conn.fetch(
        "SELECT gateway_id, serial, revoked_at, revocation_reason FROM gateway_credentials"
        " WHERE kind = 'certificate' AND not_after > $1 ORDER BY issued_at",
        now,
    )
    revoked: list[RevokedEntry] = []
    orphaned = 0
    certified: set[uuid.UUID] = set()
    for cert in certs:
        serial = int(cert["serial"], 16)
        if cert["revoked_at"] is not None:
            reason = REASONS.get(cert["revocation_reason"] or "", x509.ReasonFlags.unspecified)
            revoked.append(RevokedEntry(serial, cert["revoked_at"], reason))
        elif cert["gateway_id"] not in known:
            orphaned += 1
            revoked.append(RevokedEntry(serial, now, x509.ReasonFlags.cessation_of_operation))
        elif cert["gateway_id"] not in enabled:
            revoked.append(RevokedEntry(serial, now, x509.ReasonFlags.certificate_hold))
        else:
            certified.add(cert["gateway_id"])
    # Only a gateway with a valid credential keeps its ACL rules: Mosquitto checks the CRL only
    # at connect, so a session of a gateway whose every certificate was just revoked loses its
    # topics at the reload instead.
    admitted = [r for r in enabled.values() if r["password_hash"] or r["id"] in certified]
    return BrokerView(
        gateways=[BrokerGateway(r["id"], r["tenant_id"], r["password_hash"]) for r in admitted],
        revoked=revoked,
        disabled=len(known) - len(enabled),
        orphaned=orphaned,
    )
