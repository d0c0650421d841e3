"""Pieces of the collector against the real database: COPY rows, validators, migrations, notify."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from collector import copy_format, migrations
from collector.errors import MigrationError
from collector.series import SeriesCatalog, value_kind
from collector.service import Collector
from collector.validation import SchemaError, check_series, compile_schema
from protocol import Reason, Value
from tests.collector.conftest import Databases, collector_settings
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_MQTT, SYSTEM_PG_DSN


async def test_binary_copy_rows_read_back_exactly(scratch_db: str) -> None:
    """Numeric, boolean, non-finite, text and mixed series come back from telemetry as sent."""
    await migrations.apply(scratch_db, "timeseries")
    tenant, device = uuid.uuid4(), uuid.uuid4()
    t0 = 1_764_000_000_123_457
    series: list[tuple[str, list[int], list[Value]]] = [
        ("temperature", [t0, t0 + 1, t0 + 999_999], [21.25, -0.0, 1e300]),
        ("count", [t0 + 2, t0 + 3], [2**53 + 1, -7]),
        ("door", [t0 + 4, t0 + 5], [True, False]),
        ("noise", [t0 + 6, t0 + 7], [float("nan"), float("-inf")]),
        ("mode", [t0 + 8], ["auto ✓"]),
        ("mixed", [t0 + 9, t0 + 10], ["on", 3.5]),
    ]
    conn = await asyncpg.connect(scratch_db)
    try:
        async with conn.transaction():
            ids = await SeriesCatalog().resolve(
                conn, {(tenant, device, m): value_kind(vs) for m, _, vs in series}
            )
            parts = [
                copy_format.series_rows(ids[(tenant, device, m)], ts, vs) for m, ts, vs in series
            ]
            for table, data in (
                ("telemetry", b"".join(p[0] for p in parts)),
                ("telemetry_text", b"".join(p[1] for p in parts)),
            ):
                await conn.copy_to_table(
                    table,
                    source=_aiter([copy_format.HEADER, data, copy_format.TRAILER]),
                    columns=copy_format.COLUMNS,
                    format="binary",
                )
        rows = await conn.fetch("SELECT * FROM readings ORDER BY time")
    finally:
        await conn.close()
    expected = []
    for metric, ts, vs in series:
        for t, v in zip(ts, vs, strict=True):
            text = v if isinstance(v, str) else None
            number = None if isinstance(v, str) else float(v)
            expected.append(
                (
                    datetime.fromtimestamp(t // 1_000_000, UTC).replace(microsecond=t % 1_000_000),
                    tenant,
                    device,
                    metric,
                    number,
                    text,
                )
            )
    expected.sort(key=lambda row: row[0])
    got = [
        (r["time"], r["tenant_id"], r["device_id"], r["metric"], r["value"], r["value_text"])
        for r in rows
    ]
    assert len(expected) == len(got)
    for e, g in zip(expected, got, strict=True):
        if isinstance(e[4], float) and math.isnan(e[4]):
            assert math.isnan(g[4]) and e[:4] == g[:4]
        else:
            assert e == g


async def _aiter(parts: list[bytes]):  # type: ignore[no-untyped-def]
    for p in parts:
        yield p


def test_validator_checks_series_as_a_whole_and_explains_each_refusal() -> None:
    """Fast path accepts a clean series; a dirty one is split point by point with reasons."""
    schema = compile_schema(
        {
            "additionalProperties": False,
            "properties": {
                "t": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
                "n": {"type": "integer", "enum": [1, 2, 3]},
                "f": {"type": "number", "allowNonFinite": True},
            },
        }
    )
    t_rule = schema.rule("t")
    assert t_rule is not None
    assert check_series(t_rule, [1, 2, 3], [0, 5.5, 9.99], 0, 10).accepted is None
    verdict = check_series(t_rule, [1, 2, 3, 4, 50], [0, 10, float("nan"), "x", 1], 0, 10)
    assert [0] == verdict.accepted
    assert {r.reason: r.indexes for r in verdict.rejects} == {
        Reason.OUT_OF_RANGE: [1],
        Reason.NON_FINITE: [2],
        Reason.TYPE_MISMATCH: [3],
        Reason.TIMESTAMP_OUT_OF_WINDOW: [4],
    }
    n_rule = schema.rule("n")
    assert n_rule is not None
    verdict = check_series(n_rule, [1, 2, 3], [1, 2.0, 4], 0, 10)
    assert ([0, 1], {Reason.NOT_IN_ENUM: [2]}) == (
        verdict.accepted,
        {r.reason: r.indexes for r in verdict.rejects},
    )
    f_rule = schema.rule("f")
    assert f_rule is not None
    assert check_series(f_rule, [1, 2], [float("inf"), float("nan")], 0, 10).accepted is None
    assert schema.rule("unknown") is None
    with pytest.raises(SchemaError, match="unsupported keyword"):
        compile_schema({"properties": {"x": {"type": "number", "pattern": "a"}}})


async def test_migrations_apply_once_under_concurrency_and_refuse_edited_files(
    tmp_path: Path,
) -> None:
    """Three appliers at once apply each file once; --status lists them; an edited file is refused."""
    dsn = await create_database(SYSTEM_PG_DSN, "smmig", timescale=False)
    try:
        assert all(not s.applied for s in await migrations.status(dsn, "metadata"))
        results = await asyncio.gather(*(migrations.apply(dsn, "metadata") for _ in range(3)))
        assert sorted(map(len, results)) == [0, 0, len(migrations.migrations("metadata"))]
        assert all(s.applied for s in await migrations.status(dsn, "metadata"))
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        finally:
            await conn.close()
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrations.apply(dsn, "metadata")
    finally:
        await drop_database(SYSTEM_PG_DSN, dsn)


async def test_registry_changes_notify(scratch_db: str) -> None:
    """Inserting a device sends 'devices:<id>' on the registry channel."""
    await migrations.apply(scratch_db, "metadata")
    conn = await asyncpg.connect(scratch_db)
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await conn.add_listener("sensormine_registry", lambda *a: got.put_nowait(a[3]))
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
        gw = await conn.fetchval(
            "INSERT INTO gateways (tenant_id, name) VALUES ($1, 'g') RETURNING id", tenant
        )
        assert f"gateways:{gw}" == await asyncio.wait_for(got.get(), 5)
    finally:
        await conn.close()


async def test_chunk_interval_is_configurable(scratch_db: str) -> None:
    """The hypertables get the configured chunk interval (metrics and status history 7x)."""
    await migrations.apply(scratch_db, "timeseries", chunk_interval=timedelta(hours=6))
    conn = await asyncpg.connect(scratch_db)
    try:
        rows = await conn.fetch(
            "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions ORDER BY 1"
        )
    finally:
        await conn.close()
    assert {
        "device_status_history": timedelta(hours=42),
        "events": timedelta(hours=6),
        "metrics": timedelta(hours=42),
        "telemetry": timedelta(hours=6),
        "telemetry_text": timedelta(hours=6),
    } == {r["hypertable_name"]: r["time_interval"] for r in rows}


async def test_collectors_starting_together_set_the_chunk_interval_without_conflict(
    dbs: Databases,
) -> None:
    """Several collectors applying a new chunk interval at once neither fail nor disagree."""
    settings = collector_settings(dbs, *SYSTEM_MQTT, "p", timeseries={"chunk_interval": "6h"})
    await asyncio.gather(*(Collector(settings)._set_chunk_interval() for _ in range(6)))
    intervals = await dbs.fetch(
        "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_name IN ('telemetry', 'telemetry_text', 'events') ORDER BY 1"
    )
    assert [
        ("events", timedelta(hours=6)),
        ("telemetry", timedelta(hours=6)),
        ("telemetry_text", timedelta(hours=6)),
    ] == [tuple(r) for r in intervals]
