"""The buffer survives kill -9 at random moments: nothing committed is lost, no seq is reused."""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.buffer import integrity
from protocol import decode_batch
from tests.agent.conftest import ROOT

CYCLES = 50


def _run_cycle(
    path: Path, first_id: int, seed: int, rng: random.Random
) -> tuple[list[tuple[int, int]], dict[int, str], dict[int, list[int]]]:
    """Start the child, kill -9 it at a random moment, return what it reported."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.agent.kill_child", str(path), str(first_id), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert child.stdout is not None
    fd = child.stdout.fileno()
    data = b""
    kill_after: float | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.01)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if kill_after is None and b"\n" in data:
                kill_after = time.monotonic() + rng.uniform(0.0, 0.4)
        if kill_after is not None and time.monotonic() >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(10)
    # Whatever the child wrote before it died is in the pipe: read it all.
    data += child.stdout.read()
    child.stdout.close()
    committed: list[tuple[int, int]] = []
    sealed: dict[int, str] = {}
    delivered: dict[int, list[int]] = {}
    # Only complete lines count: the last one may have been cut by the kill.
    for line in data.decode().split("\n")[:-1]:
        parts = line.split(" ")
        if parts[0] == "C" and len(parts) == 3:
            committed.append((int(parts[1]), int(parts[2])))
        elif parts[0] == "S" and len(parts) == 3 and len(parts[2]) == 64:
            sealed[int(parts[1])] = parts[2]
        elif parts[0] == "D" and len(parts) == 3:
            delivered[int(parts[1])] = [int(v) for v in parts[2].split(",")]
    return committed, sealed, delivered


def test_kill9_loop_loses_nothing_committed(tmp_path: Path) -> None:
    """50 kill -9 cycles: every committed reading is buffered or delivered, seqs never reused."""
    path = tmp_path / "buffer.db"
    rng = random.Random(1234)
    committed: set[int] = set()
    delivered: set[int] = set()
    sealed: dict[int, str] = {}
    for cycle in range(CYCLES):
        c, s, d = _run_cycle(path, first_id=(cycle + 1) * 10_000_000, seed=cycle, rng=rng)
        for first, last in c:
            committed.update(range(first, last + 1))
        for seq, digest in s.items():
            # A seq sealed in an earlier cycle must never come back with other contents.
            assert sealed.get(seq, digest) == digest, f"seq {seq} sealed twice with two contents"
            sealed[seq] = digest
        for values in d.values():
            delivered.update(values)
    assert len(committed) > 1000

    conn = sqlite3.connect(path)
    try:
        assert "ok" == integrity(conn)
        present: set[int] = {int(v) for (v,) in conn.execute("SELECT value FROM readings")}
        stored = conn.execute("SELECT seq, frame, readings FROM batches").fetchall()
        counters = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    for seq, frame, count in stored:
        frame = bytes(frame)
        batch = decode_batch(frame)
        assert seq == batch.seq
        assert count == batch.point_count
        if seq in sealed:
            assert sealed[seq] == hashlib.sha256(frame).hexdigest()
        present.update(int(v) for s in batch.series for v in s.values)  # type: ignore[call-overload]
    missing = committed - present - delivered
    assert set() == missing
    # The counters were written in the same transactions as the data they count.
    buffered = len(present)
    assert int(counters["produced"]) == int(counters["delivered"]) + buffered
