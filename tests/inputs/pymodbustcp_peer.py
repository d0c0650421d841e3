"""A second, independent Modbus TCP device side for tests: pyModbusTCP's server.

The modbus input is a pymodbus client; its main tests use pymodbus's own server, which shares
the client's framing code. pyModbusTCP implements the server side on its own, and its data bank
can be slowed down to answer late, the way an overloaded PLC or a slow TCP-to-RTU gateway does.
"""

from __future__ import annotations

import time
from typing import Any

from pyModbusTCP.server import DataBank, ModbusServer

from tests.inputs.modbus_peer import free_port


class SlowDataBank(DataBank):  # type: ignore[misc]
    """Registers of the peer; reads of holding registers take ``delay`` seconds when set."""

    delay = 0.0

    def get_holding_registers(
        self, address: int, number: int = 1, srv_info: Any = None
    ) -> list[int] | None:
        """The registers, after the configured delay (the server answers late)."""
        if self.delay:
            time.sleep(self.delay)
        result: list[int] | None = super().get_holding_registers(address, number, srv_info)
        return result


class PyModbusTcpPeer:
    """pyModbusTCP's server on a free port, serving its threads in the background."""

    def __init__(self, holding: list[int]) -> None:
        """Serve ``holding`` from address 0."""
        self.port = free_port()
        self.bank = SlowDataBank()
        self.bank.set_holding_registers(0, holding)
        self._server = ModbusServer("127.0.0.1", self.port, no_block=True, data_bank=self.bank)

    def __enter__(self) -> PyModbusTcpPeer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bank.delay = 0.0
        self._server.stop()
