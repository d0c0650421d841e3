"""Names for the ids in what the collector tells an operator (``status``, ``quarantine list``,
``doctor``): tenants, gateways and devices from the metadata database, shown as ``name [id]``.

The time-series database holds ids only (no joins across the two databases); a report reads the
names once from the metadata database. When it cannot be asked, reports show the ids alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import asyncpg

from collector.settings import Settings

_TABLES = ("tenants", "gateways", "devices")


@dataclass(frozen=True)
class Names:
    """Id → name of tenants, gateways and devices (empty where unknown)."""

    by_id: dict[str, str] = field(default_factory=dict)
    available: bool = True

    def name(self, ident: uuid.UUID | str | None) -> str | None:
        """The name of ``ident``, or ``None``."""
        return None if ident is None else self.by_id.get(str(ident))

    def label(self, ident: uuid.UUID | str | None) -> str:
        """``name [id]`` where the name is known, else the id (``-`` for none)."""
        if ident is None:
            return "-"
        name = self.by_id.get(str(ident))
        return f"{name} [{ident}]" if name else str(ident)


async def fetch_names(settings: Settings) -> Names:
    """Read the names of every tenant, gateway and device from the metadata database."""
    from collector.service import db_kwargs  # the service module imports much; load it late

    try:
        conn = await asyncpg.connect(**db_kwargs(settings, "metadata"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return Names(available=False)
    try:
        by_id: dict[str, str] = {}
        for table in _TABLES:
            for r in await conn.fetch(f"SELECT id, name FROM {table}"):
                by_id[str(r["id"])] = str(r["name"])
        return Names(by_id)
    except asyncpg.PostgresError:
        return Names(available=False)
    finally:
        await conn.close()
