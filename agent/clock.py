"""Time the agent can trust: a boot clock that cannot jump, and the best known way to wall time.

Readings are stamped on ``CLOCK_BOOTTIME`` (it counts through suspend and is never set or
stepped) together with the kernel's boot id, and converted to wall time when their batch is
sealed, with the best offset known then. Two sources give that offset:

- **system**: the gateway's own wall clock (``wall − boot``), trusted while the kernel says it is
  synchronised (``adjtimex``: no ``STA_UNSYNC``, ``maxerror`` within the tolerance), it reads
  after the agent's build date, and it agrees with the collector within ``clock.tolerance``;
- **collector**: every ack and time reply carries the collector's clock. From each round trip
  (sent and received on the boot clock) the collector's time is known to lie within
  ``[sent, received]``, so the offset lies within ``[time − received, time − sent]``. The
  estimate is the intersection of the recent intervals, each widened by a drift allowance for
  its age (Marzullo's idea, as NTP's clock filter uses the least-delayed sample): its midpoint
  is the offset and its half-width the error bound.

When neither is trusted, sealing waits (``clock.max_wait``); the shipper asks the collector for
its time meanwhile. :class:`SystemClock` reads the real clocks; :class:`ShiftedClock` is the one
stand-in for a gateway whose wall clock is wrong (1970, days behind, stepped by ``date -s``): it
behaves as the kernel does, reporting the clock unsynchronised after a step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import structlog

log = structlog.get_logger("agent.clock")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
STA_UNSYNC = 0x0040
"""``adjtimex`` status bit: the kernel's clock is not synchronised (timex.h)."""
TIME_ERROR = 5
"""``adjtimex`` return value: the clock is not synchronised."""
DRIFT_PPM = 100
"""How fast two crystal clocks may drift apart (µs per s): generous for gateway hardware
(typically within 50 ppm), so that an old sample's interval always still holds the truth."""
MAX_SAMPLES = 16
PRECISE_US = 50_000
"""An offset error the agent is content with; beyond it, it asks for the time every 30 s."""
BUILD_FLOOR_US = 1_764_547_200_000_000
"""2025-12-01T00:00:00Z: no copy of the agent was built earlier than this."""

Source = Literal["system", "collector", "untrusted"]


@dataclass(frozen=True, slots=True)
class KernelSync:
    """What ``adjtimex`` says about the wall clock."""

    synchronised: bool
    max_error_us: int | None
    """The kernel's bound on the clock's error (``maxerror``), or ``None`` where unknown."""


class Clock(Protocol):
    """The clocks the agent reads; :class:`SystemClock` outside tests."""

    def boot_us(self) -> int:
        """``CLOCK_BOOTTIME`` in µs: monotonic, counts through suspend, never stepped."""

    def wall_us(self) -> int:
        """The wall clock (``CLOCK_REALTIME``) in µs since the epoch."""

    def boot_id(self) -> str:
        """The kernel's id of this boot: boot-clock readings of different boots do not compare."""

    def kernel_sync(self) -> KernelSync:
        """The kernel's synchronisation state of the wall clock."""


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    # struct timex of <sys/timex.h>; the trailing padding is part of the kernel ABI.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]


_libc: ctypes.CDLL | None = None
_libc_lock = threading.Lock()


def adjtimex() -> KernelSync:
    """Ask the kernel (``adjtimex`` with ``modes = 0``, which only reads) about the wall clock.

    Where the call is unavailable the state is unknown: reported as not synchronised.
    """
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    tx = _Timex()
    try:
        state = int(_libc.adjtimex(ctypes.byref(tx)))
    except (AttributeError, OSError):
        return KernelSync(False, None)
    if state < 0:
        return KernelSync(False, None)
    synchronised = state != TIME_ERROR and not tx.status & STA_UNSYNC
    return KernelSync(synchronised, int(tx.maxerror))


