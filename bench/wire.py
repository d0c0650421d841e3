"""Bytes on the wire per reading: JSON, msgpack rows, our frame, our frame with zstd.

Generated realistic data: 100 devices x 2 metrics (temperature in 0.01 °C, humidity in 0.1 %)
sampled at 1 Hz for 60 s, values drifting slowly with sensor noise and quantized to the sensor's
resolution, timestamps jittered as a gateway's scheduler jitters them. The headline figures are
for the whole data set in one batch (a backlog, or ``batch.max_age = "60s"``); the per-second
line shows the agent's default of one batch a second.

Last line: ``wire bytes/reading: json=<x> msgpack_rows=<y> frame=<z> frame_zstd=<w>``.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Batch, Series, encode_frame

DEVICES = 100
SECONDS = 60
T0 = 1_764_000_000_000_000
JITTER_US = 2_000


def generate(seed: int = 7) -> list[tuple[uuid.UUID, str, int, float]]:
    """Readings as (device, metric, time µs, value)."""
    rng = random.Random(seed)
    rows = []
    for d in range(DEVICES):
        device = uuid.UUID(int=rng.getrandbits(128), version=4)
        temp, hum = rng.uniform(15, 30), rng.uniform(30, 70)
        offset = rng.randrange(1_000_000)
        for s in range(SECONDS):
            t = T0 + offset + s * 1_000_000 + int(rng.gauss(0, JITTER_US))
            temp += rng.gauss(0, 0.01)
            hum += rng.gauss(0, 0.05)
            rows.append((device, "temperature", t, round(temp + rng.gauss(0, 0.02), 2)))
            rows.append((device, "humidity", t, round(hum + rng.gauss(0, 0.1), 1)))
        del d
    return rows


def json_bytes(rows: list[tuple[uuid.UUID, str, int, float]]) -> int:
    """One JSON object per reading, as agents that publish a message per reading send it."""
    return sum(
        len(
            json.dumps(
                {"device_id": str(d), "metric": m, "time": t, "value": v}, separators=(",", ":")
            )
        )
        for d, m, t, v in rows
    )


def msgpack_rows_bytes(rows: list[tuple[uuid.UUID, str, int, float]]) -> int:
    """One msgpack array of [device, metric, time, value] rows."""
    return len(msgpack.packb([[d.bytes, m, t, v] for d, m, t, v in rows], use_bin_type=True))


def to_batch(rows: list[tuple[uuid.UUID, str, int, float]], seq: int) -> Batch:
    """Group readings by device and metric into one batch."""
    groups: dict[tuple[uuid.UUID, str], tuple[list[int], list[float]]] = {}
    for d, m, t, v in rows:
        ts, vs = groups.setdefault((d, m), ([], []))
        ts.append(t)
        vs.append(v)
    series = [
        Series(device_id=d, metric=m, timestamps=ts, values=list(vs))
        for (d, m), (ts, vs) in groups.items()
    ]
    return Batch(
        gateway_id=uuid.UUID(int=1), stream=uuid.UUID(int=2), seq=seq, created=T0, series=series
    )


def main() -> None:
    """Print the figures; the last line is the summary."""
    rows = generate()
    n = len(rows)
    batch = to_batch(rows, 1)
    plain = len(encode_frame(batch, compress=False))
    packed = len(encode_frame(batch, compress=True))
    by_second: dict[int, list[tuple[uuid.UUID, str, int, float]]] = {}
    for row in rows:
        by_second.setdefault((row[2] - T0) // 1_000_000, []).append(row)
    per_second = sum(
        len(encode_frame(to_batch(chunk, i))) for i, chunk in enumerate(by_second.values())
    )
    print(f"readings: {n} ({DEVICES} devices x 2 metrics x {SECONDS} s at 1 Hz)")
    print(
        f"one batch a second ({len(by_second)} batches, zstd when smaller): {per_second / n:.1f} bytes/reading"
    )
    print(
        f"wire bytes/reading: json={json_bytes(rows) / n:.1f} msgpack_rows={msgpack_rows_bytes(rows) / n:.1f} frame={plain / n:.1f} frame_zstd={packed / n:.1f}"
    )


if __name__ == "__main__":
    main()
