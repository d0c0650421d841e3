"""The ``sysfs`` input: reads kernel sensor files on the input's own threads, on an interval."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from concurrent.futures import ThreadPoolExecutor

import structlog

from agent.inputs.base import InputContext
from agent.inputs.common import DeviceRead, PolledInput, StatusTracker
from agent.inputs.sysfs.config import SysfsConfig, SysfsDevice
from agent.inputs.sysfs.reader import SysfsReadError, read_device

log = structlog.get_logger(__name__)

# Threads per input: enough that one stuck probe leaves the others readable, few enough that a
# bus full of stuck probes cannot take the process's thread budget.
MAX_THREADS = 4


class SysfsInput(PolledInput):
    """Reads every configured device each interval; a slow or stuck file never blocks the loop."""

    def __init__(self, config: SysfsConfig, context: InputContext) -> None:
        """Build the input from its validated configuration."""
        self.name = config.name
        self._config = config
        self._status = StatusTracker(config.name)
        self.interval = config.interval
        self.devices = [(device.id, device.name) for device in config.devices]
        # Blocking reads go to threads of this input alone, so a 1-wire bus that hangs in the
        # kernel cannot occupy the default executor that other inputs rely on.
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[uuid.UUID, concurrent.futures.Future[dict[str, float]]] = {}

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=min(MAX_THREADS, len(self._config.devices)),
                thread_name_prefix=f"sysfs-{self.name}",
            )
        return self._pool

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    async def _read(self, device: SysfsDevice) -> dict[str, float]:
        pending = self._pending.get(device.id)
        if pending is not None and not pending.done():
            raise SysfsReadError("the previous read has not returned yet (the file hangs)")
        future = self._executor().submit(read_device, self._config.root, device)
        self._pending[device.id] = future
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._config.timeout)
        except TimeoutError:
            raise SysfsReadError(
                f"read took longer than {self._config.timeout:g}s (timeout)"
            ) from None

    async def _read_round(self, probing: bool) -> dict[uuid.UUID, DeviceRead]:
        results = await asyncio.gather(
            *(self._read(device) for device in self._config.devices), return_exceptions=True
        )
        reads = {}
        for device, result in zip(self._config.devices, results, strict=True):
            if isinstance(result, BaseException):
                # The running agent names an unexpected failure's type; inputs test says it plainly.
                plain = probing or isinstance(result, SysfsReadError)
                why = str(result) if plain else f"{type(result).__name__}: {result}"
                reads[device.id] = DeviceRead(problems=[why])
            else:
                reads[device.id] = DeviceRead(readings=dict(result))
        return reads
