"""Sealing and frame encoding: the one home of the stream/seq logic.

Sealing takes the oldest unsealed readings and pending notes, encodes them into a protocol frame
under the file's current stream and its next seq, stores the frame and deletes what it took, in
one transaction. Every resend sends the stored bytes.

Seqs are numbered globally in the file (``meta.next_seq``): a new stream continues from
``next_seq``, so seqs are strictly increasing within every stream and a seq names one batch of
the file whatever its stream. A stream is renewed only when the collector answers ``conflict``
for a batch of the current stream: its ledger already holds that key with other content (the
buffer was rolled back: a restored backup or snapshot, a cloned SD card, a power cut with
``synchronous=NORMAL``). The new stream (a random UUID) is recorded in ``streams`` and becomes
``meta.stream`` in the same transaction that re-encodes the conflicting batches: each gets a
fresh seq under the new stream and replaces its old row. Only batches answered ``conflict`` are
re-encoded: a conflict proves the collector kept nothing of that content, while any other batch
may already be committed and would be stored twice under a new key.

Time: readings on the boot clock are converted to wall time here, with the offset the timebase
judges best now (this boot's) or the one saved for an earlier boot, so the stored frame carries
wall times and a resend never changes them. While the offset is not trusted, nothing is sealed
for up to ``max_wait`` (counted from the oldest waiting reading); after that the batch is sealed
with the wall clock and its ``clock`` key says ``untrusted``. Every batch says how its times were
taken: ``system``, ``collector`` or ``untrusted`` (the least trusted of its readings).
"""

from __future__ import annotations

import math
import sqlite3
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from agent.buffer.files import storage_fault
from agent.buffer.notes import decode_notes, drop_event, event_note
from agent.buffer.schema import BATCH_COST, MAX_NOTES_PER_BATCH, Reencoded, now_us, reading_cost
from protocol import (
    Batch,
    ClockSource,
    DeviceStatus,
    Event,
    Series,
    Value,
    decode_batch,
    encode_frame,
)

if TYPE_CHECKING:
    from agent.buffer.store import Store

log = structlog.get_logger("agent.buffer")


def _least_trusted(sources: set[str]) -> ClockSource:
    if "untrusted" in sources:
        return "untrusted"
    return "collector" if "collector" in sources else "system"


def series_of(rows: Sequence[Any]) -> list[Series]:
    """Group ``(id, device, metric, ts, value, is_bool, …)`` rows into series, in order."""
    grouped: dict[tuple[bytes, str], tuple[list[int], list[Value]]] = {}
    for _, device, metric, ts, value, is_bool, *_ in rows:
        entry = grouped.get((device, metric))
        if entry is None:
            entry = grouped[(device, metric)] = ([], [])
        entry[0].append(ts)
        entry[1].append(bool(value) if is_bool else value)
    return [
        Series.model_construct(
            device_id=uuid.UUID(bytes=bytes(device)), metric=metric, timestamps=ts, values=values
        )
        for (device, metric), (ts, values) in grouped.items()
    ]


def encode(
    store: Store,
    *,
    seq: int,
    created: int,
    rows: Sequence[Any],
    events: list[Event],
    status: list[DeviceStatus],
    clock: ClockSource | None = None,
) -> tuple[bytes, int]:
    """The frame of the first readings of ``rows`` that fit ``max_frame_bytes``, and their count."""
    n = len(rows)
    while True:
        frame = encode_frame(
            Batch.model_construct(
                gateway_id=store.gateway_id,
                stream=store.stream,
                seq=seq,
                created=created,
                series=series_of(rows[:n]),
                events=events,
                status=status,
                clock=clock,
            )
        )
        if len(frame) <= store.max_frame_bytes or n <= 1:
            return frame, n
        # Shrink in proportion to the overshoot, a little more to land below the limit.
        n = max(1, min(n - 1, math.floor(n * store.max_frame_bytes / len(frame) * 0.9)))


