"""PostgreSQL binary COPY rows of ``telemetry`` and ``telemetry_text``, a whole series at a time.

A numeric row is ``(time, series_id, value)``: 34 bytes, all rows of a series alike but for the
8 bytes of the time and the 8 bytes of the value. The rows are made by repeating a template row
and writing the time and value columns into it with strided slice assignment from big-endian
``array`` buffers: a few C-level passes per series instead of a Python tuple per reading and
asyncpg's per-field encoding (the profile in docs/collector.md shows the difference).

Row layout: int16 field count, then for each field an int32 length and the bytes; ``time`` is an
int64 of microseconds since 2000-01-01, ``series_id`` an int32, ``value`` a float8 (numbers,
booleans as 1/0) or the UTF-8 text (``telemetry_text``).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

COLUMNS = ("time", "series_id", "value")
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01
_SWAP = sys.byteorder == "little"
_I32 = struct.Struct("!i")
# field count, time field, series id field, then the value's length and a float8
_NUMERIC = struct.Struct("!hiqiiid")
_TEXT_HEAD = struct.Struct("!hiqiii")


def _big_endian(values: array[Any]) -> bytes:
    if _SWAP:
        values.byteswap()
    return values.tobytes()


def numeric_rows(series_id: int, times: Sequence[int], values: Sequence[Any]) -> bytes:
    """Rows of a series whose values are all int, float or bool (stored as float8)."""
    template = _NUMERIC.pack(3, 8, 0, 4, series_id, 8, 0.0)
    size = len(template)
    rows = bytearray(template * len(times))
    t = _big_endian(array("q", [x - PG_EPOCH_US for x in times]))
    v = _big_endian(array("d", values))
    value_at = size - 8
    for k in range(8):
        rows[6 + k :: size] = t[k::8]
        rows[value_at + k :: size] = v[k::8]
    return bytes(rows)


def text_rows(series_id: int, times: Sequence[int], values: Sequence[str]) -> bytes:
    """Rows of ``telemetry_text``, one at a time (strings are rare and vary in length)."""
    parts: list[bytes] = []
    for t, v in zip(times, values, strict=True):
        text = v.encode()
        parts.append(_TEXT_HEAD.pack(3, 8, t - PG_EPOCH_US, 4, series_id, len(text)))
        parts.append(text)
    return b"".join(parts)


def series_rows(series_id: int, times: Sequence[int], values: Sequence[Any]) -> tuple[bytes, bytes]:
    """Binary COPY rows of one series: (``telemetry`` rows, ``telemetry_text`` rows)."""
    if str not in set(map(type, values)):
        return numeric_rows(series_id, times, values), b""
    nt: list[int] = []
    nv: list[Any] = []
    tt: list[int] = []
    tv: list[str] = []
    for t, v in zip(times, values, strict=True):
        if type(v) is str:
            tt.append(t)
            tv.append(v)
        else:
            nt.append(t)
            nv.append(v)
    return (numeric_rows(series_id, nt, nv) if nt else b""), text_rows(series_id, tt, tv)
