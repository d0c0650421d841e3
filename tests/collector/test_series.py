"""The series catalog: one id per series across concurrent collectors, a cache that never lies."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from collector import migrations
from collector.series import Kind, SeriesCatalog, SeriesKey, value_kind

TENANT = uuid.UUID(int=0x7E)


def _keys(n: int) -> dict[SeriesKey, Kind]:
    return {(TENANT, uuid.UUID(int=1000 + i), f"m{i % 3}"): "number" for i in range(n)}


async def test_two_transactions_creating_the_same_series_agree_on_one_id(scratch_db: str) -> None:
    """Two collectors creating the same new series at once (in opposite order) get the same ids,
    neither deadlocks, and the catalog holds one row per series."""
    await migrations.apply(scratch_db, "timeseries")
    first, second = await asyncpg.connect(scratch_db), await asyncpg.connect(scratch_db)
    try:
        keys = _keys(50)
        reverse = dict(reversed(list(keys.items())))
        a, b = SeriesCatalog(), SeriesCatalog()
        tx_a, tx_b = first.transaction(), second.transaction()
        await tx_a.start()
        await tx_b.start()
        ids_a = await a.resolve(first, keys)
        # The second waits on the first's uncommitted rows, then reads the committed ids.
        pending_b = asyncio.create_task(b.resolve(second, reverse))
        await asyncio.sleep(0.3)
        assert not pending_b.done()
        await tx_a.commit()
        a.commit()
        ids_b = await asyncio.wait_for(pending_b, 10)
        await tx_b.commit()
        b.commit()
        assert ids_a == ids_b
        assert len(set(ids_a.values())) == 50
        assert 50 == await first.fetchval("SELECT count(*) FROM series")
        assert all(a.get(k) == ids_a[k] for k in keys)
    finally:
        await first.close()
        await second.close()


async def test_a_rolled_back_transaction_leaves_nothing_in_the_cache(scratch_db: str) -> None:
    """Ids made in a transaction that rolls back are not cached; the next resolve makes them again."""
    await migrations.apply(scratch_db, "timeseries")
    conn = await asyncpg.connect(scratch_db)
    try:
        catalog = SeriesCatalog()
        keys = _keys(3)
        tx = conn.transaction()
        await tx.start()
        made = await catalog.resolve(conn, keys)
        await tx.rollback()
        catalog.discard()
        assert all(catalog.get(k) is None for k in keys)
        assert 0 == await conn.fetchval("SELECT count(*) FROM series")
        async with conn.transaction():
            again = await catalog.resolve(conn, keys)
        catalog.commit()
        assert set(again.values()).isdisjoint(made.values())
        stored = {
            (r["tenant_id"], r["device_id"], r["metric"]): r["id"]
            for r in await conn.fetch("SELECT * FROM series")
        }
        assert again == stored
        assert all(catalog.get(k) == again[k] for k in keys)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("values", "kind"),
    [([1.5, "x"], "number"), ([True, 2], "boolean"), (["on"], "text"), ([3], "number")],
)
def test_a_series_kind_is_that_of_its_first_value(values: list[object], kind: str) -> None:
    """The kind recorded is the first value's: booleans are told apart from numbers."""
    assert kind == value_kind(values)
