"""Versioned SQL migrations of the two databases, applied under an advisory lock.

Files are ``<folder>/NNNN_name.sql`` with ``folder`` ``metadata`` or ``timeseries``. Each file runs
in its own transaction together with the insertion of its row into ``schema_migrations``, so a
file is applied completely or not at all. An advisory lock serializes collectors that start at
once: the second one waits, then finds nothing pending. A file whose checksum differs from the
one recorded when it was applied is refused: applied migrations are never edited, only added.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import asyncpg

from collector.errors import DatabaseUnavailable, MigrationError

Kind = Literal["metadata", "timeseries"]
KINDS: tuple[Kind, ...] = ("metadata", "timeseries")
ROOT = Path(__file__).resolve().parent
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Arbitrary fixed keys: one lock per database kind, shared by every collector version.
_LOCK_KEYS: dict[str, int] = {"metadata": 0x53_4D_4D_45_54_41, "timeseries": 0x53_4D_54_53_44_42}

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        """The file's text."""
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class MigrationState:
    """One migration and whether (and when) it was applied."""

    version: int
    name: str
    applied_at: datetime | None

    @property
    def applied(self) -> bool:
        """Whether the migration is applied."""
        return self.applied_at is not None


def migrations(kind: Kind, root: Path = ROOT) -> list[Migration]:
    """The migration files of ``kind`` in version order."""
    if kind not in KINDS:
        raise MigrationError(f"unknown database kind {kind!r}; expected metadata or timeseries")
    found: list[Migration] = []
    for path in sorted((root / kind).glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{root / kind}: two migration files share a version number")
    return found


async def _connect(dsn: str, connect_kwargs: dict[str, Any] | None) -> asyncpg.Connection:
    kwargs = dict(connect_kwargs or {})
    kwargs.setdefault("dsn", dsn)
    try:
        return await asyncpg.connect(**kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the {dsn.split('@')[-1]} database: {exc}"
        ) from exc


async def _applied(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch("SELECT version, name, checksum, applied_at FROM schema_migrations")
    return {int(r["version"]): r for r in rows}


def _check_history(kind: Kind, files: list[Migration], applied: dict[int, asyncpg.Record]) -> None:
    by_version = {m.version: m for m in files}
    for version, row in applied.items():
        m = by_version.get(version)
        if m is None:
            raise MigrationError(
                f"{kind} database has migration {version:04d}_{row['name']} applied, which this collector does not know (newer collector?)"
            )
        if m.checksum != row["checksum"]:
            raise MigrationError(
                f"{m.path}: changed after it was applied to the {kind} database; add a new migration instead"
            )


async def apply(
    dsn: str,
    kind: Kind,
    *,
    chunk_interval: timedelta = timedelta(days=1),
    connect_kwargs: dict[str, Any] | None = None,
    target: int | None = None,
) -> list[int]:
    """Apply the pending migrations of ``kind`` to the database at ``dsn``; return their versions.

    ``target``: stop after that version (the upgrade tests build a database of an older release).
    """
    files = migrations(kind)
    conn = await _connect(dsn, connect_kwargs)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEYS[kind])
        try:
            await conn.execute("SET client_min_messages = warning")
            await conn.execute(_CREATE_TABLE)
            applied = await _applied(conn)
            _check_history(kind, files, applied)
            done: list[int] = []
            for m in files:
                if m.version in applied or (target is not None and m.version > target):
                    continue
                async with conn.transaction():
                    await conn.execute(
                        "SELECT set_config('sensormine.chunk_interval', $1, true)",
                        f"{int(chunk_interval.total_seconds())} seconds",
                    )
                    try:
                        await conn.execute(m.sql)
                    except asyncpg.PostgresError as exc:
                        raise MigrationError(f"{m.path}: {exc}") from exc
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        m.version,
                        m.name,
                        m.checksum,
                    )
                done.append(m.version)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEYS[kind])
    finally:
        await conn.close()


async def status(
    dsn: str, kind: Kind, *, connect_kwargs: dict[str, Any] | None = None
) -> list[MigrationState]:
    """Every known migration of ``kind`` with the time it was applied (``None``: pending)."""
    files = migrations(kind)
    conn = await _connect(dsn, connect_kwargs)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied = await _applied(conn) if exists else {}
    finally:
        await conn.close()
    return [
        MigrationState(
            m.version, m.name, applied[m.version]["applied_at"] if m.version in applied else None
        )
        for m in files
    ]


def lock_key(kind: str) -> int:
    """The advisory-lock key that serializes schema changes of the ``kind`` database."""
    return _LOCK_KEYS[kind]
