"""Streams and conflicts (issue 11, defect 2): a rolled-back buffer never loses new readings.

The collector's ledger keeps a digest per (gateway, stream, seq); the same key with other content
is answered ``conflict``. The agent then starts a new stream and re-encodes under it only the
batches answered ``conflict``. The tests play the collector with :class:`Ledger` on the real
broker and run ``sensormine-agent`` as real child processes on real SQLite files.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.buffer import Buffer, open_store_readonly
from protocol import Batch, decode_batch
from tests.agent.conftest import (
    Acknowledger,
    Key,
    Ledger,
    agent_cli,
    content_digest,
    start_agent,
    status_json,
    write_config,
)
from tests.waiting import wait_for

GATEWAY = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
DEVICE = uuid.UUID("00000000-0000-4000-8000-0000000000bb")
T0 = 1_700_000_000_000_000


def stop(agent: Any, timeout: float = 30) -> None:
    """SIGTERM and wait for exit status 0."""
    agent.send_signal(signal.SIGTERM)
    assert 0 == agent.wait(timeout)


def readings_of(batch: Batch) -> set[tuple[uuid.UUID, str, int]]:
    """The readings of a batch, identified by series and time."""
    return {(s.device_id, s.metric, t) for s in batch.series for t in s.timestamps}


async def test_conflict_reencodes_only_that_batch_under_a_new_persisted_stream(
    tmp_path: Path,
) -> None:
    """A conflict on seq 1: a new stream, seq 1 re-encoded with the next seq and the same
    content; seqs 0 and 2 keep their keys; later seals and a reopened file use the new stream."""
    path = tmp_path / "buffer.db"
    async with Buffer(path, gateway_id=GATEWAY, max_points=10) as buffer:
        first = buffer.stream
        await buffer.append([(DEVICE.bytes, "m", T0 + v, v) for v in range(30)])
        assert [0, 1, 2] == await buffer.seal()
        before = {b.seq: b for b in await buffer.batches(limit=10)}
        reencoded = await buffer.conflict(first, 1)
        assert reencoded is not None
        [moved] = reencoded
        second = buffer.stream
        assert second != first
        assert (first, 1, second, 3) == (moved.old_stream, moved.old_seq, moved.stream, moved.seq)
        after = {b.seq: b for b in await buffer.batches(limit=10)}
        assert [0, 2, 3] == sorted(after)
        assert before[0].frame == after[0].frame and before[2].frame == after[2].frame
        assert (first, first, second) == (after[0].stream, after[2].stream, after[3].stream)
        old, new = decode_batch(before[1].frame), decode_batch(after[3].frame)
        assert (second, 3) == (new.stream, new.seq)
        assert content_digest(old) == content_digest(new)
        # A second conflict for a batch of the old stream re-encodes it without renewing again.
        assert [(first, 2, second, 4)] == [
            (r.old_stream, r.old_seq, r.stream, r.seq)
            for r in await buffer.conflict(first, 2) or []
        ]
        # The ack for a batch of the old stream still counts (matched by stream and seq).
        assert await buffer.conflict(second, 0) is None  # seq 0 is of the first stream
        await buffer.append([(DEVICE.bytes, "m", T0 + 100, 100)])
        [seq] = await buffer.seal(force=True)
        [sealed] = await buffer.batches(after=seq - 1, limit=1)
        batch = decode_batch(sealed.frame)
        assert (second, 5) == (batch.stream, batch.seq)
        assert ["buffer.stream_renewed"] == [e.kind for e in batch.events]
        assert {"old_stream": str(first), "new_stream": str(second)}.items() <= (
            batch.events[0].attributes.items()
        )
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        assert second == buffer.stream
        stats = await buffer.stats()
        assert [first, second] == [s.stream for s in stats.streams]
        assert (3, 2) == (stats.streams[1].first_seq, stats.reencoded_batches)
        assert stats.produced == stats.readings + stats.delivered


async def test_a_version_1_file_is_migrated_and_its_batches_keep_the_original_stream(
    tmp_path: Path,
) -> None:
    """A buffer written by the first release (no stream column) opens, and every one of its
    batches belongs to the file's original stream; the frames are untouched."""
    path = tmp_path / "buffer.db"
    async with Buffer(path, gateway_id=GATEWAY, max_points=10) as buffer:
        stream = buffer.stream
        await buffer.append([(DEVICE.bytes, "m", T0 + v, v) for v in range(25)])
        await buffer.seal()
        frames = {b.seq: b.frame for b in await buffer.batches(limit=10)}
    # Turn it back into the first release's layout.
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        ALTER TABLE batches DROP COLUMN stream;
        DROP TABLE streams;
        DROP TABLE outcomes;
        UPDATE meta SET value = 1 WHERE key = 'schema';
        """
    )
    conn.close()
    legacy = open_store_readonly(path)
    assert legacy.legacy and stream == legacy.stream
    legacy.conn.close()
    async with Buffer(path, gateway_id=GATEWAY) as buffer:
        assert stream == buffer.stream
        migrated = {b.seq: (b.frame, b.stream) for b in await buffer.batches(limit=10)}
        assert {seq: (f, stream) for seq, f in frames.items()} == migrated
        stats = await buffer.stats()
        assert [(stream, 0, "created")] == [
            (s.stream, s.first_seq, s.reason) for s in stats.streams
        ]
    verify = agent_cli("buffer", "verify", "--buffer", str(path))
    assert 0 == verify.returncode, verify.stderr


def test_conflicts_resend_only_those_batches_under_a_new_stream_across_restarts(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """The collector answers ``conflict`` to chosen keys of a backlog: only those batches come
    again, re-encoded under one new stream with fresh seqs; every other batch keeps its key; new
    seals use the new stream; it survives restarts (a conflict for a batch of the old stream
    after a restart re-encodes it without another renewal); nothing is counted twice."""
    buffer = tmp_path / "buffer.db"
    gateway, tenant = uuid.uuid4(), uuid.uuid4()

    def config(port: int) -> Path:
        return write_config(
            tmp_path / "agent.toml",
            buffer=buffer,
            port=port,
            prefix=prefix,
            gateway=gateway,
            tenant=tenant,
            interval="50ms",
            extra_batch='max_age = "200ms"',
            extra_mqtt='ack_timeout = "30s"',
            extra_runtime='drain_timeout = "1s"',
            # The offline run seals its backlog with the gateway's clock at once.
            extra_clock='max_wait = "0s"',
        )

    # Run 1, offline: a backlog of batches under the first stream.
    offline = config(1)
    agent = start_agent(offline, tmp_path / "run1.log")
    try:
        wait_for(lambda: buffer.exists() and status_json(offline)["next_seq"] >= 12)
        stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    first = uuid.UUID(status_json(offline)["stream"])
    conflicted: set[Key] = {(first, 2), (first, 4), (first, 7)}
    held: Key = (first, 9)
    ledger = Ledger(conflict_keys=set(conflicted), silent={held})
    ack = acknowledger_factory(*mqtt_address, prefix, ledger)

    # Run 2: the backlog drains; three of its batches are answered "conflict", one not at all.
    online = config(mqtt_address[1])
    agent = start_agent(online, tmp_path / "run2.log")
    try:
        wait_for(lambda: conflicted <= {k for k, r in ledger.answers if r.value == "conflict"})
        wait_for(lambda: sum(1 for k in ledger.committed if k[0] != first) >= 8)
        stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    after_run2 = status_json(online)
    second = uuid.UUID(after_run2["stream"])
    assert second != first
    assert [str(first), str(second)] == [s["stream"] for s in after_run2["streams"]]

    # Run 3: the held batch of the old stream is answered "conflict" now.
    ledger.silent.clear()
    ledger.conflict_keys.add(held)
    conflicted.add(held)
    agent = start_agent(online, tmp_path / "run3.log")
    try:
        wait_for(lambda: held in {k for k, r in ledger.answers if r.value == "conflict"})
        mark = len(ledger.committed)
        wait_for(lambda: len(ledger.committed) >= mark + 5)
        stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    final = status_json(online)

    # One renewal, persisted across the restart.
    assert str(second) == final["stream"]
    assert [str(first), str(second)] == [s["stream"] for s in final["streams"]]
    assert len(conflicted) == final["reencoded_batches"]
    first_seq = final["streams"][1]["first_seq"]
    # A conflicting key is never sent again once answered.
    answered_at = {k: t for t, k, r in ack.answered if r.value == "conflict"}
    assert set() == {k for t, k in ack.received if k in answered_at and t > answered_at[k]}
    # Each conflicting content is committed once, under the new stream with a fresh seq.
    first_sent = {k: decode_batch(frames[0]) for k, frames in ack.by_key.items()}
    by_digest = {d: k for k, d in ledger.committed.items()}
    assert len(by_digest) == len(ledger.committed), "a content was committed under two keys"
    for key in conflicted:
        new_key = by_digest[content_digest(first_sent[key])]
        assert second == new_key[0] and new_key[1] >= first_seq, (key, new_key)
    # Every other batch of the first stream kept its key.
    for key, batch in first_sent.items():
        if key[0] == first and key not in conflicted:
            assert key == by_digest[content_digest(batch)]
    # Seqs are global in the file: no seq names two batches; later seals use the new stream.
    seqs = [k[1] for k in ledger.committed]
    assert len(seqs) == len(set(seqs))
    assert all(k[0] == second for k in ledger.committed if k[1] >= first_seq)
    # Nothing counted twice: the agent's delivered readings are the ledger's committed ones.
    dropped = final["dropped"]
    assert final["produced"] == final["delivered"] + final["readings"] + dropped
    # (A batch whose ack was on its way when the agent stopped is committed but still buffered.)
    store = open_store_readonly(buffer)
    waiting = {
        (uuid.UUID(stream), seq): count
        for seq, stream, count in store.conn.execute("SELECT seq, stream, readings FROM batches")
    }
    store.conn.close()
    in_both = sum(n for k, n in waiting.items() if k in ledger.committed)
    assert ledger.committed_readings() == final["delivered"] + in_both
    log = (tmp_path / "run2.log").read_text()
    renewals = [json.loads(line) for line in log.splitlines() if '"stream.renewed"' in line]
    assert [(str(first), str(second), "warning")] == [
        (r["old_stream"], r["new_stream"], r["level"]) for r in renewals
    ]
    assert '"stream.renewed"' not in (tmp_path / "run3.log").read_text()
    events = [e for b in ledger.batches.values() for e in b.events]
    assert ["buffer.stream_renewed"] == [e.kind for e in events if e.kind.startswith("buffer.")]


def test_a_restored_backup_never_loses_new_readings_as_duplicates(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
    record_property: Callable[[str, object], None],
) -> None:
    """Back up the buffer, let more batches be acked, restore the backup and keep producing:
    the restored agent reissues committed seqs with new content, the ledger answers
    ``conflict``, and every reading the agent ever offered ends committed."""
    buffer = tmp_path / "buffer.db"
    config = write_config(
        tmp_path / "agent.toml",
        buffer=buffer,
        port=mqtt_address[1],
        prefix=prefix,
        interval="50ms",
        extra_batch='max_age = "200ms"',
        extra_runtime='drain_timeout = "5s"',
    )
    ledger = Ledger()
    acknowledger_factory(*mqtt_address, prefix, ledger)
    agent = start_agent(config, tmp_path / "run1.log")
    backup = tmp_path / "backup.db"
    try:
        wait_for(lambda: len(ledger.committed) >= 4)
        # A backup as an operator's tool takes it: SQLite's online backup, beside the writer.
        source = sqlite3.connect(buffer)
        target = sqlite3.connect(backup)
        source.backup(target)
        source.close()
        target.close()
        mark = len(ledger.committed)
        wait_for(lambda: len(ledger.committed) >= mark + 6)
        stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    # Restore the backup, as a snapshot restore would.
    for side in ("-wal", "-shm"):
        Path(f"{buffer}{side}").unlink(missing_ok=True)
    backup.replace(buffer)
    agent = start_agent(config, tmp_path / "run2.log")
    try:
        wait_for(lambda: any(r.value == "conflict" for _, r in ledger.answers))
        mark = len(ledger.committed)
        wait_for(lambda: len(ledger.committed) >= mark + 6)
        stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    status = status_json(config)
    assert 0 == status["readings"], "the drain left readings behind"
    # No content was accepted as a duplicate of another: every offered reading is committed.
    committed: set[tuple[uuid.UUID, str, int]] = set()
    for batch in ledger.batches.values():
        committed |= readings_of(batch)
    offered: set[tuple[uuid.UUID, str, int]] = set()
    for batch in ledger.offered.values():
        offered |= readings_of(batch)
    record_property("conflicts", sum(1 for _, r in ledger.answers if r.value == "conflict"))
    record_property("offered_readings_not_committed", len(offered - committed))
    assert set() == offered - committed
    assert 2 == len(status["streams"])
    assert '"stream.renewed"' in (tmp_path / "run2.log").read_text()
    assert status["produced"] == status["delivered"] + status["readings"] + status["dropped"]
