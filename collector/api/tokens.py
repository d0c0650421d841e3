"""API tokens: made, listed, revoked and checked against the metadata database.

A token reads ``smt_`` followed by 43 URL-safe characters (32 random bytes). Only its SHA-256 is
stored, with its first 12 characters so that an operator can tell tokens apart in ``tokens
list``. Each token belongs to one tenant and reads that tenant only.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

PREFIX = "smt_"
SHOWN = 12


@dataclass(frozen=True)
class TokenRecord:
    """A stored token (never the secret itself)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    token_prefix: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class Caller:
    """Who a request is: the token's id and its tenant."""

    token_id: uuid.UUID
    tenant_id: uuid.UUID


def digest(token: str) -> bytes:
    """The stored form of ``token``."""
    return hashlib.sha256(token.encode()).digest()


def new_secret() -> str:
    """A fresh token."""
    return PREFIX + secrets.token_urlsafe(32)


class TokenError(Exception):
    """A token operation refused, with the reason in words."""


async def create(
    conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    name: str,
    created_by: str = "",
    expires_at: datetime | None = None,
) -> tuple[TokenRecord, str]:
    """Make a token for ``tenant_id``; returns its record and the secret (shown once)."""
    if not name.strip():
        raise TokenError("a token needs a name (--name)")
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", tenant_id):
        raise TokenError(f"no tenant with id {tenant_id}")
    secret = new_secret()
    try:
        row = await conn.fetchrow(
            "INSERT INTO api_tokens (tenant_id, name, token_prefix, token_sha256, created_by,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            tenant_id,
            name,
            secret[:SHOWN],
            digest(secret),
            created_by,
            expires_at,
        )
    except asyncpg.UniqueViolationError:
        raise TokenError(
            f"tenant {tenant_id} already has a valid token named {name!r}; revoke it or choose"
            " another name"
        ) from None
    assert row is not None
    return _record(row), secret


async def listing(
    conn: asyncpg.Connection, tenant_id: uuid.UUID | None = None, revoked: bool = False
) -> list[TokenRecord]:
    """Tokens of one tenant or of all, the revoked ones only when asked."""
    rows = await conn.fetch(
        "SELECT * FROM api_tokens WHERE ($1::uuid IS NULL OR tenant_id = $1)"
        " AND ($2 OR revoked_at IS NULL) ORDER BY tenant_id, created_at",
        tenant_id,
        revoked,
    )
    return [_record(r) for r in rows]


async def revoke(conn: asyncpg.Connection, ident: str) -> TokenRecord:
    """Revoke a token by its id or by the start of its secret as ``tokens list`` shows it."""
    try:
        token_id: uuid.UUID | None = uuid.UUID(ident)
    except ValueError:
        token_id = None
    if token_id is not None:
        rows = await conn.fetch("SELECT * FROM api_tokens WHERE id = $1", token_id)
    else:
        if len(ident) < 8:
            raise TokenError(f"{ident!r}: give the token's id or at least 8 characters of it")
        rows = await conn.fetch(
            "SELECT * FROM api_tokens WHERE token_prefix = left($1, $2)"
            " OR (length($1) > $2 AND token_sha256 = $3)",
            ident,
            SHOWN,
            digest(ident),
        )
    if not rows:
        raise TokenError(f"no token {ident!r}")
    if len(rows) > 1:
        raise TokenError(f"{ident!r} matches {len(rows)} tokens; give the token's id")
    row = await conn.fetchrow(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING *",
        rows[0]["id"],
    )
    assert row is not None
    return _record(row)


_AUTH_SQL = """
SELECT t.id, t.tenant_id
FROM api_tokens t
WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL
  AND (t.expires_at IS NULL OR t.expires_at > now())
  AND EXISTS (SELECT 1 FROM tenants WHERE id = t.tenant_id AND enabled)
"""


async def authenticate(conn: asyncpg.Connection | asyncpg.Pool, token: str) -> Caller | None:
    """The caller ``token`` stands for, or ``None`` for an unknown, revoked or expired one."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    row = await conn.fetchrow(_AUTH_SQL, digest(token))
    if row is None:
        return None
    return Caller(row["id"], row["tenant_id"])


def _record(row: asyncpg.Record) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        token_prefix=row["token_prefix"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )
