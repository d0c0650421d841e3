"""The agent's clock: the kernel's word, the offset filter, the trust rules, and the buffer
stamping readings on the boot clock (sealing waits, converts, migrates older files)."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

import msgpack

from agent.buffer import Buffer, Store, event_note
from agent.clock import (
    STA_UNSYNC,
    KernelSync,
    OffsetFilter,
    Sample,
    ShiftedClock,
    SystemClock,
    Timebase,
    adjtimex,
)
from protocol import decode_batch

GATEWAY = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
DEVICE = uuid.UUID("00000000-0000-4000-8000-0000000000bb")
T0 = 1_700_000_000_000_000


def answer(tb: Timebase, rtt_us: int = 2_000) -> None:
    """One round trip to a collector whose clock is this machine's, lasting ``rtt_us``."""
    sent = tb.clock.boot_us()
    remote = time.time_ns() // 1000
    tb.observe(sent, sent + rtt_us, remote)


def real_offset(tb: Timebase) -> int:
    """The true wall-minus-boot offset of this machine."""
    return time.time_ns() // 1000 - tb.clock.boot_us()


def test_adjtimex_reads_the_kernels_state() -> None:
    """adjtimex(2) through ctypes gives the kernel's synchronisation state and maximum error."""
    state = adjtimex()
    assert isinstance(state.synchronised, bool)
    assert state.max_error_us is not None and state.max_error_us >= 0
    assert STA_UNSYNC == 0x40
    assert state == SystemClock().kernel_sync()


def test_boot_clock_and_boot_id() -> None:
    """The boot clock moves forward and the boot id is the kernel's."""
    clock = SystemClock()
    a = clock.boot_us()
    b = clock.boot_us()
    assert 0 < a <= b
    assert Path("/proc/sys/kernel/random/boot_id").read_text().strip() == clock.boot_id()


def test_filter_intersects_round_trips_and_keeps_the_quickest() -> None:
    """Each round trip bounds the offset; the estimate is the intersection's middle, its error
    the half-width; a quick round trip outlives many slow ones."""
    f = OffsetFilter()
    offset = 5_000_000_000
    f.add(Sample(1_000_000, 1_002_000, 1_001_000 + offset))  # 2 ms round trip
    for i in range(40):
        sent = 2_000_000 + i * 1_000_000
        # Slow acks (200 ms round trips), the collector's time taken late in each.
        f.add(Sample(sent, sent + 200_000, sent + 199_000 + offset))
    estimate = f.estimate(42_000_000)
    assert estimate is not None
    est, error = estimate
    assert abs(est - offset) <= error
    assert error < 10_000  # the 2 ms round trip is still there (widened by drift)


def test_filter_starts_over_when_the_collector_steps() -> None:
    """Round trips that no single offset fits (the collector's clock was stepped) reset it."""
    f = OffsetFilter()
    f.add(Sample(0, 1_000, 500 + 10_000_000))
    f.add(Sample(2_000, 3_000, 2_500 + 20_000_000))
    assert 1 == f.resets
    estimate = f.estimate(3_000)
    assert estimate is not None and abs(estimate[0] - 20_000_000) <= 500


def test_a_synchronised_clock_is_trusted_and_checked_against_the_collector() -> None:
    """A synchronised, plausible clock is the source; once the collector disagrees beyond the
    tolerance the collector's offset is used instead, with the reason."""
    clock = ShiftedClock(0.0, synchronised=True)
    tb = Timebase(clock, tolerance=2.0)
    assert "system" == tb.offset().source
    answer(tb)
    assert "system" == tb.offset().source  # agrees within 2 s
    clock.synchronise(shift=30.0)  # a time server that is itself wrong: synchronised, 30 s off
    offset = tb.offset()
    assert "collector" == offset.source
    assert any("off the collector's clock" in r for r in offset.reasons)
    assert abs(offset.us - real_offset(tb)) < 10_000


def test_an_unsynchronised_or_implausible_clock_is_not_trusted() -> None:
    """Unsynchronised (kernel), or before the build date: untrusted until the collector answers."""
    tb = Timebase(ShiftedClock(0.0, synchronised=False))
    assert "untrusted" == tb.offset().source
    assert ["the kernel says the clock is not synchronised"] == list(tb.offset().reasons)
    early = Timebase(ShiftedClock(3600 - time.time(), synchronised=True))
    offset = early.offset()
    assert "untrusted" == offset.source
    assert ["the clock reads earlier than the agent's build date"] == list(offset.reasons)
    answer(early)
    assert "collector" == early.offset().source


