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
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd's advice: ping at half the timeout.
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given."""
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (e.g. ``"READY=1"``) as one datagram; errors are ignored."""
        if not self.address:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
        except OSError:
            pass

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
