"""No foreign keys in either database: references are checked by the application (the seed's decision)."""

from __future__ import annotations

import asyncpg

from collector.migrations import apply
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_PG_DSN


async def test_migrated_databases_have_no_foreign_keys() -> None:
    """docs/troubleshooting.md promises that "foreign key constraint violation" cannot come from us."""
    found: dict[str, list[str]] = {}
    for kind in ("metadata", "timeseries"):
        dsn = await create_database(SYSTEM_PG_DSN, "smfk", timescale=kind == "timeseries")
        try:
            await apply(dsn, kind)
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch(
                    "SELECT conrelid::regclass::text AS t, conname FROM pg_constraint "
                    "WHERE contype = 'f' AND connamespace = 'public'::regnamespace"
                )
                tables = await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                )
            finally:
                await conn.close()
        finally:
            await drop_database(SYSTEM_PG_DSN, dsn)
        assert tables >= 4
        found[kind] = [f"{r['t']}.{r['conname']}" for r in rows]
    assert {"metadata": [], "timeseries": []} == found
