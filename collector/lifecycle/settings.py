"""Configuration of the data lifecycle jobs: the ``[lifecycle]`` section of the collector's file.

Durations are written like the rest of the collector's file (``"30s"``, ``"1h"``, ``"90d"``,
``"2w"``), parsed by :mod:`service.config`.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, field_validator

from service.config import PositiveDuration, Section

DAY = 86400.0


def interval(seconds: float) -> timedelta:
    """A duration setting as the ``timedelta`` asyncpg sends as a PostgreSQL interval."""
    return timedelta(seconds=seconds)


class RollupSettings(Section):
    """Rollups of numeric telemetry into ``metrics``, recomputed from what the writer touched."""

    enabled: bool = True
    periods: tuple[PositiveDuration, ...] = (60.0, 3600.0)
    lag: PositiveDuration = 30.0
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


class RetentionSettings(Section):
    """How long each hypertable keeps its rows, and how often the collector enforces it."""

    enabled: bool = True
    telemetry: PositiveDuration = 90 * DAY
    events: PositiveDuration = 365 * DAY
    metrics: PositiveDuration = 730 * DAY
    device_status_history: PositiveDuration = 365 * DAY
    interval: PositiveDuration = 3600.0

    def horizons(self) -> dict[str, float]:
        """Hypertable name to retention in seconds."""
        return {
            "telemetry": self.telemetry,
            "telemetry_text": self.telemetry,
            "events": self.events,
            "metrics": self.metrics,
            "device_status_history": self.device_status_history,
        }


class CompressionSettings(Section):
    """Compression of old chunks by the collector's ``compression`` job (community edition only;
    skipped on Apache-2, which has none)."""

    enabled: bool = True
    after: PositiveDuration = 7 * DAY
    metrics_after: PositiveDuration = 30 * DAY
    interval: PositiveDuration = 3600.0


class LedgerSettings(Section):
    """How long ``ingest_ledger`` and ``ingest_rejects`` rows are kept.

    ``horizon`` must exceed the longest span any agent's buffer can hold: a batch resent after
    its ledger row is gone would be written a second time.
    """

    horizon: PositiveDuration = 35 * DAY
    interval: PositiveDuration = 3600.0
    delete_rows: int = Field(default=10_000, ge=1)


class LifecycleSettings(Section):
    """Rollups, retention, compression and ledger housekeeping, run by the collector."""

    enabled: bool = True
    rollups: RollupSettings = RollupSettings()
    retention: RetentionSettings = RetentionSettings()
    compression: CompressionSettings = CompressionSettings()
    ledger: LedgerSettings = LedgerSettings()
