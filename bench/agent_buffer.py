"""Benchmark: readings/s through the agent's buffer (append + seal) against raw sqlite3.

Readings come from the ``simulated`` input (50 devices x 4 metrics), staged as the runtime does,
appended in grouped transactions of one commit interval's worth and sealed into batches of 5000.
The baseline is plain ``sqlite3`` ``executemany`` of the same rows into a table of the same
shape, same file settings (WAL, synchronous=FULL), same transaction size, in this process.
The last line is ``agent buffer: <r> readings/s, raw sqlite <s> rows/s, ratio <q>, rss <m> MiB``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agent.buffer import Buffer, ReadingRow
from agent.inputs.base import InputContext
from agent.inputs.simulated import SimulatedConfig, SimulatedInput
from agent.runtime import InputEmitter, Staging, rss_bytes

DEVICES = 50
TICKS = 2500  # 50 x 4 x 2500 = 500,000 readings
GROUP = 10_000  # readings per transaction (one commit interval at 100k readings/s)


def make_rows() -> Iterator[list[ReadingRow]]:
    """Readings from the simulated input, one transaction's worth at a time (same every call)."""
    config = SimulatedConfig(
        name="bench",
        interval=1.0,
        seed=1,
        devices=tuple(
            {"id": uuid.uuid5(uuid.NAMESPACE_URL, f"bench-{i}"), "name": f"d{i}"}  # type: ignore[misc]
            for i in range(DEVICES)
        ),
    )
    sim = SimulatedInput(config, InputContext(gateway_id=uuid.uuid4(), buffer_path=Path("x")))
    staging = Staging()
    emitter = InputEmitter("bench", staging, {})
    per_group = GROUP // (DEVICES * 4)
    for _ in range(TICKS // per_group):
        for _ in range(per_group):
            sim._cycle(emitter)
        rows, _ = staging.take()
        yield rows


async def agent_run(path: Path) -> tuple[int, float]:
    """Readings and seconds to append and seal every group through the agent's buffer."""
    total, elapsed = 0, 0.0
    async with Buffer(path, gateway_id=uuid.uuid4(), max_bytes=2**34) as buffer:
        for group in make_rows():
            started = time.perf_counter()  # generating readings is not timed
            await buffer.append(group)
            await buffer.seal()
            elapsed += time.perf_counter() - started
            total += len(group)
        started = time.perf_counter()
        await buffer.seal(force=True)
        elapsed += time.perf_counter() - started
        assert buffer.unsealed == 0
    return total, elapsed


def raw_run(path: Path) -> tuple[int, float]:
    """Rows and seconds to insert the same rows with plain sqlite3 executemany."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE readings (id INTEGER PRIMARY KEY, device BLOB, metric TEXT, ts INTEGER, value)"
    )
    total, elapsed = 0, 0.0
    for group in make_rows():
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO readings(device, metric, ts, value) VALUES (?, ?, ?, ?)", group
        )
        conn.execute("COMMIT")
        elapsed += time.perf_counter() - started
        total += len(group)
    conn.close()
    return total, elapsed


def main() -> None:
    """Run both, print figures, and the summary line last."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        raw_total, raw_s = raw_run(Path(tmp) / "raw.db")
        total, agent_s = asyncio.run(agent_run(Path(tmp) / "agent.db"))
    assert raw_total == total
    agent_rate = total / agent_s
    raw_rate = raw_total / raw_s
    rss = rss_bytes() / 2**20
    print(f"readings: {total} in transactions of {GROUP}")
    print(f"agent buffer (append + seal into frames): {agent_s:.2f} s")
    print(f"raw sqlite3 executemany:                 {raw_s:.2f} s")
    print("targets: ratio >= 0.25, >= 50000 readings/s")
    print(
        f"agent buffer: {agent_rate:.0f} readings/s, raw sqlite {raw_rate:.0f} rows/s,"
        f" ratio {agent_rate / raw_rate:.2f}, rss {rss:.1f} MiB"
    )


if __name__ == "__main__":
    main()
