"""Planning Modbus requests from configured fields, and decoding the registers that come back."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from agent.inputs.modbus.config import (
    MAX_BITS_PER_REQUEST,
    MAX_REGISTERS_PER_REQUEST,
    FieldConfig,
    Table,
)

_FORMAT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
_UNSIGNED = {"int16": "H", "int32": "I", "int64": "Q"}


# Readings carry signed 64-bit integers (protocol v1): a uint64 above this cannot be carried.
INT64_MAX = 2**63 - 1


class DecodeError(Exception):
    """Registers that do not make a usable value (NaN or infinity, or an integer beyond int64)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One read request: a table, a start address, a count, and the fields it serves."""

    table: Table
    address: int
    count: int
    fields: tuple[FieldConfig, ...]


def plan_requests(fields: list[FieldConfig], max_span: int, max_gap: int) -> list[Request]:
    """Group fields into as few requests as the span and gap limits allow, in address order."""
    requests: list[Request] = []
    for table in ("holding", "input", "coil", "discrete"):
        ceiling = (
            MAX_BITS_PER_REQUEST if table in ("coil", "discrete") else MAX_REGISTERS_PER_REQUEST
        )
        span = min(max_span, ceiling)
        ordered = sorted((f for f in fields if f.table == table), key=lambda f: f.address)
        group: list[FieldConfig] = []
        start = end = 0  # end is exclusive
        for item in ordered:
            item_end = item.address + item.width
            if group and item.address <= end + max_gap and max(end, item_end) - start <= span:
                group.append(item)
                end = max(end, item_end)
                continue
            if group:
                requests.append(Request(table, start, end - start, tuple(group)))
            group, start, end = [item], item.address, item_end
        if group:
            requests.append(Request(table, start, end - start, tuple(group)))
    return requests


def decode_registers(field: FieldConfig, registers: list[int]) -> bool | int | float:
    """The value of ``field`` from its own registers (``field.width`` of them, in wire order)."""
    words = list(registers)
    if field.word_order == "little":
        words.reverse()
    raw = b"".join(word.to_bytes(2, "big") for word in words)
    if field.byte_order == "little":
        raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
    if field.bit is not None:
        unsigned = struct.unpack(
            ">" + _UNSIGNED.get(field.data_type, _FORMAT[field.data_type]), raw
        )[0]
        bits = (unsigned >> field.bit) & ((1 << field.bit_count) - 1)
        if field.bit_count == 1:
            return bool(bits)
        return _carried(field, int(bits))
    value = struct.unpack(">" + _FORMAT[field.data_type], raw)[0]
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError(f"{field.metric}: register value is {value}, not a finite number")
    if field.scale == 1.0 and field.offset == 0.0:
        if isinstance(value, int):
            return _carried(field, value)
        places = field.round_to
        return value if places is None else round(value, places)  # type: ignore[no-any-return]
    # A float from here on: exact for integers up to 2^53, ~16 significant digits beyond.
    scaled = float(value) * field.scale + field.offset
    if not math.isfinite(scaled):
        raise DecodeError(f"{field.metric}: scaled value is not a finite number")
    places = field.round_to
    return scaled if places is None else round(scaled, places)


def _carried(field: FieldConfig, value: int) -> int:
    if value > INT64_MAX:
        raise DecodeError(
            f"{field.metric}: {field.data_type} value {value} is above {INT64_MAX}, the largest "
            "integer a reading carries (with a scale other than 1 it is read as a float)"
        )
    return value


def decode_request(
    request: Request, data: list[int] | list[bool]
) -> tuple[dict[str, bool | int | float], list[str]]:
    """Readings by metric for every field of ``request``, and the problems of fields that failed."""
    readings: dict[str, bool | int | float] = {}
    problems: list[str] = []
    for field in request.fields:
        offset = field.address - request.address
        if request.table in ("coil", "discrete"):
            readings[field.metric] = bool(data[offset])
            continue
        try:
            readings[field.metric] = decode_registers(
                field, [int(word) for word in data[offset : offset + field.width]]
            )
        except DecodeError as exc:
            problems.append(str(exc))
    return readings, problems
