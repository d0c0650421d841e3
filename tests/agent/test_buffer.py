"""The SQLite buffer on real files: sealing, overflow accounting, full disk, corruption."""

from __future__ import annotations

import random
import sqlite3
import uuid
from pathlib import Path

import pytest

from agent.buffer import Buffer, ReadingRow, integrity
from agent.errors import BufferFileError
from protocol import decode_batch

GATEWAY = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
DEVICE = uuid.UUID("00000000-0000-4000-8000-0000000000bb")
T0 = 1_700_000_000_000_000


def rows(first: int, n: int, metric: str = "m") -> list[ReadingRow]:
    """``n`` readings whose values are first..first+n-1 (their identity)."""
    return [(DEVICE.bytes, metric, T0 + v, v) for v in range(first, first + n)]


def noisy_rows(first: int, n: int) -> list[ReadingRow]:
    """Readings identified by int(value) whose fractions do not compress (real-world sized)."""
    rng = random.Random(first)
    return [(DEVICE.bytes, "m", T0 + v, v + rng.random() / 2) for v in range(first, first + n)]


def values_in(frames: list[bytes]) -> list[int]:
    """Every value in the given frames, in order."""
    return [int(v) for f in frames for s in decode_batch(f).series for v in s.values]


async def test_sealed_frame_holds_readings_events_and_status_and_survives_reopen(
    tmp_path: Path,
) -> None:
    """A sealed batch carries its readings (typed), notes and seq; counters persist."""
    path = tmp_path / "buffer.db"
    from agent.buffer import event_note, status_note

    async with Buffer(path, gateway_id=GATEWAY, max_points=100) as buffer:
        stream = buffer.stream
        await buffer.append(
            [
                (DEVICE.bytes, "t", T0, 21.5),
                (DEVICE.bytes, "on", T0, True),
                (DEVICE.bytes, "mode", T0, "auto"),
                (DEVICE.bytes, "count", T0, 7),
            ]
        )
        await buffer.add_notes(
            [event_note("test.event", "hello"), status_note(DEVICE, "error", "timeout")]
        )
        assert [] == await buffer.seal()
        assert [0] == await buffer.seal(force=True)
        [sealed] = await buffer.batches(limit=10)
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        assert stream == buffer.stream
        [again] = await buffer.batches(limit=10)
        assert sealed.frame == again.frame
        batch = decode_batch(again.frame)
        values = {s.metric: s.values for s in batch.series}
        assert {"t": [21.5], "on": [True], "mode": ["auto"], "count": [7]} == values
        assert ["test.event"] == [e.kind for e in batch.events]
        assert [("error", "timeout")] == [(s.status, s.reason) for s in batch.status]
        assert (0, stream, GATEWAY) == (batch.seq, batch.stream, batch.gateway_id)
        assert [] == await buffer.seal(force=True)  # nothing pending: no empty batch
        stats = await buffer.stats()
        assert (4, 4, 0) == (stats.produced, stats.readings, stats.delivered)


async def test_batches_seal_at_max_points_and_frame_size(tmp_path: Path) -> None:
    """Batches are sealed at max_points, and split further when the frame would be too big."""
    async with Buffer(
        tmp_path / "b.db", gateway_id=GATEWAY, max_points=1000, max_frame_bytes=4096
    ) as buffer:
        # Random-looking text values do not compress: 1000 of them exceed 4 KiB.
        await buffer.append([(DEVICE.bytes, "s", T0 + i, uuid.uuid4().hex) for i in range(2500)])
        await buffer.seal(force=True)
        frames = [b.frame for b in await buffer.batches(limit=100)]
    assert all(len(f) <= 4096 for f in frames)
    assert 2500 == sum(decode_batch(f).point_count for f in frames)
    assert max(decode_batch(f).point_count for f in frames) <= 1000
    seqs = [decode_batch(f).seq for f in frames]
    assert list(range(len(frames))) == seqs


async def test_drop_oldest_keeps_newest_and_counts_exactly(tmp_path: Path) -> None:
    """With a tiny max_bytes the oldest readings go, the newest stay, and the count is exact."""
    async with Buffer(
        tmp_path / "b.db", gateway_id=GATEWAY, max_bytes=8192, max_points=50
    ) as buffer:
        total = 0
        reported = 0

        async def seal(force: bool = False) -> None:
            nonlocal reported
            for seq in await buffer.seal(force=force):
                [new] = await buffer.batches(after=seq - 1, upto=seq, limit=1)
                events = decode_batch(new.frame).events
                reported += sum(
                    e.attributes["count"] for e in events if e.kind == "readings.dropped"
                )

        for i in range(40):
            await buffer.append(noisy_rows(i * 25, 25))
            await seal()
            total += 25
        stats = await buffer.stats()
        assert stats.bytes <= 8192
        frames = [b.frame for b in await buffer.batches(limit=1000)]
        kept = values_in(frames)
        unsealed = [int(v) for (v,) in await buffer.query("SELECT value FROM readings ORDER BY id")]
        kept += unsealed
        # The newest readings are all there, contiguous up to the last one produced.
        assert list(range(total - len(kept), total)) == sorted(kept)
        assert total - len(kept) == stats.dropped["drop_oldest"]
        assert total == stats.produced
        # Every drop is reported, once, in readings.dropped events of later batches.
        await seal(force=True)
        assert stats.dropped["drop_oldest"] == reported


