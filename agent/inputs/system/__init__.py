"""The ``system`` input kind: the gateway's own health as readings of a gateway device."""

from __future__ import annotations

from agent.inputs.base import InputContext, register
from agent.inputs.system.config import SystemConfig
from agent.inputs.system.input import SystemInput


def _build(config: SystemConfig, context: InputContext) -> SystemInput:
    return SystemInput(config, context)


register("system", SystemConfig, _build)

__all__ = ["SystemConfig", "SystemInput"]
