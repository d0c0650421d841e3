"""The systemd notify protocol (``sd_notify``) over ``$NOTIFY_SOCKET``; silent without systemd.

Datagrams are sent without ever blocking: :meth:`Notifier.notify` runs on the event loop, and a
blocking ``sendto`` to an AF_UNIX datagram socket whose queue is full (a peer that stopped
reading; the queue holds only ``net.unix.max_dgram_qlen`` datagrams) waits until the peer reads,
which may be never, and with it the whole agent, SIGTERM included. A datagram that does not fit
is dropped; ``READY=1`` and ``STOPPING=1`` ride along with the next notification instead.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("agent.systemd")

# State changes systemd must eventually see; STATUS= and WATCHDOG=1 are repeated anyway.
_STICKY = ("READY=1", "STOPPING=1")


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1`` and ``STATUS=…`` datagrams to systemd when it listens."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self.dropped = 0
        self._unsent: list[str] = []
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications."""
        return self._socket is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or ``None``."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not self.enabled:
            return None
        if pid and pid != str(os.getpid()):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (e.g. ``"READY=1"``) as one datagram, never blocking; never raises."""
        if self._socket is None:
            return
        fields = (*(f for f in self._unsent if f not in fields), *fields)
        try:
            self._socket.sendto(
                "\n".join(fields).encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address
            )
        except OSError as exc:
            # BlockingIOError: the peer's queue is full. Others: nobody bound there (any more).
            self._unsent = [f for f in fields if f in _STICKY]
            self.dropped += 1
            if self.dropped == 1:
                log.warning(
                    "systemd.notify_dropped",
                    error=str(exc) or type(exc).__name__,
                    address=self.address,
                    kept_for_next=self._unsent,
                )
            return
        self._unsent = []
        if self.dropped:
            log.info("systemd.notify_resumed", dropped=self.dropped)
            self.dropped = 0

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
