"""The building blocks of both programs' configuration files.

Durations are written ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"90d"``, ``"2w"``; sizes
``"512MiB"``, ``"64KiB"``, ``"1.5GiB"``, ``"1GB"`` (or a plain number of seconds or bytes). Both
programs accept the same units everywhere. Every section forbids unknown keys; an unknown key
is reported with the closest allowed one (:func:`unknown_key_message`).
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from protocol import ProtocolError, validate_prefix

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1d"``, ``"2w"`` (or a number)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '5s', not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"a duration is a string such as '5s', got {type(value).__name__}")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; write e.g. '500ms', '5s', '2m', '1h', '90d', '2w'"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Bytes from ``"512MiB"``, ``"64KiB"``, ``"1.5GiB"``, ``"1GB"`` (or a plain integer)."""
    if isinstance(value, bool):
        raise ValueError("a size is a string such as '512MiB', not a boolean")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size is a string such as '512MiB', got {type(value).__name__}")
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. '64KiB', '512MiB', '2GiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_size(n: int) -> str:
    """A size as the configuration writes it (exact binary unit when there is one)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit]
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _topic_prefix(value: str) -> str:
    try:
        return validate_prefix(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def _listen(value: str) -> str:
    if value:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (e.g. '127.0.0.1:9108')")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
"""A duration of zero or more (``"0s"`` often means: off)."""
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
SizeOrZero = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]
"""The first levels of every MQTT topic (``protocol.validate_prefix``)."""
Listen = Annotated[str, AfterValidator(_listen)]
"""``host:port`` to listen on; empty: do not listen."""


class Section(BaseModel):
    """A table of a configuration file: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSettings(Section):
    """Log level and format (``auto``: JSON lines unless the log goes to a terminal)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``Model``, ``list[Model]``, unions, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    """The keys allowed in the table at ``loc`` (a validation error's location) under ``model``."""
    models = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        inner = [
            m
            for owner in models
            if part in owner.model_fields
            for m in _models_in(owner.model_fields[part].annotation)
        ]
        # Anything else is a list index, a dict key or a union's tag: the same tables.
        if inner:
            models = inner
    return {name for m in models for name in m.model_fields}


def unknown_key_message(key: str, allowed: set[str]) -> str:
    """``unknown key`` with the closest allowed key, or the allowed keys when none is close."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (allowed here: {', '.join(sorted(allowed))})"
