"""The contract between the agent's runtime and its inputs, and the registry of input kinds.

An input kind is a folder ``agent/inputs/<kind>/`` whose package calls :func:`register` with
its configuration model (a pydantic model with ``type: Literal["<kind>"]``) and a factory. The
runtime validates every configured input once at start (a configuration error stops the
process), then runs each one as its own task: :meth:`Input.run` loops until cancelled, reporting
readings, device status changes and events through the :class:`Emitter`. Runtime faults (a
device that does not answer, a reply that does not parse) are reported, never raised; an
exception escaping ``run`` is a bug that the runtime logs, records as an event and answers by
restarting the input after a pause, without touching the other inputs.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from protocol import Value

DeviceState = Literal["online", "error", "offline"]
Severity = Literal["debug", "info", "warning", "error", "critical"]


class Emitter(Protocol):
    """Where an input puts what it reads. Every method is cheap and never blocks."""

    def reading(
        self, device_id: uuid.UUID, metric: str, value: Value, time_us: int | None = None
    ) -> None:
        """Record one reading; ``time_us`` defaults to now (µs since the epoch)."""

    def device_status(self, device_id: uuid.UUID, status: DeviceState, reason: str = "") -> None:
        """Report a device's status; only changes are forwarded to the collector."""

    def event(
        self,
        kind: str,
        message: str,
        *,
        severity: Severity = "info",
        device_id: uuid.UUID | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Record an event (delivered to the collector's ``events`` table)."""

    def read_duration(self, seconds: float) -> None:
        """Record how long one read cycle of this input took."""

    def every_commit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on the event loop before each buffer commit (every
        ``buffer.commit_interval``), until the returned function is called: an input that can
        poll cheaply (a socket) reads on the runtime's beat instead of waking the process itself,
        and what it reads goes into that very commit."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once everything this input reported so far is
        committed to the buffer's file (not merely held in memory), e.g. to acknowledge it to
        the device side. Callbacks run in the order they were registered."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What ``sensormine-agent inputs test`` prints for one device: readings or an error."""

    device_id: uuid.UUID
    device_name: str
    readings: dict[str, Value] = field(default_factory=dict)
    error: str | None = None


class Input(Protocol):
    """One configured input instance."""

    name: str

    async def run(self, emit: Emitter) -> None:
        """Read on the input's own schedule until cancelled; report faults through ``emit``."""

    async def probe(self) -> list[ProbeResult]:
        """Read every configured device once (commissioning), without touching the buffer."""


@dataclass(frozen=True, slots=True)
class InputContext:
    """What the runtime tells an input about the agent it runs in."""

    gateway_id: uuid.UUID
    buffer_path: Path
    stats: Callable[[], dict[str, float]] = lambda: {}


PathUse = Literal["read", "program", "directory", "device"]


@dataclass(frozen=True, slots=True)
class NamedPath:
    """A file or directory an input's configuration names and what the input does with it, for
    ``check-config``: ``read`` a file, run a ``program`` (a bare name is looked up in ``PATH``),
    list a ``directory``, open a ``device`` for reading and writing. ``present=False`` marks
    what may appear only later (a probe not wired yet, an adapter not plugged in): its absence
    is a warning, not an error."""

    key: str
    path: str
    use: PathUse
    present: bool = True
    search_path: str | None = None


class InputConfig(BaseModel):
    """Fields every input kind's configuration has; kinds subclass it and narrow ``type``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str

    def named_paths(self) -> list[NamedPath]:
        """The files and directories this input uses (keys relative to the input's table)."""
        return []


Factory = Callable[[Any, InputContext], Input]


@dataclass(frozen=True, slots=True)
class InputKind:
    """A registered input kind: its configuration model and how to build an instance."""

    name: str
    config_model: type[InputConfig]
    factory: Factory


class RegistryError(Exception):
    """A kind registered twice, or a configuration naming a kind that does not exist."""


_REGISTRY: dict[str, InputKind] = {}


def register(name: str, config_model: type[InputConfig], factory: Factory) -> None:
    """Register an input kind under its folder's name; refuses duplicates."""
    if name in _REGISTRY:
        raise RegistryError(f"input kind {name!r} is registered twice")
    _REGISTRY[name] = InputKind(name=name, config_model=config_model, factory=factory)


def kinds() -> dict[str, InputKind]:
    """The registered input kinds, built-ins included."""
    from agent.inputs import load_builtins

    load_builtins()
    return dict(_REGISTRY)


def kind(name: str) -> InputKind:
    """The input kind called ``name``, or a ``RegistryError`` listing the known ones."""
    known = kinds()
    try:
        return known[name]
    except KeyError:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RegistryError(
            f"unknown input type {name!r}{hint}; known types: {', '.join(sorted(known))}"
        ) from None
