"""Housekeeping of ``ingest_ledger`` and ``ingest_rejects``: rows older than the horizon go.

The ledger is what makes a resent batch harmless, so its horizon must exceed the longest span any
agent's buffer can hold (and the collector's ``validation.max_age``, beyond which a resent batch's
points are refused anyway): a batch resent after its ledger row is gone would be written twice.
Rows are deleted in slices of ``delete_rows``, each its own transaction, so that a long backlog
of old rows never holds locks for long.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from collector.lifecycle.settings import LedgerSettings

_DELETE = {
    "ingest_ledger": (
        "DELETE FROM ingest_ledger WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM ingest_ledger WHERE received_at < now() - $1::interval LIMIT $2))"
    ),
    "ingest_rejects": (
        "DELETE FROM ingest_rejects WHERE id = ANY(ARRAY("
        "SELECT id FROM ingest_rejects WHERE received_at < now() - $1::interval LIMIT $2))"
    ),
}


async def trim_ledger(conn: asyncpg.Connection, settings: LedgerSettings) -> dict[str, Any]:
    """Delete ledger and reject rows received longer than ``settings.horizon`` ago."""
    horizon = timedelta(seconds=settings.horizon)
    removed: dict[str, int] = {}
    for table, sql in _DELETE.items():
        removed[table] = 0
        while True:
            status = await conn.execute(sql, horizon, settings.delete_rows)
            count = int(status.rsplit(" ", 1)[-1])
            removed[table] += count
            if count < settings.delete_rows:
                break
    return {"removed": removed}
