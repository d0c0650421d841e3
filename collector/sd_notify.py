"""systemd notification (READY, WATCHDOG, STATUS) over ``$NOTIFY_SOCKET``; a no-op without it.

A small copy of what the agent has: code shared by both sides that is not about the wire stays
duplicated rather than growing a shared package.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends ``sd_notify`` datagrams when started by systemd with ``Type=notify``."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        self.dropped = 0
        self._pending: list[str] = []
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd's advice: ping at half the timeout.
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given."""
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (e.g. ``"READY=1"``) as one datagram; never blocks, never raises.

        The send is non-blocking: a notify socket whose queue is full (a reader that stalls)
        must not stall the event loop that commits and acknowledges batches. A datagram that
        does not fit is dropped; ``READY=1`` and ``STOPPING=1`` are kept and sent again with
        the next notification, while ``STATUS=`` and ``WATCHDOG=1`` repeat anyway.
        """
        if not self.address:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        message = [*self._pending, *(f for f in fields if f not in self._pending)]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(
                    "\n".join(message).encode(),
                    socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
                    address,
                )
            self._pending = []
        except OSError:
            self.dropped += 1
            self._pending = [f for f in message if f in ("READY=1", "STOPPING=1")]

    def ready(self, status: str = "") -> None:
        """Tell systemd that start-up is complete."""
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        """Set the status line shown by ``systemctl status``."""
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        """Keep the watchdog from firing."""
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """Tell systemd that shutdown has begun."""
        self.notify("STOPPING=1")
