"""Every SQL example of docs/data-model.md runs against freshly migrated databases."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from collector.lifecycle.rollups import rollup
from tests.lifecycle.conftest import write_readings

DOC = Path(__file__).resolve().parents[2] / "docs" / "data-model.md"
_BLOCK = re.compile(r"```sql\n(.*?)```", re.S)
DEVICE = uuid.UUID("00000000-0000-0000-0000-000000000002")
TENANT = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


def examples() -> list[tuple[str, str]]:
    """(database, sql) for each ```sql block; the first line names the database."""
    out = []
    for block in _BLOCK.findall(DOC.read_text()):
        first, _, _ = block.partition("\n")
        match = re.fullmatch(r"-- database: (metadata|timeseries)", first.strip())
        assert match, (
            f"{DOC.name}: an SQL example must start with '-- database: metadata|timeseries': {first!r}"
        )
        out.append((match.group(1), block))
    return out


def test_the_doc_has_the_examples_operators_need() -> None:
    """Latest values, hourly averages, rollups, status history and rejects are all there."""
    found = examples()
    text = " ".join(sql for _, sql in found)
    assert len(found) >= 10
    for needle in (
        "DISTINCT ON",
        "time_bucket",
        "FROM rollups",
        "FROM latest_readings",
        "device_status_history",
        "ingest_rejects",
    ):
        assert needle in text
    assert {"metadata", "timeseries"} == {db for db, _ in found}


async def test_every_sql_example_runs(ts: asyncpg.Connection, metadata_dsn: str) -> None:
    """Each example executes without error on migrated databases holding some data."""
    t0 = datetime.now(UTC) - timedelta(hours=2)
    await write_readings(
        ts,
        TENANT,
        DEVICE,
        "temperature",
        [(t0 + timedelta(minutes=m), 20.0 + m) for m in range(90)],
    )
    await rollup(ts, (60.0, 3600.0), 100)
    await ts.execute(
        "INSERT INTO device_status_history (time, tenant_id, gateway_id, device_id, status, reason) "
        "VALUES (now(), $1, $1, $2, 'offline', 'gateway_offline')",
        TENANT,
        DEVICE,
    )
    await ts.execute("INSERT INTO ingest_rejects (reason, points) VALUES ('out_of_range', 2)")
    meta = await asyncpg.connect(metadata_dsn)
    try:
        for database, sql in examples():
            conn = meta if database == "metadata" else ts
            try:
                await conn.fetch(sql)
            except asyncpg.PostgresError as exc:
                raise AssertionError(f"{DOC.name} example failed: {exc}\n{sql}") from exc
    finally:
        await meta.close()
    rows = await ts.fetch(
        "SELECT bucket FROM rollups WHERE period = interval '1 hour' AND device_id = $1", DEVICE
    )
    assert 2 <= len(rows)