async def test_drop_oldest_never_deletes_a_batch_in_flight(tmp_path: Path) -> None:
    """drop_oldest skips batches the shipper has in flight."""
    async with Buffer(
        tmp_path / "b.db", gateway_id=GATEWAY, max_bytes=8192, max_points=50
    ) as buffer:
        await buffer.append(noisy_rows(0, 50))
        [first] = await buffer.seal()
        buffer.protected.add(first)
        for i in range(1, 30):
            await buffer.append(noisy_rows(i * 50, 50))
            await buffer.seal()
        seqs = [b.seq for b in await buffer.batches(limit=1000)]
        assert first in seqs
        assert first + 1 not in seqs


async def test_drop_newest_refuses_what_does_not_fit(tmp_path: Path) -> None:
    """drop_newest keeps the oldest readings and counts the refused ones exactly."""
    async with Buffer(
        tmp_path / "b.db", gateway_id=GATEWAY, max_bytes=8192, overflow="drop_newest"
    ) as buffer:
        results = [await buffer.append(rows(i * 50, 50)) for i in range(10)]
        stored = sum(r.stored for r in results)
        dropped = sum(r.dropped for r in results)
        assert 500 == stored + dropped
        values = [int(v) for (v,) in await buffer.query("SELECT value FROM readings ORDER BY id")]
        assert list(range(stored)) == values
        assert dropped == (await buffer.stats()).dropped["drop_newest"]


async def test_full_disk_is_counted_and_writing_resumes(tmp_path: Path) -> None:
    """SQLITE_FULL (a real one, from max_page_count): readings wait in memory up to the hold
    bound (the newest kept), only the excess is counted as dropped; writing resumes after."""
    path = tmp_path / "b.db"
    async with Buffer(path, gateway_id=GATEWAY, max_points=100_000, hold_readings=5000) as buffer:
        await buffer.append(rows(0, 10))
        pages = int((await buffer.query("PRAGMA page_count"))[0][0])
        await buffer.set_max_page_count(pages + 2)
        stored = dropped = held = 0
        for i in range(1, 40):
            result = await buffer.append(rows(i * 1000, 1000))
            stored += result.stored
            dropped += result.dropped
            held = result.held
        assert dropped > 0, "the page cap never filled the file"
        assert 5000 == held
        # Sealing and acking while full must not crash either.
        await buffer.seal(force=True)
        await buffer.set_max_page_count(1_000_000)
        after = await buffer.append(rows(10_000_000, 100))
        assert (5100, 0, 0) == (after.stored, after.dropped, after.held)
        stats = await buffer.stats()
        assert dropped == stats.dropped["disk_full"]
        assert 10 + 39_000 + 100 == stats.produced
        assert stats.produced == stats.readings + sum(stats.dropped.values())
        present = {int(v) for (v,) in await buffer.query("SELECT value FROM readings")}
        batched = [b.frame for b in await buffer.batches(limit=1000)]
        present.update(values_in(batched))
        # drop_oldest: the held readings that survived are the newest ones.
        assert set(range(35_000, 40_000)) <= present
    conn = sqlite3.connect(path)
    try:
        assert "ok" == integrity(conn)
        # The drop counts were persisted once space returned.
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        assert dropped == meta["dropped_disk_full"]
    finally:
        conn.close()


async def test_corrupt_file_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    """A corrupt buffer is renamed buffer.db.corrupt-<timestamp>; an event records it."""
    path = tmp_path / "buffer.db"
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        await buffer.append(rows(0, 2000))
        old_stream = buffer.stream
    data = bytearray(path.read_bytes())
    data[4096 : 4096 + 2048] = b"\xde\xad\xbe\xef" * 512  # wreck a b-tree page
    path.write_bytes(bytes(data))
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        assert buffer.moved_to is not None
        assert buffer.moved_to.name.startswith("buffer.db.corrupt-")
        assert buffer.moved_to.exists()
        assert old_stream != buffer.stream
        await buffer.seal(force=True)
        [batch] = await buffer.batches(limit=5)
        [event] = decode_batch(batch.frame).events
        assert ("buffer.corrupt", "error") == (event.kind, event.severity)


async def test_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    """Garbage where the buffer should be does not stop the agent."""
    path = tmp_path / "buffer.db"
    path.write_bytes(b"this is not sqlite" * 100)
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        assert buffer.moved_to is not None
        assert (await buffer.append(rows(0, 3))).stored == 3


async def test_one_agent_per_buffer_file(tmp_path: Path) -> None:
    """A second buffer on the same file is refused while the first is open, and not moved."""
    path = tmp_path / "buffer.db"
    async with Buffer(path, gateway_id=GATEWAY) as first:
        await first.append(rows(0, 5))
        with pytest.raises(BufferFileError, match="another agent process"):
            await Buffer(path, gateway_id=GATEWAY).open()
    async with Buffer(path, gateway_id=GATEWAY) as again:
        assert again.moved_to is None
        assert 5 == again.unsealed


@pytest.mark.parametrize(("synchronous", "level"), [("FULL", 2), ("NORMAL", 1)])
async def test_file_settings(tmp_path: Path, synchronous: str, level: int) -> None:
    """WAL, the chosen synchronous level and a bounded WAL are what the connection uses."""
    async with Buffer(
        tmp_path / "b.db",
        gateway_id=GATEWAY,
        synchronous=synchronous,  # type: ignore[arg-type]
        journal_size_limit=1 << 20,
    ) as buffer:
        assert [("wal",)] == await buffer.query("PRAGMA journal_mode")
        assert [(level,)] == await buffer.query("PRAGMA synchronous")
        assert [(1 << 20,)] == await buffer.query("PRAGMA journal_size_limit")
