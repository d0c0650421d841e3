"""Configuration of the ``system`` input: the gateway's own health."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import Field

from agent.inputs.base import InputConfig
from agent.inputs.common import Duration

Group = Literal["cpu", "memory", "disk", "load", "temperature", "uptime", "agent"]
ALL_GROUPS: tuple[Group, ...] = ("cpu", "memory", "disk", "load", "temperature", "uptime", "agent")


class SystemConfig(InputConfig):
    """The gateway's own health: CPU, memory, disk, load, temperature, uptime, agent."""

    type: Literal["system"]
    interval: Duration = Field(default=30.0, ge=0.05, le=86400.0)
    # A collection slower than this (a hung file system under the buffer) is an error.
    timeout: Duration = Field(default=5.0, ge=0.01, le=600.0)
    # The device the readings belong to; by default the gateway's own id, so the gateway is
    # registered as a device of itself in the collector.
    device_id: uuid.UUID | None = None
    device_name: str = Field(default="gateway", min_length=1, max_length=128)
    groups: list[Group] = Field(default=list(ALL_GROUPS), min_length=1, max_length=len(ALL_GROUPS))
    # Prefix for /proc and /sys; "/" on a gateway.
    root: str = Field(default="/", min_length=1, max_length=4096)
