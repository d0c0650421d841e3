"""Configuration of the ``modbus`` input: one TCP endpoint or one serial bus, devices, fields."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.inputs.base import InputConfig, NamedPath
from agent.inputs.common import DeviceConfig, Duration, MetricName

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
Order = Literal["big", "little"]
Number = Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]

# Registers each data type occupies.
WIDTH: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
# The protocol's own ceilings per request (Modbus application protocol v1.1b3, §6.1-6.4).
MAX_REGISTERS_PER_REQUEST = 125
MAX_BITS_PER_REQUEST = 2000


def _places(number: float) -> int:
    """Decimal places of ``number`` as written (its shortest repr): 0.01 → 2, 1e-05 → 5, 5.0 → 0."""
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return min(15, max(0, -exponent)) if isinstance(exponent, int) else 0


class FieldConfig(BaseModel):
    """One value of a device: where it lives, how it is encoded, and the metric it becomes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: MetricName
    table: Table = "holding"
    # Protocol (zero-based) address: register 40001 in a manual is address 0 of "holding".
    address: int = Field(ge=0, le=65535)
    # Ignored for coils and discrete inputs, which are booleans.
    data_type: DataType = "uint16"
    # Order of the 16-bit words of a multi-register value; "little" is the common
    # "word-swapped" (CDAB) layout of many meters.
    word_order: Order = "big"
    # Order of the two bytes inside each word; "little" gives the rarer BADC/DCBA layouts.
    byte_order: Order = "big"
    scale: Number = 1.0
    offset: Number = 0.0
    # Decimal places of a scaled value; by default those the scale and offset imply (0.01 →
    # 2) for integer registers, so 2315 × 0.01 is stored as 23.15, not 23.150000000000002.
    # Float registers are rounded only when this is set.
    decimals: int | None = Field(default=None, ge=0, le=15)
    # A bit field of an integer register: bits [bit, bit + bit_count) counted from the least
    # significant bit; one bit gives a boolean, more give an integer. Scale/offset do not apply.
    bit: int | None = Field(default=None, ge=0, le=63)
    bit_count: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _check_layout(self) -> FieldConfig:
        if self.table in ("coil", "discrete"):
            if self.bit is not None:
                raise ValueError("bit: coils and discrete inputs are single bits already")
            return self
        if self.address + WIDTH[self.data_type] - 1 > 65535:
            raise ValueError(f"address: a {self.data_type} at {self.address} runs past 65535")
        if self.bit is not None:
            if self.data_type.startswith("float"):
                raise ValueError("bit: bit fields need an integer data_type, not a float")
            if self.bit + self.bit_count > 16 * WIDTH[self.data_type]:
                raise ValueError(
                    f"bit: bits {self.bit}..{self.bit + self.bit_count - 1} do not fit "
                    f"in a {self.data_type}"
                )
        return self

    @property
    def round_to(self) -> int | None:
        """Decimal places a scaled value is rounded to, or ``None`` to keep it as computed."""
        if self.decimals is not None:
            return self.decimals
        if self.data_type.startswith("float"):
            return None
        return max(_places(self.scale), _places(self.offset))

    @property
    def width(self) -> int:
        """Registers (or bits, for coil tables) this field occupies."""
        return 1 if self.table in ("coil", "discrete") else WIDTH[self.data_type]


class ModbusDevice(DeviceConfig):
    """One Modbus server (slave) reached through this input's connection."""

    unit: int = Field(default=1, ge=0, le=247)
    # None: use the input's value.
    timeout: Duration | None = Field(default=None, ge=0.01, le=60.0)
    retries: int | None = Field(default=None, ge=0, le=10)
    pause: Duration | None = Field(default=None, ge=0.0, le=10.0)
    fields: list[FieldConfig] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _unique_metrics(self) -> ModbusDevice:
        metrics = [field.metric for field in self.fields]
        duplicates = sorted({m for m in metrics if metrics.count(m) > 1})
        if duplicates:
            raise ValueError(f"fields: metric {duplicates[0]!r} appears twice")
        return self


class ModbusConfig(InputConfig):
    """Modbus TCP or RTU devices: registers, coils, discrete inputs and bit fields."""

    type: Literal["modbus"]
    transport: Literal["tcp", "rtu"] = "tcp"
    interval: Duration = Field(default=10.0, ge=0.05, le=86400.0)
    # TCP
    host: str | None = Field(default=None, min_length=1, max_length=253)
    port: int = Field(default=502, ge=1, le=65535)
    # RTU
    serial_port: str | None = Field(default=None, min_length=1, max_length=4096)
    baudrate: int = Field(default=9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    # Defaults for every device; a device may override them.
    timeout: Duration = Field(default=1.0, ge=0.01, le=60.0)
    retries: int = Field(default=1, ge=0, le=10)
    # Quiet time between requests: slow RS-485 converters and some PLCs drop requests that
    # follow each other too closely.
    pause: Duration = Field(default=0.0, ge=0.0, le=10.0)
    # Fields whose addresses are at most max_gap apart are read in one request, up to max_span
    # registers (or bits); 0 reads only truly contiguous fields together, since some devices
    # answer "illegal address" for unmapped registers in between.
    max_span: int = Field(default=MAX_REGISTERS_PER_REQUEST, ge=1, le=MAX_BITS_PER_REQUEST)
    max_gap: int = Field(default=0, ge=0, le=100)
    devices: list[ModbusDevice] = Field(min_length=1, max_length=247)

    @model_validator(mode="after")
    def _check_transport(self) -> ModbusConfig:
        if self.transport == "tcp" and self.host is None:
            raise ValueError("host: a tcp modbus input needs a host")
        if self.transport == "rtu" and self.serial_port is None:
            raise ValueError("serial_port: an rtu modbus input needs a serial_port")
        ids = [device.id for device in self.devices]
        if len(ids) != len(set(ids)):
            raise ValueError("devices: two devices have the same id")
        return self

    def named_paths(self) -> list[NamedPath]:
        """The serial port of an RTU bus (a USB adapter may be plugged in later)."""
        if self.transport != "rtu" or self.serial_port is None:
            return []
        return [NamedPath("serial_port", self.serial_port, "device", present=False)]
