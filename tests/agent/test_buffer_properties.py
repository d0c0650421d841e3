"""Property test of the buffer's bookkeeping under random appends, seals, acks and reopenings."""

from __future__ import annotations

import random
import sqlite3
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer import DROP_REASONS, Store, _configure
from protocol import AckResult, decode_batch

GATEWAY = uuid.UUID(int=1)
DEVICE = uuid.UUID(int=2).bytes

operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 120)),
        st.tuples(st.just("seal"), st.booleans()),
        st.tuples(st.just("ack"), st.sampled_from(["ok", "rejected", "unknown", "quarantined"])),
        st.tuples(st.just("conflict"), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


def open_store(path: Path, overflow: str) -> Store:
    """A Store on its own connection, as Buffer builds it."""
    conn = sqlite3.connect(path, isolation_level=None)
    _configure(conn, "NORMAL", 2**20)
    store = Store(
        conn,
        gateway_id=GATEWAY,
        max_bytes=6000,
        overflow=overflow,  # type: ignore[arg-type]
        max_points=50,
        max_frame_bytes=2048,
    )
    store.create()
    return store


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, overflow=st.sampled_from(["drop_oldest", "drop_newest"]), seed=st.integers())
def test_every_reading_is_buffered_delivered_or_counted_as_dropped(
    ops: list[tuple[str, object]], overflow: str, seed: int
) -> None:
    """produced == delivered + buffered + dropped after any sequence, conflicts included;
    delivered == stored + quarantined + refused; seqs only grow, within each stream too."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.db"
        store = open_store(path, overflow)
        next_value = 0
        delivered_values: set[int] = set()
        last_seq = -1
        for op, arg in ops:
            if op == "append":
                n = int(arg)  # type: ignore[call-overload]
                store.append(
                    [
                        (DEVICE, "m", v, v + rng.random() / 2)
                        for v in range(next_value, next_value + n)
                    ]
                )
                next_value += n
            elif op == "seal":
                for seq in store.seal(force=bool(arg)):
                    assert seq > last_seq
                    last_seq = seq
            elif op == "conflict":
                batches = store.batches(limit=1)
                if batches:
                    old_stream = store.stream
                    moved = store.conflict(batches[0].stream, batches[0].seq)
                    assert moved is not None and 1 == len(moved)
                    assert moved[0].seq > last_seq
                    last_seq = moved[0].seq
                    assert (store.stream != old_stream) == (batches[0].stream == old_stream)
            elif op == "ack":
                batches = store.batches(limit=1)
                if batches and arg != "unknown":
                    frame = batches[0].frame
                    if arg == "quarantined":
                        outcome = store.acknowledge(
                            batches[0].seq,
                            stream=batches[0].stream,
                            result=AckResult.QUARANTINED,
                            quarantined=batches[0].readings,
                            reasons={"unknown_device": (batches[0].readings, 0)},
                        )
                    else:
                        outcome = store.acknowledge(batches[0].seq, rejected=arg == "rejected")
                    assert outcome is not None
                    batch = decode_batch(frame)
                    delivered_values.update(int(v) for s in batch.series for v in s.values)  # type: ignore[call-overload]
                elif arg == "unknown":
                    assert store.acknowledge(10**9, rejected=False) is None
            else:
                store.conn.close()
                store = open_store(path, overflow)
            in_memory = store.unsealed + store.batched_readings, store.batch_count, store.bytes
            stats = store.stats()  # re-reads everything from the file
            assert (stats.readings, stats.batches, stats.bytes) == in_memory
            dropped = sum(stats.dropped[r] for r in DROP_REASONS)
            assert stats.produced == next_value
            assert stats.produced == stats.delivered + stats.readings + dropped
            assert stats.delivered == stats.stored + stats.quarantined + stats.refused
            assert stats.bytes <= 6000 or stats.readings == 0
        # What is buffered and what was delivered are distinct readings, all of them produced.
        buffered: list[int] = [int(v) for (v,) in store.conn.execute("SELECT value FROM readings")]
        for (frame,) in store.conn.execute("SELECT frame FROM batches"):
            batch = decode_batch(bytes(frame))
            buffered.extend(int(v) for s in batch.series for v in s.values)  # type: ignore[call-overload]
        assert len(buffered) == len(set(buffered))
        for seq, stream, frame in store.conn.execute("SELECT seq, stream, frame FROM batches"):
            assert (seq, stream) == (
                decode_batch(bytes(frame)).seq,
                str(decode_batch(bytes(frame)).stream),
            )
        assert not (set(buffered) & delivered_values)
        assert set(buffered) | delivered_values <= set(range(next_value))
        store.conn.close()