def test_the_kernels_maximum_error_beyond_the_tolerance_is_not_trusted() -> None:
    """A clock the kernel calls synchronised but with a maximum error beyond the tolerance."""

    class Drifting(ShiftedClock):
        def kernel_sync(self) -> KernelSync:
            return KernelSync(True, 5_000_000)

    offset = Timebase(Drifting(0.0), tolerance=2.0).offset()
    assert "untrusted" == offset.source
    assert "maximum error is 5.0 s" in offset.reasons[0]


def test_wants_time_asks_until_precise_then_rarely() -> None:
    """The agent asks every request_interval while it has no precise offset, then not again
    while round trips keep coming."""
    tb = Timebase(ShiftedClock(0.0), request_interval=2.0)
    now = tb.clock.boot_us()
    assert tb.wants_time(now)
    assert not tb.wants_time(now + 1_000_000)
    assert tb.wants_time(now + 2_000_000)
    answer(tb)
    assert not tb.wants_time(tb.clock.boot_us() + 10_000_000)


def _store(path: Path, tb: Timebase, max_wait: float | None) -> Store:
    conn = sqlite3.connect(path, isolation_level=None)
    store = Store(
        conn,
        gateway_id=GATEWAY,
        max_bytes=10 * 2**20,
        overflow="drop_oldest",
        max_points=1000,
        max_frame_bytes=256 * 2**10,
        timebase=tb,
        max_wait=max_wait,
    )
    store.create()
    return store


