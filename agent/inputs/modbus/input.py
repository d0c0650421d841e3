"""The ``modbus`` input: polls devices over one TCP connection or one RTU serial bus."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException

from agent.inputs.base import InputContext
from agent.inputs.common import DeviceRead, PolledInput, ProblemLog, StatusTracker, now_us
from agent.inputs.modbus.config import ModbusConfig, ModbusDevice
from agent.inputs.modbus.registers import Request, decode_request, plan_requests

log = structlog.get_logger(__name__)

_FUNCTION = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


class ModbusReadError(Exception):
    """A request that failed; ``answered`` tells an exception reply from silence or a lost link."""

    def __init__(self, message: str, *, answered: bool) -> None:
        """Say what failed and whether the device answered at all."""
        super().__init__(message)
        self.answered = answered


def _exception_name(code: int) -> str:
    try:
        return ExcCodes(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown exception"


class ModbusInput(PolledInput):
    """Reads every device once per interval; requests on the shared link are serialised."""

    def __init__(self, config: ModbusConfig, context: InputContext) -> None:
        """Build the input and plan each device's requests once."""
        self.name = config.name
        self._config = config
        self._status = StatusTracker(config.name)
        self.interval = config.interval
        self.devices = [(device.id, device.name) for device in config.devices]
        self._problems = ProblemLog("modbus", config.name)
        self._plans = {
            device.id: plan_requests(device.fields, config.max_span, config.max_gap)
            for device in config.devices
        }
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._sent_any = False
        # pymodbus logs every unanswered request at ERROR, once per request and cycle; this input
        # reports each failure itself as a status change with its reason, once per transition.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    @property
    def _link(self) -> str:
        if self._config.transport == "tcp":
            return f"tcp {self._config.host}:{self._config.port}"
        return f"serial {self._config.serial_port}"

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        config = self._config
        # retries=0 and reconnect_delay=0: this input retries per device and reconnects once per
        # cycle itself, so a dead link costs a bounded, predictable time per cycle.
        if config.transport == "tcp":
            return AsyncModbusTcpClient(
                config.host or "",
                port=config.port,
                timeout=config.timeout,
                retries=0,
                reconnect_delay=0,
                name=f"modbus-{config.name}",
            )
        return AsyncModbusSerialClient(
            config.serial_port or "",
            baudrate=config.baudrate,
            parity=config.parity,
            stopbits=config.stopbits,
            bytesize=config.bytesize,
            timeout=config.timeout,
            retries=0,
            reconnect_delay=0,
            name=f"modbus-{config.name}",
        )

    async def _connect(self) -> str | None:
        """Open the link if it is closed; the reason it could not be opened, or ``None``."""
        if self._client is None:
            self._client = self._make_client()
        if self._client.connected:
            return None
        try:
            connected = await asyncio.wait_for(self._client.connect(), self._config.timeout + 1.0)
        except (TimeoutError, OSError, ModbusException) as exc:
            connected = False
            detail = str(exc) or type(exc).__name__
        else:
            # pymodbus logs the OS error and returns False; say what it usually means.
            detail = (
                "connection refused or host unreachable"
                if self._config.transport == "tcp"
                else "missing, not permitted, or locked by another program (the running agent?)"
            )
        if not connected:
            self._client.close()
            return f"cannot connect to {self._link}: {detail}"
        return None

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _request(self, device: ModbusDevice, request: Request) -> list[int] | list[bool]:
        """Send one request with the device's timeout and retries; the data or ModbusReadError."""
        assert self._client is not None
        timeout = device.timeout if device.timeout is not None else self._config.timeout
        retries = device.retries if device.retries is not None else self._config.retries
        pause = device.pause if device.pause is not None else self._config.pause
        # pymodbus keeps its response timeout here; setting it per device lets one bus mix fast
        # meters and slow PLCs. The wait_for below bounds the call whatever pymodbus does.
        comm_params = getattr(getattr(self._client, "ctx", None), "comm_params", None)
        if comm_params is not None:
            comm_params.timeout_connect = timeout
        where = f"{request.table} {request.address}..{request.address + request.count - 1}"
        method = getattr(self._client, _FUNCTION[request.table])
        no_answer = f"no answer within {timeout:g}s reading {where}"
        last_error = ""
        for _attempt in range(retries + 1):
            if not self._client.connected:
                # pymodbus closes the link itself after a few unanswered requests in a row: a
                # slow or silent device, not a lost connection. Reopen it for this request, so
                # that one condition keeps one reason (and other units behind a gateway are
                # not blamed for it).
                failure = await self._connect()
                if failure is not None:
                    raise ModbusReadError(last_error or failure, answered=False)
            if pause and self._sent_any:
                await asyncio.sleep(pause)
            self._sent_any = True
            try:
                response: Any = await asyncio.wait_for(
                    method(request.address, count=request.count, device_id=device.unit),
                    timeout * 2 + 0.5,
                )
            except TimeoutError:
                last_error = no_answer
                continue
            except ModbusException as exc:
                # pymodbus reports its own response timeout as an I/O error with this text,
                # also when it then closes the link because of repeated silence.
                if "No response received" in str(exc):
                    last_error = no_answer
                elif not self._client.connected:
                    last_error = last_error or f"connection to {self._link} lost reading {where}"
                    break
                else:
                    last_error = f"bad reply reading {where}: {exc}"
                continue
            if response.isError():
                code = int(getattr(response, "exception_code", 0))
                raise ModbusReadError(
                    f"exception {code} ({_exception_name(code)}) reading {where}", answered=True
                )
            data = response.bits if request.table in ("coil", "discrete") else response.registers
            if len(data) < request.count:
                raise ModbusReadError(
                    f"short reply reading {where}: {len(data)} of {request.count}", answered=True
                )
            return list(data)
        raise ModbusReadError(last_error, answered=False)

    async def _read_device(self, device: ModbusDevice) -> DeviceRead:
        """Read every request of ``device``; stop at the first silence, go on after exceptions."""
        result = DeviceRead()
        for request in self._plans[device.id]:
            try:
                data = await self._request(device, request)
            except ModbusReadError as exc:
                result.problems.append(str(exc))
                if not exc.answered:
                    # A device that does not answer would cost a timeout per remaining request.
                    break
                continue
            readings, problems = decode_request(request, data)
            result.readings.update(readings)
            result.problems.extend(problems)
            for problem in problems:
                # Every time, not only on the transition into error (rate-limited).
                self._problems("bad_value", problem, device=device.name)
        result.stamp = now_us()
        return result

    async def _read_round(self, probing: bool) -> dict[uuid.UUID, DeviceRead]:
        self._sent_any = False
        failure = await self._connect()
        if failure is not None:
            return {device.id: DeviceRead(problems=[failure]) for device in self._config.devices}
        return {device.id: await self._read_device(device) for device in self._config.devices}
