"""Schema validation of readings: one compiled validator per schema version, checked per series.

A schema version is a JSON Schema object whose ``properties`` are the metrics of a device type.
Supported keywords per property: ``type`` (``number``, ``integer``, ``boolean``, ``string``, or a
list of them), ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``, ``enum``,
``allowNonFinite`` (ours: accept NaN and infinities for this metric) and descriptive keys such as
``unit``, ``title`` and ``description``; at the top level ``additionalProperties: false`` refuses
metrics that are not listed.

A series is checked as a whole first (the set of value types, ``min``/``max``, finiteness, the
timestamp window), which costs a few C-level passes over its lists; only a series that fails that
check is walked point by point to find which points to refuse and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import Reason

_TYPES: dict[str, frozenset[type]] = {
    "number": frozenset({int, float}),
    "integer": frozenset({int}),
    "boolean": frozenset({bool}),
    "string": frozenset({str}),
}
_ANY = frozenset({int, float, bool, str})
_DESCRIPTIVE = {"unit", "title", "description", "$comment", "examples", "default", "format"}


class SchemaError(ValueError):
    """A schema document that uses something this validator does not understand."""


@dataclass(frozen=True, slots=True)
class PointRejects:
    """Points of one series refused for one reason: their indexes into the series."""

    reason: Reason
    indexes: list[int]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of checking one series: ``accepted`` indexes (``None``: all of them)."""

    accepted: list[int] | None
    rejects: list[PointRejects] = field(default_factory=list)


ALL_ACCEPTED = Verdict(None)


@dataclass(frozen=True, slots=True)
class MetricRule:
    """What one metric's values must satisfy."""

    types: frozenset[type] = _ANY
    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    enum: frozenset[Any] | None = None
    allow_non_finite: bool = False

    @property
    def ranged(self) -> bool:
        """Whether the rule bounds numeric values."""
        return (
            self.minimum is not None
            or self.maximum is not None
            or self.exclusive_minimum is not None
            or self.exclusive_maximum is not None
        )

    def point_reason(self, value: Any) -> Reason | None:
        """Why a single value is refused, or ``None`` when it is fine (the slow path)."""
        t = type(value)
        if t is float and self.integer and math.isfinite(value) and value.is_integer():
            t = int
        if t not in self.types:
            return Reason.TYPE_MISMATCH
        if t is str:
            if "\x00" in value:
                return Reason.TYPE_MISMATCH
        elif t is float and not math.isfinite(value):
            if not self.allow_non_finite:
                return Reason.NON_FINITE
            if math.isnan(value):
                return None if self.enum is None else Reason.NOT_IN_ENUM
        if t is not str and t is not bool and self.ranged and not self._in_range(value):
            return Reason.OUT_OF_RANGE
        if self.enum is not None and value not in self.enum:
            return Reason.NOT_IN_ENUM
        return None

    def _in_range(self, v: float) -> bool:
        if self.minimum is not None and v < self.minimum:
            return False
        if self.maximum is not None and v > self.maximum:
            return False
        if self.exclusive_minimum is not None and v <= self.exclusive_minimum:
            return False
        return not (self.exclusive_maximum is not None and v >= self.exclusive_maximum)

    def series_ok(self, values: Sequence[Any]) -> bool:
        """Whether every value passes, checked on the series as a whole (the fast path)."""
        types = set(map(type, values))
        if not types <= self.types:
            return False
        if str in types:
            if any("\x00" in v for v in values if type(v) is str):
                return False
            return self.enum is None or set(values) <= self.enum
        if float in types and not self.allow_non_finite and not all(map(math.isfinite, values)):
            return False
        if self.ranged and types - {bool}:
            # NaN compares false both ways, so it fails the range unless allowed above.
            lo, hi = min(values), max(values)
            if not (self._in_range(lo) and self._in_range(hi)):
                return False
            # NaN passed the finiteness check only where non-finite values are allowed.
            if float in types and self.allow_non_finite and any(map(math.isnan, values)):
                return False
        return self.enum is None or set(values) <= self.enum


