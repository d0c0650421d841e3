"""Parsing a program's output lines: JSON objects or ``metric=value`` pairs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, Literal

from agent.inputs.common import timestamp_us
from protocol import Value

_METRIC = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")
MAX_STRING = 1024
# One metric=value pair of a keyvalue line (logfmt): a value in double quotes may hold spaces,
# with \" and \\ inside; an unquoted value runs to the next space.
_PAIR = re.compile(r'\s*([^\s="]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s"]*))(?=\s|$)')
_UNESCAPE = re.compile(r"\\(.)")


class LineError(Exception):
    """A line that cannot be turned into readings; the message says why.

    ``device`` is the device name the line gave in its device field, when it could be read:
    the bad line is then that device's problem.
    """

    def __init__(self, message: str, device: str | None = None) -> None:
        """Say what is wrong with the line, and which device it named if any."""
        super().__init__(message)
        self.device = device


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """The readings of one line, the device it names (if any) and its time (if given)."""

    readings: dict[str, Value]
    device: str | None
    time_us: int | None


def _value(metric: str, raw: Any) -> Value:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        if not -(2**63) <= raw < 2**63:
            raise LineError(f"{metric}: {raw} does not fit in 64 bits")
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise LineError(f"{metric}: {raw} is not a finite number")
        return raw
    if isinstance(raw, str):
        if len(raw) > MAX_STRING:
            raise LineError(f"{metric}: text longer than {MAX_STRING} characters")
        return raw
    raise LineError(f"{metric}: a {type(raw).__name__} is not a reading")


def _scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _keyvalue(text: str, device_field: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    position = 0
    problem = ""
    while position < len(text):
        match = _PAIR.match(text, position)
        if match is None:
            rest = text[position:].split(None, 1)
            problem = f"{rest[0][:40] if rest else text[position:][:40]!r} is not metric=value"
            break
        key, quoted, bare = match.groups()
        fields[key] = _UNESCAPE.sub(r"\1", quoted) if quoted is not None else _scalar(bare)
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    if problem:
        # The pairs before the bad one may still say which device the line is about.
        device = fields.get(device_field)
        raise LineError(problem, device if isinstance(device, str) else None)
    return fields


def parse_line(
    line: str,
    fmt: Literal["auto", "json", "keyvalue"],
    device_field: str,
    time_field: str | None,
    local_zone: tzinfo | None = None,
) -> ParsedLine | None:
    """The readings in ``line``, ``None`` for a blank line, or ``LineError``.

    ``local_zone`` is the zone of ISO times without an offset (the input's ``timezone``).
    """
    text = line.strip()
    if not text:
        return None
    fields: dict[str, Any]
    if fmt == "json" or (fmt == "auto" and text.startswith("{")):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LineError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(decoded, dict):
            raise LineError(f"a JSON line must be an object, not {type(decoded).__name__}")
        fields = decoded
    else:
        fields = _keyvalue(text, device_field)
    device = fields.pop(device_field, None)
    if device is not None and not isinstance(device, str):
        raise LineError(f"{device_field}: a device name is text, not {type(device).__name__}")
    try:
        stamp = None
        if time_field is not None and time_field in fields:
            try:
                stamp = timestamp_us(fields.pop(time_field), local_zone)
            except ValueError as exc:
                raise LineError(f"{time_field}: {exc}") from None
        readings: dict[str, Value] = {}
        for metric, raw in fields.items():
            if not _METRIC.match(metric):
                raise LineError(f"{metric[:40]!r} is not a usable metric name")
            if raw is None:
                continue  # JSON null: the program had no value this time
            readings[metric] = _value(metric, raw)
        if not readings:
            raise LineError("the line holds no readings")
    except LineError as exc:
        raise LineError(str(exc), device) from None
    return ParsedLine(readings, device, stamp)
