"""bench/wire.py prints its summary line, and our zstd frame meets its size target."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wire_bench_summary() -> None:
    """The last line has the agreed form and frame_zstd is at most 6.0 bytes per reading."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "wire.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"wire bytes/reading: json=(\d+\.\d) msgpack_rows=(\d+\.\d) frame=(\d+\.\d) frame_zstd=(\d+\.\d)",
        last,
    )
    assert match, last
    json_b, rows_b, frame_b, zstd_b = (float(g) for g in match.groups())
    assert zstd_b <= 6.0
    assert zstd_b < frame_b < rows_b < json_b
