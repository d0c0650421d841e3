"""What the input tests share: an Emitter that keeps what it is given, and sample loading."""

from __future__ import annotations

import asyncio
import contextlib
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.inputs.base import DeviceState, InputConfig, InputContext, Severity, kind
from protocol import Value

INPUTS_DIR = Path(__file__).resolve().parents[2] / "agent" / "inputs"


@dataclass
class Reading:
    """One reading as an input reported it."""

    device_id: uuid.UUID
    metric: str
    value: Value
    time_us: int | None
    at: float  # monotonic time of the call, to check cadence


@dataclass
class RecordingEmitter:
    """Our own Emitter implementation for tests: it keeps everything an input reports."""

    readings: list[Reading] = field(default_factory=list)
    statuses: list[tuple[uuid.UUID, DeviceState, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    _beats: set[asyncio.Task[None]] = field(default_factory=set)

    def reading(
        self, device_id: uuid.UUID, metric: str, value: Value, time_us: int | None = None
    ) -> None:
        """Keep a reading."""
        self.readings.append(Reading(device_id, metric, value, time_us, time.monotonic()))

    def device_status(self, device_id: uuid.UUID, status: DeviceState, reason: str = "") -> None:
        """Keep a status report."""
        self.statuses.append((device_id, status, reason))

    def event(
        self,
        kind: str,
        message: str,
        *,
        severity: Severity = "info",
        device_id: uuid.UUID | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Keep an event."""
        self.events.append(
            {
                "kind": kind,
                "message": message,
                "severity": severity,
                "device_id": device_id,
                "attributes": attributes or {},
            }
        )

    def read_duration(self, seconds: float) -> None:
        """Keep a read-cycle duration."""
        self.durations.append(seconds)

    def every_commit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call back every 50 ms, as a runtime with a short commit interval would."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(0.05)
                callback()

        task = asyncio.get_running_loop().create_task(beat())
        self._beats.add(task)

        def stop() -> None:
            task.cancel()

        return stop

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Nothing to commit here: what is kept is kept, so call back on the next loop step."""
        asyncio.get_running_loop().call_soon(callback)

    def values(self, device_id: uuid.UUID, metric: str) -> list[Value]:
        """Every value reported for one device and metric, in order."""
        return [r.value for r in self.readings if r.device_id == device_id and r.metric == metric]

    def last_status(self, device_id: uuid.UUID) -> tuple[DeviceState, str] | None:
        """The latest status reported for a device."""
        for dev, status, reason in reversed(self.statuses):
            if dev == device_id:
                return status, reason
        return None

    async def wait_for(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``condition()`` holds, failing the test after ``within`` seconds."""
        deadline = time.monotonic() + within
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {within}s: {self!r:.2000}")
            await asyncio.sleep(0.02)


@pytest.fixture
def emitter() -> RecordingEmitter:
    """A fresh recording emitter."""
    return RecordingEmitter()


@pytest.fixture
def context(tmp_path: Path) -> InputContext:
    """An InputContext pointing at a buffer path in the test's directory."""
    return InputContext(gateway_id=uuid.uuid4(), buffer_path=tmp_path / "buffer.db")


def build_config(kind_name: str, raw: dict[str, Any]) -> InputConfig:
    """Validate ``raw`` with the registered model of ``kind_name``."""
    return kind(kind_name).config_model.model_validate(raw)


def load_sample(kind_name: str) -> list[InputConfig]:
    """Load and validate every ``[[inputs]]`` stanza of a kind's ``sample.toml``."""
    with (INPUTS_DIR / kind_name / "sample.toml").open("rb") as handle:
        document = tomllib.load(handle)
    stanzas = document["inputs"]
    return [kind(stanza["type"]).config_model.model_validate(stanza) for stanza in stanzas]


async def run_for(input_: Any, emitter: RecordingEmitter) -> asyncio.Task[None]:
    """Start ``input_.run(emitter)`` as a task; the caller cancels it (see ``stop``)."""
    return asyncio.create_task(input_.run(emitter))


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel an input's task and wait for it to finish, surfacing any error it raised."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