def test_sealing_waits_for_a_trusted_time_then_converts(tmp_path: Path) -> None:
    """Readings on the boot clock stay unsealed while the time is untrusted; once the collector
    answered they are sealed at their true times, marked ``collector``."""
    clock = ShiftedClock(-2 * 86400.0, synchronised=False)
    tb = Timebase(clock)
    store = _store(tmp_path / "buffer.db", tb, max_wait=600.0)
    boots = [clock.boot_us() + i * 1000 for i in range(5)]
    truth = [b + real_offset(tb) for b in boots]
    store.append([(DEVICE.bytes, "m", b, i, True) for i, b in enumerate(boots)])
    assert [] == store.seal(force=True)
    assert 5 == store.unsealed
    answer(tb)
    [seq] = store.seal(force=True)
    frame = store.conn.execute("SELECT frame FROM batches WHERE seq = ?", (seq,)).fetchone()[0]
    batch = decode_batch(bytes(frame))
    assert "collector" == batch.clock
    assert all(abs(t - w) < 10_000 for t, w in zip(batch.series[0].timestamps, truth, strict=True))
    assert abs(batch.created - (time.time_ns() // 1000)) < 1_000_000
    state = store.stats().clock  # what ``status`` shows
    assert state is not None and "collector" == state["source"]
    assert abs(float(state["system_clock_off_s"]) + 2 * 86400) < 0.1  # type: ignore[arg-type]


def test_past_max_wait_readings_are_sealed_with_the_wall_clock_marked_untrusted(
    tmp_path: Path,
) -> None:
    """No trusted time within max_wait: the batch is sealed with the gateway's wall clock and
    its ``clock`` says ``untrusted``; nothing is dropped."""
    clock = ShiftedClock(3600 - time.time(), synchronised=False)
    tb = Timebase(clock)
    store = _store(tmp_path / "buffer.db", tb, max_wait=1.0)
    boot = clock.boot_us()
    store.append([(DEVICE.bytes, "m", boot, 1.0, True)])
    store.add_notes([event_note("test.event", "at boot time")])
    assert [] == store.seal(force=True)
    time.sleep(1.05)
    [seq] = store.seal(force=True)
    frame = store.conn.execute("SELECT frame FROM batches WHERE seq = ?", (seq,)).fetchone()[0]
    batch = decode_batch(bytes(frame))
    assert "untrusted" == batch.clock
    wall = boot + (clock.wall_us() - clock.boot_us())
    assert abs(batch.series[0].timestamps[0] - wall) < 10_000
    assert batch.series[0].timestamps[0] < 7200 * 1_000_000  # 1970, as the gateway believed
    assert [e.kind for e in batch.events] == ["test.event"]


def test_readings_of_an_earlier_boot_use_the_offset_saved_for_that_boot(tmp_path: Path) -> None:
    """After a reboot, unsealed readings of the previous boot are converted with the trusted
    offset saved for that boot (the new boot's clock says nothing about them)."""
    path = tmp_path / "buffer.db"
    tb = Timebase(ShiftedClock(0.0, synchronised=True))
    store = _store(path, tb, max_wait=600.0)
    store.append([(DEVICE.bytes, "m", 0, 0, False)])
    store.seal(force=True)  # saves this boot's (trusted) offset
    saved = store.boots[store.boot_ref or 0]
    assert "system" == saved[2]
    # Readings of that boot left unsealed, as if the power went: the next boot is another one.
    store.conn.execute(
        "INSERT INTO readings(device, metric, ts, value, is_bool, boot) VALUES (?, 'm', ?, 1, NULL, ?)",
        (DEVICE.bytes, 5_000_000, store.boot_ref),
    )
    store.conn.close()

    class NextBoot(ShiftedClock):
        def boot_id(self) -> str:
            return "another-boot"

    later = Timebase(NextBoot(0.0, synchronised=False))
    store = _store(path, later, max_wait=600.0)
    assert store.boot_ref != 1
    answer(later)
    sealed = store.seal(force=True)
    frame = store.conn.execute("SELECT frame FROM batches WHERE seq = ?", (sealed[-1],)).fetchone()
    batch = decode_batch(bytes(frame[0]))
    assert [5_000_000 + saved[1]] == batch.series[0].timestamps
    assert "collector" == batch.clock  # its creation time comes from the collector's offset


def test_a_version_2_buffer_is_migrated_and_keeps_every_reading(tmp_path: Path) -> None:
    """A buffer file of the previous release (schema 2: wall-clock readings, no boots) is
    migrated when the agent opens it; each reading is kept and sealed at the time it had."""
    path = tmp_path / "buffer.db"
    tb = Timebase(ShiftedClock(0.0, synchronised=True))
    store = _store(path, tb, max_wait=None)
    store.conn.executescript(
        "ALTER TABLE readings DROP COLUMN boot; DROP TABLE boots;"
        " UPDATE meta SET value = 2 WHERE key = 'schema';"
    )
    store.conn.executemany(
        "INSERT INTO readings(device, metric, ts, value, is_bool) VALUES (?, 'm', ?, ?, NULL)",
        [(DEVICE.bytes, T0 + i, i) for i in range(100)],
    )
    store.conn.execute(
        "INSERT INTO notes(kind, body) VALUES ('event', ?)",
        (
            msgpack.packb(
                {
                    "time": T0,
                    "device": None,
                    "severity": "info",
                    "kind": "old.event",
                    "message": "",
                    "attributes": {},
                }
            ),
        ),
    )
    store.conn.close()
    store = _store(path, Timebase(ShiftedClock(0.0, synchronised=False)), max_wait=600.0)
    assert 3 == int(store.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0])
    assert 100 == store.unsealed
    answer(store.timebase)
    store.seal(force=True)
    frames = [bytes(f) for (f,) in store.conn.execute("SELECT frame FROM batches ORDER BY seq")]
    batches = [decode_batch(f) for f in frames]
    times = [t for b in batches for s in b.series for t in s.timestamps]
    assert [T0 + i for i in range(100)] == times
    assert [T0] == [e.time for b in batches for e in b.events]


async def test_the_async_buffer_takes_the_timebase(tmp_path: Path) -> None:
    """``Buffer`` passes its timebase and max_wait to the store: it waits, then converts."""
    clock = ShiftedClock(3600.0, synchronised=False)
    tb = Timebase(clock)
    async with Buffer(tmp_path / "b.db", gateway_id=GATEWAY, timebase=tb, max_wait=600.0) as buf:
        await buf.append([(DEVICE.bytes, "m", clock.boot_us(), 1, True)])
        assert [] == await buf.seal(force=True)
        answer(tb)
        assert 1 == len(await buf.seal(force=True))
