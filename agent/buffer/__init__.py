"""The agent's disk buffer: one SQLite file in WAL mode that loses nothing it has committed.

Readings are appended in grouped transactions (one commit per ``commit_interval``, not per
reading). A batch is *sealed* before its first send: in one transaction its readings, pending
events and device status changes are encoded into a protocol frame, the frame is stored with the
next ``seq`` under the file's current ``stream`` and the readings are deleted. Every resend
therefore sends the stored bytes, byte for byte. A batch is deleted only when the collector's ack
is final (every result but ``conflict``); a ``conflict`` starts a new stream and re-encodes only
the batches so answered.

The file is bounded by ``max_bytes`` (an estimate of the stored data): ``drop_oldest`` deletes
the oldest batches (never one in flight) and then the oldest readings, ``drop_newest`` refuses
what does not fit. Every dropped reading is counted in the file and reported as a
``readings.dropped`` event in a later batch. A full disk is survived: readings wait in memory
within a bound, acknowledged batches are remembered and deleted later, and a reserve file beside
the buffer is given back to let SQLite delete and checkpoint.

Bookkeeping lives in the ``meta`` table and survives restarts: ``produced`` (readings accepted
from inputs), ``delivered`` (readings in finally acknowledged batches, split into ``stored``,
``quarantined`` and ``refused``) and the dropped counts, so that
``produced == delivered + buffered + dropped`` holds at every commit.

The package, one module per concern:

- :mod:`~agent.buffer.schema` — tables, migration, counters, size estimates, plain values;
- :mod:`~agent.buffer.overflow` — what ``drop_oldest`` and ``drop_newest`` give up;
- :mod:`~agent.buffer.sealing` — sealing, frame encoding, streams and seqs, conflicts;
- :mod:`~agent.buffer.notes` — events and device status changes waiting for a batch;
- :mod:`~agent.buffer.files` — connection settings, the lock, corruption, storage faults;
- :mod:`~agent.buffer.space` — the reserve file and the full-disk state;
- :mod:`~agent.buffer.store` — :class:`Store`, the synchronous core that ties them together;
- :mod:`~agent.buffer.aio` — :class:`Buffer`, the async wrapper the agent uses.
"""

from agent.buffer.aio import Buffer
from agent.buffer.files import (
    SQLITE_CORRUPT,
    SQLITE_FULL,
    SQLITE_NOTADB,
    integrity,
    move_aside,
    storage_fault,
)
from agent.buffer.files import configure as _configure
from agent.buffer.notes import Note, event_note, status_note
from agent.buffer.overflow import Freed
from agent.buffer.schema import (
    BATCH_COST,
    DROP_REASONS,
    MAX_NOTES_PER_BATCH,
    READING_COST,
    SCHEMA_VERSION,
    AckOutcome,
    AppendResult,
    BufferStats,
    DropReason,
    Overflow,
    ReadingRow,
    Reencoded,
    SealedBatch,
    StreamInfo,
    Synchronous,
    now_us,
    reading_cost,
)
from agent.buffer.space import Space
from agent.buffer.store import Store, open_store_readonly, split_outcome

__all__ = [
    "BATCH_COST",
    "DROP_REASONS",
    "MAX_NOTES_PER_BATCH",
    "READING_COST",
    "SCHEMA_VERSION",
    "SQLITE_CORRUPT",
    "SQLITE_FULL",
    "SQLITE_NOTADB",
    "AckOutcome",
    "AppendResult",
    "Buffer",
    "BufferStats",
    "DropReason",
    "Freed",
    "Note",
    "Overflow",
    "ReadingRow",
    "Reencoded",
    "SealedBatch",
    "Space",
    "Store",
    "StreamInfo",
    "Synchronous",
    "_configure",
    "event_note",
    "integrity",
    "move_aside",
    "now_us",
    "open_store_readonly",
    "reading_cost",
    "split_outcome",
    "status_note",
    "storage_fault",
]
