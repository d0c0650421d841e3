"""The systemd notify protocol (``sd_notify``) over ``$NOTIFY_SOCKET``; silent without systemd.

Datagrams are sent without ever blocking: :meth:`Notifier.notify` runs on the event loop, and a
blocking ``sendto`` to an AF_UNIX datagram socket whose queue is full (a peer that stopped
reading; the queue holds only ``net.unix.max_dgram_qlen`` datagrams) waits until the peer reads,
which may be never, and with it the whole program, SIGTERM included. A datagram that does not
fit is dropped; ``READY=1`` and ``STOPPING=1`` ride along with the next notification instead,
while ``STATUS=`` and ``WATCHDOG=1`` are repeated anyway.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("service.systemd")

# State changes systemd must eventually see; STATUS= and WATCHDOG=1 are repeated anyway.
_STICKY = ("READY=1", "STOPPING=1")


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1``, ``STATUS=…`` and ``STOPPING=1`` when systemd listens.

    ``watchdog_interval`` is how often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``, as
    systemd advises), or ``None`` when no watchdog is asked for this process.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.dropped = 0
        self._unsent: list[str] = []
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        if self.address and usec.isdigit() and int(usec) > 0 and ours:
            self.watchdog_interval = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications."""
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (e.g. ``"READY=1"``) as one datagram, never blocking; never raises."""
        if not self.address:
            return
        fields = (*(f for f in self._unsent if f not in fields), *fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(
                    "\n".join(fields).encode(),
                    socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
                    self.address,
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

    def ready(self, status: str = "") -> None:
        """Start-up is complete."""
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        """The line ``systemctl status`` shows."""
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        """Keep the watchdog from firing."""
        self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> None:
        """Shutdown has begun."""
        self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))
