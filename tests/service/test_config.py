"""The configuration building blocks both programs share: one set of units, one wording."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import (
    Listen,
    Section,
    TopicPrefix,
    format_size,
    keys_at,
    parse_duration,
    parse_size,
    unknown_key_message,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("90d", 90 * 86400.0),
        ("2w", 14 * 86400.0),
        (3, 3.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    """Durations are written with a unit, from milliseconds to weeks."""
    assert seconds == parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 2**20),
        ("64KiB", 65536),
        ("1.5GiB", 3 * 2**29),
        ("1GB", 10**9),
        ("2TB", 2 * 10**12),
        ("1MB", 10**6),
        (4096, 4096),
    ],
)
def test_sizes(text: object, size: int) -> None:
    """Sizes are written with a binary or decimal unit, fractions allowed."""
    assert size == parse_size(text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5 minutes", "is not a duration"),
        (True, "not a boolean"),
        ([5], "got list"),
    ],
)
def test_bad_durations_say_how_to_write_one(value: object, message: str) -> None:
    """A wrong duration is refused with an example of a right one."""
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_bad_size_says_how_to_write_one() -> None:
    """A wrong size is refused with an example of a right one."""
    with pytest.raises(ValueError, match=r"is not a size; write e.g. '64KiB'"):
        parse_size("12 parsecs")


def test_format_size_writes_the_exact_binary_unit() -> None:
    """Sizes read back as the configuration would write them."""
    assert ["512MiB", "1GiB", "1000B"] == [format_size(n) for n in (2**29, 2**30, 1000)]


class _Example(Section):
    prefix: TopicPrefix = "sensormine"
    listen: Listen = ""


def test_topic_prefix_and_listen_address_are_checked() -> None:
    """A wildcard in the topic prefix and a listen address without a port are refused."""
    assert "plant/a" == _Example(prefix="plant/a").prefix
    with pytest.raises(ValidationError, match="wildcard"):
        _Example(prefix="plant/#")
    with pytest.raises(ValidationError, match="is not host:port"):
        _Example(listen="localhost")
    with pytest.raises(ValidationError, match="extra"):
        _Example(nonsense=1)  # type: ignore[call-arg]


def test_unknown_key_names_the_closest_or_every_allowed_key() -> None:
    """A misspelt key gets the closest allowed one; a wholly unknown one the list."""
    allowed = keys_at(_Example, ())
    assert {"prefix", "listen"} == allowed
    assert "unknown key (did you mean 'prefix'?)" == unknown_key_message("prefx", allowed)
    assert "unknown key (allowed here: listen, prefix)" == unknown_key_message("zzz", allowed)
