"""Turning one MQTT message into readings according to a subscription."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, Literal

from agent.inputs.common import timestamp_us
from agent.inputs.mqtt.config import Subscription

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_TRUE = {"on", "true", "open", "yes"}
_FALSE = {"off", "false", "closed", "no"}

Problem = Literal["malformed", "too_large", "missing", "bad_value", "unknown_device"]


class MessageError(Exception):
    """A message that yields no reading: ``problem`` is the counter it goes to."""

    def __init__(self, problem: Problem, message: str, device_key: str | None = None) -> None:
        """Say what was wrong, under which counter, and which device it was for if known."""
        super().__init__(message)
        self.problem = problem
        self.device_key = device_key


@dataclass(frozen=True, slots=True)
class Mapped:
    """Readings of one message for one device, with the problems of fields that failed."""

    device_key: str
    readings: dict[str, bool | int | float]
    time_us: int | None
    missing: list[str]


@functools.lru_cache(maxsize=4096)
def _steps(path: str) -> tuple[str | int, ...]:
    """A path's keys and list indexes, parsed once per distinct path (a measured hot spot)."""
    return tuple(
        int(index) if index else key for key, index in _STEP.findall(path.removeprefix("$."))
    )


def lookup(document: Any, path: str) -> Any:
    """The value at ``path`` ("a.b[0].c") in a decoded JSON document; ``KeyError`` if absent."""
    current = document
    for step in _steps(path):
        if step.__class__ is int:
            if current.__class__ is not list or step >= len(current):  # type: ignore[operator]
                raise KeyError(path)
        elif current.__class__ is not dict or step not in current:
            raise KeyError(path)
        current = current[step]
    return current


class TopicFilter:
    """An MQTT topic filter compiled once: matching costs a comparison per level.

    paho's ``topic_matches_sub`` builds a matcher tree on every call, which was the largest
    single cost per message with a handful of subscriptions.
    """

    __slots__ = ("_exact", "_levels", "_multi", "_wild_first")

    def __init__(self, text: str) -> None:
        """Compile ``text`` (already validated: ``+`` and ``#`` only as whole levels)."""
        levels = text.split("/")
        self._multi = levels[-1] == "#"
        if self._multi:
            levels.pop()
        self._levels = tuple(None if level == "+" else level for level in levels)
        self._exact = text if "+" not in levels and not self._multi else None
        self._wild_first = (self._multi and not levels) or (bool(levels) and levels[0] == "+")

    def matches(self, topic: str, levels: list[str]) -> bool:
        """Whether ``topic`` (split into ``levels``) matches this filter."""
        if self._exact is not None:
            return topic == self._exact
        if self._wild_first and topic.startswith("$"):
            return False  # MQTT 4.7.2: wildcards at the first level do not match $-topics
        wanted = self._levels
        if self._multi:
            # "a/#" also matches "a" itself (MQTT 4.7.1.2).
            if len(levels) < len(wanted):
                return False
        elif len(levels) != len(wanted):
            return False
        for want, level in zip(wanted, levels, strict=False):
            if want is not None and want != level:
                return False
        return True


def boolean_word(raw: str) -> bool | None:
    """``True``/``False`` for on/off, true/false, open/closed, yes/no (any case), else ``None``."""
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    return None


def topic_device_key(sub: Subscription, topic: str, levels: list[str] | None = None) -> str | None:
    """The device key a subscription takes from the topic or its configuration, if it does."""
    if sub.device is not None:
        return sub.device
    if sub.device_level is not None:
        return (levels if levels is not None else topic.split("/"))[sub.device_level]
    return None


def to_value(raw: Any) -> bool | int | float:
    """A reading from a JSON value or plain text; ``ValueError`` for anything else."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        if not -(2**63) <= raw < 2**63:
            raise ValueError(f"{raw} does not fit in 64 bits")
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError(f"{raw} is not a finite number")
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        word = boolean_word(text)
        if word is not None:
            return word
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text[:40]!r} is not a number or a boolean") from None
        if not math.isfinite(number):
            raise ValueError(f"{text[:40]!r} is not a finite number")
        return number
    raise ValueError(f"a {type(raw).__name__} is not a number or a boolean")


def map_message(
    sub: Subscription,
    topic: str,
    payload: bytes | bytearray,
    local_zone: tzinfo | None = None,
    levels: list[str] | None = None,
) -> Mapped:
    """The readings of ``payload`` under ``sub``, or ``MessageError`` saying what is wrong.

    ``local_zone`` is the zone of ISO times without an offset (the input's ``timezone``);
    ``levels`` is the topic already split at ``/``.
    """
    if levels is None:
        levels = topic.split("/")
    device_key = topic_device_key(sub, topic, levels)

    if sub.payload == "plain":
        assert device_key is not None  # validation: plain payloads name devices by topic/config
        metric = sub.metric if sub.metric is not None else levels[sub.metric_level or 0]
        try:
            text = payload.decode("utf-8")
            value = to_value(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MessageError("bad_value", f"{topic}: {exc}", device_key) from None
        return Mapped(device_key, {metric: value}, None, [])

    try:
        document = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MessageError("malformed", f"{topic}: malformed JSON ({exc})", device_key) from None
    if not isinstance(document, dict):
        raise MessageError(
            "malformed",
            f"{topic}: expected a JSON object, got {type(document).__name__}",
            device_key,
        )
    if sub.device_path is not None:
        try:
            found = lookup(document, sub.device_path)
        except KeyError:
            raise MessageError(
                "missing", f"{topic}: no {sub.device_path} naming the device"
            ) from None
        device_key = str(found)
    assert device_key is not None

    readings: dict[str, bool | int | float] = {}
    missing: list[str] = []
    for metric, path in sub.fields.items():
        try:
            readings[metric] = to_value(lookup(document, path))
        except KeyError:
            missing.append(path)
        except ValueError as exc:
            missing.append(f"{path} ({exc})")
    if sub.all_fields:
        for key, raw in document.items():
            if key in readings or isinstance(raw, dict | list) or raw is None:
                continue
            if isinstance(raw, str):
                # "state": "ON" is a reading; other text ("update": "idle") is not.
                word = boolean_word(raw)
                if word is not None:
                    readings[key] = word
                continue
            try:
                readings[key] = to_value(raw)
            except ValueError:
                continue
    stamp = None
    if sub.time_path is not None:
        try:
            stamp = timestamp_us(lookup(document, sub.time_path), local_zone)
        except KeyError:
            pass  # the time is optional: arrival time stands in
        except ValueError as exc:
            raise MessageError(
                "bad_value", f"{topic}: {sub.time_path}: {exc}", device_key
            ) from None
    if not readings:
        wanted = (
            f"none of the configured fields present ({', '.join(missing)})"
            if missing
            else "no top-level number, boolean or ON/OFF word"
        )
        if missing and sub.all_fields:
            wanted += " and no other top-level number, boolean or ON/OFF word"
        raise MessageError("missing", f"{topic}: {wanted}", device_key)
    return Mapped(device_key, readings, stamp, missing)