_UNCONSTRAINED = MetricRule()


def _number(prop: dict[str, Any], key: str, where: str) -> float | None:
    value = prop.get(key)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise SchemaError(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def compile_rule(prop: Any, where: str, allow_non_finite: bool) -> MetricRule:
    """Compile one property of a schema into a :class:`MetricRule`."""
    if not isinstance(prop, dict):
        raise SchemaError(f"{where} must be an object")
    known = {
        "type",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "enum",
        "allowNonFinite",
    }
    unknown = sorted(set(prop) - known - _DESCRIPTIVE)
    if unknown:
        raise SchemaError(f"{where} uses unsupported keyword(s) {', '.join(unknown)}")
    raw_type = prop.get("type")
    names = [raw_type] if isinstance(raw_type, str) else list(raw_type or [])
    types: set[type] = set()
    for name in names:
        if name not in _TYPES:
            raise SchemaError(f"{where}.type {name!r} is not one of {', '.join(_TYPES)}")
        types |= _TYPES[name]
    enum = prop.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise SchemaError(f"{where}.enum must be a list")
    allow = prop.get("allowNonFinite", allow_non_finite)
    if not isinstance(allow, bool):
        raise SchemaError(f"{where}.allowNonFinite must be true or false")
    return MetricRule(
        types=frozenset(types) if types else _ANY,
        integer="integer" in names and "number" not in names,
        minimum=_number(prop, "minimum", where),
        maximum=_number(prop, "maximum", where),
        exclusive_minimum=_number(prop, "exclusiveMinimum", where),
        exclusive_maximum=_number(prop, "exclusiveMaximum", where),
        enum=frozenset(enum) if enum is not None else None,
        allow_non_finite=allow,
    )


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """A schema version compiled for checking series."""

    rules: dict[str, MetricRule]
    additional: bool
    version: int = 0
    allow_non_finite: bool = False

    def rule(self, metric: str) -> MetricRule | None:
        """The rule for ``metric``; ``None`` when the schema refuses unknown metrics."""
        rule = self.rules.get(metric)
        if rule is None and self.additional:
            return (
                _UNCONSTRAINED if not self.allow_non_finite else MetricRule(allow_non_finite=True)
            )
        return rule


def compile_schema(
    document: Any, *, version: int = 0, allow_non_finite: bool = False
) -> CompiledSchema:
    """Compile a JSON Schema document of a device type's telemetry."""
    if not isinstance(document, dict):
        raise SchemaError("schema must be a JSON object")
    props = document.get("properties", {})
    if not isinstance(props, dict):
        raise SchemaError("schema.properties must be an object")
    additional = document.get("additionalProperties", True)
    if not isinstance(additional, bool):
        raise SchemaError("schema.additionalProperties must be true or false")
    rules = {
        str(name): compile_rule(prop, f"properties.{name}", allow_non_finite)
        for name, prop in props.items()
    }
    return CompiledSchema(rules, additional, version, allow_non_finite)


def check_series(
    rule: MetricRule, timestamps: Sequence[int], values: Sequence[Any], earliest: int, latest: int
) -> Verdict:
    """Check one series' values and timestamps; point by point only if the whole check fails."""
    if earliest <= min(timestamps) and max(timestamps) <= latest and rule.series_ok(values):
        return ALL_ACCEPTED
    accepted: list[int] = []
    refused: dict[Reason, list[int]] = {}
    for i, (t, v) in enumerate(zip(timestamps, values, strict=True)):
        reason = rule.point_reason(v)
        if reason is None and not earliest <= t <= latest:
            reason = Reason.TIMESTAMP_OUT_OF_WINDOW
        if reason is None:
            accepted.append(i)
        else:
            refused.setdefault(reason, []).append(i)
    return Verdict(accepted, [PointRejects(r, idx) for r, idx in refused.items()])
