"""The ``simulated`` input kind: deterministic, seeded waveforms for demos, tests and benchmarks.

Each configured device has several metrics; each metric follows a waveform (``sine``,
``random_walk``, ``step``, ``sawtooth``) plus Gaussian noise. Values depend only on the seed, the
device id, the metric name and the tick number, so two runs with one configuration produce the
same sequence of values.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.inputs.base import (
    Emitter,
    InputConfig,
    InputContext,
    ProbeResult,
    register,
)
from agent.inputs.common import Duration, MetricName, now_us

Waveform = Literal["sine", "random_walk", "step", "sawtooth"]


class MetricConfig(BaseModel):
    """One simulated metric: a waveform around ``base`` with ``amplitude`` and ``noise``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: MetricName
    waveform: Waveform = "sine"
    base: float = 0.0
    amplitude: float = 1.0
    period: Duration = Field(default=60.0, gt=0)
    noise: float = Field(default=0.0, ge=0)
    decimals: int | None = Field(default=3, ge=0, le=9)


DEFAULT_METRICS = (
    MetricConfig(name="temperature", waveform="sine", base=21.0, amplitude=4.0, noise=0.05),
    MetricConfig(name="pressure", waveform="random_walk", base=1013.0, amplitude=0.5, noise=0.0),
    MetricConfig(name="valve", waveform="step", base=0.0, amplitude=1.0, period=30.0, decimals=0),
    MetricConfig(name="level", waveform="sawtooth", base=50.0, amplitude=40.0, period=120.0),
)


class SimulatedDevice(BaseModel):
    """A simulated device: its id as registered with the collector, a name and its metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    name: str = Field(min_length=1, max_length=128)
    metrics: tuple[MetricConfig, ...] = DEFAULT_METRICS

    @model_validator(mode="after")
    def _unique_metrics(self) -> SimulatedDevice:
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"device {self.name!r} names a metric twice")
        if not names:
            raise ValueError(f"device {self.name!r} has no metrics")
        return self


class SimulatedConfig(InputConfig):
    """Simulated devices: waveforms with noise, counters and switches, for demos and tests."""

    type: Literal["simulated"] = "simulated"
    interval: Duration = Field(default=1.0, gt=0)
    seed: int = 0
    devices: tuple[SimulatedDevice, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_devices(self) -> SimulatedConfig:
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("a device id appears twice")
        return self


class _Signal:
    """The deterministic value sequence of one metric of one device."""

    def __init__(self, seed: int, device: uuid.UUID, metric: MetricConfig, interval: float) -> None:
        self.metric = metric
        self.interval = interval
        self.rng = random.Random(f"{seed}:{device}:{metric.name}")
        self.walk = metric.base

    def value(self, tick: int) -> float:
        m = self.metric
        t = tick * self.interval
        phase = (t % m.period) / m.period
        if m.waveform == "sine":
            v = m.base + m.amplitude * math.sin(2 * math.pi * phase)
        elif m.waveform == "sawtooth":
            v = m.base + m.amplitude * phase
        elif m.waveform == "step":
            v = m.base + (m.amplitude if phase >= 0.5 else 0.0)
        else:
            self.walk += self.rng.gauss(0.0, m.amplitude)
            v = self.walk
        if m.noise:
            v += self.rng.gauss(0.0, m.noise)
        return round(v, m.decimals) if m.decimals is not None else v


class SimulatedInput:
    """Emits every metric of every device once per ``interval``."""

    def __init__(self, config: SimulatedConfig, context: InputContext) -> None:
        self.name = config.name
        self.config = config
        self.context = context
        self._signals = [
            (device.id, metric.name, _Signal(config.seed, device.id, metric, config.interval))
            for device in config.devices
            for metric in device.metrics
        ]
        self._tick = 0

    def _cycle(self, emit: Emitter) -> None:
        time_us = now_us()
        tick = self._tick
        self._tick += 1
        for device_id, metric, signal in self._signals:
            emit.reading(device_id, metric, signal.value(tick), time_us)

    async def run(self, emit: Emitter) -> None:
        """Emit a round of readings every ``interval`` until cancelled."""
        for device in self.config.devices:
            emit.device_status(device.id, "online")
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            started = time.perf_counter()
            self._cycle(emit)
            emit.read_duration(time.perf_counter() - started)
            next_at += self.config.interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a stalled loop): skip missed ticks, no burst
                next_at = loop.time() + self.config.interval
                delay = self.config.interval
            await asyncio.sleep(delay)

    async def probe(self) -> list[ProbeResult]:
        """One round of values per device, without touching the buffer."""
        signals = {
            device.id: [
                (m.name, _Signal(self.config.seed, device.id, m, self.config.interval))
                for m in device.metrics
            ]
            for device in self.config.devices
        }
        return [
            ProbeResult(
                device_id=device.id,
                device_name=device.name,
                readings={name: signal.value(0) for name, signal in signals[device.id]},
            )
            for device in self.config.devices
        ]


def _build(config: SimulatedConfig, context: InputContext) -> SimulatedInput:
    return SimulatedInput(config, context)


register("simulated", SimulatedConfig, _build)
