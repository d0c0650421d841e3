"""The ``modbus`` input kind: Modbus TCP and RTU devices, registers, coils and bit fields."""

from __future__ import annotations

from agent.inputs.base import InputContext, register
from agent.inputs.modbus.config import ModbusConfig
from agent.inputs.modbus.input import ModbusInput


def _build(config: ModbusConfig, context: InputContext) -> ModbusInput:
    return ModbusInput(config, context)


register("modbus", ModbusConfig, _build)

__all__ = ["ModbusConfig", "ModbusInput"]
