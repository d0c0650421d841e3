"""The ``system`` input: the gateway's CPU, memory, disk, load, temperature, uptime and agent figures."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from agent.inputs.base import InputContext
from agent.inputs.common import DeviceRead, PolledInput, StatusTracker, finite_or_none
from agent.inputs.system.collect import (
    Collected,
    CpuTimes,
    cpu_percent,
    read_cpu_times,
    read_disk,
    read_load,
    read_memory,
    read_temperature,
    read_uptime,
)
from agent.inputs.system.config import SystemConfig

log = structlog.get_logger(__name__)

# Sampling window for the CPU figure of `inputs test`, which has no previous sample.
FIRST_CPU_WINDOW = 0.25
# Runtime figures that are yes/no; the others are counts (readings, bytes, batches).
BOOLEAN_FIGURES = frozenset({"link_up"})


def _own_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class SystemInput(PolledInput):
    """Reports the host's health as readings of one device (the gateway by default)."""

    def __init__(self, config: SystemConfig, context: InputContext) -> None:
        """Build the input; the device is the gateway unless ``device_id`` says otherwise."""
        self.name = config.name
        self._config = config
        self._context = context
        self.device_id = config.device_id or context.gateway_id
        self._status = StatusTracker(config.name)
        self.interval = config.interval
        self.devices = [(self.device_id, config.device_name)]
        self._cpu: CpuTimes | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: asyncio.Future[Collected] | None = None

    def _collect_host(self, sample_first: bool) -> Collected:
        """Everything that needs the file system; runs on this input's own thread.

        Without a previous CPU sample, ``sample_first`` measures a short window (for `inputs
        test`); otherwise this cycle only takes the baseline and reports no ``cpu_percent``:
        a first figure would measure the agent's own start-up, not the gateway's load.
        """
        config = self._config
        result = Collected()
        groups = set(config.groups)
        readers: list[tuple[str, Callable[[], dict[str, int | float]]]] = [
            ("memory", lambda: read_memory(config.root)),
            ("disk", lambda: read_disk(self._context.buffer_path)),
            ("load", lambda: read_load(config.root)),
            ("uptime", lambda: read_uptime(config.root)),
            ("temperature", lambda: read_temperature(config.root)),
        ]
        if "cpu" in groups:
            try:
                now = read_cpu_times(config.root)
                if self._cpu is None and sample_first:
                    time.sleep(FIRST_CPU_WINDOW)
                    self._cpu, now = now, read_cpu_times(config.root)
                percent = cpu_percent(self._cpu, now) if self._cpu is not None else None
                self._cpu = now
                if percent is not None:
                    result.readings["cpu_percent"] = percent
            except (OSError, ValueError, IndexError) as exc:
                result.problems.append(f"cpu: {exc}")
        for group, reader in readers:
            if group not in groups:
                continue
            try:
                result.readings.update(reader())
            except (OSError, ValueError, IndexError, KeyError) as exc:
                result.problems.append(f"{group}: {type(exc).__name__}: {exc}")
        return result

    def _agent_figures(self) -> dict[str, int | bool]:
        """The runtime's own figures (buffer depth, dropped, RSS), prefixed ``agent_``.

        Counts are integers and ``agent_link_up`` is a boolean, as they are meant.
        """
        try:
            stats = dict(self._context.stats())
        except Exception as exc:
            log.warning("system.stats_failed", input=self.name, error=str(exc))
            stats = {}
        stats.setdefault("rss_bytes", _own_rss())
        figures: dict[str, int | bool] = {}
        for key, value in stats.items():
            number = finite_or_none(float(value))
            if number is None:
                continue
            figures[f"agent_{key}"] = bool(number) if key in BOOLEAN_FIGURES else round(number)
        return figures

    async def _collect(self, sample_first: bool = False) -> Collected:
        if self._pending is not None and not self._pending.done():
            return Collected(
                problems=["the previous collection has not returned (hung file system?)"]
            )
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"system-{self.name}")
        future = asyncio.wrap_future(self._pool.submit(self._collect_host, sample_first))
        self._pending = future
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self._config.timeout)
        except TimeoutError:
            result = Collected(problems=[f"collection took longer than {self._config.timeout:g}s"])
        if "agent" in self._config.groups:
            # Called on the loop: the runtime's counters are not meant to be read from threads.
            result.readings.update(self._agent_figures())
        return result

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _read_round(self, probing: bool) -> dict[uuid.UUID, DeviceRead]:
        result = await self._collect(sample_first=probing)
        return {self.device_id: DeviceRead(dict(result.readings), list(result.problems))}