class SystemClock:
    """The real clocks of this machine."""

    def __init__(self) -> None:
        self._boot_id: str | None = None

    def boot_us(self) -> int:
        """``CLOCK_BOOTTIME`` in µs."""
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000

    def wall_us(self) -> int:
        """The wall clock in µs since the epoch."""
        return time.time_ns() // 1000

    def boot_id(self) -> str:
        """The kernel's boot id (a random UUID per boot)."""
        if self._boot_id is None:
            try:
                self._boot_id = BOOT_ID_PATH.read_text().strip()
            except OSError:
                # No /proc: without a boot id readings cannot outlive the process on the boot
                # clock, so take one per process (a restart then counts as a new boot).
                self._boot_id = f"process-{uuid.uuid4()}"
        return self._boot_id

    def kernel_sync(self) -> KernelSync:
        """``adjtimex``'s view of the wall clock."""
        return adjtimex()


class ShiftedClock(SystemClock):
    """A gateway whose wall clock is off by ``shift`` seconds (and can be stepped mid-run).

    The boot clock and the boot id are the machine's own. The kernel's state behaves as on a real
    gateway: a step (``date -s``, an NTP step) leaves the clock unsynchronised with a maximum
    error of 16 s until :meth:`synchronise` (what ``chronyd`` or ``systemd-timesyncd`` does once
    it has steered the clock).
    """

    def __init__(self, shift: float = 0.0, *, synchronised: bool = False) -> None:
        super().__init__()
        self.shift_us = int(shift * 1e6)
        self.synchronised = synchronised
        self._lock = threading.Lock()

    def wall_us(self) -> int:
        """The real wall clock plus the shift."""
        return time.time_ns() // 1000 + self.shift_us

    def step(self, seconds: float) -> None:
        """Step the wall clock by ``seconds``; the kernel then says it is unsynchronised."""
        with self._lock:
            self.shift_us += int(seconds * 1e6)
            self.synchronised = False

    def synchronise(self, shift: float | None = None) -> None:
        """The time daemon has set the clock (to ``shift``, if given) and synchronised it."""
        with self._lock:
            if shift is not None:
                self.shift_us = int(shift * 1e6)
            self.synchronised = True

    def kernel_sync(self) -> KernelSync:
        """Synchronised with a small error, or unsynchronised with the kernel's 16 s."""
        if self.synchronised:
            return KernelSync(True, 50_000)
        return KernelSync(False, 16_000_000)


@dataclass(frozen=True, slots=True)
class Sample:
    """One round trip to the collector: sent and received on the boot clock, its time between."""

    sent_boot: int
    received_boot: int
    remote_us: int

    @property
    def low(self) -> int:
        """The smallest offset (collector − boot) consistent with this round trip."""
        return self.remote_us - self.received_boot

    @property
    def high(self) -> int:
        """The largest offset consistent with this round trip."""
        return self.remote_us - self.sent_boot


@dataclass(slots=True)
class OffsetFilter:
    """The collector's offset from the boot clock, as the intersection of recent round trips.

    At most ``MAX_SAMPLES`` are kept; when one more comes, the one whose interval is widest now
    (its width plus its drift allowance) goes: a quick round trip (a time request answered at
    once) outlives many slow ones (acks, which wait for the collector's database commit), as in
    NTP's clock filter.
    """

    drift_ppm: int = DRIFT_PPM
    samples: list[Sample] = field(default_factory=list)
    resets: int = 0

    def _slack(self, sample: Sample, now_boot: int) -> int:
        return max(0, now_boot - sample.received_boot) * self.drift_ppm // 1_000_000

    def add(self, sample: Sample) -> bool:
        """Take a round trip; ``False`` if it was discarded (received before it was sent)."""
        if sample.received_boot < sample.sent_boot:
            return False
        self.samples.append(sample)
        now = sample.received_boot
        if len(self.samples) > MAX_SAMPLES:
            widest = max(self.samples[:-1], key=lambda s: s.high - s.low + 2 * self._slack(s, now))
            self.samples.remove(widest)
        if self._bounds(now) is None:
            # No offset fits every interval: the collector's clock was stepped. Start over from
            # the newest round trip rather than averaging two different times.
            self.samples = [sample]
            self.resets += 1
            log.warning(
                "clock.collector_stepped",
                hint="the collector's clock disagrees with its earlier answers; starting over",
            )
        return True

    def _bounds(self, now_boot: int) -> tuple[int, int] | None:
        low, high = -(2**63), 2**63
        for s in self.samples:
            slack = self._slack(s, now_boot)
            low = max(low, s.low - slack)
            high = min(high, s.high + slack)
        if low > high:
            return None
        return low, high

    def estimate(self, now_boot: int) -> tuple[int, int] | None:
        """``(offset, error)`` in µs at boot time ``now_boot``, or ``None`` without samples."""
        if not self.samples:
            return None
        bounds = self._bounds(now_boot)
        if bounds is None:
            newest = max(self.samples, key=lambda s: s.received_boot)
            bounds = (newest.low, newest.high)
        low, high = bounds
        return (low + high) // 2, (high - low + 1) // 2

    def last_received(self) -> int | None:
        """Boot time of the newest round trip."""
        return max((s.received_boot for s in self.samples), default=None)