def seal(store: Store, force: bool) -> list[int]:
    """Seal full batches; with ``force`` also the remainder. Returns the new seqs."""
    if store.pending_conflicts:
        resolve_conflicts(store)
        if store.stream in store.pending_conflicts.values():
            # Never seal under a stream the collector has refused: the renewal must land first.
            return []
    sealed: list[int] = []
    while store.unsealed >= store.max_points or (force and store.has_unsealed()):
        if sealed == [] and waiting(store):
            break
        seq = seal_one(store)
        if seq is None:
            break
        sealed.append(seq)
    return sealed


def waiting(store: Store) -> bool:
    """Whether sealing waits for a trusted time now (see the module's docstring)."""
    if store.max_wait_us is None or store.timebase.offset().trusted:
        store.waiting_since = None
        store.untrusted_since = None
        return False
    now = store.timebase.clock.boot_us()
    started = store.waiting_since
    if started is None:
        started = store.waiting_since = now
    if store.boot_ref is not None and store.has_boot_column:
        row = store.conn.execute(
            "SELECT ts FROM readings WHERE boot = ? ORDER BY id LIMIT 1", (store.boot_ref,)
        ).fetchone()
        if row is not None:
            started = min(started, int(row[0]))
    if now - started < store.max_wait_us:
        return True
    if store.untrusted_since is None:
        store.untrusted_since = now
        log.warning(
            "clock.sealing_untrusted",
            waited_s=round((now - started) / 1e6, 1),
            hint="no trusted time within clock.max_wait: sealing with the gateway's wall clock,"
            " marked untrusted; the collector quarantines what falls outside its window",
        )
    return False


def seal_one(store: Store) -> int | None:
    """Seal one batch in one transaction; its seq, or ``None`` (nothing to seal, or a fault)."""
    conn = store.conn
    offset = store.timebase.offset()
    created = store.timebase.clock.boot_us() + offset.us
    counters = store.counters_with_unpersisted()
    sources: set[str] = {offset.source}
    cache: dict[int, tuple[int, str]] = {}

    def to_wall(ts: int, boot: int | None) -> int:
        if boot is None:
            return ts
        found = cache.get(boot)
        if found is None:
            found = cache[boot] = (
                (offset.us, offset.source) if boot == store.boot_ref else store.wall_offset(boot)
            )
        sources.add(found[1])
        return max(0, ts + found[0])

    def note_time(ts: int, boot_id: str | None) -> int:
        if boot_id is None:
            return ts
        ref = next((i for i, b in store.boots.items() if b[0] == boot_id), None)
        if ref is None:
            sources.add("untrusted")
            return ts + offset.us
        return to_wall(ts, ref)

    boot_column = "boot" if store.has_boot_column else "NULL"
    try:
        with store.transaction():
            stored = conn.execute(
                f"SELECT id, device, metric, ts, value, is_bool, {boot_column} FROM readings"
                " ORDER BY id LIMIT ?",
                (store.max_points,),
            ).fetchall()
            rows = [
                (rid, device, metric, to_wall(ts, boot), value, is_bool, ts, boot)
                for rid, device, metric, ts, value, is_bool, boot in stored
            ]
            notes = conn.execute(
                "SELECT id, kind, body FROM notes ORDER BY id LIMIT ?", (MAX_NOTES_PER_BATCH,)
            ).fetchall()
            events, status = decode_notes(notes, note_time)
            dropped = drop_event(counters, created)
            if dropped is not None:
                events.append(dropped)
            if not rows and not events and not status:
                return None
            seq = counters["next_seq"]
            clock = _least_trusted(sources)
            frame, n = encode(
                store,
                seq=seq,
                created=created,
                rows=rows,
                events=events,
                status=status,
                clock=clock,
            )
            taken = rows[:n]
            oldest = min((r[3] for r in taken), default=None)
            conn.execute(
                "INSERT INTO batches(seq, frame, readings, notes, created_us, oldest_us, stream)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, frame, n, len(notes), created, oldest, str(store.stream)),
            )
            taken_bytes = 0
            if taken:
                conn.execute("DELETE FROM readings WHERE id <= ?", (taken[-1][0],))
                taken_bytes = sum(
                    reading_cost(r[2], r[4] if not r[5] else bool(r[4])) for r in taken
                )
            if notes:
                conn.execute("DELETE FROM notes WHERE id <= ?", (notes[-1][0],))
            counters["next_seq"] = seq + 1
            store.write_counters(counters)
            store.save_offset(offset)
    except sqlite3.Error as exc:
        fault = storage_fault(exc)
        if fault is None:
            raise
        # Nothing is lost: the readings stay unsealed and the next seal tries again.
        store.storage_failed(fault, "seal", exc)
        return None
    store.committed(counters)
    store.unsealed -= n
    store.notes_pending -= len(notes)
    store.batch_count += 1
    store.batched_readings += n
    store.bytes += BATCH_COST + len(frame) - taken_bytes
    return seq


