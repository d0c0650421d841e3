"""The ``mqtt`` input kind: devices publishing on a local broker (Tasmota, ESPHome, Shelly, Z2M)."""

from __future__ import annotations

from agent.inputs.base import InputContext, register
from agent.inputs.mqtt.config import MqttInputConfig
from agent.inputs.mqtt.input import MqttInput


def _build(config: MqttInputConfig, context: InputContext) -> MqttInput:
    return MqttInput(config, context)


register("mqtt", MqttInputConfig, _build)

__all__ = ["MqttInput", "MqttInputConfig"]
