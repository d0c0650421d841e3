"""A truly full file system (issue 11, defect 7): no resend storm, readings kept, recovery.

``PRAGMA max_page_count`` never limits the WAL, so it cannot show what a full disk does: SQLite
needs room in the WAL even to delete. These tests mount a small tmpfs of their own and fill it
with a file, then run ``sensormine-agent`` on it as a real child process against the real broker.
"""

from __future__ import annotations

import errno
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol import AckResult, Batch
from tests.agent.conftest import Acknowledger, start_agent, status_json, write_config
from tests.waiting import wait_for

FS_SIZE = "24m"
RESERVE = 2**20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of a few MiB mounted for this test (skipped where mounting is not permitted)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0755", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: the full-disk test needs a small real file system")
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}):"
            " the full-disk test needs a small real file system (run as root)"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(path: Path) -> int:
    """Write ``path`` until the file system refuses another byte; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1 << 9):
            block = b"\xa5" * size
            while True:
                try:
                    n = f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n or 0
                if not n:
                    break
    return written


def test_full_file_system_no_resend_storm_readings_kept_and_recovery(
    tmp_path: Path,
    small_fs: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
    record_property: Callable[[str, object], None],
) -> None:
    """The file system fills up while the collector is away: the agent releases its reserve,
    holds new readings in memory, and once acks come again deletes the acknowledged batches
    without resending them (no storm); when the filler goes, the reserve is made again and
    every reading produced arrives, none dropped."""
    buffer = small_fs / "buffer.db"
    config = write_config(
        tmp_path / "agent.toml",
        buffer=buffer,
        port=mqtt_address[1],
        prefix=prefix,
        devices=10,
        interval="10ms",
        extra_buffer=f'reserve_bytes = "{RESERVE}B"',
        extra_batch='max_age = "200ms"',
        extra_mqtt='ack_timeout = "2s"',
        extra_runtime='drain_timeout = "10s"',
    )
    # Noisy values at full precision: frames that do not compress, so the buffer grows quickly.
    metrics = "".join(
        f'\n  [[inputs.devices.metrics]]\n  name = "m{i}"\n  waveform = "random_walk"'
        f"\n  base = {i}.0\n  amplitude = 1.0\n  noise = 0.5\n"
        for i in range(4)
    )
    lines = config.read_text().splitlines()
    config.write_text(
        "\n".join(line + (metrics if line.startswith('name = "dev-') else "") for line in lines)
    )
    log_path = tmp_path / "agent.log"
    answering = [True]

    def policy(batch: Batch, seen: int) -> AckResult | None:
        return AckResult.OK if answering[0] else None

    ack = acknowledger_factory(*mqtt_address, prefix, policy)
    reserve = Path(f"{buffer}.reserve")
    agent = start_agent(config, log_path)

    def logged(event: str) -> bool:
        return f'"event": "{event}"' in log_path.read_text()

    try:
        wait_for(lambda: len(ack.acked) >= 5, what="first acks")
        assert reserve.stat().st_blocks * 512 >= RESERVE
        # The collector goes quiet and the file system fills up: the buffer must grow, and can't.
        answering[0] = False
        sent = len(ack.received)
        wait_for(lambda: len(ack.received) >= sent + 3, what="batches waiting for their ack")
        filler = small_fs / "filler"
        filled = fill(filler)
        assert filled > 0
        wait_for(lambda: logged("buffer.disk_full"), what="SQLITE_FULL")
        time.sleep(1.0)
        assert agent.poll() is None
        # The collector answers again; the disk is still full.
        answering[0] = True
        since = time.monotonic()
        time.sleep(4.0)
        with_acks = Counter(k for t, k in ack.received if t >= since)
        assert with_acks, "nothing was sent while the disk was full"
        storm = max(with_acks.values())
        record_property("max_sends_of_one_batch_in_4s_on_full_disk", storm)
        assert storm <= 3, f"one batch was sent {storm} times in 4 s (resend storm)"
        full = status_json(config)
        # Acknowledged batches were deleted on the full file system (the reserve made room).
        assert logged("buffer.reserve_released")
        assert not reserve.exists()
        assert full["batches"] <= 8, full
        # Space returns: the agent recovers by itself.
        filler.unlink()
        wait_for(lambda: logged("buffer.space_restored"), timeout=20, what="recovery")
        wait_for(lambda: reserve.exists() and reserve.stat().st_blocks * 512 >= RESERVE)
        mark = len(ack.acked)
        wait_for(lambda: len(ack.acked) >= mark + 2, what="shipping after recovery")
        agent.send_signal(signal.SIGTERM)
        assert 0 == agent.wait(40)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    status = status_json(config)
    record_property("produced", status["produced"])
    record_property("dropped", status["dropped"])
    assert 0 == status["dropped"], status["dropped_by_reason"]
    assert (0, status["produced"]) == (status["readings"], status["delivered"])
    batches = ack.batches()
    assert status["delivered"] == sum(b.point_count for b in batches.values())
    # Every series has a reading at every tick: nothing went missing while the disk was full.
    ticks: Counter[tuple[uuid.UUID, str]] = Counter()
    times: set[int] = set()
    for b in batches.values():
        for s in b.series:
            ticks[(s.device_id, s.metric)] += len(s.timestamps)
            times.update(s.timestamps)
    assert 40 == len(ticks)
    assert {len(times)} == set(ticks.values())
    assert not logged("buffer.held_lost")