def resolve_conflicts(store: Store) -> list[Reencoded]:
    """Re-encode the batches answered ``conflict`` under the current stream, renewed if needed.

    One transaction: when a conflicting batch belongs to the current stream, a new stream is
    started (recorded in ``streams`` and ``meta``, announced by a ``buffer.stream_renewed`` event);
    each conflicting batch gets the next seq under the current stream and replaces its old row.
    On a storage fault nothing changes and the conflicts wait for the next try.
    """
    pending = dict(store.pending_conflicts)
    if not pending:
        return []
    conn = store.conn
    counters = store.counters_with_unpersisted()
    old_stream = store.stream
    renew = old_stream in pending.values()
    stream = uuid.uuid4() if renew else old_stream
    trigger = min(s for s, st in pending.items() if st == old_stream) if renew else None
    reason = (
        f"conflict: the collector holds seq {trigger} of stream {old_stream} with other content"
    )
    started = now_us()
    first_seq = counters["next_seq"]
    done: list[Reencoded] = []
    delta = 0
    try:
        with store.transaction():
            if renew:
                conn.execute(
                    "INSERT INTO streams(stream, first_seq, started_us, reason) VALUES (?, ?, ?, ?)",
                    (str(stream), first_seq, started, reason),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('stream', ?)", (str(stream),)
                )
                conn.execute(
                    "INSERT INTO notes(kind, body) VALUES (?, ?)",
                    event_note(
                        kind="buffer.stream_renewed",
                        message=f"new stream {stream} after a conflict on seq {trigger}"
                        f" of stream {old_stream} (the buffer was rolled back)",
                        severity="warning",
                        attributes={
                            "old_stream": str(old_stream),
                            "new_stream": str(stream),
                            "seq": trigger,
                            "reason": "conflict",
                        },
                        time_us=started,
                    ),
                )
            for seq, seq_stream in sorted(pending.items()):
                row = conn.execute(
                    "SELECT frame, readings, notes, created_us, oldest_us FROM batches"
                    " WHERE seq = ? AND stream = ?",
                    (seq, str(seq_stream)),
                ).fetchone()
                if row is None:
                    continue  # dropped by overflow meanwhile, or already re-encoded
                frame, count, notes, created_us, oldest_us = row
                new_seq = counters["next_seq"]
                counters["next_seq"] = new_seq + 1
                batch = decode_batch(bytes(frame))
                new_frame = encode_frame(
                    batch.model_copy(update={"stream": stream, "seq": new_seq})
                )
                conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                conn.execute(
                    "INSERT INTO batches(seq, frame, readings, notes, created_us, oldest_us, stream)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (new_seq, new_frame, count, notes, created_us, oldest_us, str(stream)),
                )
                delta += len(new_frame) - len(bytes(frame))
                done.append(Reencoded(seq_stream, seq, stream, new_seq, int(count)))
            counters["reencoded_batches"] += len(done)
            store.write_counters(counters)
    except sqlite3.Error as exc:
        fault = storage_fault(exc)
        if fault is None:
            raise
        store.storage_failed(fault, "reencode", exc)
        return []
    store.committed(counters)
    for seq in pending:
        store.pending_conflicts.pop(seq, None)
    store.bytes += delta
    if renew:
        store.renewed(stream, first_seq, started, reason)
        store.notes_pending += 1
        log.warning(
            "stream.renewed",
            old_stream=str(old_stream),
            new_stream=str(stream),
            seq=trigger,
            reason=reason,
        )
    for r in done:
        log.info(
            "batch.reencoded",
            old_stream=str(r.old_stream),
            old_seq=r.old_seq,
            stream=str(r.stream),
            seq=r.seq,
            readings=r.readings,
        )
    return done
