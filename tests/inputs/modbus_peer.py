"""A real Modbus peer for tests: pymodbus's own server with a known register map.

``ModbusPeer`` serves TCP on a free port; ``NullModem`` joins two pseudo-terminals the way a
crossed serial cable joins two ports, so an RTU server and client can talk over real ttys.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import termios
import tty
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def words(fmt: str, value: float | int) -> list[int]:
    """The big-endian 16-bit words of ``value`` packed with struct format ``fmt``."""
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def swap_bytes(registers: list[int]) -> list[int]:
    """Each word with its two bytes exchanged."""
    return [((r & 0xFF) << 8) | (r >> 8) for r in registers]


# The known register map: address -> words, and what each field must decode to.
HOLDING: list[int] = (
    words("f", 12.5)  # 0-1 float32 ABCD
    + list(reversed(words("f", 12.5)))  # 2-3 float32 CDAB (word-swapped)
    + words("i", -2)  # 4-5 int32
    + words("h", -5)  # 6 int16
    + [1234]  # 7 uint16, scale 0.1 offset 1
    + [0b1010_0000_0000_1001]  # 8 status word: bit 0 set, bit 1 clear, bits 12-15 = 10
    + words("d", 3.141592653589793)  # 9-12 float64
    + list(reversed(words("Q", 2**40 + 7)))  # 13-16 uint64 word-little
    + swap_bytes(words("I", 0x12345678))  # 17-18 uint32 byte-swapped (BADC)
    + words("f", 21.75)  # 19-20 float32 (unit 2's temperature)
)
INPUT: list[int] = [7, 8, 9]
COILS: list[bool] = [True, False, True, True, False]
DISCRETE: list[bool] = [False, True]

FIELDS: list[dict[str, object]] = [
    {"metric": "f32", "address": 0, "data_type": "float32"},
    {"metric": "f32_swapped", "address": 2, "data_type": "float32", "word_order": "little"},
    {"metric": "i32", "address": 4, "data_type": "int32"},
    {"metric": "i16", "address": 6, "data_type": "int16"},
    {"metric": "scaled", "address": 7, "data_type": "uint16", "scale": 0.1, "offset": 1},
    {"metric": "alarm", "address": 8, "bit": 0},
    {"metric": "fault", "address": 8, "bit": 1},
    {"metric": "mode", "address": 8, "bit": 12, "bit_count": 4},
    {"metric": "f64", "address": 9, "data_type": "float64"},
    {"metric": "u64", "address": 13, "data_type": "uint64", "word_order": "little"},
    {"metric": "u32_bytes", "address": 17, "data_type": "uint32", "byte_order": "little"},
    {"metric": "in1", "table": "input", "address": 1},
    {"metric": "in2", "table": "input", "address": 2},
    {"metric": "coil0", "table": "coil", "address": 0},
    {"metric": "coil3", "table": "coil", "address": 3},
    {"metric": "di1", "table": "discrete", "address": 1},
]
EXPECTED: dict[str, object] = {
    "f32": 12.5,
    "f32_swapped": 12.5,
    "i32": -2,
    "i16": -5,
    "scaled": 124.4,
    "alarm": True,
    "fault": False,
    "mode": 10,
    "f64": 3.141592653589793,
    "u64": 2**40 + 7,
    "u32_bytes": 0x12345678,
    "in1": 8,
    "in2": 9,
    "coil0": True,
    "coil3": True,
    "di1": True,
}


@dataclass
class Behaviour:
    """How the peer answers right now; tests flip these while an input is polling it."""

    answering: asyncio.Event = field(default_factory=asyncio.Event)
    exception: ExcCodes | None = None
    requests: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.answering.set()


def make_devices(behaviour: Behaviour, units: tuple[int, ...] = (1, 2)) -> list[SimDevice]:
    """Server-side devices with the known map; every request goes through ``behaviour``."""

    def action_for(unit: int):  # type: ignore[no-untyped-def]
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            current_registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            behaviour.requests.append((unit, function_code, address, count))
            # Holding the request open is what a device that stopped answering looks like.
            await behaviour.answering.wait()
            return behaviour.exception

        return action

    return [
        SimDevice(
            id=unit,
            simdata=(
                [SimData(0, values=list(COILS), datatype=DataType.BITS)],
                [SimData(0, values=list(DISCRETE), datatype=DataType.BITS)],
                [SimData(0, values=list(HOLDING), datatype=DataType.REGISTERS)],
                [SimData(0, values=list(INPUT), datatype=DataType.REGISTERS)],
            ),
            action=action_for(unit),
        )
        for unit in units
    ]


class ModbusPeer:
    """pymodbus's TCP server on a free port, which can be stopped and started on that port."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        """Prepare a server; ``start`` begins listening."""
        self.port = free_port()
        self.behaviour = behaviour or Behaviour()
        self._server: ModbusTcpServer | None = None

    async def start(self) -> None:
        """Listen on ``self.port``."""
        self._server = ModbusTcpServer(
            make_devices(self.behaviour), address=("127.0.0.1", self.port)
        )
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        """Stop listening and drop every connection, like a device losing power."""
        if self._server is not None:
            self.behaviour.answering.set()  # let held requests finish so nothing leaks
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
            await asyncio.sleep(0.05)


class NullModem:
    """Two pseudo-terminals whose masters are joined: bytes written to one tty come out of the other.

    This is what ``socat pty,raw pty,raw`` does; each end is a real tty device node that
    pyserial opens like a USB-RS485 adapter.
    """

    def __init__(self) -> None:
        """Open both pty pairs in raw mode."""
        self._masters: list[int] = []
        self.ports: list[str] = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            self._masters.append(master)
            self.ports.append(os.ttyname(slave))
            # Keep the slave open so the pair survives the client closing and reopening it.
            self._slaves = [*getattr(self, "_slaves", []), slave]

    def start(self) -> None:
        """Copy bytes between the two masters on the running event loop."""
        loop = asyncio.get_running_loop()
        a, b = self._masters
        loop.add_reader(a, self._copy, a, b)
        loop.add_reader(b, self._copy, b, a)

    @staticmethod
    def _copy(source: int, target: int) -> None:
        try:
            data = os.read(source, 4096)
        except OSError:
            return
        os.write(target, data)

    def close(self) -> None:
        """Stop copying and close every descriptor."""
        loop = asyncio.get_running_loop()
        for fd in self._masters:
            loop.remove_reader(fd)
            os.close(fd)
        for fd in self._slaves:
            os.close(fd)


async def start_rtu_server(port: str, behaviour: Behaviour) -> ModbusSerialServer:
    """pymodbus's RTU server on the tty ``port``."""
    server = ModbusSerialServer(
        make_devices(behaviour),
        framer=FramerType.RTU,
        port=port,
        baudrate=19200,
        timeout=1,
    )
    await server.serve_forever(background=True)
    return server
