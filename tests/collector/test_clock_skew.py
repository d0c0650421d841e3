"""Per-gateway clock skew: what the gauge shows for live batches, a backlog and a wrong clock."""

from __future__ import annotations

import uuid

from prometheus_client import CollectorRegistry, Gauge

from collector.clock_skew import SkewTracker

GW = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
NOW = 1_796_000_000_000_000


def tracker() -> tuple[SkewTracker, list[float], Gauge]:
    """A tracker on a clock the test moves (seconds), with its own gauge."""
    now = [0.0]
    gauge = Gauge("skew_seconds", "test", ["gateway_id"], registry=CollectorRegistry())
    return SkewTracker(gauge, window=60.0, clock=lambda: now[0]), now, gauge


def shown(gauge: Gauge) -> float:
    """The gauge's value for the gateway."""
    return float(gauge.labels(gateway_id=str(GW))._value.get())


def test_a_backlog_beside_live_batches_is_not_skew() -> None:
    """Batches sealed hours ago arriving beside live ones: the gauge stays near zero."""
    skew, now, gauge = tracker()
    skew.record(GW, NOW - 3 * 3600 * 10**6, NOW)  # backlog first
    assert not skew.settled(GW)
    for i in range(10):
        now[0] += 1.0
        skew.record(GW, NOW + i * 10**6 - 20_000, NOW + i * 10**6)  # live, 20 ms on the way
        skew.record(GW, NOW - 2 * 3600 * 10**6, NOW + i * 10**6)  # more backlog
    assert abs(shown(gauge) + 0.02) < 1e-6


def test_a_clock_ahead_or_behind_shows() -> None:
    """Every batch an hour ahead (or two days behind) moves the gauge; it settles after half a
    window, so a gateway behind is told apart from a backlog."""
    skew, now, gauge = tracker()
    skew.record(GW, NOW + 3600 * 10**6, NOW)
    assert 3600.0 == shown(gauge)
    other = uuid.UUID(int=7)
    skew.record(other, NOW - 2 * 86400 * 10**6, NOW)
    now[0] += 31.0
    skew.record(other, NOW - 2 * 86400 * 10**6, NOW + 31 * 10**6)
    assert skew.settled(other)
    assert -2 * 86400 == skew.skew(other)  # the largest of the window
    now[0] += 100.0  # a new window: the old one no longer counts once it is two windows old
    skew.record(GW, NOW + 131 * 10**6, NOW + 131 * 10**6)
    assert 0.0 == shown(gauge)