@dataclass(frozen=True, slots=True)
class Offset:
    """How to turn a boot-clock reading of this boot into wall time: ``wall = boot + us``."""

    us: int
    source: Source
    error_us: int | None = None
    reasons: tuple[str, ...] = ()
    """Why the system clock is not trusted (empty when it is)."""

    @property
    def trusted(self) -> bool:
        """Whether times converted with this offset are trusted."""
        return self.source != "untrusted"


def build_time_us() -> int:
    """When this copy of the agent was built: no correct clock reads earlier.

    The installed package's files carry their build time (Debian packages and wheels keep it);
    :data:`BUILD_FLOOR_US` bounds it from below where they do not.
    """
    with contextlib.suppress(OSError):
        mtime = int(Path(__file__).stat().st_mtime * 1e6)
        return max(BUILD_FLOOR_US, mtime)
    return BUILD_FLOOR_US


class Timebase:
    """The agent's judgement of time: which offset converts boot-clock readings, and whether it
    is trusted. One per agent process; the runtime, buffer and shipper share it."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        tolerance: float = 2.0,
        build_us: int | None = None,
        request_interval: float = 2.0,
        refresh_interval: float = 300.0,
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.tolerance_us = int(tolerance * 1e6)
        self.build_us = build_us if build_us is not None else build_time_us()
        self.request_interval_us = int(request_interval * 1e6)
        self.refresh_interval_us = int(refresh_interval * 1e6)
        self.filter = OffsetFilter()
        self.boot_id = self.clock.boot_id()
        self._last: Offset | None = None
        self._last_request: int | None = None
        self._lock = threading.Lock()

    # --- stamps ------------------------------------------------------------------------------

    def boot_now(self) -> int:
        """Now on the boot clock (µs), the time readings are stamped with."""
        return self.clock.boot_us()

    def wall_now(self) -> int:
        """Now in wall time with the best offset (trusted or not): for status frames and logs."""
        return self.clock.boot_us() + self.offset().us

    # --- the collector's answers -------------------------------------------------------------

    def observe(self, sent_boot: int, received_boot: int, remote_us: int) -> None:
        """A round trip to the collector: sent and received on the boot clock."""
        with self._lock:
            self.filter.add(Sample(sent_boot, received_boot, remote_us))

    def wants_time(self, now_boot: int | None = None) -> bool:
        """Whether the shipper should ask the collector for its time now.

        Every ``request_interval`` while the collector's offset is unknown or not precise enough
        to be trusted; every 30 s while its error exceeds ``PRECISE_US`` (acks alone, which wait
        for a database commit, give wide intervals); otherwise when no round trip (acks count)
        came for ``refresh_interval``.
        """
        now = now_boot if now_boot is not None else self.clock.boot_us()
        with self._lock:
            estimate = self.filter.estimate(now)
            last_rx = self.filter.last_received()
        if estimate is None or estimate[1] > self.tolerance_us // 2:
            interval = self.request_interval_us
        elif estimate[1] > PRECISE_US:
            interval = 30_000_000
        elif last_rx is not None and now - last_rx < self.refresh_interval_us:
            return False
        else:
            interval = self.request_interval_us
        if self._last_request is not None and now - self._last_request < interval:
            return False
        self._last_request = now
        return True

    # --- judgement -----------------------------------------------------------------------------

    def collector_offset(self, now_boot: int | None = None) -> tuple[int, int] | None:
        """The collector's offset from the boot clock and its error bound (µs), if measured."""
        now = now_boot if now_boot is not None else self.clock.boot_us()
        with self._lock:
            return self.filter.estimate(now)

    def offset(self) -> Offset:
        """The best offset now, and whether it is trusted (logs when that changes)."""
        boot = self.clock.boot_us()
        wall = self.clock.wall_us()
        local = wall - boot
        reasons: list[str] = []
        sync = self.clock.kernel_sync()
        if not sync.synchronised:
            reasons.append("the kernel says the clock is not synchronised")
        elif sync.max_error_us is not None and sync.max_error_us > self.tolerance_us:
            reasons.append(f"the kernel's maximum error is {sync.max_error_us / 1e6:.1f} s")
        if wall < self.build_us:
            reasons.append("the clock reads earlier than the agent's build date")
        remote = self.collector_offset(boot)
        if remote is not None:
            diff = local - remote[0]
            if abs(diff) > self.tolerance_us + remote[1]:
                reasons.append(f"it is {diff / 1e6:+.3f} s off the collector's clock")
        if not reasons:
            result = Offset(local, "system", sync.max_error_us)
        elif remote is not None and remote[1] <= self.tolerance_us // 2:
            result = Offset(remote[0], "collector", remote[1], tuple(reasons))
        else:
            result = Offset(local, "untrusted", None, tuple(reasons))
        self._note(result, local, remote)
        return result

    def _note(self, now: Offset, local: int, remote: tuple[int, int] | None) -> None:
        last, self._last = self._last, now
        if last is not None and last.source == now.source and abs(last.us - now.us) < 1_000_000:
            return
        fields = {
            "source": now.source,
            "system_clock_off_s": None if remote is None else round((local - remote[0]) / 1e6, 3),
            "error_ms": None if now.error_us is None else round(now.error_us / 1000, 1),
            "reasons": list(now.reasons) or None,
        }
        if last is not None and last.source == now.source:
            log.warning(
                "clock.offset_changed", change_s=round((now.us - last.us) / 1e6, 3), **fields
            )
        elif now.trusted:
            log.info("clock.trusted", **fields)
        else:
            log.warning(
                "clock.untrusted",
                hint="readings wait unsealed for the collector's time (clock.max_wait)",
                **fields,
            )

    def status(self) -> dict[str, object]:
        """The clock's state for ``status``, the STATUS line and status logs."""
        current = self.offset()
        boot = self.clock.boot_us()
        remote = self.collector_offset(boot)
        local = self.clock.wall_us() - boot
        return {
            "source": current.source,
            "trusted": current.trusted,
            "error_ms": None if current.error_us is None else round(current.error_us / 1000, 1),
            "system_clock_off_s": None if remote is None else round((local - remote[0]) / 1e6, 3),
            "collector_error_ms": None if remote is None else round(remote[1] / 1000, 1),
            "reasons": list(current.reasons),
            "boot_id": self.boot_id,
        }


