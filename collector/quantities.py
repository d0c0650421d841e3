"""Durations and sizes as the collector's configuration writes them: ``"30s"``, ``"90d"``, ``"1MiB"``.

One parser for the whole collector (its settings, the ``[lifecycle]`` section, the admin
commands), so every key accepts the same units. The agent has its own small copy: code shared by
both sides that is not about the wire stays duplicated rather than growing a shared package.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1d"``, ``"2w"`` (or a plain number)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '5s', not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"a duration is a string such as '5s', got {type(value).__name__}")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; write e.g. '500ms', '5s', '2m', '1h', '90d'"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Bytes from ``"1MiB"``, ``"64KiB"`` (or a plain integer)."""
    if isinstance(value, bool):
        raise ValueError("a size is a string such as '1MiB', not a boolean")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size is a string such as '1MiB', got {type(value).__name__}")
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. '64KiB', '1MiB'")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
Timeout = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
"""A duration where ``"0s"`` means: no timeout."""
