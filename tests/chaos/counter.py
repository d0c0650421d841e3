"""Counter program of the chaos test, run by an agent's ``command`` input in stream mode.

Every ``interval`` it prints one JSON line per device, ``{"device": "d03", "t": <µs>, "c0": n,
"c1": n, ...}``: the same strictly increasing tick number ``n`` for every metric, stamped with
the wall clock. So every reading is identified by (device, metric, n), and a reading missing
from the database is a gap in one series' ``n``.

``n`` is persisted in the state file after each tick was written to the agent's pipe, and a new
run continues after it: a SIGKILLed agent breaks the pipe, this program's next write fails
(``EPIPE``) and it exits without counting that tick, and the agent's next run starts the next
program on the same file (an exclusive ``flock`` makes it wait for the old one to be gone). A
gap can therefore only be readings the agent lost (the staging of a SIGKILLed agent, lines in a
broken pipe) or dropped (and counted).

While the file ``<state>.stop`` exists it prints nothing (the test's end of production); it is
still running, so the agent sees neither a failure nor an exit.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from types import FrameType

WIDTH = 20


def read_state(fd: int) -> int:
    """The last tick written, 0 for a new file."""
    raw = os.pread(fd, WIDTH, 0).strip()
    return int(raw) if raw else 0


class Stop:
    """Set by SIGTERM, read between ticks: a tick is never written without being counted."""

    requested = False

    @classmethod
    def request(cls, signum: int, frame: FrameType | None) -> None:
        """The SIGTERM handler."""
        cls.requested = True


def main() -> int:
    """Print ticks until SIGTERM or a broken pipe."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--metrics", type=int, required=True)
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args()
    stop = args.state.with_name(args.state.name + ".stop")
    fd = os.open(args.state, os.O_RDWR | os.O_CREAT, 0o644)
    # The previous run may still be alive for a moment after its agent was killed.
    fcntl.flock(fd, fcntl.LOCK_EX)
    tick = read_state(fd)
    devices = [f"d{i:02d}" for i in range(args.devices)]
    metrics = [f"c{i}" for i in range(args.metrics)]
    signal.signal(signal.SIGTERM, Stop.request)
    next_at = time.monotonic()
    while not Stop.requested:
        if not stop.exists():
            n = tick + 1
            t = time.time_ns() // 1000
            lines = "".join(
                json.dumps({"device": d, "t": t, **dict.fromkeys(metrics, n)}) + "\n"
                for d in devices
            ).encode()
            # One write of at most PIPE_BUF bytes is atomic: the agent reads a whole tick or
            # none of it, and a failed write means that nobody read any of it.
            assert len(lines) <= select.PIPE_BUF, f"a tick of {len(lines)} bytes"
            try:
                os.write(sys.stdout.fileno(), lines)
            except BrokenPipeError:
                return 0
            tick = n
            os.pwrite(fd, str(tick).rjust(WIDTH).encode(), 0)
        # Ticks are never skipped (the numbers stay consecutive); a late tick is written at once.
        next_at += args.interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
