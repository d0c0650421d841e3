"""The systemd notifier against real AF_UNIX datagram sockets: a full or missing peer never blocks."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.systemd import Notifier


@pytest.fixture
def peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound notify socket named by ``$NOTIFY_SOCKET``, read only when the test says so."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield sock
    sock.close()


def fill(address: str) -> int:
    """Queue datagrams at ``address`` until its queue refuses one; return how many fitted."""
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        while True:
            try:
                filler.sendto(b"FILLER=1", socket.MSG_DONTWAIT, address)
            except BlockingIOError:
                return sent
            sent += 1


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on ``sock``."""
    got: list[bytes] = []
    while True:
        try:
            got.append(sock.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return got


def test_full_queue_drops_the_datagram_at_once_and_keeps_ready_for_next_time(
    peer: socket.socket,
) -> None:
    """A peer that stops reading costs a STATUS=, never a blocked caller; READY=1 is resent."""
    assert fill(peer.getsockname()) > 0
    notifier = Notifier()
    started = time.monotonic()
    notifier.notify("READY=1", "STATUS=starting")
    notifier.notify("WATCHDOG=1")
    assert time.monotonic() - started < 1.0
    assert 2 == notifier.dropped
    assert all(d == b"FILLER=1" for d in drain(peer))
    notifier.notify("WATCHDOG=1", "STATUS=running")
    assert [b"READY=1\nWATCHDOG=1\nSTATUS=running"] == drain(peer)
    assert 0 == notifier.dropped
    notifier.notify("WATCHDOG=1")
    assert [b"WATCHDOG=1"] == drain(peer)


def test_stopping_is_kept_but_status_is_not(peer: socket.socket) -> None:
    """STOPPING=1 is a state change systemd must see; a stale STATUS= is not worth resending."""
    notifier = Notifier()
    fill(peer.getsockname())
    notifier.notify("STOPPING=1", "STATUS=draining")
    drain(peer)
    notifier.notify("STATUS=stopped")
    assert [b"STOPPING=1\nSTATUS=stopped"] == drain(peer)


def test_nobody_listening_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET path nobody is bound to (systemd gone) is counted, not raised."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    notifier = Notifier()
    notifier.notify("READY=1")
    notifier.notify("WATCHDOG=1")
    assert 2 == notifier.dropped


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd the notifier is disabled and has no watchdog interval."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.notify("READY=1")
    assert 0 == notifier.dropped


def test_ready_watchdog_status_and_stopping_arrive_as_datagrams(tmp_path: Path) -> None:
    """With NOTIFY_SOCKET and WATCHDOG_USEC set, the watchdog interval is half the timeout and
    each notification arrives as one datagram."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert 2.0 == n.watchdog_interval
        n.ready("consuming")
        n.watchdog()
        n.status("busy")
        n.stopping("draining")
        assert [
            b"READY=1\nSTATUS=consuming",
            b"WATCHDOG=1",
            b"STATUS=busy",
            b"STOPPING=1\nSTATUS=draining",
        ] == [server.recv(100) for _ in range(4)]


def test_a_watchdog_meant_for_another_process_is_not_ours() -> None:
    """WATCHDOG_PID naming another process: no watchdog interval for this one."""
    n = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