class Stamp(int):
    """A time read from the gateway's own clock: its wall value (µs since the epoch, what the
    gateway's clock said) that also carries the boot-clock reading it was taken with.

    Inputs stamp readings with :func:`agent.inputs.common.now_us`, which returns one; the runtime
    stores the boot-clock reading, so a wrong or stepped wall clock never reaches the buffer.
    Arithmetic on a stamp gives a plain ``int`` (a wall time).
    """

    boot: int

    def __new__(cls, wall: int, boot: int) -> Stamp:
        """A stamp of wall time ``wall`` taken at boot time ``boot``."""
        stamp = super().__new__(cls, wall)
        stamp.boot = boot
        return stamp


_current: Timebase | None = None
_current_lock = threading.Lock()


def current() -> Timebase:
    """The process's timebase (the runtime installs its own; a plain system one otherwise)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Timebase()
        return _current


def install(timebase: Timebase | None) -> Timebase | None:
    """Make ``timebase`` the process's timebase (the runtime while it runs); return the previous
    one, for the runtime to put back (``None``: a plain system one again on next use)."""
    global _current
    with _current_lock:
        previous, _current = _current, timebase
        return previous


def stamp() -> Stamp:
    """Now, as the gateway's clock says, with the boot-clock reading behind it."""
    clock = current().clock
    boot = clock.boot_us()
    return Stamp(clock.wall_us(), boot)
