"""Configuration of the data lifecycle jobs: the ``[lifecycle]`` section of the collector's file.

Durations are written like the rest of the collector's file (``"30s"``, ``"1h"``, ``"90d"``), plus
``"w"`` for weeks. The parser is repeated here rather than imported from ``collector.settings``
because that module imports this one (the ``lifecycle`` field), and a cycle would break whichever
is imported first.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
DAY = 86400.0


def parse_duration(value: Any) -> float:
    """Seconds from ``"30s"``, ``"2m"``, ``"1h"``, ``"90d"``, ``"2w"`` (or a plain number)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '30s' or '90d', not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"a duration is a string such as '90d', got {type(value).__name__}")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '1h', '90d'")
    return float(match.group(1)) * _UNITS[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


def interval(seconds: float) -> timedelta:
    """A duration setting as the ``timedelta`` asyncpg sends as a PostgreSQL interval."""
    return timedelta(seconds=seconds)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RollupSettings(_Section):
    """Rollups of numeric telemetry into ``metrics``, recomputed from what the writer touched."""

    enabled: bool = True
    periods: tuple[Duration, ...] = (60.0, 3600.0)
    lag: Duration = 30.0
    claim_rows: int = Field(default=5000, ge=1, le=1_000_000)

    @field_validator("periods")
    @classmethod
    def _periods(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("at least one rollup period is needed, e.g. ['1m', '1h']")
        for period in value:
            if period < 1 or period != int(period):
                raise ValueError(f"rollup period {period} s must be a whole number of seconds")
            if period > 7 * DAY:
                raise ValueError(f"rollup period {period} s is longer than a week")
        if len(set(value)) != len(value):
            raise ValueError("rollup periods must differ from each other")
        return tuple(sorted(value))


class RetentionSettings(_Section):
    """How long each hypertable keeps its rows, and how often the collector enforces it."""

    enabled: bool = True
    telemetry: Duration = 90 * DAY
    events: Duration = 365 * DAY
    metrics: Duration = 730 * DAY
    device_status_history: Duration = 365 * DAY
    interval: Duration = 3600.0

    def horizons(self) -> dict[str, float]:
        """Hypertable name to retention in seconds."""
        return {
            "telemetry": self.telemetry,
            "events": self.events,
            "metrics": self.metrics,
            "device_status_history": self.device_status_history,
        }


class CompressionSettings(_Section):
    """Native compression of ``telemetry`` (community edition only; skipped on Apache-2)."""

    enabled: bool = True
    after: Duration = 7 * DAY


class LedgerSettings(_Section):
    """How long ``ingest_ledger`` and ``ingest_rejects`` rows are kept.

    ``horizon`` must exceed the longest span any agent's buffer can hold: a batch resent after
    its ledger row is gone would be written a second time.
    """

    horizon: Duration = 35 * DAY
    interval: Duration = 3600.0
    delete_rows: int = Field(default=10_000, ge=1)


class LifecycleSettings(_Section):
    """Rollups, retention, compression and ledger housekeeping, run by the collector."""

    enabled: bool = True
    rollups: RollupSettings = RollupSettings()
    retention: RetentionSettings = RetentionSettings()
    compression: CompressionSettings = CompressionSettings()
    ledger: LedgerSettings = LedgerSettings()
    policy_interval: Duration = 3600.0
