"""Alert rules as the collector evaluates them, and their index by (tenant, metric).

A rule compares each reading of a metric with ``threshold`` (``condition``); once firing it
stays firing while the reading still compares true against ``clear_threshold`` (hysteresis:
a ``>`` rule with threshold 80 and clear threshold 75 clears only below 75). ``for_us`` is how
long the condition must hold before the alert is raised (pending until then);
``keep_firing_for_us`` how long it keeps firing after the condition stopped holding. A rule
with ``no_data_us`` is a no-data rule instead: it fires when its metric is silent that long.
"""

from __future__ import annotations

import hashlib
import operator
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

CONDITIONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
US = 1_000_000


class RuleError(ValueError):
    """A rule that cannot be evaluated as written (the message says why)."""


def check_clear_threshold(condition: str, threshold: float, clear: float | None) -> None:
    """Refuse a clear threshold on the wrong side of the threshold (it would never clear)."""
    if clear is None or clear == threshold:
        return
    if condition in (">", ">="):
        if clear > threshold:
            raise RuleError(
                f"clear threshold {clear:g} must not be above the threshold {threshold:g}"
                f" of a '{condition}' rule (it clears when the value falls below it)"
            )
    elif condition in ("<", "<="):
        if clear < threshold:
            raise RuleError(
                f"clear threshold {clear:g} must not be below the threshold {threshold:g}"
                f" of a '{condition}' rule (it clears when the value rises above it)"
            )
    else:
        raise RuleError(
            f"a '{condition}' rule has no hysteresis: its clear threshold must be its"
            f" threshold ({threshold:g}), not {clear:g}"
        )


def _us(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, timedelta):
        return int(value / timedelta(microseconds=1))
    return int(float(value) * US)


@dataclass(frozen=True, slots=True)
class Rule:
    """One enabled alert rule."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    metric: str
    condition: str
    threshold: float
    clear_threshold: float
    for_us: int = 0
    keep_firing_for_us: int = 0
    severity: str = "warning"
    device_id: uuid.UUID | None = None
    device_type_id: uuid.UUID | None = None
    no_data_us: int | None = None
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise RuleError(f"condition {self.condition!r} is not one of {' '.join(CONDITIONS)}")
        check_clear_threshold(self.condition, self.threshold, self.clear_threshold)
        if self.for_us < 0 or self.keep_firing_for_us < 0:
            raise RuleError("durations must not be negative")
        if self.no_data_us is not None and self.no_data_us <= 0:
            raise RuleError("a no-data duration must be positive")
        if not self.digest:
            object.__setattr__(self, "digest", self.condition_digest())

    def condition_digest(self) -> str:
        """What decides the rule's state: an edit that changes it resets pending timers."""
        text = "|".join(
            str(x)
            for x in (
                self.metric,
                self.condition,
                repr(self.threshold),
                repr(self.clear_threshold),
                self.for_us,
                self.keep_firing_for_us,
                self.no_data_us,
                self.device_id,
                self.device_type_id,
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def is_no_data(self) -> bool:
        """A no-data rule fires on silence, not on values."""
        return self.no_data_us is not None

    def breaches(self, value: float) -> bool:
        """The reading meets the condition (raises, after ``for``)."""
        return CONDITIONS[self.condition](value, self.threshold)

    def holds(self, value: float) -> bool:
        """A firing alert stays firing on this reading (compared with the clear threshold)."""
        return CONDITIONS[self.condition](value, self.clear_threshold)

    def applies(self, device_id: uuid.UUID, device_type_id: uuid.UUID | None) -> bool:
        """The rule's scope includes this device."""
        if self.device_id is not None:
            return self.device_id == device_id
        if self.device_type_id is not None:
            return self.device_type_id == device_type_id
        return True

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Rule:
        """A rule from its ``alert_rules`` row; :class:`RuleError` if it cannot be evaluated."""
        threshold = float(row["threshold"])
        clear = row.get("clear_threshold")
        no_data = row.get("no_data_for")
        return cls(
            id=row["id"],
            tenant_id=row["tenant_id"],
            name=row["name"],
            metric=row["metric"],
            condition=row["condition"],
            threshold=threshold,
            clear_threshold=threshold if clear is None else float(clear),
            for_us=_us(row.get("duration")),
            keep_firing_for_us=_us(row.get("keep_firing_for")),
            severity=row.get("severity") or "warning",
            device_id=row.get("device_id"),
            device_type_id=row.get("device_type_id"),
            no_data_us=None if no_data is None else _us(no_data),
        )


class RuleIndex:
    """Enabled rules by (tenant, metric): one dict lookup per series written, nothing more."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: dict[uuid.UUID, Rule] = {}
        self._by_metric: dict[tuple[uuid.UUID, str], tuple[Rule, ...]] = {}
        self.typed = False  # some rule is scoped by device type (device types must be looked up)
        for rule in rules:
            self.rules[rule.id] = rule
        self.tenants = frozenset(r.tenant_id for r in self.rules.values())
        grouped: dict[tuple[uuid.UUID, str], list[Rule]] = {}
        for rule in self.rules.values():
            grouped.setdefault((rule.tenant_id, rule.metric), []).append(rule)
            self.typed = self.typed or rule.device_type_id is not None
        self._by_metric = {k: tuple(sorted(v, key=lambda r: r.id)) for k, v in grouped.items()}

    def __len__(self) -> int:
        return len(self.rules)

    def for_metric(self, tenant_id: uuid.UUID, metric: str) -> tuple[Rule, ...]:
        """The rules on ``metric`` of ``tenant_id`` (any scope)."""
        return self._by_metric.get((tenant_id, metric), ())

    def no_data_rules(self) -> list[Rule]:
        """The no-data rules."""
        return [r for r in self.rules.values() if r.is_no_data]
