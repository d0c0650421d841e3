"""The ``[lifecycle]`` settings: defaults, durations and errors that name the key."""

from __future__ import annotations

import pytest

from collector.errors import ConfigError
from collector.settings import parse_settings


def _settings(**lifecycle: object) -> dict[str, object]:
    return {
        "metadata": {"dsn": "postgresql://u@h/meta"},
        "timeseries": {"dsn": "postgresql://u@h/ts"},
        "lifecycle": lifecycle,
    }


def test_defaults_are_the_documented_ones() -> None:
    """1-minute and 1-hour rollups 30 s behind; 90 d / 365 d / 2 y / 365 d retention; 7 d compression."""
    lc = parse_settings(_settings()).lifecycle
    assert (60.0, 3600.0) == lc.rollups.periods
    assert 30.0 == lc.rollups.lag
    assert {
        "telemetry": 90 * 86400.0,
        "telemetry_text": 90 * 86400.0,
        "events": 365 * 86400.0,
        "metrics": 730 * 86400.0,
        "device_status_history": 365 * 86400.0,
    } == lc.retention.horizons()
    assert 7 * 86400.0 == lc.compression.after
    assert 35 * 86400.0 == lc.ledger.horizon


def test_durations_are_parsed_and_periods_sorted() -> None:
    """Durations use the collector's units plus weeks; periods come back in ascending order."""
    lc = parse_settings(
        _settings(
            rollups={"periods": ["1h", "5m", "1w"], "lag": "10s"}, retention={"metrics": "104w"}
        )
    ).lifecycle
    assert (300.0, 3600.0, 7 * 86400.0) == lc.rollups.periods
    assert 104 * 7 * 86400.0 == lc.retention.metrics


@pytest.mark.parametrize(
    ("lifecycle", "message"),
    [
        (
            {"rollups": {"periods": ["1.5s"]}},
            r"lifecycle\.rollups\.periods: .*whole number of seconds",
        ),
        (
            {"rollups": {"periods": []}},
            r"lifecycle\.rollups\.periods: .*at least one rollup period",
        ),
        (
            {"retention": {"telemetry": "ninety days"}},
            r"lifecycle\.retention\.telemetry: .*not a duration",
        ),
        ({"ledger": {"horizon": "0s"}}, r"lifecycle\.ledger\.horizon: .*greater than 0"),
        ({"compression": {"segment_by": "x"}}, r"lifecycle\.compression\.segment_by: unknown key"),
    ],
)
def test_errors_name_the_key(lifecycle: dict[str, object], message: str) -> None:
    """A bad value is reported with the file and the dotted key under lifecycle."""
    with pytest.raises(ConfigError, match=message):
        parse_settings(_settings(**lifecycle), "site.toml")
