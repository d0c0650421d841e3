"""The systemd notify protocol (``sd_notify``) over ``$NOTIFY_SOCKET``; silent without systemd."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("agent.systemd")


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1`` and ``STATUS=…`` datagrams to systemd when it listens."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

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
        """Send ``fields`` (e.g. ``"READY=1"``) as one datagram; errors are logged, not raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc))

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
