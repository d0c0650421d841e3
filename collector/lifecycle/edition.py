"""Which TimescaleDB edition the time-series database runs, and what that allows."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

HYPERTABLES = ("telemetry", "telemetry_text", "events", "metrics", "device_status_history")


@dataclass(frozen=True)
class Edition:
    """``license`` is ``timescale`` (community, TSL) or ``apache``; ``version`` the extension's."""

    license: str
    version: str

    @property
    def native_policies(self) -> bool:
        """Whether compression and background retention policies exist in this edition."""
        return self.license == "timescale"

    @property
    def name(self) -> str:
        """A phrase for people."""
        if self.native_policies:
            return "community (TSL) edition"
        return "Apache-2 edition (no compression, no background policies)"


async def detect(conn: asyncpg.Connection) -> Edition:
    """Read ``timescaledb.license`` and the extension's version from the connected database."""
    row = await conn.fetchrow(
        "SELECT current_setting('timescaledb.license', true) AS license, "
        "(SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version"
    )
    assert row is not None
    return Edition(str(row["license"] or "unknown"), str(row["version"] or "not installed"))
