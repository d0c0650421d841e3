"""The ``command`` input kind: readings from a program run on an interval or kept running."""

from __future__ import annotations

from agent.inputs.base import InputContext, register
from agent.inputs.command.config import CommandConfig
from agent.inputs.command.input import CommandInput


def _build(config: CommandConfig, context: InputContext) -> CommandInput:
    return CommandInput(config, context)


register("command", CommandConfig, _build)

__all__ = ["CommandConfig", "CommandInput"]
