"""The findings of one ``doctor`` examination, and the small formatting helpers probes share."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def seconds_text(value: float) -> str:
    """A duration for people: ``30s``, ``5m``, ``2h``, ``90d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


def iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601 to the second (``None`` stays ``None``)."""
    return value.isoformat(timespec="seconds") if value is not None else None


class Report:
    """The findings of one examination, as a JSON-ready mapping plus problems and notes."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        """Everything, with ``ok``, ``problems`` and ``notes`` first."""
        return {
            "ok": not self.problems,
            "problems": self.problems,
            "notes": self.notes,
            **self.data,
        }
