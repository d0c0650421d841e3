"""Overflow: what an append gives up when the buffer would exceed ``max_bytes``.

``drop_newest`` stores the prefix of the incoming readings that fits; ``drop_oldest`` deletes the
oldest sealed batches that are not in flight (nor acknowledged and waiting for their delete),
then the oldest unsealed readings, then, if that is still not enough, the oldest of the incoming
readings. The caller counts what was dropped in the same transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from agent.buffer.schema import BATCH_COST, READING_COST


@dataclass(slots=True)
class Freed:
    """What :func:`drop_oldest` deleted from the file."""

    bytes: int = 0
    readings: int = 0
    unsealed: int = 0
    batches: int = 0

    @property
    def batched(self) -> int:
        """Readings that were in deleted batches."""
        return self.readings - self.unsealed


def fitting_prefix(costs: Sequence[int], room: int) -> int:
    """How many of the first ``costs`` fit in ``room`` bytes (``drop_newest``)."""
    total = kept = 0
    for c in costs:
        if total + c > room:
            break
        total += c
        kept += 1
    return kept


def oldest_incoming(costs: Sequence[int], rest: int) -> int:
    """How many of the oldest incoming readings must go to free ``rest`` more bytes."""
    n = 0
    while rest > 0 and n < len(costs):
        rest -= costs[n]
        n += 1
    return n


def drop_oldest(conn: sqlite3.Connection, excess: int, keep: Collection[int]) -> Freed:
    """Delete the oldest batches whose seq is not in ``keep``, then the oldest readings."""
    freed = Freed()
    cursor = conn.execute(
        f"SELECT seq, {BATCH_COST} + length(frame), readings FROM batches ORDER BY seq"
    )
    doomed: list[int] = []
    for seq, size, count in cursor:
        if freed.bytes >= excess:
            break
        if seq in keep:
            continue
        doomed.append(seq)
        freed.bytes += size
        freed.readings += count
    cursor.close()
    if doomed:
        conn.executemany("DELETE FROM batches WHERE seq = ?", [(s,) for s in doomed])
        freed.batches = len(doomed)
    last_id = None
    if freed.bytes < excess:
        cursor = conn.execute(
            f"SELECT id, {READING_COST} + length(metric)"
            " + CASE WHEN typeof(value) = 'text' THEN length(value) ELSE 0 END"
            " FROM readings ORDER BY id"
        )
        for rid, size in cursor:
            if freed.bytes >= excess:
                break
            freed.bytes += size
            freed.readings += 1
            freed.unsealed += 1
            last_id = rid
        cursor.close()
        if last_id is not None:
            conn.execute("DELETE FROM readings WHERE id <= ?", (last_id,))
    return freed
