"""The ``sysfs`` input kind: 1-wire DS18B20 probes, thermal zones, hwmon chips, number files."""

from __future__ import annotations

from agent.inputs.base import InputContext, register
from agent.inputs.sysfs.config import SysfsConfig
from agent.inputs.sysfs.input import SysfsInput


def _build(config: SysfsConfig, context: InputContext) -> SysfsInput:
    return SysfsInput(config, context)


register("sysfs", SysfsConfig, _build)

__all__ = ["SysfsConfig", "SysfsInput"]
